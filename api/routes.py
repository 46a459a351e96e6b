"""Each route once: its handler, and everything ``/openapi.json`` says about it.

A ``Route`` names the pydantic models of its body, query and answers, the headers it reads,
who may call it and every status it can answer. The app registers routes from these lists and
the OpenAPI document is generated from the same lists (``api.openapi``), so a route cannot be
served undocumented, nor documented with a shape it does not have.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Auth = Literal["buyer", "seller", "admin", "job_token"]

# SPEC 3: ``/min{N}`` before any media path. Matched case-insensitively so that a misspelt
# prefix (``/MIN30``) is told what is wrong (400) instead of "no such route".
MIN_PREFIX_ROUTE = "/{min_prefix:[mM][iI][nN][^/]*}"
MIN_PREFIX_PATH = "/min{min_discount}"

UUID_SCHEMA: dict[str, Any] = {"type": "string", "format": "uuid"}
PATH_PARAMETERS: dict[str, tuple[dict[str, Any], str]] = {
    "job_id": (UUID_SCHEMA, "A job id; another buyer's job is answered like an unknown one"),
    "index": ({"type": "integer", "minimum": 0}, "The artifact's index in the job's results"),
    "buyer_id": (UUID_SCHEMA, "A buyer id"),
    "offer_id": (UUID_SCHEMA, "One of your offers"),
    "provider_id": (UUID_SCHEMA, "One of your provider keys"),
    "model": ({"type": "string"}, "A catalog model id or alias"),
    "min_discount": (
        {"type": "integer", "minimum": 0, "maximum": 100},
        "Route only to offers at least this many percent below the list price (SPEC 3); "
        "accepted and ignored on every media route but the submit",
    ),
}


@dataclass(frozen=True)
class Header:
    name: str
    description: str
    schema: Mapping[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = False


# Visible ASCII, no surrounding blanks (HTTP strips them): what a client can send back intact.
IDEMPOTENCY_KEY_PATTERN = r"[!-~]([ -~]*[!-~])?"
IDEMPOTENCY_KEY = Header(
    "Idempotency-Key",
    "Makes the submit safe to retry for 24 hours: the same key and body return the original "
    "job (with Idempotent-Replayed: true); the same key with another body is a 422",
    {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "pattern": f"^{IDEMPOTENCY_KEY_PATTERN}$",
    },
)
RANGE = Header(
    "Range",
    "One byte range (RFC 9110), such as bytes=0-1023; several ranges get the whole file, "
    "a malformed one is refused 416",
)
REQUEST_ID = Header(
    "X-Request-Id",
    "Your id for this request, echoed back when it is 1 to 200 visible ASCII characters; "
    "one is generated otherwise",
)

# Response headers, by name.
RESPONSE_HEADERS: dict[str, tuple[dict[str, Any], str]] = {
    "X-Request-Id": ({"type": "string"}, "The request's id, echoed or generated"),
    "Retry-After": ({"type": "integer", "minimum": 1}, "Seconds until polling again is useful"),
    "Idempotent-Replayed": (
        {"type": "string", "enum": ["true"]},
        "The job was created by an earlier request with this Idempotency-Key",
    ),
    "Preference-Applied": (
        {"type": "string", "pattern": "^wait=[0-9]+$"},
        "The Prefer: wait the answer honoured, in seconds (at most 60)",
    ),
    "Content-Range": ({"type": "string"}, "The bytes sent, as bytes first-last/size"),
    "Accept-Ranges": ({"type": "string", "enum": ["bytes"]}, "Byte ranges are served"),
    "Content-Disposition": ({"type": "string"}, "The file name to save as"),
}


@dataclass(frozen=True)
class Reply:
    """One answer of a route: a JSON document (``model``) or other content (``schema``)."""

    description: str
    model: type[BaseModel] | None = None
    media_type: str = "application/json"
    schema: Mapping[str, Any] | None = None
    headers: tuple[str, ...] = ()
    # Other media types the same answer may come in.
    also: tuple[str, ...] = ()


CSV = Reply(
    "The rows as CSV, one header line first",
    media_type="text/csv",
    schema={"type": "string"},
    headers=("Content-Disposition",),
)


# What each error status means, for the document; a route adds its own codes.
ERROR_STATUSES: dict[int, str] = {
    400: "invalid_request: a malformed or unsupported request",
    401: "invalid_api_key: no, or the wrong, credentials",
    402: "insufficient_balance: the hold exceeds the available balance",
    404: "not_found: no such resource, or not yours",
    410: "artifact_expired: past its retention period",
    413: "request_too_large: a body over 4 MiB",
    415: "unsupported_media_type: a body that is not application/json",
    416: "range_not_satisfiable: a malformed range, or one past the end of the file",
    422: "idempotency_key_reused: the key was used with another body",
    500: "internal_error: a bug; the request id finds it in the logs",
    503: "the engine cannot answer now; retry",
}


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    name: str
    summary: str
    tag: str
    replies: Mapping[int, Reply]
    auth: tuple[Auth, ...] = ()
    body: type[BaseModel] | None = None
    query: type[BaseModel] | None = None
    headers: tuple[Header, ...] = ()
    # Error statuses beyond those every route of its kind can answer, with their codes.
    errors: Mapping[int, str] = field(default_factory=dict)
    # Media routes also answer under SPEC 3's ``/min{N}`` prefix.
    min_prefix: bool = False
    description: str = ""
    # Path parameters particular to this route: name -> (schema, description).
    path_parameters: Mapping[str, tuple[Mapping[str, Any], str]] = field(default_factory=dict)

    def error_statuses(self) -> dict[int, str]:
        """Every error status this route can answer, with what it means here."""
        statuses: dict[int, str] = {500: ERROR_STATUSES[500]}
        if self.body is not None:
            statuses[400] = ERROR_STATUSES[400]
            statuses[413] = ERROR_STATUSES[413]
            statuses[415] = ERROR_STATUSES[415]
        if self.query is not None:
            statuses[400] = ERROR_STATUSES[400]
        if self.auth:
            statuses[401] = ERROR_STATUSES[401]
        statuses.update(self.errors)
        return dict(sorted(statuses.items()))


def register(app: web.Application, routes: Iterable[Route]) -> None:
    for route in routes:
        app.router.add_route(route.method, route.path, route.handler)
        if route.min_prefix:
            # SPEC 3: any media path may carry the /min{N} prefix; the handler validates N.
            app.router.add_route(route.method, MIN_PREFIX_ROUTE + route.path, route.handler)
