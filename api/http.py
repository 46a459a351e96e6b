"""Shared HTTP plumbing: the app key, middlewares, authentication, body parsing."""

from __future__ import annotations

import hmac
import itertools
import re
import secrets
import time
import uuid
from collections.abc import Mapping
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from eventsourcing.persistence import InterfaceError, OperationalError
from pydantic import BaseModel

from adapters.crypto import sha256_hex
from api.body import MAX_BODY_BYTES
from api.bootstrap import Engine
from api.errors import ApiError, not_found
from api.responses import json_response
from api.routes import Handler
from domain.catalog import Catalog, ModelSpec
from domain.routing import MinimumDiscountError, parse_min_prefix
from projections.views import JobRow
from services.commands import ConflictError


class Startup:
    """A server's engine, once it is ready. Until then (waiting for the database, rebuilding
    views for a new schema) ``/healthz`` answers 503 with ``state`` and every other route 503
    ``engine_starting``: SPEC 8, a process never exits on an unreachable database."""

    def __init__(self, engine: Engine | None = None) -> None:
        self.engine = engine
        self.state = "starting"

    def set_state(self, state: str) -> None:
        self.state = state


STARTUP = web.AppKey("startup", Startup)
# Keys are never reassigned, so a positive lookup can be remembered for the process lifetime.
PRINCIPALS = web.AppKey("principals", dict)
log = structlog.get_logger("http")
READ_YOUR_WRITES_TIMEOUT = 5.0
# Credentials, job tokens and request ids are printable ASCII (RFC 6750's b64token and then
# some); anything else, such as raw non-UTF-8 bytes, is no credential at all.
_TOKEN = re.compile(r"[!-~]{1,1000}", re.ASCII)
_REQUEST_ID = re.compile(r"[!-~]{1,200}", re.ASCII)
SLOW_REQUEST_MS = 1000.0
# Unique across processes by the random prefix, and far cheaper than a uuid4 per request.
REQUEST_ID_PREFIX = secrets.token_hex(6)
REQUEST_COUNTER = itertools.count()


