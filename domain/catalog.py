"""The model catalog and the validation of a video submit (SPEC 4.1, 5.1).

Pure: the catalog is parsed from a payload the adapter fetched, and webhook hosts are checked
only as written. Resolving a webhook host name and refusing private addresses it resolves to is
the webhook adapter's job, at send time (a name can change what it points to after submit).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar, cast
from urllib.parse import SplitResult, urlsplit

ALIASES: dict[str, str] = {"venice-video-gen": "venice-seedance-2-fast-t2v"}

MAX_PROMPT_CHARS = 2000
# Venice's prompt limit for a video model that states none (its /models documentation).
VENICE_PROMPT_LIMIT = 2500
MAX_URL_CHARS = 2048
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 40
MAX_METADATA_VALUE_CHARS = 500
# Integers beyond 2**53 lose precision in JavaScript clients, so they could not be echoed intact.
MAX_METADATA_INT = 2**53 - 1
# A buyer's own ceiling (max_cost_usdc): as large as any deposit may be.
MAX_CEILING_USDC = 10**15
_MICROS = re.compile(r"0|[1-9][0-9]*", re.ASCII)
# SPEC 5.2: when a provider names no default aspect ratio, 16:9 is the conventional one.
FALLBACK_ASPECT_RATIO = "16:9"

_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)
_DURATION = re.compile(r"([1-9][0-9]{0,3})s", re.ASCII)
_DATA_IMAGE_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+(;[^,]*)?,.+", re.ASCII | re.DOTALL)
_RESOLUTION_P = re.compile(r"([0-9]+)p", re.ASCII | re.IGNORECASE)
_RESOLUTION_K = re.compile(r"([0-9]+)k", re.ASCII | re.IGNORECASE)
# Hosts such as "127.1", "2130706433" or "0x7f.0.0.1" are not DNS names (no TLD is numeric),
# yet many resolvers read them as IPv4 addresses; they are refused rather than guessed at.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*", re.ASCII | re.IGNORECASE)


@dataclass(frozen=True)
class ModelSpec:
    id: str
    provider: str
    provider_model: str
    name: str
    image_input: bool
    durations: tuple[int, ...]
    # Empty when the provider defines none for the model: the parameter is then never sent.
    resolutions: tuple[str, ...]
    aspect_ratios: tuple[str, ...]
    audio: bool
    default_resolution: str | None
    default_aspect_ratio: str | None
    aliases: tuple[str, ...] = ()
    # False for a model that always generates audio (it cannot be switched off).
    audio_configurable: bool = True
    prompt_character_limit: int = VENICE_PROMPT_LIMIT

    @property
    def default_duration(self) -> int:
        # Providers price per second, so the shortest duration is the cheapest one.
        return min(self.durations)

    @property
    def default_audio(self) -> bool:
        """The marketplace's default: audio off wherever the model lets it be off."""
        return self.audio and not self.audio_configurable

    @property
    def prompt_limit(self) -> int:
        return min(MAX_PROMPT_CHARS, self.prompt_character_limit)


def _resolution_rank(resolution: str) -> int:
    if match := _RESOLUTION_P.fullmatch(resolution):
        return int(match.group(1))
    if match := _RESOLUTION_K.fullmatch(resolution):
        return int(match.group(1)) * 540
    return 1_000_000


def _parse_durations(raw: object) -> tuple[int, ...] | None:
    """Venice lists durations as ``"5s"`` strings; entries that are no fixed length (``"auto"``,
    ``"-1"``, ``"1 gen"``) are left out, and a model left with none cannot be priced."""
    if not isinstance(raw, list):
        return None
    durations: set[int] = set()
    for item in raw:
        if isinstance(item, str) and (match := _DURATION.fullmatch(item)):
            durations.add(int(match.group(1)))
    return tuple(sorted(durations)) or None


