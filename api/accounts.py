"""Buyer, seller and operator routes (SPEC 4.4)."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from adapters.outbound import OutboundRefused
from adapters.venice import ProviderError
from api.errors import ApiError, invalid, not_found
from api.http import (
    catalog_of,
    caught_up,
    day_param,
    engine_of,
    json_body,
    parse_model,
    require,
    require_admin,
    resolve_model,
)
from domain.money import MoneyError, format_multiplier, parse_multiplier, to_json
from services.commands import DepositConflict, NotFound
from services.routing import default_params


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NameBody(Strict):
    name: StrictStr = Field(min_length=1, max_length=200)


class DepositBody(Strict):
    amount_usdc: StrictStr | StrictInt
    deposit_id: StrictStr | None = Field(default=None, min_length=1, max_length=255)


class OfferBody(Strict):
    model: StrictStr
    provider: Literal["venice"]
    api_key: StrictStr = Field(min_length=1, max_length=500)
    base_url: StrictStr | None = Field(default=None, pattern=r"^https?://")
    pricing_mode: Literal["cost_multiplier"] = "cost_multiplier"
    cost_multiplier: StrictStr
    max_concurrent_jobs: StrictInt | None = Field(default=None, ge=1, le=10_000)


class OfferPatch(Strict):
    cost_multiplier: StrictStr | None = None
    max_concurrent_jobs: StrictInt | None = Field(default=None, ge=1, le=10_000)
    paused: StrictBool | None = None
    api_key: StrictStr | None = Field(default=None, min_length=1, max_length=500)


def _uuid(text: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise not_found(what) from None


def _multiplier(text: str) -> str:
    try:
        return format_multiplier(parse_multiplier(text))
    except MoneyError as e:
        raise invalid(str(e), "cost_multiplier") from None


# ---------------------------------------------------------------------- operator


async def _create_principal(request: web.Request, kind: str) -> web.Response:
    """A buyer or seller named by the operator; its API key is shown this once."""
    require_admin(request)
    body = parse_model(NameBody, await json_body(request))
    engine = engine_of(request)
    create = engine.commands.create_buyer if kind == "buyer" else engine.commands.create_seller
    principal_id, api_key, written = await engine.blocking(create, body.name)
    await caught_up(request, written.position)
    return web.json_response(
        {f"{kind}_id": str(principal_id), "object": kind, "name": body.name, "api_key": api_key},
        status=201,
    )


async def create_buyer(request: web.Request) -> web.Response:
    return await _create_principal(request, "buyer")


async def create_seller(request: web.Request) -> web.Response:
    return await _create_principal(request, "seller")


async def deposit(request: web.Request) -> web.Response:
    require_admin(request)
    buyer_id = _uuid(request.match_info["buyer_id"], "buyer")
    body = parse_model(DepositBody, await json_body(request))
    amount = body.amount_usdc
    if isinstance(amount, str):
        if not amount.isdigit() or not amount.isascii():
            raise invalid(
                "amount_usdc must be a positive integer of microdollars, as a string", "amount_usdc"
            )
        amount = int(amount)
    if amount <= 0 or amount > 10**15:
        raise invalid("amount_usdc must be between 1 and 10^15 microdollars", "amount_usdc")
    engine = engine_of(request)
    try:
        written = await engine.blocking(engine.commands.deposit, buyer_id, amount, body.deposit_id)
    except NotFound:
        raise not_found("buyer") from None
    except DepositConflict as e:
        raise ApiError(
            422,
            "idempotency_key_reused",
            f"deposit_id {e.deposit_id!r} was used for a deposit of {e.amount} microdollars",
            "deposit_id",
        ) from None
    await caught_up(request, written.position)
    buyer = await engine.blocking(engine.commands.buyer, buyer_id)
    return web.json_response(
        {
            "object": "deposit",
            "buyer_id": str(buyer_id),
            "amount_usdc": to_json(amount),
            "balance": _balance(buyer),
        },
        status=201,
    )


def _balance(buyer: Any) -> dict[str, str]:
    return {
        "available_usdc": to_json(buyer.available),
        "held_usdc": to_json(buyer.held),
        "spent_usdc": to_json(buyer.spent),
        "deposited_usdc": to_json(buyer.deposited),
    }


# ---------------------------------------------------------------------- buyer


async def buyer_me(request: web.Request) -> web.Response:
    buyer_id = await require(request, "buyer")
    engine = engine_of(request)
    buyer = await engine.blocking(engine.commands.buyer, uuid.UUID(buyer_id))
    return web.json_response(
        {
            "id": buyer_id,
            "object": "buyer",
            "name": buyer.name,
            "balance": _balance(buyer),
            "usage": {
                "jobs": buyer.jobs,
                "spent_usdc": to_json(buyer.spent),
                "held_usdc": to_json(buyer.held),
            },
        }
    )


# ---------------------------------------------------------------------- seller


async def create_offer(request: web.Request) -> web.Response:
    seller_id = await require(request, "seller")
    body = parse_model(OfferBody, await json_body(request))
    engine = engine_of(request)
    multiplier = _multiplier(body.cost_multiplier)
    spec = resolve_model(request, body.model)
    _check_base_url(request, body.provider, body.base_url)
    await _check_key(request, body.provider, body.base_url, body.api_key, spec)
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
    return web.json_response(offer.public(engine.router.wall_clock()), status=201)


def _check_base_url(request: web.Request, provider: str, base_url: str | None) -> None:
    """A provider URL a seller or buyer gives must pass the outbound policy (SPEC 9) before
    the engine ever calls it."""
    if base_url is None:
        return
    try:
        engine_of(request).outbound.policy.check_base_url(provider, base_url)
    except OutboundRefused as e:
        raise invalid(f"base_url is not allowed: {e}", "base_url") from None


async def _check_key(
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


async def list_offers(request: web.Request) -> web.Response:
    seller_id = await require(request, "seller")
    engine = engine_of(request)
    offers = await engine.read(engine.views.offers, seller_id=seller_id)
    now = engine.router.wall_clock()
    return web.json_response({"object": "list", "data": [o.public(now) for o in offers]})


async def _own_offer(request: web.Request, seller_id: str) -> Any:
    engine = engine_of(request)
    offer_id = _uuid(request.match_info["offer_id"], "offer")
    offer = await engine.read(engine.views.offer, str(offer_id))
    if offer is None or offer.seller_id != seller_id or offer.state == "deleted":
        raise not_found("offer")
    return offer


async def update_offer(request: web.Request) -> web.Response:
    seller_id = await require(request, "seller")
    body = parse_model(OfferPatch, await json_body(request))
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
        await _check_key(request, offer.provider, offer.base_url, changes["api_key"], spec)
    try:
        written = await engine.blocking(
            engine.commands.update_offer, uuid.UUID(seller_id), uuid.UUID(offer.offer_id), changes
        )
    except NotFound:
        raise not_found("offer") from None
    await caught_up(request, written.position)
    fresh = await engine.read(engine.views.offer, offer.offer_id)
    assert fresh is not None
    return web.json_response(fresh.public(engine.router.wall_clock()))


async def delete_offer(request: web.Request) -> web.Response:
    seller_id = await require(request, "seller")
    offer = await _own_offer(request, seller_id)
    engine = engine_of(request)
    written = await engine.blocking(
        engine.commands.delete_offer, uuid.UUID(seller_id), uuid.UUID(offer.offer_id)
    )
    await caught_up(request, written.position)
    return web.json_response({"id": offer.offer_id, "object": "offer", "deleted": True})


async def earnings(request: web.Request) -> web.Response:
    """Settled payouts of the seller's jobs, in total, by model and by day (UTC)."""
    seller_id = await require(request, "seller")
    first_day = day_param(request, "from")
    last_day = day_param(request, "to")
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

    return web.json_response(
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
        }
    )


