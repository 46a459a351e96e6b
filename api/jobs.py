"""Media job routes (SPEC 4.1 to 4.4): submit, poll, cancel, list, artifact download."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from api.errors import ApiError, invalid, not_found
from api.http import (
    catalog_of,
    caught_up,
    engine_of,
    job_access,
    json_body,
    min_discount_of,
    require,
)
from api.validation import validate_video_request
from domain.aggregates import PENDING, TERMINAL, InsufficientBalance
from domain.catalog import VideoRequest
from domain.routing import CeilingBelowEstimate, RoutingError
from projections.jobdoc import JobDoc
from services.audit import as_json, job_history
from services.commands import IdempotencyMismatch, NotFound, Submitted
from services.routing import Route

ROUTING_STATUS = {"no_sellers_for_model": 404}
SIGNED_URL_SECONDS = 3600


def served_doc(request: web.Request, doc: JobDoc) -> JobDoc:
    """The stored document plus what depends on the moment: the short-lived direct URLs."""
    if not doc["results"]:
        return doc
    engine = engine_of(request)
    now = int(time.time())
    results = []
    for result in doc["results"]:
        result = dict(result)
        expired = result.pop("expired", False)
        if not expired:
            path = result["download_url"]
            expires = now + SIGNED_URL_SECONDS
            sig = engine.secrets.sign_url(path, expires)
            result["url"] = f"{request.scheme}://{request.host}{path}?expires={expires}&sig={sig}"
        else:
            result["url"] = None
        results.append(result)
    return {**doc, "results": results}


def job_response(
    request: web.Request, doc: JobDoc, status: int | None = None, **extra: Any
) -> web.Response:
    pending = doc["status"] in PENDING
    body = {**served_doc(request, doc), **extra}
    response = web.json_response(body, status=status or (202 if pending else 200))
    if pending:
        response.headers["Retry-After"] = "1" if doc["status"] == "queued" else "2"
    return response


async def submit(request: web.Request) -> web.Response:
    engine = engine_of(request)
    min_discount = min_discount_of(request)
    buyer_id = await require(request, "buyer")
    idempotency_key = request.headers.get("Idempotency-Key")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
        raise invalid("Idempotency-Key must be 1 to 255 characters", "Idempotency-Key")
    body = await json_body(request)
    video = validate_video_request(
        body,
        catalog_of(request),
        allow_http_webhooks=engine.settings.WEBHOOK_ALLOW_HTTP,
        allow_private_webhooks=engine.settings.WEBHOOK_ALLOW_PRIVATE,
    )

    if idempotency_key is not None:
        replay = await _find_replay(request, buyer_id, idempotency_key, video)
        if replay is not None:
            return await _answer(request, replay.job_id, replay.job_token, replay.position, True)

    offers = await engine.read(engine.views.offers, model=video.model.id)
    own_keys = await engine.read(engine.views.buyer_providers, buyer_id, video.model.id)
    try:
        route: Route = await engine.router.route(video, offers, min_discount, own_keys)
    except RoutingError as e:
        raise ApiError(ROUTING_STATUS.get(e.code, 503), e.code, str(e)) from None
    try:
        hold = route.hold(video.max_cost)
    except CeilingBelowEstimate as e:
        raise invalid(str(e), "max_cost_usdc") from None
    try:
        submitted = await engine.blocking(
            engine.commands.submit,
            buyer_id=uuid.UUID(buyer_id),
            request=video,
            route=route.as_event_data(),
            routing=route.decision(),
            estimated_cost=route.best.price.buyer_cost,
            hold=hold,
            ttl_seconds=engine.settings.JOB_TTL_SECONDS,
            min_discount=min_discount,
            idempotency_key=idempotency_key,
        )
    except InsufficientBalance as e:
        raise ApiError(
            402,
            "insufficient_balance",
            f"this job holds up to {e.wanted} microdollars but only {e.available} are available",
        ) from None
    except IdempotencyMismatch:
        raise _reused() from None
    return await _answer(
        request, submitted.job_id, submitted.job_token, submitted.position, submitted.replayed
    )


async def _find_replay(
    request: web.Request, buyer_id: str, idempotency_key: str, video: VideoRequest
) -> Submitted | None:
    """The job this buyer's Idempotency-Key already created, if any; 422 for another body."""
    engine = engine_of(request)
    try:
        found: Submitted | None = await engine.blocking(
            engine.commands.find_idempotent,
            uuid.UUID(buyer_id),
            idempotency_key,
            video.fingerprint(),
        )
    except IdempotencyMismatch:
        raise _reused() from None
    return found


def _reused() -> ApiError:
    return ApiError(
        422,
        "idempotency_key_reused",
        "this Idempotency-Key was used with a different request body",
        "Idempotency-Key",
    )


async def _answer(
    request: web.Request, job_id: uuid.UUID, token: str, position: int, replayed: bool
) -> web.Response:
    engine = engine_of(request)
    await caught_up(request, position)
    row = await engine.read(engine.views.get_job, str(job_id))
    if row is None:
        raise ApiError(503, "projection_lagging", "the job is saved but not yet visible; retry")
    response = job_response(request, row.doc, status=202, job_token=token)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def poll(request: web.Request) -> web.Response:
    min_discount_of(request)
    row = await job_access(request, request.match_info["job_id"])
    return job_response(request, row.doc)


