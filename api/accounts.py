"""Operator and buyer routes (SPEC 4.4): buyers, sellers, deposits, balances, own provider keys."""

from __future__ import annotations

import uuid
from typing import Any

from aiohttp import web

from api.body import parse_body
from api.errors import ApiError, invalid, not_found
from api.http import catalog_of, caught_up, engine_of, reply, require, require_admin, resolve_model
from api.routes import Reply, Route
from api.schemas.accounts import (
    Buyer,
    BuyerCreated,
    BuyerProvider,
    BuyerProviderBody,
    BuyerProviderList,
    Deposit,
    DepositBody,
    NameBody,
    SellerCreated,
)
from api.schemas.common import Deleted
from api.sellers import LAGGING, check_base_url, check_key, uuid_or_404
from domain.money import to_json
from services.commands import DepositConflict, NotFound

# ---------------------------------------------------------------------- operator


async def _create_principal(request: web.Request, kind: str) -> web.Response:
    """A buyer or seller named by the operator; its API key is shown this once."""
    require_admin(request)
    body = await parse_body(request, NameBody)
    engine = engine_of(request)
    create = engine.commands.create_buyer if kind == "buyer" else engine.commands.create_seller
    principal_id, api_key, written = await engine.blocking(create, body.name)
    await caught_up(request, written.position)
    return reply(
        BuyerCreated if kind == "buyer" else SellerCreated,
        {f"{kind}_id": str(principal_id), "object": kind, "name": body.name, "api_key": api_key},
        status=201,
    )


async def create_buyer(request: web.Request) -> web.Response:
    return await _create_principal(request, "buyer")


async def create_seller(request: web.Request) -> web.Response:
    return await _create_principal(request, "seller")


async def deposit(request: web.Request) -> web.Response:
    require_admin(request)
    buyer_id = uuid_or_404(request.match_info["buyer_id"], "buyer")
    body = await parse_body(request, DepositBody)
    # The model allows only canonical ASCII decimals from 1 to 10**15.
    amount = int(body.amount_usdc)
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
    return reply(
        Deposit,
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
    return reply(
        Buyer,
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
        },
    )


async def add_buyer_provider(request: web.Request) -> web.Response:
    """A buyer's own provider key: for one model (tried first) or, with ``model: null``, for
    every model of that provider (tried after the market)."""
    buyer_id = await require(request, "buyer")
    body = await parse_body(request, BuyerProviderBody)
    engine = engine_of(request)
    if body.model is None:
        # A catch-all key is checked with a quote for any model of its provider.
        models = catalog_of(request).models()
        spec = next((m for m in models if m.provider == body.provider), None)
        if spec is None:
            raise invalid(f"the catalog has no model of provider {body.provider}", "provider")
    else:
        spec = resolve_model(request, body.model)
    check_base_url(request, body.provider, body.base_url)
    await check_key(request, body.provider, body.base_url, body.api_key, spec)
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
    return reply(BuyerProvider, row.public(), status=201)


async def list_buyer_providers(request: web.Request) -> web.Response:
    buyer_id = await require(request, "buyer")
    engine = engine_of(request)
    rows = await engine.read(engine.views.buyer_providers, buyer_id)
    return reply(BuyerProviderList, {"object": "list", "data": [r.public() for r in rows]})


async def delete_buyer_provider(request: web.Request) -> web.Response:
    buyer_id = await require(request, "buyer")
    provider_id = uuid_or_404(request.match_info["provider_id"], "provider")
    engine = engine_of(request)
    try:
        written = await engine.blocking(
            engine.commands.delete_buyer_provider, uuid.UUID(buyer_id), provider_id
        )
    except NotFound:
        raise not_found("provider") from None
    await caught_up(request, written.position)
    return reply(Deleted, {"id": str(provider_id), "object": "buyer.provider", "deleted": True})


CREATED = "The new account; its API key is shown this once"

ACCOUNT_ROUTES: list[Route] = [
    Route(
        "POST",
        "/admin/buyers",
        create_buyer,
        name="create_buyer",
        summary="Create a buyer (admin)",
        tag="operator",
        auth=("admin",),
        body=NameBody,
        replies={201: Reply(CREATED, BuyerCreated)},
        errors={503: LAGGING},
    ),
    Route(
        "POST",
        "/admin/buyers/{buyer_id}/deposits",
        deposit,
        name="create_deposit",
        summary="Fund a buyer account (admin)",
        tag="operator",
        auth=("admin",),
        body=DepositBody,
        replies={201: Reply("Credited (or, for a repeated deposit_id, credited before)", Deposit)},
        errors={
            404: "not_found: no such buyer",
            422: "idempotency_key_reused: the deposit_id was used for another amount",
            503: LAGGING,
        },
    ),
    Route(
        "POST",
        "/admin/sellers",
        create_seller,
        name="create_seller",
        summary="Create a seller (admin)",
        tag="operator",
        auth=("admin",),
        body=NameBody,
        replies={201: Reply(CREATED, SellerCreated)},
        errors={503: LAGGING},
    ),
    Route(
        "GET",
        "/v1/buyer/me",
        buyer_me,
        name="get_buyer",
        summary="Your balance and usage",
        tag="buyers",
        auth=("buyer",),
        replies={200: Reply("Your account", Buyer)},
    ),
    Route(
        "POST",
        "/v1/buyer/providers",
        add_buyer_provider,
        name="add_buyer_provider",
        summary="Bring your own provider key",
        tag="buyers",
        auth=("buyer",),
        body=BuyerProviderBody,
        replies={
            201: Reply("The key, checked with the provider and stored encrypted", BuyerProvider)
        },
        errors={
            400: "invalid_request, invalid_provider_key: the provider refused the key",
            404: "model_not_found",
            503: f"catalog_unavailable, {LAGGING}",
        },
    ),
    Route(
        "GET",
        "/v1/buyer/providers",
        list_buyer_providers,
        name="list_buyer_providers",
        summary="Your own provider keys",
        tag="buyers",
        auth=("buyer",),
        replies={200: Reply("Your keys (never the keys themselves)", BuyerProviderList)},
    ),
    Route(
        "DELETE",
        "/v1/buyer/providers/{provider_id}",
        delete_buyer_provider,
        name="delete_buyer_provider",
        summary="Remove one of your provider keys",
        tag="buyers",
        auth=("buyer",),
        replies={200: Reply("Removed", Deleted)},
        errors={404: "not_found: no such key of yours", 503: LAGGING},
    ),
]