def _parse_labels(raw: object) -> tuple[str, ...] | None:
    """A list of option labels; empty means the model takes no such parameter. A lone string is
    read as a list of one, as Venice's own model browser does."""
    if isinstance(raw, str) and raw:
        return (raw,)
    if not isinstance(raw, list):
        return None
    if not all(isinstance(item, str) and item for item in raw):
        return None
    return tuple(dict.fromkeys(raw))


def _parse_venice_model(provider: str, item: object) -> ModelSpec | None:
    """One entry of Venice's ``GET /models?type=video`` (``ModelResponse`` with the video
    constraints: ``durations``, ``resolutions``, ``aspect_ratios``, ``model_type``, ``audio``,
    ``audio_configurable``, ``prompt_character_limit``); None for one the market can't sell."""
    if not isinstance(item, dict) or item.get("type") != "video":
        return None
    provider_model = item.get("id")
    if not isinstance(provider_model, str) or not _MODEL_ID.fullmatch(provider_model):
        return None
    spec = item.get("model_spec")
    if not isinstance(spec, dict) or spec.get("offline") is True:
        return None
    constraints = spec.get("constraints")
    if not isinstance(constraints, dict):
        return None
    # Video-to-video models need a source video, which the market's requests cannot carry.
    model_type = constraints.get("model_type")
    if model_type not in ("text-to-video", "image-to-video"):
        return None

    durations = _parse_durations(constraints.get("durations"))
    resolutions = _parse_labels(constraints.get("resolutions"))
    aspect_ratios = _parse_labels(constraints.get("aspect_ratios"))
    if durations is None or resolutions is None or aspect_ratios is None:
        return None
    audio = constraints.get("audio")
    configurable = constraints.get("audio_configurable")
    if not isinstance(audio, bool) or not isinstance(configurable, bool):
        return None
    limit = constraints.get("prompt_character_limit", VENICE_PROMPT_LIMIT)
    # JSON that Python reads may hold Infinity or NaN (1e400 is one): no limit to convert.
    if (
        isinstance(limit, bool)
        or not isinstance(limit, int | float)
        or not math.isfinite(limit)
        or limit < 1
    ):
        limit = VENICE_PROMPT_LIMIT

    # Venice names no defaults for video; SPEC 5.2's convention is the lowest resolution
    # (the cheapest) and 16:9.
    default_resolution = min(resolutions, key=_resolution_rank) if resolutions else None
    default_aspect_ratio = None
    if aspect_ratios:
        default_aspect_ratio = (
            FALLBACK_ASPECT_RATIO if FALLBACK_ASPECT_RATIO in aspect_ratios else aspect_ratios[0]
        )

    model_id = f"{provider}-{provider_model}"
    name = spec.get("name")
    return ModelSpec(
        id=model_id,
        provider=provider,
        provider_model=provider_model,
        name=name if isinstance(name, str) and name else provider_model,
        image_input=model_type == "image-to-video",
        durations=durations,
        resolutions=resolutions,
        aspect_ratios=aspect_ratios,
        audio=audio,
        default_resolution=default_resolution,
        default_aspect_ratio=default_aspect_ratio,
        aliases=tuple(sorted(alias for alias, target in ALIASES.items() if target == model_id)),
        # A model without audio has nothing to switch; only one with audio can be fixed on.
        audio_configurable=configurable or not audio,
        prompt_character_limit=int(limit),
    )


def parse_venice_models(provider: str, payload: list[dict[str, Any]]) -> list[ModelSpec]:
    """The video models of a provider's ``GET /models?type=video`` ``data`` list.

    One odd entry must not take the whole catalog down, so malformed entries are skipped; the
    first of two entries with the same id wins.
    """
    if not isinstance(payload, list):
        return []
    models: dict[str, ModelSpec] = {}
    for item in payload:
        model = _parse_venice_model(provider, item)
        if model is not None and model.id not in models:
            models[model.id] = model
    return list(models.values())