def engine_of(request: web.Request) -> Engine:
    startup = request.app[STARTUP]
    engine = startup.engine
    if engine is None:
        raise ApiError(503, "engine_starting", f"the engine is starting: {startup.state}")
    return engine


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request ids, the error shape of SPEC 4 for every failure, and one access-log line."""
    request_id = request.headers.get("X-Request-Id")
    if request_id is None or not _REQUEST_ID.fullmatch(request_id):
        request_id = _new_request_id()
    started = time.perf_counter()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        try:
            response = await handler(request)
        except ApiError as e:
            response = e.response()
        except web.HTTPRequestEntityTooLarge:
            response = ApiError(
                413, "request_too_large", f"request body must be at most {MAX_BODY_BYTES} bytes"
            ).response()
        except web.HTTPNotFound:
            response = not_found("route").response()
        except web.HTTPMethodNotAllowed as e:
            response = ApiError(
                405, "method_not_allowed", f"{request.method} is not allowed here"
            ).response()
            response.headers["Allow"] = ",".join(sorted(e.allowed_methods))
        except web.HTTPException as e:
            response = ApiError(e.status, "invalid_request", e.reason).response()
        except ConflictError:
            # A command lost the race for one aggregate (a busy buyer's account, say) on every
            # one of its tries: nothing was written, and a retry a moment later goes through.
            log.warning("command_contention", method=request.method, path=request.path)
            response = ApiError(
                503, "contention", "too many concurrent changes to the same account; retry shortly"
            ).response()
            response.headers["Retry-After"] = "1"
        except (OperationalError, InterfaceError) as e:
            # The database is down, restarting or out of connections: nothing was answered
            # from it, and the pool reconnects by itself; the client should retry.
            log.warning("database_unavailable", method=request.method, error=str(e))
            response = ApiError(
                503, "database_unavailable", "the database is unreachable; retry shortly"
            ).response()
            response.headers["Retry-After"] = "2"
        except Exception:
            log.exception("unhandled_error", method=request.method, path=request.path)
            response = ApiError(500, "internal_error", "internal error").response()
        response.headers["X-Request-Id"] = request_id
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        seconds = time.perf_counter() - started
        engine = request.app[STARTUP].engine
        if engine is not None:  # a starting server has no registry yet (nor /metrics)
            engine.metrics.observe_request(request.method, route, response.status, seconds)
        ms = round(seconds * 1000, 2)
        # Every request at info costs a tenth of a poll's CPU; client errors, failures and slow
        # ones stay visible, the rest at debug (LOG_LEVEL=debug shows them all).
        if response.status >= 500:
            emit = log.warning
        elif response.status >= 400 or ms > SLOW_REQUEST_MS:
            emit = log.info
        else:
            emit = log.debug
        emit(
            "request",
            method=request.method,
            path=request.path,
            route=route,
            status=response.status,
            ms=ms,
        )
        return response
    finally:
        structlog.contextvars.clear_contextvars()


# ---------------------------------------------------------------------- unparsable requests


def _new_request_id() -> str:
    return f"req_{REQUEST_ID_PREFIX}{next(REQUEST_COUNTER):010x}"


_PARSE_ERRORS = {
    "LineTooLong": "a line of the request is too long (at most 8190 bytes)",
    "BadHttpMethod": "the request line is not valid HTTP/1.1",
    "BadStatusLine": "the request line is not valid HTTP/1.1",
    "InvalidURLError": "the request's URL is not valid",
    "InvalidHeader": "a header of the request is not valid",
    "TransferEncodingError": "the request's chunked body is not valid",
    "ContentLengthError": "the request's body is shorter than its Content-Length",
}


class _ShapedErrors(RequestHandler):
    """aiohttp's connection handler, answering requests its parser refuses (bad header bytes,
    a line over 8,190 bytes, a bad request line, Content-Length or chunk size) in SPEC 4's error
    shape: aiohttp's own answer is plain text quoting the client's bytes back, and logs a
    traceback per request, which a client could use to flood the log (SPEC 9)."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # aiohttp's own contract: the connection is broken, and it closes it.
            raise ConnectionError("the response had begun; no error answer can follow")
        if status >= 500:
            # Not the client's fault: the middleware answers handlers' errors itself, so
            # this is aiohttp's (a 504 of its own handler timeout, or a bug of ours there).
            log.error("unhandled_error", status=status, exc_info=exc)
            error = ApiError(status, "internal_error", "internal error")
        elif status == 413:
            error = ApiError(413, "request_too_large", "the request is too large")
        else:
            # The parser's reason, without the bytes it quotes.
            reason = type(exc).__name__ if exc is not None else "BadHttpMessage"
            what = _PARSE_ERRORS.get(reason, "the request is not valid HTTP/1.1")
            error = ApiError(status, "invalid_request", what)
            log.info("malformed_request", status=status, reason=reason)
        response = error.response()
        response.headers["X-Request-Id"] = _new_request_id()
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _ShapedErrors(self, loop=self._loop, **self._kwargs)


class Runner(web.AppRunner):
    """``web.AppRunner`` whose connections answer unparsable requests in SPEC 4's shape."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app builds its own web.Server; only which connection handler it makes differs.
        server.__class__ = _Server
        return server


# ---------------------------------------------------------------------- answers


def reply(
    model: type[BaseModel],
    data: Mapping[str, Any],
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A JSON answer shaped by its documented model: what is served is what is documented."""
    document = model.model_validate(data).model_dump(mode="json", by_alias=True, exclude_unset=True)
    return json_response(document, status=status, headers=headers)


