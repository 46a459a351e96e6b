"""The engine's client for the Venice video protocol (SPEC 5.1, Venice's own OpenAPI).

Every outcome the engine must act on differently is its own exception class, because the
money rules hinge on them: a refusal before acceptance may fail over to the next seller, a
rejection of the request itself may not, and an unknown outcome must never be retried
elsewhere since the provider may already have billed the seller.

What a provider answers in an error body is never shown to buyers or sellers: a provider URL
may be one a seller typed (SPEC 9), and its body then is whatever that host chose to say.
Each error carries ``message``, written here from the status and Venice's documented machine
codes, for people; and ``detail``, a short redacted excerpt of the body, for the operator's logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from functools import wraps
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import aiohttp

from adapters.outbound import Outbound, OutboundRefused
from domain.catalog import ModelSpec
from domain.money import MoneyError, usd_to_micros

_T = TypeVar("_T")
_P = ParamSpec("_P")

# Upstream bodies kept for logs are cut short: enough to diagnose, not a place to dump data.
MAX_DETAIL_CHARS = 300
DOWNLOAD_CHUNK_BYTES = 1 << 20
# A provider's video beyond this is refused mid-download instead of filling the disk.
MAX_VIDEO_BYTES = 4 << 30

# What each status means for the engine, in its own words (Venice's error-codes page).
_STATUS_TEXT = {
    400: "the provider rejected the request as invalid",
    401: "the provider rejected the API key",
    402: "the provider account has insufficient balance",
    403: "the provider refused access to this model",
    404: "the provider has no such job",
    409: "the provider account needs to give consent before this model can be used",
    410: "the provider no longer has this job",
    413: "the request is too large for the provider",
    415: "the provider refused the request's content type",
    422: "the provider's content policy rejected the request",
    429: "the provider rate-limited the account",
    500: "the provider failed to process the request",
    502: "the provider's gateway failed",
    503: "the provider is at capacity",
    504: "the provider timed out",
}


class ProviderError(Exception):
    # What kind of failure this is, for the operator's counts (``error_kind``): one word per
    # class, so the label stays bounded whatever a provider answers.
    kind = "error"

    def __init__(self, status: int, message: str, detail: str = "", code: str = "") -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        # Safe to show to buyers and sellers: written by the engine, never copied from upstream.
        self.message = message
        # For logs only: a redacted excerpt of what the provider said.
        self.detail = detail
        # Venice's machine code where it documents one (``needs_consent``, ...).
        self.code = code


class QuoteFailed(ProviderError):
    """No price could be obtained; the offer is simply not a candidate for this request."""

    kind = "quote_failed"


class ProviderRefused(ProviderError):
    """The provider answered and did not accept the job: failing over is safe."""

    kind = "refused"


class ProviderRejected(ProviderError):
    """The request itself is invalid; another seller would reject it too."""

    kind = "rejected"


class ProviderUnknown(ProviderError):
    """It is unknown whether the provider accepted (and billed) the job."""

    kind = "unknown"

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(0, message, detail)


class ProviderLost(ProviderError):
    """The provider no longer knows the job (unknown or expired queue id or download link)."""

    kind = "lost"


class ProviderContentPolicy(ProviderError):
    kind = "content_policy"


class ProviderInferenceFailed(ProviderError):
    kind = "inference_failed"


class ProviderTransient(ProviderError):
    """Try again later; nothing is known to be wrong with the job itself."""

    kind = "transient"


@dataclass(frozen=True)
class VideoParams:
    model: str
    duration_seconds: int
    resolution: str | None = None
    aspect_ratio: str | None = None
    audio: bool | None = None

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "duration": f"{self.duration_seconds}s"}
        if self.resolution is not None:
            body["resolution"] = self.resolution
        if self.aspect_ratio is not None:
            body["aspect_ratio"] = self.aspect_ratio
        if self.audio is not None:
            body["audio"] = self.audio
        return body

    def queue_body(self, prompt: str, image_url: str | None) -> dict[str, Any]:
        """The body of ``/video/queue``: the quote's parameters plus the content."""
        body = self.body()
        body["prompt"] = prompt
        if image_url is not None:
            body["image_url"] = image_url
        return body


# ---------------------------------------------------------------------- GET /models?type=video

# Venice's prompt limit for a video model that states none (its /models documentation).
VENICE_PROMPT_LIMIT = 2500
_MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*", re.ASCII)
_DURATION = re.compile(r"([1-9][0-9]{0,3})s", re.ASCII)


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


