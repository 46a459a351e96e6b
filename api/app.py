"""The aiohttp application: routes, public endpoints, OpenAPI, and the engine's lifecycle."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from adapters.settings import Settings
from adapters.simulator import create_simulator_app
from api import accounts, docs, finance, jobs, market, sellers
from api.artifacts import ARTIFACT_ROUTES
from api.body import MAX_BODY_BYTES
from api.bootstrap import Engine
from api.http import PRINCIPALS, STARTUP, Startup, engine_of, reply, request_context
from api.metrics import CONTENT_TYPE, degraded_reasons
from api.openapi import openapi_document
from api.responses import json_response
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
    lag = await engine.blocking(engine.metrics.projection_lag, engine.market, engine.views)
    # Degraded, not down: the views keep serving what they hold, but stopped following the
    # log at an event they could not apply, or follow it too far behind (SPEC 8).
    reasons = degraded_reasons(failure, lag)
    work_failure = engine.work_runner.failure if engine.work_runner is not None else None
    if work_failure is not None:
        # The work queue stopped following the log: no new job is dispatched by this process.
        reasons.append("work_queue_failed")
    body: dict[str, Any] = {
        "status": "degraded" if reasons else "ok",
        "degraded_reasons": reasons,
        "catalog": engine.catalog is not None,
        "projection_position": engine.runner.position,
        "projection_lag_events": lag.events,
        "projection_lag_seconds": round(lag.seconds, 3),
    }
    for key, stopped in (("projection_failure", failure), ("work_queue_failure", work_failure)):
        if stopped is not None:
            body[key] = {
                "position": stopped.position,
                "error": stopped.error,
                "failed_at": int(stopped.at),
            }
    return reply(Health, body)


async def metrics(request: web.Request) -> web.Response:
    engine = engine_of(request)
    body = await engine.blocking(engine.metrics.scrape, engine)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    return json_response(OPENAPI)


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


def create_ops_app(engine: Engine) -> web.Application:
    """What a ``mediamarket worker`` serves on ``METRICS_PORT``: ``/healthz`` and ``/metrics``
    only (its provider errors, outcomes and active jobs are seen nowhere else)."""
    app = web.Application(middlewares=[request_context])
    app[STARTUP] = Startup(engine)
    app[PRINCIPALS] = {}
    register(app, [r for r in PUBLIC_ROUTES if r.path in ("/healthz", "/metrics")])
    return app


def is_embedded_simulator(settings: Settings) -> bool:
    return settings.PROVIDER_BASE_URL_VENICE is None
