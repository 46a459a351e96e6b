"""Seller routes (SPEC 4.4): offers and earnings."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from adapters.outbound import OutboundRefused
from adapters.venice import ProviderError
from api.body import parse_body, parse_query
from api.errors import ApiError, invalid, not_found
from api.http import caught_up, engine_of, reply, require, resolve_model
from api.routes import Reply, Route
from api.schemas.accounts import DayRange, Earnings, Offer, OfferBody, OfferList, OfferPatch
from api.schemas.common import Deleted
from domain.money import MoneyError, format_multiplier, parse_multiplier, to_json
from services.commands import NotFound
from services.routing import default_params


def uuid_or_404(text: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise not_found(what) from None


def _multiplier(text: str) -> str:
    try:
        return format_multiplier(parse_multiplier(text))
    except MoneyError as e:
        raise invalid(str(e), "cost_multiplier") from None


def check_base_url(request: web.Request, provider: str, base_url: str | None) -> None:
    """A provider URL a seller or buyer gives must pass the outbound policy (SPEC 9) before
    the engine ever calls it."""
    if base_url is None:
        return
    try:
        engine_of(request).outbound.policy.check_base_url(provider, base_url)
    except OutboundRefused as e:
        raise invalid(f"base_url is not allowed: {e}", "base_url") from None


async def check_key(
    request: web.Request, provider: str, base_url: str | None, api_key: str, spec: Any
) -> None:
    """Before a key goes live: the provider quotes the model's default request there, and takes
    the key (a probe that costs nothing, as Venice's quote needs no key). Only the engine's own
    description of a refusal is shown, never what the provider's body said."""
    engine = engine_of(request)
    client = engine.providers.client(provider, base_url)
    try:
        await client.quote(api_key, default_params(spec))
        await client.check_key(api_key, spec.provider_model)
    except ProviderError as e:
        raise ApiError(
            400,
            "invalid_provider_key",
            f"the provider did not accept this API key: {e.message}",
            "api_key",
        ) from None


async def create_offer(request: web.Request) -> web.Response:
    seller_id = await require(request, "seller")
    body = await parse_body(request, OfferBody)
    engine = engine_of(request)
    multiplier = _multiplier(body.cost_multiplier)
    spec = resolve_model(request, body.model)
    check_base_url(request, body.provider, body.base_url)
    await check_key(request, body.provider, body.base_url, body.api_key, spec)
    offer_id, written = await engine.blocking(
        engine.commands.create_offer,
        seller_id=uuid.UUID(seller_id),
        model=spec.id,
        provider=body.provider,
        base_url=body.base_url,
        api_key=body.api_key,
        cost_multiplier=multiplier,
        max_concurrent_jobs=body.max_concurrent_jobs,
    )
    await caught_up(request, written.position)
    offer = await engine.read(engine.views.offer, str(offer_id))
    assert offer is not None
    return reply(Offer, offer.public(engine.router.wall_clock()), status=201)


async def list_offers(request: web.Request) -> web.Response:
    seller_id = await require(request, "seller")
    engine = engine_of(request)
    offers = await engine.read(engine.views.offers, seller_id=seller_id)
    now = engine.router.wall_clock()
    return reply(OfferList, {"object": "list", "data": [o.public(now) for o in offers]})


async def _own_offer(request: web.Request, seller_id: str) -> Any:
    engine = engine_of(request)
    offer_id = uuid_or_404(request.match_info["offer_id"], "offer")
    offer = await engine.read(engine.views.offer, str(offer_id))
    if offer is None or offer.seller_id != seller_id or offer.state == "deleted":
        raise not_found("offer")
    return offer


async def update_offer(request: web.Request) -> web.Response:
    seller_id = await require(request, "seller")
    body = await parse_body(request, OfferPatch)
    offer = await _own_offer(request, seller_id)
    engine = engine_of(request)
    # An explicit null lifts the concurrency limit; any other null means "leave as it is".
    changes: dict[str, Any] = {
        name: value
        for name, value in body.model_dump(exclude_unset=True).items()
        if value is not None or name == "max_concurrent_jobs"
    }
    if "cost_multiplier" in changes:
        changes["cost_multiplier"] = _multiplier(changes["cost_multiplier"])
    if "api_key" in changes:
        spec = resolve_model(request, offer.model)
        await check_key(request, offer.provider, offer.base_url, changes["api_key"], spec)
    try:
        written = await engine.blocking(
            engine.commands.update_offer, uuid.UUID(seller_id), uuid.UUID(offer.offer_id), changes
        )
    except NotFound:
        raise not_found("offer") from None
    await caught_up(request, written.position)
    fresh = await engine.read(engine.views.offer, offer.offer_id)
    assert fresh is not None
    return reply(Offer, fresh.public(engine.router.wall_clock()))


async def delete_offer(request: web.Request) -> web.Response:
    seller_id = await require(request, "seller")
    offer = await _own_offer(request, seller_id)
    engine = engine_of(request)
    written = await engine.blocking(
        engine.commands.delete_offer, uuid.UUID(seller_id), uuid.UUID(offer.offer_id)
    )
    await caught_up(request, written.position)
    return reply(Deleted, {"id": offer.offer_id, "object": "offer", "deleted": True})


async def earnings(request: web.Request) -> web.Response:
    """Settled payouts of the seller's jobs, in total, by model and by day (UTC)."""
    seller_id = await require(request, "seller")
    query = parse_query(request, DayRange)
    first_day, last_day = query.from_, query.to
    engine = engine_of(request)
    rows = await engine.read(engine.views.seller_earnings, seller_id, first_day, last_day)
    models: dict[str, tuple[int, int]] = {}
    days: dict[str, list[tuple[str, int, int]]] = {}
    for day, model, jobs, payout in rows:
        before = models.get(model, (0, 0))
        models[model] = (before[0] + jobs, before[1] + payout)
        days.setdefault(day, []).append((model, jobs, payout))

    def line(jobs: int, payout: int) -> dict[str, Any]:
        return {"jobs": jobs, "payout_usdc": to_json(payout)}

    return reply(
        Earnings,
        {
            "object": "seller.earnings",
            "seller_id": seller_id,
            "from": first_day,
            "to": last_day,
            **line(sum(j for j, _ in models.values()), sum(p for _, p in models.values())),
            "by_model": [{"model": m, **line(j, p)} for m, (j, p) in sorted(models.items())],
            "by_day": [
                {
                    "day": day,
                    **line(sum(j for _, j, _ in entries), sum(p for _, _, p in entries)),
                    "models": [{"model": m, **line(j, p)} for m, j, p in entries],
                }
                for day, entries in days.items()
            ],
        },
    )


OFFER_ERRORS = {404: "not_found: no such offer of yours"}
LAGGING = "projection_lagging: saved, not yet visible; retry"

SELLER_ROUTES: list[Route] = [
    Route(
        "GET",
        "/v1/seller/earnings",
        earnings,
        name="get_earnings",
        summary="Settled payouts by model and day",
        tag="sellers",
        auth=("seller",),
        query=DayRange,
        replies={200: Reply("Your payouts", Earnings)},
    ),
    Route(
        "POST",
        "/v1/seller/offers",
        create_offer,
        name="create_offer",
        summary="List provider capacity as an offer",
        tag="sellers",
        auth=("seller",),
        body=OfferBody,
        replies={201: Reply("The offer, live in the order book", Offer)},
        errors={
            400: "invalid_request, invalid_provider_key: the provider refused the key",
            404: "model_not_found",
            503: f"catalog_unavailable, {LAGGING}",
        },
    ),
    Route(
        "GET",
        "/v1/seller/offers",
        list_offers,
        name="list_offers",
        summary="Your offers",
        tag="sellers",
        auth=("seller",),
        replies={200: Reply("Every offer of yours not withdrawn", OfferList)},
    ),
    Route(
        "PATCH",
        "/v1/seller/offers/{offer_id}",
        update_offer,
        name="update_offer",
        summary="Change, pause or resume an offer",
        tag="sellers",
        auth=("seller",),
        body=OfferPatch,
        replies={200: Reply("The offer as changed", Offer)},
        errors={
            400: "invalid_request, invalid_provider_key: the provider refused the new key",
            **OFFER_ERRORS,
            503: f"catalog_unavailable, {LAGGING}",
        },
    ),
    Route(
        "DELETE",
        "/v1/seller/offers/{offer_id}",
        delete_offer,
        name="delete_offer",
        summary="Withdraw an offer",
        tag="sellers",
        auth=("seller",),
        replies={200: Reply("Withdrawn", Deleted)},
        errors={**OFFER_ERRORS, 503: LAGGING},
    ),
]