def min_discount_of(request: web.Request) -> int | None:
    """The ``/min{N}`` prefix of a media path (SPEC 3), validated; None when absent."""
    prefix = request.match_info.get("min_prefix")
    if prefix is None:
        return None
    try:
        if not prefix.startswith("min"):
            # The prefix is spelt in lower case, as SPEC 3 writes it; /MIN30 is no /min30.
            raise MinimumDiscountError(
                f"invalid minimum discount {prefix[:20]!a}: use /min{{N}}/ in lower case, "
                "with N a whole number from 0 to 100, such as /min30/"
            )
        discount, _ = parse_min_prefix(request.path)
    except MinimumDiscountError as e:
        raise ApiError(400, "invalid_minimum_discount", str(e)) from None
    return discount


# ---------------------------------------------------------------------- authentication


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN.fullmatch(token):
        return None
    return token


async def principal(request: web.Request) -> tuple[str, str] | None:
    token = bearer(request)
    if token is None:
        return None
    key_hash = sha256_hex(token)
    known: dict[str, tuple[str, str]] = request.app[PRINCIPALS]
    if key_hash in known:
        return known[key_hash]
    engine = engine_of(request)
    found = await engine.read(engine.views.principal, key_hash)
    if found is None:
        return None
    if len(known) > 100_000:
        known.clear()
    known[key_hash] = (found[0], found[1])
    return known[key_hash]


def unauthenticated(message: str = "missing or invalid API key") -> ApiError:
    return ApiError(401, "invalid_api_key", message)


async def require(request: web.Request, kind: str) -> str:
    found = await principal(request)
    if found is None or found[0] != kind:
        raise unauthenticated(f"a valid {kind} API key is required")
    return found[1]


def require_admin(request: web.Request) -> None:
    token = bearer(request)
    expected = engine_of(request).admin_token
    if token is None or not hmac.compare_digest(token.encode(), expected.encode()):
        raise unauthenticated("a valid admin token is required")


async def job_access(request: web.Request, job_id: str, poll: bool = False) -> JobRow:
    """A buyer's own job (buyer key) or the one job a job token names; 404 otherwise. A
    ``poll`` may be answered from the process's cache of finished jobs (api/jobcache.py)."""
    try:
        job_uuid = uuid.UUID(job_id)
    except ValueError:
        raise not_found("job") from None
    engine = engine_of(request)
    token = request.headers.get("X-Job-Token")
    buyer_id: str | None = None
    if token is None:
        buyer_id = await require(request, "buyer")
    if poll:
        row = await engine.job_row(str(job_uuid))
    else:
        row = await engine.read(engine.views.get_job, str(job_uuid))
    if token is not None and (row is None or not _token_opens(token, row.token_hash)):
        if bearer(request) is None:
            # A token that opens no job is a wrong credential, answered alike whether the id
            # names a job (someone else's) or none: no oracle of which ids exist (SPEC 4.5).
            raise unauthenticated("invalid job token")
        buyer_id = await require(request, "buyer")
    if row is None or (buyer_id is not None and row.buyer_id != buyer_id):
        raise not_found("job")
    return row


def _token_opens(token: str, token_hash: str) -> bool:
    return bool(_TOKEN.fullmatch(token)) and hmac.compare_digest(sha256_hex(token), token_hash)


async def caught_up(request: web.Request, position: int) -> None:
    """Read-your-writes: wait until the views include ``position`` before answering."""
    if position <= 0:
        return
    engine = engine_of(request)
    ok = await engine.caught_up(position, READ_YOUR_WRITES_TIMEOUT)
    if not ok:
        raise ApiError(503, "projection_lagging", "the write is saved but not yet visible; retry")


def catalog_of(request: web.Request) -> Catalog:
    catalog = engine_of(request).catalog
    if catalog is None:
        raise ApiError(503, "catalog_unavailable", "the model catalog is loading; retry shortly")
    return catalog


def resolve_model(request: web.Request, name: str) -> ModelSpec:
    """A catalog model by id or alias, or 404 ``model_not_found``."""
    spec = catalog_of(request).resolve(name)
    if spec is None:
        raise ApiError(404, "model_not_found", f"unknown model {name}", "model")
    return spec
