"""Media job routes (SPEC 4.1 to 4.4): submit, poll, cancel, list, artifact download."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import structlog
from aiohttp import web

from api.artifacts import direct_url
from api.body import parse_query, read_json
from api.errors import ApiError, invalid, not_found
from api.http import (
    READ_YOUR_WRITES_TIMEOUT,
    catalog_of,
    engine_of,
    job_access,
    min_discount_of,
    reply,
    require,
)
from api.responses import json_response, json_text_response
from api.routes import IDEMPOTENCY_KEY, IDEMPOTENCY_KEY_PATTERN, Header, Reply, Route
from api.schemas.jobs import JobHistory, JobList, JobView, ListJobsQuery, SubmittedJob
from api.stream import KEEPALIVE_SECONDS, last_event_id, preferred_wait, sse_event
from api.validation import SubmitBody, validate_video_request
from domain.aggregates import PENDING, TERMINAL, InsufficientBalance
from domain.catalog import VideoRequest
from domain.routing import CeilingBelowEstimate, RoutingError
from projections.jobdoc import JobDoc
from projections.jobviews import JobRow
from services.audit import as_json, job_history
from services.commands import IdempotencyMismatch, NotFound, Submitted
from services.commands.submit import SubmitRequest
from services.routing import Route as Routing

ROUTING_STATUS = {"no_sellers_for_model": 404}
IDEMPOTENCY_KEY_FORM = re.compile(IDEMPOTENCY_KEY_PATTERN, re.ASCII)


def served_doc(request: web.Request, doc: JobDoc) -> JobDoc:
    """The stored document plus what depends on the moment: the short-lived direct URLs."""
    if not doc["results"]:
        return doc
    now = int(time.time())
    results = []
    for result in doc["results"]:
        result = dict(result)
        expired = result.pop("expired", False)
        result["url"] = (
            None
            if expired
            else direct_url(
                request, doc["id"], result["artifact_index"], result["download_url"], now
            )
        )
        results.append(result)
    return {**doc, "results": results}


def job_response(
    request: web.Request, row: JobRow, status: int | None = None, **extra: Any
) -> web.Response:
    """A job view (``JobView``, or ``SubmittedJob`` with its token). The document is the one
    the projection stored pre-rendered, served without a second validation on this hot path:
    the contract tests hold it to the model (tests/test_schemathesis.py, test_api_openapi.py).
    One with nothing added at answer time (no result URLs, no token) is sent as the views
    stored its text: encoding it again was a tenth of a poll's CPU."""
    doc = row.doc
    pending = doc["status"] in PENDING
    status = status or (202 if pending else 200)
    if row.text is not None and not extra and not doc["results"]:
        response = json_text_response(row.text, status=status)
    else:
        response = json_response({**served_doc(request, doc), **extra}, status=status)
    if pending:
        response.headers["Retry-After"] = str(retry_after(doc))
    return response


def retry_after(doc: JobDoc) -> int:
    """When polling a pending job again is useful: when the provider expects it done (SPEC 7),
    within 1 to 30 seconds; soon while that is unknown."""
    eta = doc.get("eta_seconds")
    if eta is None:
        return 1 if doc["status"] == "queued" else 2
    return max(1, min(int(eta), 30))


