"""The model catalog and the rules a video request must meet on a model (SPEC 4.1, 5.2).

Pure domain: which models the market sells, their constraints and defaults, and what a request
on a model becomes once those defaults apply. Reading a provider's catalog off the wire is the
provider adapter's job (``adapters.venice.parse_venice_models``); checking the shape of an HTTP
body and turning a broken rule into an error code is the API's (``api.validation``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

ALIASES: dict[str, str] = {"venice-video-gen": "venice-seedance-2-fast-t2v"}

# SPEC 4.1: a prompt is 1..2000 characters, whatever more a provider would take.
MAX_PROMPT_CHARS = 2000
# SPEC 5.2: when a provider names no default aspect ratio, 16:9 is the conventional one.
FALLBACK_ASPECT_RATIO = "16:9"

_RESOLUTION_P = re.compile(r"([0-9]+)p", re.ASCII | re.IGNORECASE)
_RESOLUTION_K = re.compile(r"([0-9]+)k", re.ASCII | re.IGNORECASE)


def _resolution_rank(resolution: str) -> int:
    if match := _RESOLUTION_P.fullmatch(resolution):
        return int(match.group(1))
    if match := _RESOLUTION_K.fullmatch(resolution):
        return int(match.group(1)) * 540
    return 1_000_000


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
    prompt_character_limit: int = MAX_PROMPT_CHARS

    @classmethod
    def offered(
        cls,
        *,
        provider: str,
        provider_model: str,
        name: str,
        image_input: bool,
        durations: Iterable[int],
        resolutions: tuple[str, ...],
        aspect_ratios: tuple[str, ...],
        audio: bool,
        audio_configurable: bool,
        prompt_character_limit: int,
    ) -> ModelSpec:
        """A provider's model as the market sells it: its id, aliases and defaults derived.

        The defaults are the cheapest request (the lowest resolution) in 16:9 where the model
        has it: providers price per second and resolution and name no defaults for video.
        """
        model_id = f"{provider}-{provider_model}"
        default_aspect_ratio = None
        if aspect_ratios:
            default_aspect_ratio = (
                FALLBACK_ASPECT_RATIO
                if FALLBACK_ASPECT_RATIO in aspect_ratios
                else aspect_ratios[0]
            )
        return cls(
            id=model_id,
            provider=provider,
            provider_model=provider_model,
            name=name,
            image_input=image_input,
            durations=tuple(sorted(set(durations))),
            resolutions=resolutions,
            aspect_ratios=aspect_ratios,
            audio=audio,
            default_resolution=min(resolutions, key=_resolution_rank) if resolutions else None,
            default_aspect_ratio=default_aspect_ratio,
            aliases=tuple(sorted(alias for alias, target in ALIASES.items() if target == model_id)),
            # A model without audio has nothing to switch; only one with audio can be fixed on.
            audio_configurable=audio_configurable or not audio,
            prompt_character_limit=prompt_character_limit,
        )

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


# ---------------------------------------------------------------------- a request on a model


class ModelConstraintError(ValueError):
    """A request the model cannot take; ``param`` names the request field at fault."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class PromptTooLong(ModelConstraintError):
    pass


class UnsupportedParameter(ModelConstraintError):
    """A value (or a parameter at all) the model does not offer."""


class MissingParameter(ModelConstraintError):
    """A parameter the model needs and the request left out."""


T = TypeVar("T")


def _choice(name: str, value: T | None, allowed: tuple[T, ...], default: T, model: ModelSpec) -> T:
    """An optional parameter that must be one of the model's values; None means the default."""
    if value is None:
        return default
    if not allowed:
        raise UnsupportedParameter(name, f"model {model.id} does not take {name}")
    if value not in allowed:
        one_of = ", ".join(str(v) for v in allowed)
        raise UnsupportedParameter(name, f"{name} must be one of {one_of} for model {model.id}")
    return value


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

    @classmethod
    def on_model(
        cls,
        model: ModelSpec,
        *,
        prompt: str,
        duration_seconds: int | None = None,
        resolution: str | None = None,
        aspect_ratio: str | None = None,
        audio: bool | None = None,
        image_url: str | None = None,
        webhook_url: str | None = None,
        metadata: dict[str, Any] | None = None,
        max_cost: int | None = None,
    ) -> VideoRequest:
        """The request with the model's defaults for what is None, checked against the model's
        constraints in the order a client would fix them; ModelConstraintError otherwise."""
        limit = model.prompt_limit
        if len(prompt) > limit:
            raise PromptTooLong("prompt", f"prompt must be at most {limit} characters")
        duration = _choice(
            "duration_seconds", duration_seconds, model.durations, model.default_duration, model
        )
        resolution = _choice(
            "resolution", resolution, model.resolutions, model.default_resolution, model
        )
        aspect_ratio = _choice(
            "aspect_ratio", aspect_ratio, model.aspect_ratios, model.default_aspect_ratio, model
        )
        if audio is None:
            audio = model.default_audio
        elif audio and not model.audio:
            raise UnsupportedParameter("audio", f"model {model.id} does not generate audio")
        elif not audio and not model.audio_configurable:
            raise UnsupportedParameter("audio", f"model {model.id} always generates audio")
        if model.image_input and image_url is None:
            raise MissingParameter("image_url", f"image_url is required for model {model.id}")
        if not model.image_input and image_url is not None:
            raise UnsupportedParameter(
                "image_url", f"model {model.id} does not take an input image"
            )
        return cls(
            model=model,
            prompt=prompt,
            duration_seconds=duration,
            resolution=resolution,
            aspect_ratio=aspect_ratio,
            audio=audio,
            image_url=image_url,
            webhook_url=webhook_url,
            metadata=dict(metadata or {}),
            max_cost=max_cost,
        )

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
