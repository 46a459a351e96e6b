"""``GET /v1/media/artifacts/{job_id}/{index}``: the video bytes, with byte ranges (SPEC 4.4).

Access by buyer key, job token, or a short-lived signed URL (``expires`` and ``sig``). One
well-formed byte range is served (206); a list of several well-formed ranges is answered with the
whole file (200), as RFC 9110 section 14.2 lets a server do. A Range header that does not parse
(another unit, bad digits, last before first) or that starts past the end is refused 416 in the
error shape: SPEC 9 counts a malformed Range among the hostile inputs that get a 4xx.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from adapters.artifacts import ArtifactGone, ArtifactStore, LocalArtifactStore
from api.errors import ApiError, not_found
from api.http import engine_of, job_access, min_discount_of
from api.routes import RANGE, Reply, Route

# Artifact indexes as written by the engine: int() would also take "-0", " 0" or "\u0660".
_INDEX = re.compile(r"0|[1-9][0-9]{0,5}", re.ASCII)
_RANGE = re.compile(r"bytes=(?:([0-9]{1,18})-([0-9]{0,18})|-([0-9]{1,18}))", re.ASCII)
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{1,100}={0,2}", re.ASCII)
_EXPIRES = re.compile(r"[1-9][0-9]{0,11}", re.ASCII)
# How long a local store's signed ``url`` stays valid (an S3 pre-signed one: 900 s).
SIGNED_URL_SECONDS = 3600


_RANGE_SPEC = re.compile(r"(?:[0-9]{1,18}-[0-9]{0,18}|-[0-9]{1,18})", re.ASCII)


class RangeNotSatisfiable(ValueError):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(first, last)`` to serve, or None to serve everything; ``RangeNotSatisfiable`` (with
    the reason) for a header that is malformed or starts past the end."""
    if header is None:
        return None
    text = header.strip()
    match = _RANGE.fullmatch(text)
    if match is None:
        specs = text[len("bytes=") :].split(",") if text.startswith("bytes=") else []
        if len(specs) > 1 and all(_RANGE_SPEC.fullmatch(spec.strip()) for spec in specs):
            return None  # several ranges: the whole file instead of a multipart answer
        raise RangeNotSatisfiable("Range must be one byte range, such as bytes=0-1023")
    first, last, suffix = match.groups()
    if suffix is not None:
        length = int(suffix)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable(f"the range is empty or the file is ({size} bytes)")
        return max(size - length, 0), size - 1
    start = int(first)
    if last and int(last) < start:
        raise RangeNotSatisfiable("the range's last byte comes before its first")
    if start >= size:
        raise RangeNotSatisfiable(f"the range starts past the end of the file ({size} bytes)")
    return start, (min(int(last), size - 1) if last else size - 1)


async def artifact(request: web.Request) -> web.StreamResponse:
    min_discount_of(request)
    engine = engine_of(request)
    job_id = request.match_info["job_id"]
    text = request.match_info["index"]
    if not _INDEX.fullmatch(text):
        raise not_found("artifact")
    index = int(text)
    if "sig" in request.query or "expires" in request.query:
        row = await _signed_access(request, job_id)
    else:
        row = await job_access(request, job_id)
    results = [r for r in row.doc["results"] if r["artifact_index"] == index]
    if not results:
        raise not_found("artifact")
    store = engine.store
    content_type = results[0]["content_type"]
    if isinstance(store, LocalArtifactStore):
        path = store.path(row.job_id, index)
        if results[0].get("expired") or not path.is_file():
            raise _expired()
        return _file_response(request, path, content_type)
    size = None if results[0].get("expired") else await store.size(row.job_id, index)
    if size is None:
        raise _expired()
    return await _streamed_response(request, store, row.job_id, index, size, content_type)


def _expired() -> ApiError:
    return ApiError(410, "artifact_expired", "this artifact is past its retention period")


def direct_url(request: web.Request, job_id: str, index: int, download_url: str, now: int) -> str:
    """A result's ``url`` (SPEC 7): the store's own (an S3 pre-signed GET) or, for a local
    folder, the engine's signed URL from ``PUBLIC_BASE_URL``, never the request's Host."""
    engine = engine_of(request)
    url = engine.store.direct_url(job_id, index)
    if url is not None:
        return url
    expires = now + SIGNED_URL_SECONDS
    sig = engine.secrets.sign_url(download_url, expires)
    return f"{engine.settings.public_base_url}{download_url}?expires={expires}&sig={sig}"