# ---------------------------------------------------------------------- buyer-owned providers


class BuyerProviderBody(Strict):
    provider: Literal["venice"]
    api_key: StrictStr = Field(min_length=1, max_length=500)
    model: StrictStr | None
    base_url: StrictStr | None = Field(default=None, pattern=r"^https?://")


async def add_buyer_provider(request: web.Request) -> web.Response:
    """A buyer's own provider key: for one model (tried first) or, with ``model: null``, for
    every model of that provider (tried after the market)."""
    buyer_id = await require(request, "buyer")
    body = parse_model(BuyerProviderBody, await json_body(request))
    engine = engine_of(request)
    if body.model is None:
        # A catch-all key is checked with a quote for any model of its provider.
        models = catalog_of(request).models()
        spec = next((m for m in models if m.provider == body.provider), None)
        if spec is None:
            raise invalid(f"the catalog has no model of provider {body.provider}", "provider")
    else:
        spec = resolve_model(request, body.model)
    _check_base_url(request, body.provider, body.base_url)
    await _check_key(request, body.provider, body.base_url, body.api_key, spec)
    provider_id, written = await engine.blocking(
        engine.commands.add_buyer_provider,
        buyer_id=uuid.UUID(buyer_id),
        provider=body.provider,
        model=None if body.model is None else spec.id,
        base_url=body.base_url,
        api_key=body.api_key,
    )
    await caught_up(request, written.position)
    row = await engine.read(engine.views.buyer_provider, str(provider_id))
    assert row is not None
    return web.json_response(row.public(), status=201)