class Catalog:
    def __init__(self, models: Iterable[ModelSpec], aliases: Mapping[str, str] = ALIASES) -> None:
        by_id: dict[str, ModelSpec] = {}
        for model in models:
            by_id.setdefault(model.id, model)
        alias_map: dict[str, str] = {}
        for model in by_id.values():
            for alias in model.aliases:
                alias_map.setdefault(alias, model.id)
        for alias, target in aliases.items():
            alias_map.setdefault(alias, target)
        # A real model id always beats an alias of the same name, and an alias whose target is
        # not (or no longer) listed resolves to nothing rather than to a stale model.
        self._aliases = {
            alias: target
            for alias, target in alias_map.items()
            if alias not in by_id and target in by_id
        }
        self._models = {
            model_id: replace(
                model,
                aliases=tuple(sorted(a for a, t in self._aliases.items() if t == model_id)),
            )
            for model_id, model in by_id.items()
        }

    def resolve(self, model_id_or_alias: str) -> ModelSpec | None:
        model = self._models.get(model_id_or_alias)
        if model is not None:
            return model
        target = self._aliases.get(model_id_or_alias)
        return self._models.get(target) if target is not None else None

    def models(self) -> list[ModelSpec]:
        return sorted(self._models.values(), key=lambda model: model.id)


class RequestError(ValueError):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    def __repr__(self) -> str:
        return f"RequestError(code={self.code!r}, param={self.param!r}, message={self.message!r})"


def _invalid(param: str | None, message: str) -> RequestError:
    return RequestError("invalid_request", message, param)


def _unsupported(param: str, message: str) -> RequestError:
    return RequestError("unsupported_parameter", message, param)