async def _signed_access(request: web.Request, job_id: str) -> Any:
    engine = engine_of(request)
    expires_text = request.query.get("expires", "")
    signature = request.query.get("sig", "")
    if not _EXPIRES.fullmatch(expires_text) or not _SIGNATURE.fullmatch(signature):
        raise ApiError(401, "invalid_api_key", "the signed URL is invalid or has expired")
    expires = int(expires_text)
    if expires < time.time() or not engine.secrets.verify_url(request.path, expires, signature):
        raise ApiError(401, "invalid_api_key", "the signed URL is invalid or has expired")
    row = await engine.read(engine.views.get_job, job_id)
    if row is None:
        raise not_found("job")
    return row


def _wanted_range(request: web.Request, size: int) -> tuple[int, int] | web.Response | None:
    """The range to serve (None: all of it), or the 416 answer."""
    try:
        return parse_range(request.headers.get("Range"), size)
    except RangeNotSatisfiable as e:
        error = ApiError(416, "range_not_satisfiable", str(e), "Range").response()
        error.headers["Content-Range"] = f"bytes */{size}"
        return error


def _file_response(request: web.Request, path: Path, content_type: str) -> web.StreamResponse:
    wanted = _wanted_range(request, path.stat().st_size)
    if isinstance(wanted, web.Response):
        return wanted
    return _FileResponse(path, content_type, wanted)


async def _streamed_response(
    request: web.Request,
    store: ArtifactStore,
    job_id: str,
    index: int,
    size: int,
    content_type: str,
) -> web.StreamResponse:
    """An object of a remote store, relayed chunk by chunk from a ranged GET: never the
    whole video in memory."""
    wanted = _wanted_range(request, size)
    if isinstance(wanted, web.Response):
        return wanted
    first, last = wanted if wanted is not None else (0, size - 1)
    chunks = store.read(job_id, index, first, last)
    try:
        # The first chunk before any header: a purge between the size and the bytes is a 410.
        head = await anext(chunks) if size else b""
    except ArtifactGone:
        raise _expired() from None
    response = web.StreamResponse(status=200 if wanted is None else 206)
    response.content_type = content_type
    response.headers["Accept-Ranges"] = "bytes"
    response.content_length = last - first + 1 if size else 0
    if wanted is not None:
        response.headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    # Closed at once if the client goes away mid-video: the S3 connection is released.
    async with contextlib.aclosing(chunks):
        await response.prepare(request)
        if head:
            await response.write(head)
            async for chunk in chunks:
                await response.write(chunk)
    await response.write_eof()
    return response


class _FileResponse(web.FileResponse):
    """aiohttp reads the Range header itself, more loosely (``int()`` takes Unicode digits):
    it is shown only the range parsed here, or none."""

    def __init__(self, path: Path, content_type: str, wanted: tuple[int, int] | None) -> None:
        super().__init__(path, headers={"Content-Type": content_type, "Accept-Ranges": "bytes"})
        self._wanted = wanted

    async def prepare(self, request: web.BaseRequest) -> Any:
        headers = CIMultiDict(request.headers)
        headers.popall("Range", None)
        headers.popall("If-Range", None)
        if self._wanted is not None:
            headers["Range"] = f"bytes={self._wanted[0]}-{self._wanted[1]}"
        return await super().prepare(request.clone(headers=headers))


ARTIFACT_ROUTES: list[Route] = [
    Route(
        "GET",
        "/v1/media/artifacts/{job_id}/{index}",
        artifact,
        name="download_artifact",
        summary="Download a finished video",
        tag="jobs",
        auth=("buyer", "job_token"),
        headers=(RANGE,),
        replies={
            200: Reply(
                "The whole video",
                media_type="video/mp4",
                schema={"type": "string", "format": "binary"},
                headers=("Accept-Ranges",),
            ),
            206: Reply(
                "The requested byte range",
                media_type="video/mp4",
                schema={"type": "string", "format": "binary"},
                headers=("Accept-Ranges", "Content-Range"),
            ),
        },
        errors={
            401: "invalid_api_key: no valid key or token, or a signed URL that is invalid or "
            "expired",
            404: "not_found: no such job or artifact, or not yours",
            410: "artifact_expired: past its retention period",
            416: "range_not_satisfiable: a malformed range, or one past the end of the file",
        },
        min_prefix=True,
        description="Also served with `?expires=...&sig=...` (the `url` of a result) and no "
        "credentials, until it expires.",
    ),
]