async def list_buyer_providers(request: web.Request) -> web.Response:
    buyer_id = await require(request, "buyer")
    engine = engine_of(request)
    rows = await engine.read(engine.views.buyer_providers, buyer_id)
    return web.json_response({"object": "list", "data": [r.public() for r in rows]})


async def delete_buyer_provider(request: web.Request) -> web.Response:
    buyer_id = await require(request, "buyer")
    provider_id = _uuid(request.match_info["provider_id"], "provider")
    engine = engine_of(request)
    try:
        written = await engine.blocking(
            engine.commands.delete_buyer_provider, uuid.UUID(buyer_id), provider_id
        )
    except NotFound:
        raise not_found("provider") from None
    await caught_up(request, written.position)
    return web.json_response({"id": str(provider_id), "object": "buyer.provider", "deleted": True})


ACCOUNT_ROUTES: list[tuple[str, str, Any, str]] = [
    ("POST", "/admin/buyers", create_buyer, "Create a buyer (admin); the API key is shown once"),
    ("POST", "/admin/buyers/{buyer_id}/deposits", deposit, "Fund a buyer account (admin)"),
    ("POST", "/admin/sellers", create_seller, "Create a seller (admin); the API key is shown once"),
    ("GET", "/v1/buyer/me", buyer_me, "Your balance and usage"),
    ("POST", "/v1/buyer/providers", add_buyer_provider, "Bring your own provider key"),
    ("GET", "/v1/buyer/providers", list_buyer_providers, "Your own provider keys"),
    ("DELETE", "/v1/buyer/providers/{provider_id}", delete_buyer_provider, "Remove a key"),
    ("GET", "/v1/seller/earnings", earnings, "Settled payouts by model and day"),
    ("POST", "/v1/seller/offers", create_offer, "List provider capacity as an offer"),
    ("GET", "/v1/seller/offers", list_offers, "Your offers"),
    ("PATCH", "/v1/seller/offers/{offer_id}", update_offer, "Change, pause or resume an offer"),
    ("DELETE", "/v1/seller/offers/{offer_id}", delete_offer, "Withdraw an offer"),
]


def register(app: web.Application) -> None:
    for method, path, handler, _ in ACCOUNT_ROUTES:
        app.router.add_route(method, path, handler)