async def cancel(request: web.Request) -> web.Response:
    min_discount_of(request)
    engine = engine_of(request)
    row = await job_access(request, request.match_info["job_id"])
    if row.status in TERMINAL:
        return job_response(request, row.doc)
    try:
        written = await engine.blocking(engine.commands.cancel, uuid.UUID(row.job_id))
    except NotFound:
        raise not_found("job") from None
    await caught_up(request, written.position)
    fresh = await engine.read(engine.views.get_job, row.job_id)
    assert fresh is not None
    return job_response(request, fresh.doc, status=200)


async def list_jobs(request: web.Request) -> web.Response:
    min_discount_of(request)
    engine = engine_of(request)
    buyer_id = await require(request, "buyer")
    query = request.query
    unknown = set(query) - {"limit", "after", "status"}
    if unknown:
        raise invalid(f"unknown query parameter {sorted(unknown)[0]}", sorted(unknown)[0])
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        raise invalid("limit must be an integer from 1 to 100", "limit") from None
    if not 1 <= limit <= 100:
        raise invalid("limit must be an integer from 1 to 100", "limit")
    status = query.get("status")
    if status is not None and status not in PENDING | TERMINAL:
        raise invalid(f"status must be one of {', '.join(sorted(PENDING | TERMINAL))}", "status")
    after = query.get("after")
    if after is not None:
        try:
            after = str(uuid.UUID(after))
        except ValueError:
            raise invalid("after must be a job id", "after") from None
    docs = await engine.read(engine.views.list_jobs, buyer_id, limit + 1, after, status)
    if docs is None:
        raise invalid("after names no job of yours", "after")
    page = docs[:limit]
    return web.json_response(
        {
            "object": "list",
            "data": [served_doc(request, d) for d in page],
            "has_more": len(docs) > limit,
            "next_after": page[-1]["id"] if len(docs) > limit else None,
        }
    )


async def events(request: web.Request) -> web.Response:
    """The job's history from the event log (SPEC 6), for the buyer who owns it."""
    min_discount_of(request)
    engine = engine_of(request)
    # As poll: a malformed id is as unknown as a missing one, even before authentication.
    try:
        job_id = uuid.UUID(request.match_info["job_id"])
    except ValueError:
        raise not_found("job") from None
    buyer_id = await require(request, "buyer")
    # Ownership comes from the log too, so a job is visible here before its view catches up.
    history = await engine.blocking(job_history, engine.market, job_id)
    if history is None or history.buyer_id != buyer_id:
        raise not_found("job")
    return web.json_response(as_json(history, for_buyer=True))


async def artifact(request: web.Request) -> web.StreamResponse:
    min_discount_of(request)
    engine = engine_of(request)
    job_id = request.match_info["job_id"]
    try:
        index = int(request.match_info["index"])
    except ValueError:
        raise not_found("artifact") from None
    if "sig" in request.query:
        row = await _signed_access(request, job_id)
    else:
        row = await job_access(request, job_id)
    results = [r for r in row.doc["results"] if r["artifact_index"] == index]
    if not results:
        raise not_found("artifact")
    path = engine.store.path(row.job_id, index)
    if results[0].get("expired") or not path.is_file():
        raise ApiError(410, "artifact_expired", "this artifact is past its retention period")
    return _file_response(path, results[0]["content_type"])


async def _signed_access(request: web.Request, job_id: str) -> Any:
    engine = engine_of(request)
    try:
        expires = int(request.query.get("expires", ""))
    except ValueError:
        raise ApiError(401, "invalid_api_key", "invalid signed URL") from None
    if expires < time.time() or not engine.secrets.verify_url(
        request.path, expires, request.query.get("sig", "")
    ):
        raise ApiError(401, "invalid_api_key", "the signed URL is invalid or has expired")
    row = await engine.read(engine.views.get_job, job_id)
    if row is None:
        raise not_found("job")
    return row


def _file_response(path: Path, content_type: str) -> web.FileResponse:
    response = web.FileResponse(path, headers={"Content-Type": content_type})
    return response


MEDIA_ROUTES: list[tuple[str, str, Any, str]] = [
    ("POST", "/v1/video/generations", submit, "Submit a video generation job"),
    ("GET", "/v1/video/generations", list_jobs, "List your jobs, newest first"),
    ("GET", "/v1/video/generations/{job_id}", poll, "Poll a job"),
    ("DELETE", "/v1/video/generations/{job_id}", cancel, "Cancel a job"),
    ("GET", "/v1/video/generations/{job_id}/events", events, "A job's event history"),
    ("GET", "/v1/media/artifacts/{job_id}/{index}", artifact, "Download a finished video"),
]


def register(app: web.Application) -> None:
    for method, path, handler, _ in MEDIA_ROUTES:
        app.router.add_route(method, path, handler)
        # SPEC 3: any media path may carry the /min{N} prefix; the handler validates N.
        app.router.add_route(method, "/{min_prefix:min[^/]*}" + path, handler)