def idempotency_key_of(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not (len(key) <= 255 and IDEMPOTENCY_KEY_FORM.fullmatch(key)):
        raise invalid(
            "Idempotency-Key must be 1 to 255 visible ASCII characters", "Idempotency-Key"
        )
    return key


async def submit(request: web.Request) -> web.Response:
    engine = engine_of(request)
    min_discount = min_discount_of(request)
    buyer_id = await require(request, "buyer")
    idempotency_key = idempotency_key_of(request)
    body = await read_json(request)
    video = validate_video_request(
        body,
        catalog_of(request),
        allow_http_webhooks=engine.settings.WEBHOOK_ALLOW_HTTP,
        allow_private_webhooks=engine.settings.OUTBOUND_ALLOW_PRIVATE,
    )

    if idempotency_key is not None:
        replay = await _find_replay(request, buyer_id, idempotency_key, video)
        if replay is not None:
            return await _answer(request, replay.job_id, replay.job_token, replay.position, True)

    offers, own_keys = await engine.routing_inputs(video.model.id, buyer_id)
    try:
        route: Routing = await engine.router.route(video, offers, min_discount, own_keys)
    except RoutingError as e:
        raise ApiError(ROUTING_STATUS.get(e.code, 503), e.code, str(e)) from None
    try:
        hold = route.hold(video.max_cost)
    except CeilingBelowEstimate as e:
        raise invalid(str(e), "max_cost_usdc") from None
    try:
        submitted = await engine.submits(
            SubmitRequest(
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


async def _view_after(request: web.Request, job_id: str, position: int) -> JobRow:
    """The job's view once it includes the write at ``position`` (read-your-writes)."""
    row = await engine_of(request).job_row_after(job_id, position, READ_YOUR_WRITES_TIMEOUT)
    if row is None:
        raise ApiError(503, "projection_lagging", "the job is saved but not yet visible; retry")
    return row


async def _answer(
    request: web.Request, job_id: uuid.UUID, token: str, position: int, replayed: bool
) -> web.Response:
    row = await _view_after(request, str(job_id), position)
    response = job_response(request, row, status=202, job_token=token)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


async def poll(request: web.Request) -> web.Response:
    min_discount_of(request)
    row = await job_access(request, request.match_info["job_id"], poll=True)
    wait = preferred_wait(request.headers.get("Prefer"))
    if wait is None:
        return job_response(request, row)
    if row.status in PENDING and wait > 0:
        row = await _next_status(request, row, wait)
    response = job_response(request, row)
    response.headers["Preference-Applied"] = f"wait={wait}"
    return response


async def _next_status(request: web.Request, row: JobRow, wait: int) -> JobRow:
    """The job's view once its status differs from ``row``'s, or the latest after ``wait`` s.

    Progress alone does not end the wait (the stream shows every change): a long poll is for
    learning that the job moved on."""
    engine = engine_of(request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while (remaining := deadline - loop.time()) > 0 and not engine.watchers.closed:
        changed = await engine.watchers.changed(row.job_id, row.version, remaining)
        fresh = await engine.read(engine.views.get_job, row.job_id)
        if fresh is None:
            return row
        if fresh.status != row.status or not changed:
            return fresh
        row = fresh
    return row


async def stream(request: web.Request) -> web.StreamResponse:
    """The job's views as Server-Sent Events, one per change, until the terminal one."""
    min_discount_of(request)
    engine = engine_of(request)
    row = await job_access(request, request.match_info["job_id"])
    seen = last_event_id(request)
    if seen is not None and seen >= row.version and row.status in TERMINAL:
        # The client has the final view already: 204 tells an EventSource not to reconnect.
        return web.Response(status=204)
    response = web.StreamResponse(
        status=200,
        headers={
            # Sent before the request middleware could add it to a finished response.
            "X-Request-Id": str(structlog.contextvars.get_contextvars().get("request_id", "")),
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            # Proxies such as nginx would otherwise hold the events back.
            "X-Accel-Buffering": "no",
        },
    )
    await response.prepare(request)
    sent: JobDoc | None = None
    try:
        while True:
            # Only the latest view is kept: a client that missed several changes gets that.
            if (seen is None or row.version > seen) and row.doc != sent:
                await response.write(sse_event(row.version, served_doc(request, row.doc)))
                sent = row.doc
            seen = max(seen or 0, row.version)
            if row.status in TERMINAL or engine.watchers.closed:
                break
            if not await engine.watchers.changed(row.job_id, row.version, KEEPALIVE_SECONDS):
                if engine.watchers.closed:
                    break
                await response.write(b": keepalive\n\n")
                if engine.runner.failure is None:
                    continue
                # This process's views stopped (see /healthz), so nothing wakes the watchers;
                # on PostgreSQL other processes still move the shared views: look now and then.
            fresh = await engine.read(engine.views.get_job, row.job_id)
            if fresh is None:
                break
            row = fresh
        await response.write_eof()
    except ConnectionError:
        pass  # the client went away
    return response


async def cancel(request: web.Request) -> web.Response:
    min_discount_of(request)
    engine = engine_of(request)
    row = await job_access(request, request.match_info["job_id"])
    if row.status in TERMINAL:
        return job_response(request, row)
    try:
        written = await engine.blocking(engine.commands.cancel, uuid.UUID(row.job_id))
    except NotFound:
        raise not_found("job") from None
    fresh = await _view_after(request, row.job_id, written.position)
    return job_response(request, fresh, status=200)


async def list_jobs(request: web.Request) -> web.Response:
    min_discount_of(request)
    engine = engine_of(request)
    buyer_id = await require(request, "buyer")
    query = parse_query(request, ListJobsQuery)
    limit = query.limit
    docs = await engine.read(engine.views.list_jobs, buyer_id, limit + 1, query.after, query.status)
    if docs is None:
        raise invalid("after names no job of yours", "after")
    page = docs[:limit]
    return json_response(
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
    return reply(JobHistory, as_json(history, for_buyer=True))


JOB_ERRORS = {404: "not_found: no such job, or not yours"}
VIEW_REPLIES = {
    200: Reply("The job, in a terminal state", JobView),
    202: Reply("The job, still pending", JobView, headers=("Retry-After",)),
}
PREFER = Header(
    "Prefer",
    "wait=N (RFC 7240, N seconds, at most 60): answer as soon as the job's status changes, "
    "or after N seconds with its view then. Other preferences, and a malformed wait, are "
    "ignored",
)
LAST_EVENT_ID = Header(
    "Last-Event-ID",
    "The id of the last event received: resume after it (sent by an EventSource on "
    "reconnect); an id this server did not send is ignored, as the SSE standard has it",
)
SSE = Reply(
    "Server-Sent Events: `event: job` with the job's view (as poll shows it) as data and its "
    "version as `id`, one per change, the stream ending after the terminal one. A comment "
    "line every 15 s keeps an idle stream open",
    media_type="text/event-stream",
    # OpenAPI before 3.2 reads an event stream's schema as that of each event.
    schema={
        "type": "object",
        "required": ["event", "id", "data"],
        "properties": {
            "event": {"const": "job"},
            "id": {"type": "string", "pattern": "^[0-9]+$"},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": {"$ref": "#/components/schemas/JobView"},
            },
        },
    },
)

MEDIA_ROUTES: list[Route] = [
    Route(
        "POST",
        "/v1/video/generations",
        submit,
        name="submit_video",
        summary="Submit a video generation job",
        tag="jobs",
        auth=("buyer",),
        body=SubmitBody,
        headers=(IDEMPOTENCY_KEY,),
        replies={
            202: Reply(
                "Accepted: priced, funds held, queued",
                SubmittedJob,
                headers=("Retry-After", "Idempotent-Replayed"),
            )
        },
        errors={
            400: "invalid_request, prompt_too_long, unsupported_parameter, "
            "invalid_minimum_discount",
            402: "insufficient_balance: the hold exceeds your available balance",
            404: "model_not_found, no_sellers_for_model",
            422: "idempotency_key_reused: the key was used with another body",
            503: "no_healthy_sellers, minimum_discount_not_met, catalog_unavailable, "
            "projection_lagging",
        },
        min_prefix=True,
    ),
    Route(
        "GET",
        "/v1/video/generations",
        list_jobs,
        name="list_jobs",
        summary="List your jobs, newest first",
        tag="jobs",
        auth=("buyer",),
        query=ListJobsQuery,
        replies={200: Reply("A page of your jobs", JobList)},
        min_prefix=True,
    ),
    Route(
        "GET",
        "/v1/video/generations/{job_id}",
        poll,
        name="get_job",
        summary="Poll a job",
        tag="jobs",
        auth=("buyer", "job_token"),
        headers=(PREFER,),
        replies={
            200: Reply("The job, in a terminal state", JobView, headers=("Preference-Applied",)),
            202: Reply(
                "The job, still pending",
                JobView,
                headers=("Retry-After", "Preference-Applied"),
            ),
        },
        errors=JOB_ERRORS,
        min_prefix=True,
    ),
    Route(
        "GET",
        "/v1/video/generations/{job_id}/stream",
        stream,
        name="stream_job",
        summary="Follow a job as Server-Sent Events until it ends",
        tag="jobs",
        auth=("buyer", "job_token"),
        headers=(LAST_EVENT_ID,),
        replies={
            200: SSE,
            204: Reply("The job had ended and Last-Event-ID names its final view: nothing new"),
        },
        errors=JOB_ERRORS,
        min_prefix=True,
    ),
    Route(
        "DELETE",
        "/v1/video/generations/{job_id}",
        cancel,
        name="cancel_job",
        summary="Cancel a job (best effort; a no-op on a finished one)",
        tag="jobs",
        auth=("buyer", "job_token"),
        replies={200: Reply("The job after the cancel", JobView)},
        errors={**JOB_ERRORS, 503: "projection_lagging: saved, not yet visible; retry"},
        min_prefix=True,
    ),
    Route(
        "GET",
        "/v1/video/generations/{job_id}/events",
        events,
        name="get_job_events",
        summary="A job's event history, from the log",
        tag="jobs",
        auth=("buyer",),
        replies={200: Reply("Every event of the job and its settlement", JobHistory)},
        errors=JOB_ERRORS,
        min_prefix=True,
    ),
]
