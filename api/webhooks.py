"""Webhook routes (SPEC 4.4, 7): the buyer's signing secret, a job's deliveries, redelivery."""

from __future__ import annotations

import uuid
from typing import Literal

from aiohttp import web
from pydantic import Field

from api.errors import not_found
from api.http import caught_up, engine_of, job_access, min_discount_of, reply, require
from api.routes import Reply, Route
from api.schemas.common import Document, Uuid
from services.commands import NotFound


class WebhookSecretCreated(Document):
    object: Literal["webhook.secret"]
    secret: str = Field(
        description="whsec_ + base64: verify webhooks with it (Standard Webhooks v1); shown "
        "only here. The secret it replaces keeps signing for 24 hours"
    )
    created: int = Field(description="Unix seconds")
    previous_valid_until: int | None = Field(
        description="Unix seconds until which the replaced secret also signs; null when this "
        "secret replaces none"
    )


class WebhookAttempt(Document):
    at: float = Field(description="When the try ended, Unix seconds")
    status_code: int | None = Field(description="The receiver's HTTP status; null if none")
    latency_ms: int | None = Field(description="From sending to the answer; null if not sent")
    error: str | None = Field(description="Why the try failed, in the engine's words")


class WebhookDeliveryView(Document):
    object: Literal["webhook.delivery"]
    job_id: Uuid
    webhook_id: str = Field(description="The webhook-id header of every try and redelivery")
    url: str
    status: Literal["pending", "delivered", "failed"] = Field(
        description="failed: the retry schedule ran out; redeliver to try again"
    )
    next_attempt_at: float | None = Field(description="Unix seconds; null when none is due")
    attempts: list[WebhookAttempt]


class WebhookDeliveryList(Document):
    object: Literal["list"]
    data: list[WebhookDeliveryView] = Field(
        description="The job's webhook (empty without webhook_url or before the job ended)"
    )


async def rotate_secret(request: web.Request) -> web.Response:
    engine = engine_of(request)
    buyer_id = await require(request, "buyer")
    secret, _, at, previous_until = await engine.blocking(engine.webhooks.rotate_secret, buyer_id)
    created = int(at)
    # From the same clock reading as created: exactly the overlap apart.
    overlap_end = None if previous_until is None else created + round(previous_until - at)
    return reply(
        WebhookSecretCreated,
        {
            "object": "webhook.secret",
            "secret": secret,
            "created": created,
            "previous_valid_until": overlap_end,
        },
        status=201,
    )


async def list_deliveries(request: web.Request) -> web.Response:
    min_discount_of(request)
    engine = engine_of(request)
    row = await job_access(request, request.match_info["job_id"])
    docs = await engine.read(engine.views.webhook_deliveries, row.job_id)
    return reply(WebhookDeliveryList, {"object": "list", "data": docs})


async def redeliver(request: web.Request) -> web.Response:
    min_discount_of(request)
    engine = engine_of(request)
    row = await job_access(request, request.match_info["job_id"])
    try:
        written = await engine.blocking(engine.webhooks.redeliver, uuid.UUID(row.job_id))
    except NotFound:
        raise not_found("webhook") from None
    await caught_up(request, written.position)
    docs = await engine.read(engine.views.webhook_deliveries, row.job_id)
    return reply(WebhookDeliveryView, docs[0], status=202)


JOB_ERRORS = {404: "not_found: no such job, or not yours"}

WEBHOOK_ROUTES: list[Route] = [
    Route(
        "POST",
        "/v1/buyer/webhook-secret",
        rotate_secret,
        name="rotate_webhook_secret",
        summary="Create or rotate your webhook signing secret (shown once)",
        tag="webhooks",
        auth=("buyer",),
        replies={201: Reply("The new secret", WebhookSecretCreated)},
    ),
    Route(
        "GET",
        "/v1/video/generations/{job_id}/webhooks",
        list_deliveries,
        name="list_job_webhooks",
        summary="A job's webhook: every try, the next one, the outcome",
        tag="webhooks",
        auth=("buyer", "job_token"),
        replies={200: Reply("The job's webhook deliveries", WebhookDeliveryList)},
        errors=JOB_ERRORS,
        min_prefix=True,
    ),
    Route(
        "POST",
        "/v1/video/generations/{job_id}/webhooks/redeliver",
        redeliver,
        name="redeliver_job_webhook",
        summary="Send the job's webhook again (same payload, same webhook-id)",
        tag="webhooks",
        auth=("buyer", "job_token"),
        replies={202: Reply("Scheduled now", WebhookDeliveryView)},
        errors={
            404: "not_found: no such job, or not yours, or it has no webhook (yet)",
            503: "projection_lagging: saved, not yet visible; retry",
        },
        min_prefix=True,
    ),
]