@dataclass(frozen=True)
class VideoRequest:
    model: ModelSpec
    prompt: str
    duration_seconds: int
    resolution: str | None
    aspect_ratio: str | None
    audio: bool
    image_url: str | None
    webhook_url: str | None
    metadata: dict[str, Any] = field(default_factory=dict)
    # The buyer's own ceiling (SPEC 1): becomes the hold instead of the estimate plus 10%.
    max_cost: int | None = None

    def provider_params(self) -> dict[str, Any]:
        """The body of the provider's ``/video/quote`` (SPEC 5.1), also the pricing parameters.

        ``audio`` is sent explicitly (even ``false``) to models that support it, because Venice
        defaults it to on and would bill for audio the buyer did not ask for; models without
        audio never see the field, nor a model the resolution or aspect ratio it doesn't take.
        """
        params: dict[str, Any] = {
            "model": self.model.provider_model,
            "duration": f"{self.duration_seconds}s",
        }
        if self.resolution is not None:
            params["resolution"] = self.resolution
        if self.aspect_ratio is not None:
            params["aspect_ratio"] = self.aspect_ratio
        if self.model.audio:
            params["audio"] = self.audio
        return params

    def queue_params(self) -> dict[str, Any]:
        """The body of the provider's ``/video/queue``: the quote parameters plus the content."""
        params = self.provider_params()
        params["prompt"] = self.prompt
        if self.image_url is not None:
            params["image_url"] = self.image_url
        return params

    def canonical(self) -> dict[str, Any]:
        canonical = {
            "model": self.model.id,
            "prompt": self.prompt,
            "duration_seconds": self.duration_seconds,
            "resolution": self.resolution,
            "aspect_ratio": self.aspect_ratio,
            "audio": self.audio,
            "image_url": self.image_url,
            "webhook_url": self.webhook_url,
            "metadata": self.metadata,
        }
        # Only when sent: requests made before the field existed keep their fingerprints.
        if self.max_cost is not None:
            canonical["max_cost_usdc"] = str(self.max_cost)
        return canonical

    def fingerprint(self) -> str:
        """SHA-256 over the request after aliases and defaults are applied.

        So a retry that spells the model by its alias, or states a default explicitly, is the
        same request; two requests that would run differently never share a fingerprint.
        """
        canonical = json.dumps(
            self.canonical(),
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


_FIELD_TYPES: dict[str, tuple[type, str]] = {
    "model": (str, "a string"),
    "prompt": (str, "a string"),
    "duration_seconds": (int, "an integer"),
    "image_url": (str, "a string"),
    "resolution": (str, "a string"),
    "aspect_ratio": (str, "a string"),
    "audio": (bool, "a boolean"),
    "webhook_url": (str, "a string"),
    "metadata": (dict, "an object"),
    "max_cost_usdc": (str, "a decimal string of microdollars"),
}
_REQUIRED = ("model", "prompt")


def _has_type(value: object, expected: type) -> bool:
    if expected is int:
        # bool is a subclass of int in Python, but JSON's true is not a number.
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _one_of(values: Iterable[object]) -> str:
    return ", ".join(str(value) for value in values)


def _check_prompt(prompt: str, model: ModelSpec) -> None:
    limit = model.prompt_limit
    if len(prompt) > limit:
        raise RequestError(
            "prompt_too_long", f"prompt must be at most {limit} characters", "prompt"
        )
    if not prompt.strip():
        raise _invalid("prompt", "prompt must not be empty")


def _check_image_url(url: str) -> None:
    if url[:5].lower() == "data:":
        if not _DATA_IMAGE_URL.fullmatch(url):
            raise _invalid("image_url", "image_url must be a data:image/...;base64,... URL")
        return
    if len(url) > MAX_URL_CHARS:
        raise _invalid("image_url", f"image_url must be at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (urlsplit only checks the port when it is read)
    except ValueError as e:
        raise _invalid("image_url", "image_url is not a valid URL") from e
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _invalid("image_url", "image_url must be an http(s) or data: URL")


def _host_is_private(host: str) -> bool:
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def _check_webhook_url(url: str, *, allow_http: bool, allow_private: bool) -> None:
    if len(url) > MAX_URL_CHARS:
        raise _invalid("webhook_url", f"webhook_url must be at most {MAX_URL_CHARS} characters")
    try:
        parts: SplitResult = urlsplit(url)
        parts.port  # noqa: B018  (urlsplit only checks the port when it is read)
    except ValueError as e:
        raise _invalid("webhook_url", "webhook_url is not a valid URL") from e
    scheme = parts.scheme.lower()
    allowed = ("https", "http") if allow_http else ("https",)
    if scheme not in allowed:
        message = (
            "webhook_url must be an http(s) URL" if allow_http else "webhook_url must be https"
        )
        raise _invalid("webhook_url", message)
    host = parts.hostname
    if not host:
        raise _invalid("webhook_url", "webhook_url must name a host")
    last_label = host.rstrip(".").rsplit(".", 1)[-1]
    if not _is_ip_literal(host) and _NUMERIC_LABEL.fullmatch(last_label):
        raise _invalid(
            "webhook_url", "webhook_url host must be a domain name or a standard IP address"
        )
    if not allow_private and _host_is_private(host):
        raise _invalid("webhook_url", "webhook_url must not point to a private or local address")


def _parse_ceiling(text: str) -> int:
    # The length first: int() of thousands of digits is refused by Python itself.
    too_long = len(text) > len(str(MAX_CEILING_USDC))
    if too_long or not _MICROS.fullmatch(text) or int(text) > MAX_CEILING_USDC:
        raise _invalid(
            "max_cost_usdc",
            "max_cost_usdc must be a whole number of microdollars written as a decimal string "
            f'such as "250000", at most {MAX_CEILING_USDC}',
        )
    return int(text)


def _check_metadata(metadata: dict[Any, Any]) -> dict[str, Any]:
    if len(metadata) > MAX_METADATA_KEYS:
        raise _invalid("metadata", f"metadata must have at most {MAX_METADATA_KEYS} keys")
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or len(key) > MAX_METADATA_KEY_CHARS:
            raise _invalid(
                "metadata",
                f"metadata keys must be strings of 1 to {MAX_METADATA_KEY_CHARS} characters",
            )
        if isinstance(value, str):
            if len(value) > MAX_METADATA_VALUE_CHARS:
                raise _invalid(
                    "metadata",
                    f"metadata value for {key!r} must be at most "
                    f"{MAX_METADATA_VALUE_CHARS} characters",
                )
        elif isinstance(value, bool) or value is None:
            pass
        elif isinstance(value, int):
            if abs(value) > MAX_METADATA_INT:
                raise _invalid("metadata", f"metadata value for {key!r} is too large")
        elif isinstance(value, float):
            # Python's json accepts NaN and Infinity, which could not be echoed back as JSON.
            if not math.isfinite(value):
                raise _invalid("metadata", f"metadata value for {key!r} must be finite")
        else:
            raise _invalid(
                "metadata",
                f"metadata value for {key!r} must be a string, number, boolean or null",
            )
    return dict(metadata)


T = TypeVar("T")


def _choice(
    body: dict[str, Any], field: str, allowed: tuple[T, ...], default: T, model: ModelSpec
) -> T:
    """An optional field that must be one of the model's values; omitted means the default."""
    value = body.get(field)
    if value is None:
        return default
    if not allowed:
        raise _unsupported(field, f"model {model.id} does not take {field}")
    if value not in allowed:
        raise _unsupported(field, f"{field} must be one of {_one_of(allowed)} for model {model.id}")
    return cast(T, value)


def validate_video_request(
    body: object,
    catalog: Catalog,
    *,
    allow_http_webhooks: bool,
    allow_private_webhooks: bool,
) -> VideoRequest:
    """A submit body checked against SPEC 4.1 and the model's constraints, defaults applied.

    Checks run shape first (unknown fields, types, required fields), then the model, then each
    value, so the error a client sees first is the most basic thing wrong. An optional field sent
    as ``null`` counts as omitted, as SDKs commonly send unset fields that way.
    """
    if not isinstance(body, dict):
        raise _invalid(None, "request body must be a JSON object")
    for name in body:
        if name not in _FIELD_TYPES:
            raise _invalid(str(name), f"unknown field {str(name)!r}")
    for name, (expected, description) in _FIELD_TYPES.items():
        value = body.get(name)
        if value is None and name not in _REQUIRED:
            continue
        if name in _REQUIRED and name not in body:
            continue
        if not _has_type(value, expected):
            raise _invalid(name, f"{name} must be {description}")
    for name in _REQUIRED:
        if name not in body:
            raise _invalid(name, f"{name} is required")

    model_name: str = body["model"]
    model = catalog.resolve(model_name)
    if model is None:
        raise RequestError("model_not_found", f"model {model_name!r} does not exist", "model")

    prompt: str = body["prompt"]
    _check_prompt(prompt, model)

    duration = _choice(body, "duration_seconds", model.durations, model.default_duration, model)
    resolution = _choice(body, "resolution", model.resolutions, model.default_resolution, model)
    aspect_ratio = _choice(
        body, "aspect_ratio", model.aspect_ratios, model.default_aspect_ratio, model
    )

    audio = body.get("audio")
    if audio is None:
        audio = model.default_audio
    elif audio and not model.audio:
        raise _unsupported("audio", f"model {model.id} does not generate audio")
    elif not audio and not model.audio_configurable:
        raise _unsupported("audio", f"model {model.id} always generates audio")

    image_url = body.get("image_url")
    if model.image_input:
        if image_url is None:
            raise _invalid("image_url", f"image_url is required for model {model.id}")
        _check_image_url(image_url)
    elif image_url is not None:
        raise _unsupported("image_url", f"model {model.id} does not take an input image")

    webhook_url = body.get("webhook_url")
    if webhook_url is not None:
        _check_webhook_url(
            webhook_url, allow_http=allow_http_webhooks, allow_private=allow_private_webhooks
        )

    metadata = body.get("metadata")
    metadata = {} if metadata is None else _check_metadata(metadata)

    ceiling = body.get("max_cost_usdc")
    max_cost = None if ceiling is None else _parse_ceiling(ceiling)

    return VideoRequest(
        model=model,
        prompt=prompt,
        duration_seconds=duration,
        resolution=resolution,
        aspect_ratio=aspect_ratio,
        audio=audio,
        image_url=image_url,
        webhook_url=webhook_url,
        metadata=metadata,
        max_cost=max_cost,
    )
