"""The aiohttp application: routes, public endpoints, OpenAPI, and the engine's lifecycle."""

from __future__ import annotations

from collections import Counter
from typing import Any

from aiohttp import web

from adapters.settings import Settings
from adapters.simulator import create_simulator_app
from api import accounts, docs, finance, jobs, market, sellers
from api.artifacts import ARTIFACT_ROUTES
from api.body import MAX_BODY_BYTES
from api.bootstrap import Engine
from api.http import METRICS, PRINCIPALS, STARTUP, Startup, engine_of, reply, request_context
from api.openapi import openapi_document
from api.routes import Reply, Route, register
from api.schemas.system import Health
from api.webhooks import WEBHOOK_ROUTES

VERSION = "0.1.0"


async def healthz(request: web.Request) -> web.Response:
    startup = request.app[STARTUP]
    if startup.engine is None:
        # Not ready: a load balancer sends this process nothing yet.
        return reply(
            Health,
            {
                "status": "starting",
                "catalog": False,
                "projection_position": 0,
                "detail": startup.state,
            },
            status=503,
        )
    engine = startup.engine
    unreachable = await engine.database_problem()
    if unreachable is not None:
        # Not ready either: the pool reconnects by itself once the database is back.
        return reply(
            Health,
            {
                "status": "unavailable",
                "catalog": engine.catalog is not None,
                "projection_position": engine.runner.position,
                "detail": unreachable,
            },
            status=503,
        )
    failure = engine.runner.failure
    body: dict[str, Any] = {
        # Degraded, not down: the views keep serving what they hold, but stopped following
        # the log at an event they could not apply (SPEC 8: a stuck projection).
        "status": "ok" if failure is None else "degraded",
        "catalog": engine.catalog is not None,
        "projection_position": engine.runner.position,
    }
    if failure is not None:
        body["projection_failure"] = {
            "position": failure.position,
            "error": failure.error,
            "failed_at": int(failure.at),
        }
    return reply(Health, body)


async def metrics(request: web.Request) -> web.Response:
    engine = engine_of(request)
    failure = engine.runner.failure
    webhook_backlog = await engine.read(engine.views.webhook_backlog)
    lines = [
        "# HELP mediamarket_http_requests_total HTTP requests by route and status.",
        "# TYPE mediamarket_http_requests_total counter",
    ]
    for (method, route, status), count in sorted(request.app[METRICS].items()):
        lines.append(
            f'mediamarket_http_requests_total{{method="{method}",route="{route}",'
            f'status="{status}"}} {count}'
        )
    lines += [
        "# HELP mediamarket_projection_position Last log position applied to the views.",
        "# TYPE mediamarket_projection_position gauge",
        f"mediamarket_projection_position {engine.runner.position}",
        "# HELP mediamarket_projection_failed 1 when the projection stopped on an event it could"
        " not apply (see /healthz), else 0.",
        "# TYPE mediamarket_projection_failed gauge",
        f"mediamarket_projection_failed {0 if failure is None else 1}",
        "# HELP mediamarket_projection_failed_position Log position of the event the projection"
        " stopped on (0 while it runs).",
        "# TYPE mediamarket_projection_failed_position gauge",
        f"mediamarket_projection_failed_position {0 if failure is None else failure.position}",
        "# HELP mediamarket_worker_active_jobs Jobs this process is driving now.",
        "# TYPE mediamarket_worker_active_jobs gauge",
        f"mediamarket_worker_active_jobs {engine.worker.active_jobs if engine.worker else 0}",
        "# HELP mediamarket_webhook_backlog Webhooks not yet delivered and still to be tried.",
        "# TYPE mediamarket_webhook_backlog gauge",
        f"mediamarket_webhook_backlog {webhook_backlog}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


PUBLIC_ROUTES: list[Route] = [
    Route(
        "GET",
        "/healthz",
        healthz,
        name="get_health",
        summary="Liveness and readiness",
        tag="meta",
        replies={
            200: Reply("The engine's state", Health),
            503: Reply("Not ready: waiting for the database or rebuilding views", Health),
        },
    ),
    Route(
        "GET",
        "/metrics",
        metrics,
        name="get_metrics",
        summary="Prometheus metrics",
        tag="meta",
        replies={
            200: Reply(
                "The Prometheus text format", media_type="text/plain", schema={"type": "string"}
            )
        },
    ),
    Route(
        "GET",
        "/openapi.json",
        openapi,
        name="get_openapi",
        summary="This document: OpenAPI 3.1",
        tag="meta",
        replies={200: Reply("The document", schema={"type": "object"})},
    ),
]

# Every route the app serves, in the order the document lists them.
ROUTES: list[Route] = [
    *jobs.MEDIA_ROUTES,
    *ARTIFACT_ROUTES,
    *WEBHOOK_ROUTES,
    *accounts.ACCOUNT_ROUTES,
    *sellers.SELLER_ROUTES,
    *market.MARKET_ROUTES,
    *finance.FINANCE_ROUTES,
    *PUBLIC_ROUTES,
    *docs.DOCS_ROUTES,
]
OPENAPI = openapi_document(ROUTES, version=VERSION)


def create_app(
    engine: Engine | None,
    *,
    settings: Settings | None = None,
    mount_simulator: bool = False,
) -> web.Application:
    """The API over ``engine``; or, with ``engine`` None, over the one ``app[STARTUP]`` gets
    when it is ready (until then: 503, see ``Startup``)."""
    app = web.Application(middlewares=[request_context], client_max_size=MAX_BODY_BYTES)
    app[STARTUP] = Startup(engine)
    app[METRICS] = Counter()
    app[PRINCIPALS] = {}
    register(app, ROUTES)
    settings = settings or (engine.settings if engine is not None else None)
    if mount_simulator:
        assert settings is not None
        app.add_subapp(
            "/sim",
            create_simulator_app(
                render_seconds=settings.SIM_RENDER_SECONDS,
                state_path=settings.data_dir / "simulator.db",
            ),
        )
    return app


def is_embedded_simulator(settings: Settings) -> bool:
    return settings.PROVIDER_BASE_URL_VENICE is None
