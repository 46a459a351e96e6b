"""Shared HTTP plumbing: the app key, middlewares, authentication, body parsing."""

from __future__ import annotations

import hmac
import itertools
import json
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError

from adapters.crypto import sha256_hex
from api.bootstrap import Engine
from api.errors import ApiError, invalid, not_found
from domain.catalog import Catalog, ModelSpec
from domain.routing import MinimumDiscountError, parse_min_prefix
from projections.views import JobRow
from services.exports import parse_day

ENGINE = web.AppKey("engine", Engine)
# Keys are never reassigned, so a positive lookup can be remembered for the process lifetime.
PRINCIPALS = web.AppKey("principals", dict)
M = TypeVar("M", bound=BaseModel)
METRICS = web.AppKey("metrics", Counter)
log = structlog.get_logger("http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY_BYTES = 4 * 1024 * 1024
READ_YOUR_WRITES_TIMEOUT = 5.0
SLOW_REQUEST_MS = 1000.0
# Unique across processes by the random prefix, and far cheaper than a uuid4 per request.
REQUEST_ID_PREFIX = secrets.token_hex(6)
REQUEST_COUNTER = itertools.count()


def engine_of(request: web.Request) -> Engine:
    return request.app[ENGINE]


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request ids, the error shape of SPEC 4 for every failure, and one access-log line."""
    request_id = request.headers.get("X-Request-Id")
    if not request_id or len(request_id) > 200:
        request_id = f"req_{REQUEST_ID_PREFIX}{next(REQUEST_COUNTER):010x}"
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
        except Exception:
            log.exception("unhandled_error", method=request.method, path=request.path)
            response = ApiError(500, "internal_error", "internal error").response()
        response.headers["X-Request-Id"] = request_id
        route = request.match_info.route.resource
        template = route.canonical if route is not None else "unmatched"
        request.app[METRICS][(request.method, template, response.status)] += 1
        ms = round((time.perf_counter() - started) * 1000, 2)
        # Every request at info costs a tenth of a poll's CPU; failures and slow ones stay
        # visible at info, the rest at debug (LOG_LEVEL=debug shows them all).
        emit = log.info if response.status >= 500 or ms > SLOW_REQUEST_MS else log.debug
        emit("request", method=request.method, path=request.path, status=response.status, ms=ms)
        return response
    finally:
        structlog.contextvars.clear_contextvars()


# ---------------------------------------------------------------------- body parsing


async def json_body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, request.content_length)
    raw = await request.read()
    if not raw:
        raise invalid("request body must be a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise invalid("request body is not valid JSON") from None


def parse_model(model: type[M], body: Any) -> M:
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        # The top-level field: pydantic appends the member type for a union ("amount_usdc.str").
        param = str(first["loc"][0]) if first["loc"] else None
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = f"unknown field {param}"
        elif first["type"] == "missing":
            message = f"{param} is required"
        raise invalid(
            f"{param}: {message}" if param and param not in message else message, param
        ) from None


def min_discount_of(request: web.Request) -> int | None:
    """The ``/min{N}`` prefix of a media path (SPEC 3), validated; None when absent."""
    if "min_prefix" not in request.match_info:
        return None
    try:
        discount, _ = parse_min_prefix(request.path)
    except MinimumDiscountError as e:
        raise ApiError(400, "invalid_minimum_discount", str(e)) from None
    return discount


# ---------------------------------------------------------------------- authentication


def bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


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


async def job_access(request: web.Request, job_id: str) -> JobRow:
    """A buyer's own job (buyer key) or the one job a job token names; 404 otherwise."""
    try:
        job_uuid = uuid.UUID(job_id)
    except ValueError:
        raise not_found("job") from None
    engine = engine_of(request)
    token = request.headers.get("X-Job-Token")
    buyer_id: str | None = None
    if token is None:
        buyer_id = await require(request, "buyer")
    row = await engine.read(engine.views.get_job, str(job_uuid))
    if row is None:
        raise not_found("job")
    if token is not None and not hmac.compare_digest(sha256_hex(token), row.token_hash):
        if bearer(request) is None:
            raise unauthenticated("invalid job token")
        buyer_id = await require(request, "buyer")
    if buyer_id is not None and row.buyer_id != buyer_id:
        raise not_found("job")
    return row


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


def day_param(request: web.Request, name: str) -> str | None:
    """An optional ``YYYY-MM-DD`` (UTC day) query parameter."""
    value = request.query.get(name)
    if value is None:
        return None
    try:
        return parse_day(value)
    except ValueError:
        raise invalid(f"{name} must be a date as YYYY-MM-DD", name) from None
