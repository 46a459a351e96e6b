"""The engine's client for the Venice video protocol (SPEC 5.1).

Every outcome the engine must act on differently is its own exception class, because the
money rules hinge on them: a refusal before acceptance may fail over to the next seller, a
rejection of the request itself may not, and an unknown outcome must never be retried
elsewhere since the provider may already have billed the seller.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from domain.money import MoneyError, usd_to_micros

_T = TypeVar("_T")

# Provider error bodies are echoed into job errors and logs; long ones are cut short.
MAX_MESSAGE_CHARS = 300
DOWNLOAD_CHUNK_BYTES = 1 << 20


class ProviderError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


class QuoteFailed(ProviderError):
    """No price could be obtained; the offer is simply not a candidate for this request."""


class ProviderRefused(ProviderError):
    """The provider answered and did not accept the job: failing over is safe."""


class ProviderRejected(ProviderError):
    """The request itself is invalid; another seller would reject it too."""


class ProviderUnknown(ProviderError):
    """It is unknown whether the provider accepted (and billed) the job."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message)


class ProviderLost(ProviderError):
    """The provider no longer knows the job (unknown or expired queue id)."""


class ProviderContentPolicy(ProviderError):
    pass


class ProviderInferenceFailed(ProviderError):
    pass


class ProviderTransient(ProviderError):
    """Try again later; nothing is known to be wrong with the job itself."""


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


@dataclass(frozen=True)
class Processing:
    average_execution_time_ms: int | None
    execution_duration_ms: int | None


@dataclass(frozen=True)
class Completed:
    path: Path
    bytes: int


_QUEUE_REFUSED = {401, 402, 403, 408, 429}
# A gateway timeout means the request may have reached the provider and been accepted there.
_QUEUE_UNKNOWN = {504}


def _optional_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


class VeniceClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        quote_timeout: float = 10.0,
        queue_timeout: float = 30.0,
        retrieve_timeout: float = 120.0,
        queue_session: aiohttp.ClientSession | None = None,
    ) -> None:
        self._session = session
        # A pooled keep-alive connection that the server closed a moment ago fails a POST in a
        # way indistinguishable from a lost answer; queue (which bills) deserves a fresh one.
        self._queue_session = queue_session or session
        self._base = base_url.rstrip("/")
        self._quote_timeout = quote_timeout
        self._queue_timeout = queue_timeout
        self._retrieve_timeout = retrieve_timeout

    @staticmethod
    def _timeout(total: float) -> aiohttp.ClientTimeout:
        # A connect that can't finish means nothing was sent, which queue may treat as a refusal.
        return aiohttp.ClientTimeout(total=total, connect=min(total, 10.0))

    @staticmethod
    def _headers(api_key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {api_key}", "Accept": "application/json, video/mp4"}

    @staticmethod
    def _message(text: str, api_key: str | None = None) -> str:
        """A provider's error body for people: the error field if JSON, and never the key."""
        message = text.strip()
        with contextlib.suppress(ValueError):
            parsed = json.loads(message)
            if isinstance(parsed, dict):
                detail = parsed.get("error") or parsed.get("message") or parsed.get("detail")
                if isinstance(detail, str):
                    message = detail
        if api_key:
            message = message.replace(api_key, "[redacted]")
        message = message or "(empty response)"
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "…"
        return message

    def _safe(self, error: BaseException, api_key: str | None = None) -> str:
        return self._message(f"{type(error).__name__}: {error}", api_key)

    async def list_models(self) -> list[dict[str, Any]]:
        url = f"{self._base}/models"
        try:
            async with self._session.get(
                url,
                params={"type": "video"},
                timeout=self._timeout(self._quote_timeout),
                allow_redirects=False,
            ) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise ProviderTransient(resp.status, self._message(text))
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ProviderTransient(0, f"model catalog unavailable: {self._safe(e)}") from e
        try:
            data = json.loads(text)["data"]
        except (ValueError, KeyError, TypeError) as e:
            raise ProviderTransient(200, "model catalog is not the expected JSON") from e
        if not isinstance(data, list):
            raise ProviderTransient(200, "model catalog data is not a list")
        return [m for m in data if isinstance(m, dict)]

    async def quote(self, api_key: str, params: VideoParams) -> int:
        """The provider's list price for ``params`` in microdollars (rounded up)."""
        try:
            async with self._session.post(
                f"{self._base}/video/quote",
                json=params.body(),
                headers=self._headers(api_key),
                timeout=self._timeout(self._quote_timeout),
                allow_redirects=False,
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise QuoteFailed(0, self._safe(e, api_key)) from e
        if status != 200:
            raise QuoteFailed(status, self._message(text, api_key))
        try:
            # Decimal straight from the JSON text: 0.42 must not pass through a binary float.
            amount = json.loads(text, parse_float=Decimal)["quote"]
            return usd_to_micros(amount)
        except (ValueError, KeyError, TypeError, MoneyError) as e:
            raise QuoteFailed(status, f"unusable quote response: {self._message(text)}") from e

    async def queue(
        self, api_key: str, params: VideoParams, prompt: str, image_url: str | None
    ) -> str:
        """Submit a job; the provider bills the seller when this returns a queue id."""
        body = params.body()
        body["prompt"] = prompt
        if image_url is not None:
            body["image_url"] = image_url
        try:
            async with self._queue_session.post(
                f"{self._base}/video/queue",
                json=body,
                headers=self._headers(api_key),
                timeout=self._timeout(self._queue_timeout),
                allow_redirects=False,
            ) as resp:
                status = resp.status
                try:
                    text = await resp.text()
                except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as e:
                    if 200 <= status < 300:
                        detail = self._safe(e, api_key)
                        raise ProviderUnknown(
                            f"queue answered {status} but the body was lost: {detail}"
                        ) from e
                    text = ""
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as e:
            # Raised before the request could be written: the provider never saw it.
            raise ProviderRefused(0, f"provider unreachable: {self._safe(e, api_key)}") from e
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ProviderUnknown(f"no answer to queue: {self._safe(e, api_key)}") from e
        message = self._message(text, api_key)
        if 200 <= status < 300:
            try:
                queue_id = json.loads(text)["queue_id"]
            except (ValueError, KeyError, TypeError) as e:
                raise ProviderUnknown(f"queue answered {status} without a queue_id") from e
            if not isinstance(queue_id, str) or not queue_id:
                raise ProviderUnknown(f"queue answered {status} without a queue_id")
            return queue_id
        if status in _QUEUE_UNKNOWN:
            raise ProviderUnknown(f"{status}: {message}")
        if status in _QUEUE_REFUSED or status >= 500 or status < 400:
            raise ProviderRefused(status, message)
        raise ProviderRejected(status, message)

    async def retrieve(
        self, api_key: str, model: str, queue_id: str, dest: Path
    ) -> Processing | Completed:
        """Poll a job; when the video is ready it is streamed to ``dest`` and returned."""
        body = {"model": model, "queue_id": queue_id}
        try:
            async with self._session.post(
                f"{self._base}/video/retrieve",
                json=body,
                headers=self._headers(api_key),
                timeout=self._timeout(self._retrieve_timeout),
                allow_redirects=False,
            ) as resp:
                if resp.status != 200:
                    raise self._retrieve_error(resp.status, await resp.text(), api_key)
                content_type = resp.content_type
                if content_type == "application/json":
                    return self._processing(await resp.text(), api_key)
                if not (content_type.startswith("video/") or content_type.endswith("octet-stream")):
                    raise ProviderTransient(200, f"unexpected retrieve content type {content_type}")
                size = await self._download(resp, dest)
                return Completed(path=dest, bytes=size)
        except ProviderError:
            raise
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as e:
            raise ProviderTransient(0, f"retrieve failed: {self._safe(e, api_key)}") from e

    def _retrieve_error(self, status: int, text: str, api_key: str) -> ProviderError:
        message = self._message(text, api_key)
        if status in (404, 410):
            return ProviderLost(status, message)
        if status == 422:
            return ProviderContentPolicy(status, message)
        if status == 500:
            return ProviderInferenceFailed(status, message)
        # Anything else is retried, including 401/402/403: a seller's key revoked or out of
        # funds after the job was billed must not lose the job, since the video may still be
        # retrievable once the key is fixed. Expiry, not a guess here, ends such a job.
        return ProviderTransient(status, message)

    def _processing(self, text: str, api_key: str) -> Processing:
        try:
            payload = json.loads(text)
        except ValueError as e:
            raise ProviderTransient(200, "retrieve answered unparseable JSON") from e
        if not isinstance(payload, dict) or payload.get("status") != "PROCESSING":
            raise ProviderTransient(
                200, f"unexpected retrieve answer: {self._message(text, api_key)}"
            )
        return Processing(
            average_execution_time_ms=_optional_int(payload.get("average_execution_time")),
            execution_duration_ms=_optional_int(payload.get("execution_duration")),
        )

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
                    await off_loop(f.write, chunk)
                    size += len(chunk)
            await off_loop(os.replace, tmp, dest)
        except BaseException:
            # Shielded and re-raised: on cancellation the partial file is still removed, and
            # a second cancel only skips the cleanup, never swallows the first exception.
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await asyncio.shield(off_loop(tmp.unlink))
            raise
        return size

    async def complete(self, api_key: str, model: str, queue_id: str) -> None:
        """Ask the provider to delete its copy. Already gone (404) counts as done."""
        try:
            async with self._session.post(
                f"{self._base}/video/complete",
                json={"model": model, "queue_id": queue_id},
                headers=self._headers(api_key),
                timeout=self._timeout(self._quote_timeout),
                allow_redirects=False,
            ) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise ProviderTransient(0, f"complete failed: {self._safe(e, api_key)}") from e
        if 200 <= status < 300 or status in (404, 410):
            return
        raise ProviderTransient(status, self._message(text, api_key))
