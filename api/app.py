"""The aiohttp application: routes, public endpoints, OpenAPI, and the engine's lifecycle."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from aiohttp import web

from adapters.settings import Settings
from adapters.simulator import create_simulator_app
from api import accounts, finance, jobs, market
from api.bootstrap import Engine
from api.http import ENGINE, MAX_BODY_BYTES, METRICS, PRINCIPALS, engine_of, request_context

PUBLIC_ROUTES: list[tuple[str, str, Any, str]] = []


async def healthz(request: web.Request) -> web.Response:
    engine = engine_of(request)
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
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    engine = engine_of(request)
    failure = engine.runner.failure
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
        f"mediamarket_worker_active_jobs {len(engine.worker._active) if engine.worker else 0}",
    ]
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8")


def operation_id(method: str, path: str) -> str:
    return f"{method.lower()}_{re.sub(r'[^a-z0-9]+', '_', path.lower()).strip('_')}"


def openapi_document() -> dict[str, Any]:
    error = {"$ref": "#/components/schemas/Error"}
    paths: dict[str, dict[str, Any]] = {}
    routes = [
        *jobs.MEDIA_ROUTES,
        *accounts.ACCOUNT_ROUTES,
        *market.MARKET_ROUTES,
        *finance.FINANCE_ROUTES,
        *PUBLIC_ROUTES,
    ]
    for method, path, _, summary in routes:
        params = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", path)
        ]
        operation: dict[str, Any] = {
            "summary": summary,
            "operationId": operation_id(method, path),
            "parameters": params,
            "responses": {
                "200": {"description": "OK"},
                "default": {
                    "description": "Error",
                    "content": {"application/json": {"schema": error}},
                },
            },
        }
        if method in ("POST", "PATCH"):
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        paths.setdefault(path, {})[method.lower()] = operation
        if path.startswith("/v1/") and path in {p for _, p, _, _ in jobs.MEDIA_ROUTES}:
            prefixed = "/min{min_discount}" + path
            op = {
                **operation,
                "operationId": operation["operationId"] + "_min",
                "parameters": [
                    {
                        "name": "min_discount",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 0, "maximum": 100},
                    },
                    *params,
                ],
            }
            paths.setdefault(prefixed, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mediamarket",
            "version": "0.1.0",
            "description": "Event-sourced marketplace for asynchronous AI video generation",
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "jobToken": {"type": "apiKey", "in": "header", "name": "X-Job-Token"},
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                k: {"type": ["string", "null"]}
                                for k in ("message", "type", "code", "param")
                            },
                            "required": ["message", "type", "code"],
                        }
                    },
                    "required": ["error"],
                }
            },
        },
        "security": [{"bearer": []}, {"jobToken": []}],
        "paths": paths,
    }


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


PUBLIC_ROUTES.extend(
    [
        ("GET", "/healthz", healthz, "Liveness and readiness"),
        ("GET", "/metrics", metrics, "Prometheus metrics"),
        ("GET", "/openapi.json", openapi, "This document"),
    ]
)


def create_app(engine: Engine, *, mount_simulator: bool = False) -> web.Application:
    app = web.Application(middlewares=[request_context], client_max_size=MAX_BODY_BYTES)
    app[ENGINE] = engine
    app[METRICS] = Counter()
    app[PRINCIPALS] = {}
    jobs.register(app)
    accounts.register(app)
    market.register(app)
    finance.register(app)
    for method, path, handler, _ in PUBLIC_ROUTES:
        app.router.add_route(method, path, handler)
    if mount_simulator:
        app.add_subapp(
            "/sim",
            create_simulator_app(
                render_seconds=engine.settings.SIM_RENDER_SECONDS,
                state_path=engine.settings.data_dir / "simulator.db",
            ),
        )
    return app


def is_embedded_simulator(settings: Settings) -> bool:
    return settings.PROVIDER_BASE_URL_VENICE is None