def _prompt_limit(raw: object) -> int:
    # JSON that Python reads may hold Infinity or NaN (1e400 is one): no limit to convert.
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        return VENICE_PROMPT_LIMIT
    return int(raw) if raw >= 1 else VENICE_PROMPT_LIMIT


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
    name = spec.get("name")
    return ModelSpec.offered(
        provider=provider,
        provider_model=provider_model,
        name=name if isinstance(name, str) and name else provider_model,
        image_input=model_type == "image-to-video",
        durations=durations,
        resolutions=resolutions,
        aspect_ratios=aspect_ratios,
        audio=audio,
        audio_configurable=configurable,
        prompt_character_limit=_prompt_limit(
            constraints.get("prompt_character_limit", VENICE_PROMPT_LIMIT)
        ),
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


@dataclass(frozen=True)
class Queued:
    queue_id: str
    # Venice's pre-signed link for models that deliver the video there, not from retrieve.
    download_url: str | None = None


@dataclass(frozen=True)
class Processing:
    average_execution_time_ms: int | None
    execution_duration_ms: int | None


@dataclass(frozen=True)
class Completed:
    """The video, downloaded to ``path``."""

    path: Path
    bytes: int


@dataclass(frozen=True)
class Finished:
    """Retrieve says ``COMPLETED`` without the video: it is at the queue answer's download_url."""


Retrieved = Processing | Completed | Finished

# Refusals by the seller's account or the provider's capacity: nothing was accepted, another
# seller may take the job. 409 is Venice's needs_consent, an account matter.
_QUEUE_REFUSED = {401, 402, 403, 408, 409, 429}
# A gateway timeout means the request may have reached the provider and been accepted there.
_QUEUE_UNKNOWN = {504}


def _optional_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


# Venice's machine codes (its error-codes page and OpenAPI) that the engine names to people.
# Anything else in a code field is upstream text like the rest of the body: not repeated.
KNOWN_CODES = frozenset(
    {
        "needs_consent",
        "provider_content_policy",
        "PAYLOAD_TOO_LARGE",
        "AUTHENTICATION_FAILED",
        "AUTHENTICATION_FAILED_INACTIVE_KEY",
        "PRO_ONLY_MODEL",
        "INSUFFICIENT_BALANCE",
        "API_KEY_USD_SPEND_LIMIT_EXCEEDED",
        "API_KEY_DIEM_SPEND_LIMIT_EXCEEDED",
        "UNAUTHORIZED",
        "API_ACCESS_DISABLED",
        "INVALID_REQUEST",
        "INVALID_MODEL",
        "REQUEST_ID_NOT_FOUND",
        "MODEL_NOT_FOUND",
        "MEDIA_NOT_FOUND",
        "CONTENT_POLICY_VIOLATION",
        "RATE_LIMIT_EXCEEDED",
        "MODEL_OVERLOADED",
        "INFERENCE_FAILED",
        "UNKNOWN_ERROR",
        "MODEL_OFFLINE",
        "MODEL_AT_CAPACITY",
        "REQUEST_TIMEOUT",
    }
)


def _error_code(parsed: object) -> str:
    """Venice's machine code in an error body, where its shapes carry a known one."""
    if not isinstance(parsed, dict):
        return ""
    error = parsed.get("error")
    candidates = [parsed.get("code")]
    if isinstance(error, dict):
        candidates = [error.get("code"), error.get("type"), *candidates]
    return next((c for c in candidates if isinstance(c, str) and c in KNOWN_CODES), "")


def describe(status: int, code: str = "") -> str:
    """What a provider's error status means, for buyers and sellers."""
    text = _STATUS_TEXT.get(status, "the provider answered with an error")
    return f"{text} (HTTP {status}{', ' + code if code else ''})"


def error_kind(error: ProviderError) -> str:
    """A bounded name for what went wrong: the class's kind, or ``timeout`` when the provider
    (or the link) did not answer in time, whatever that meant for the job."""
    return "timeout" if isinstance(error.__cause__, TimeoutError) else error.kind


def _reported(
    call: Callable[Concatenate[VeniceClient, _P], Awaitable[_T]],
) -> Callable[Concatenate[VeniceClient, _P], Awaitable[_T]]:
    """Tell ``on_error`` of every failure a call ends in, once, as it leaves the client: the
    classes above are the classification, so no raise site has to remember to count."""

    @wraps(call)
    async def reported(self: VeniceClient, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await call(self, *args, **kwargs)
        except ProviderError as e:
            if self._on_error is not None:
                self._on_error(error_kind(e))
            raise

    return reported


class VeniceClient:
    """One provider base URL. ``outbound`` carries the HTTP sessions and, for a URL a seller or
    buyer supplied, the outbound policy every call passes through (SPEC 9)."""

    def __init__(
        self,
        outbound: Outbound,
        base_url: str,
        *,
        quote_timeout: float = 10.0,
        queue_timeout: float = 30.0,
        retrieve_timeout: float = 120.0,
        download_timeout: float = 600.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._outbound = outbound
        # Told the kind of each failure (``error_kind``), for the operator's metrics.
        self._on_error = on_error
        self._base = base_url.rstrip("/")
        self._quote_timeout = quote_timeout
        self._queue_timeout = queue_timeout
        self._retrieve_timeout = retrieve_timeout
        self._download_timeout = download_timeout

    @staticmethod
    def _timeout(total: float) -> aiohttp.ClientTimeout:
        # A connect that can't finish means nothing was sent, which queue may treat as a refusal.
        return aiohttp.ClientTimeout(total=total, connect=min(total, 10.0))

    @staticmethod
    def _headers(api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}", "Accept": "application/json, video/mp4"}

    @staticmethod
    def _detail(text: str, api_key: str | None = None) -> str:
        """An excerpt of an upstream body for logs, never with the key in it."""
        detail = " ".join(text.split())
        if api_key:
            detail = detail.replace(api_key, "[redacted]")
        if len(detail) > MAX_DETAIL_CHARS:
            detail = detail[:MAX_DETAIL_CHARS] + "…"
        return detail

    def _failure(self, cls: type[ProviderError], status: int, text: str, key: str) -> ProviderError:
        parsed: object = None
        with contextlib.suppress(ValueError):
            parsed = json.loads(text)
        code = _error_code(parsed)
        return cls(status, describe(status, code), self._detail(text, key), code)

    @staticmethod
    async def _text(resp: aiohttp.ClientResponse) -> str:
        """The body as text whatever its bytes: the status decides what happened, and an
        error body that is not UTF-8 must not turn a 404 into "no answer"."""
        return (await resp.read()).decode("utf-8", "replace")

    def _safe(self, error: BaseException, api_key: str | None = None) -> str:
        return self._detail(f"{type(error).__name__}: {error}", api_key)

    def _post(
        self, path: str, api_key: str, body: dict[str, Any], timeout: float, **kw: Any
    ) -> Any:
        """A POST to an API path, through the policy when the base URL is a user's."""
        return self._outbound.request(
            "POST",
            f"{self._base}{path}",
            json=body,
            headers=self._headers(api_key),
            timeout=self._timeout(timeout),
            provider="venice",
            **kw,
        )

    async def _exchange(
        self,
        path: str,
        api_key: str,
        body: dict[str, Any],
        *,
        refused: type[ProviderError],
        silent: type[ProviderError],
    ) -> tuple[int, str]:
        """One short call (within the quote timeout): its status and body, or ``refused`` when
        the outbound policy forbids it and ``silent`` when the provider did not answer."""
        try:
            async with self._post(path, api_key, body, self._quote_timeout) as r:
                return r.status, await self._text(r)
        except OutboundRefused as e:
            raise refused(0, f"the outbound policy refused the call: {e}") from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise silent(0, "the provider did not answer", self._safe(e, api_key)) from e

    @_reported
    async def list_models(self) -> list[dict[str, Any]]:
        try:
            async with self._outbound.request(
                "GET",
                f"{self._base}/models",
                params={"type": "video"},
                timeout=self._timeout(self._quote_timeout),
                provider="venice",
            ) as resp:
                text = await self._text(resp)
                if resp.status != 200:
                    raise self._failure(ProviderTransient, resp.status, text, "")
        except (aiohttp.ClientError, TimeoutError, OutboundRefused) as e:
            raise ProviderTransient(0, "the model catalog is unavailable", self._safe(e)) from e
        try:
            data = json.loads(text)["data"]
        except (ValueError, KeyError, TypeError) as e:
            raise ProviderTransient(200, "the model catalog is not the expected JSON") from e
        if not isinstance(data, list):
            raise ProviderTransient(200, "the model catalog's data is not a list")
        return [m for m in data if isinstance(m, dict)]

    @_reported
    async def quote(self, api_key: str, params: VideoParams) -> int:
        """The provider's list price for ``params`` in microdollars (rounded up)."""
        status, text = await self._exchange(
            "/video/quote", api_key, params.body(), refused=QuoteFailed, silent=QuoteFailed
        )
        if status != 200:
            raise self._failure(QuoteFailed, status, text, api_key)
        try:
            # Decimal straight from the JSON text: 0.42 must not pass through a binary float.
            amount = json.loads(text, parse_float=Decimal)["quote"]
            return usd_to_micros(amount)
        except (ValueError, KeyError, TypeError, MoneyError) as e:
            raise QuoteFailed(
                status, "the provider's quote is unusable", self._detail(text, api_key)
            ) from e

    @_reported
    async def check_key(self, api_key: str, model: str) -> None:
        """Whether the provider accepts ``api_key``, at no cost: Venice's quote is public, so a
        retrieve of a queue id that cannot exist is the probe (404 means the key got through).
        Raises ``ProviderRefused`` for a refused key, ``ProviderTransient`` if it can't tell."""
        body = {"model": model, "queue_id": str(uuid.uuid4())}
        status, text = await self._exchange(
            "/video/retrieve", api_key, body, refused=ProviderRefused, silent=ProviderTransient
        )
        if status in (404, 410):
            return
        if status in (401, 402, 403):
            raise self._failure(ProviderRefused, status, text, api_key)
        raise self._failure(ProviderTransient, status, text, api_key)

    @_reported
    async def queue(
        self, api_key: str, params: VideoParams, prompt: str, image_url: str | None
    ) -> Queued:
        """Submit a job; the provider bills the seller when this returns a queue id."""
        body = params.queue_body(prompt, image_url)
        try:
            async with self._post(
                "/video/queue", api_key, body, self._queue_timeout, fresh=True
            ) as resp:
                status = resp.status
                try:
                    text = await self._text(resp)
                except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as e:
                    if 200 <= status < 300:
                        raise ProviderUnknown(
                            f"the provider answered {status} but its answer was lost",
                            self._safe(e, api_key),
                        ) from e
                    text = ""
        except OutboundRefused as e:
            # Refused before any connection: the provider never saw the job.
            raise ProviderRefused(0, f"the outbound policy refused the call: {e}") from e
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
            # Raised before the request could be written: the provider never saw it.
            raise ProviderRefused(
                0, "the provider could not be reached", self._safe(e, api_key)
            ) from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ProviderUnknown(
                "the provider did not answer the queue call", self._safe(e, api_key)
            ) from e
        if 200 <= status < 300:
            return self._queued(status, text, api_key)
        if status in _QUEUE_UNKNOWN:
            raise self._unknown(status, text, api_key)
        if status == 422:
            # Venice's ContentViolationError: the prompt itself, whoever's account runs it.
            raise self._failure(ProviderContentPolicy, status, text, api_key)
        if status in _QUEUE_REFUSED or status >= 500 or status < 400:
            raise self._failure(ProviderRefused, status, text, api_key)
        raise self._failure(ProviderRejected, status, text, api_key)

    def _unknown(self, status: int, text: str, api_key: str) -> ProviderUnknown:
        return ProviderUnknown(describe(status), self._detail(text, api_key))

    def _queued(self, status: int, text: str, api_key: str) -> Queued:
        try:
            answer = json.loads(text)
            queue_id = answer["queue_id"]
            download_url = answer.get("download_url")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ProviderUnknown(
                f"the provider answered {status} without a queue id", self._detail(text, api_key)
            ) from e
        if not isinstance(queue_id, str) or not queue_id:
            raise ProviderUnknown(f"the provider answered {status} without a queue id")
        if not isinstance(download_url, str) or not download_url:
            download_url = None
        return Queued(queue_id, download_url)

    @_reported
    async def retrieve(self, api_key: str, model: str, queue_id: str, dest: Path) -> Retrieved:
        """Poll a job; when the video comes with the answer it is streamed to ``dest``."""
        body = {"model": model, "queue_id": queue_id}
        try:
            async with self._post("/video/retrieve", api_key, body, self._retrieve_timeout) as r:
                if r.status != 200:
                    raise self._retrieve_error(r.status, await self._text(r), api_key)
                content_type = r.content_type
                if content_type == "application/json":
                    return self._status(await self._text(r), api_key)
                if not (content_type.startswith("video/") or content_type.endswith("octet-stream")):
                    raise ProviderTransient(
                        200,
                        "the provider answered an unexpected content type",
                        self._detail(content_type),
                    )
                size = await self._download(r, dest)
                return Completed(path=dest, bytes=size)
        except ProviderError:
            raise
        except OutboundRefused as e:
            raise ProviderTransient(0, f"the outbound policy refused the call: {e}") from e
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as e:
            raise ProviderTransient(0, "the provider did not answer", self._safe(e, api_key)) from e

    def _retrieve_error(self, status: int, text: str, api_key: str) -> ProviderError:
        if status in (404, 410):
            return self._failure(ProviderLost, status, text, api_key)
        if status == 422:
            return self._failure(ProviderContentPolicy, status, text, api_key)
        if status == 500:
            return self._failure(ProviderInferenceFailed, status, text, api_key)
        # Anything else is retried, including 401/402/403: a seller's key revoked or out of
        # funds after the job was billed must not lose the job, since the video may still be
        # retrievable once the key is fixed. Expiry, not a guess here, ends such a job.
        return self._failure(ProviderTransient, status, text, api_key)

    def _status(self, text: str, api_key: str) -> Processing | Finished:
        try:
            payload = json.loads(text)
        except ValueError as e:
            raise ProviderTransient(200, "the provider answered unreadable JSON") from e
        state = payload.get("status") if isinstance(payload, dict) else None
        if state == "COMPLETED":
            return Finished()
        if state != "PROCESSING":
            raise ProviderTransient(
                200, "the provider answered an unknown job status", self._detail(text, api_key)
            )
        return Processing(
            average_execution_time_ms=_optional_int(payload.get("average_execution_time")),
            execution_duration_ms=_optional_int(payload.get("execution_duration")),
        )

    @_reported
    async def download(self, url: str, dest: Path) -> Completed:
        """Fetch a finished video from a pre-signed ``download_url`` (no API key: the URL is
        the credential), through the outbound policy whoever's URL it is."""
        try:
            async with self._outbound.request(
                "GET",
                url,
                headers={"Accept": "video/mp4"},
                timeout=self._timeout(self._download_timeout),
            ) as r:
                if r.status in (404, 410):
                    raise self._failure(ProviderLost, r.status, await self._text(r), "")
                if r.status != 200:
                    raise self._failure(ProviderTransient, r.status, await self._text(r), "")
                size = await self._download(r, dest)
                return Completed(path=dest, bytes=size)
        except ProviderError:
            raise
        except OutboundRefused as e:
            # A link the policy forbids never becomes fetchable by waiting.
            raise ProviderLost(0, f"the outbound policy refused the download link: {e}") from e
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as e:
            raise ProviderTransient(0, "the download link did not answer", self._safe(e)) from e

    async def revoke_download(self, url: str) -> None:
        """Best effort: ``DELETE`` a pre-signed link once its video is stored, so a copy of the
        URL in some proxy's log opens nothing (Venice's advice for private links)."""
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OutboundRefused):
            async with self._outbound.request(
                "DELETE", url, timeout=self._timeout(self._quote_timeout)
            ) as r:
                await r.read()

    async def _download(self, resp: aiohttp.ClientResponse, dest: Path) -> int:
        loop = asyncio.get_running_loop()

        def off_loop(fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
            return loop.run_in_executor(None, fn, *args)

        # A temp file beside dest makes the final rename atomic: a reader never sees half a video.
        fd, tmp_name = await off_loop(tempfile.mkstemp, f".{dest.name}.", ".part", str(dest.parent))
        tmp = Path(tmp_name)
        size = 0
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in resp.content.iter_chunked(DOWNLOAD_CHUNK_BYTES):
                    size += len(chunk)
                    if size > MAX_VIDEO_BYTES:
                        raise ProviderInferenceFailed(
                            200, f"the provider's video is larger than {MAX_VIDEO_BYTES} bytes"
                        )
                    await off_loop(f.write, chunk)
            await off_loop(os.replace, tmp, dest)
        except BaseException:
            # Shielded and re-raised: on cancellation the partial file is still removed, and
            # a second cancel only skips the cleanup, never swallows the first exception.
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await asyncio.shield(off_loop(tmp.unlink))
            raise
        return size

    @_reported
    async def complete(self, api_key: str, model: str, queue_id: str) -> None:
        """Ask the provider to delete its copy. Already gone counts as done: 404/410, or 400,
        which is how Venice answers an unknown request id here (REQUEST_ID_NOT_FOUND)."""
        body = {"model": model, "queue_id": queue_id}
        status, text = await self._exchange(
            "/video/complete", api_key, body, refused=ProviderTransient, silent=ProviderTransient
        )
        if 200 <= status < 300 or status in (400, 404, 410):
            return
        raise self._failure(ProviderTransient, status, text, api_key)
