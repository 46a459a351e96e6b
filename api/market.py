"""Public market data (SPEC 4.4): the catalog with prices, market summaries, order books."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api.http import catalog_of, engine_of, reply, resolve_model
from api.routes import Reply, Route
from api.schemas.market import CatalogList, MarketList, OrderBook
from domain.catalog import ModelSpec
from domain.money import format_discount, to_json
from domain.routing import Candidate
from services.market import BookEntry, MarketSummary


def _percent(candidate: Candidate) -> str:
    return format_discount(candidate.price.discount).removesuffix("%")


def _defaults(spec: ModelSpec) -> dict[str, Any]:
    return {
        "duration_seconds": spec.default_duration,
        "resolution": spec.default_resolution,
        "aspect_ratio": spec.default_aspect_ratio,
        "audio": spec.default_audio,
    }


def price_columns(summary: MarketSummary) -> dict[str, Any]:
    """The best estimate for the model's default parameters, as /v1/models and markets show."""
    best = summary.best
    if best is None or best.candidate is None:
        return {"estimated_cost_usdc": None, "list_price_usdc": None, "discount_percent": None}
    price = best.candidate.price
    return {
        "estimated_cost_usdc": to_json(price.buyer_cost),
        "list_price_usdc": to_json(price.list_price),
        "discount_percent": _percent(best.candidate),
    }


def market_document(summary: MarketSummary) -> dict[str, Any]:
    spec, activity, best = summary.spec, summary.activity, summary.best
    return {
        "object": "market",
        "model": spec.id,
        "aliases": list(spec.aliases),
        "defaults": _defaults(spec),
        **price_columns(summary),
        "best_offer_id": best.offer.offer_id if best is not None else None,
        "sellers": {"active": summary.active_sellers, "healthy": summary.healthy_sellers},
        "offer_counts": {
            "active": len(summary.book),
            "available": sum(1 for e in summary.book if e.unavailable is None),
        },
        "last_24h": {"jobs": activity.jobs_24h, "volume_usdc": to_json(activity.volume_24h)},
        "all_time": {"jobs": activity.jobs, "volume_usdc": to_json(activity.volume)},
    }


def book_entry(entry: BookEntry, now: float) -> dict[str, Any]:
    offer, c = entry.offer, entry.candidate
    return {
        "offer_id": offer.offer_id,
        "seller_id": offer.seller_id,
        "cost_multiplier": offer.cost_multiplier,
        "estimated_cost_usdc": to_json(c.price.buyer_cost) if c else None,
        "list_price_usdc": to_json(c.price.list_price) if c else None,
        "discount_percent": _percent(c) if c else None,
        "available": entry.unavailable is None and c is not None,
        "capacity": offer.capacity(),
        "health": offer.health(now),
        "jobs": offer.jobs,
        "volume_usdc": to_json(offer.volume),
    }


async def list_markets(request: web.Request) -> web.Response:
    engine = engine_of(request)
    summaries = await engine.market_data.summaries(catalog_of(request).models())
    return reply(MarketList, {"object": "list", "data": [market_document(s) for s in summaries]})


async def order_book(request: web.Request) -> web.Response:
    engine = engine_of(request)
    spec = resolve_model(request, request.match_info["model"])
    [summary] = await engine.market_data.summaries([spec])
    now = engine.router.wall_clock()
    return reply(
        OrderBook,
        {
            **market_document(summary),
            "object": "order_book",
            "offers": [book_entry(e, now) for e in summary.book],
        },
    )


async def models(request: web.Request) -> web.Response:
    engine = engine_of(request)
    if engine.catalog is None:
        return reply(CatalogList, {"object": "list", "data": []})
    specs = engine.catalog.models()
    summaries = await engine.market_data.summaries(specs)
    data = [
        {
            "id": spec.id,
            "object": "model",
            "kind": "video",
            "provider": spec.provider,
            "name": spec.name,
            "aliases": list(spec.aliases),
            "durations": list(spec.durations),
            "resolutions": list(spec.resolutions),
            "aspect_ratios": list(spec.aspect_ratios),
            "audio": spec.audio,
            "audio_configurable": spec.audio_configurable,
            "image_input": spec.image_input,
            "max_prompt_characters": spec.prompt_limit,
            "defaults": _defaults(spec),
            **price_columns(summary),
        }
        for spec, summary in zip(specs, summaries, strict=True)
    ]
    return reply(CatalogList, {"object": "list", "data": data})


MARKET_ROUTES: list[Route] = [
    Route(
        "GET",
        "/v1/models",
        models,
        name="list_models",
        summary="The model catalog with current best prices",
        tag="market",
        replies={200: Reply("Every model on sale; empty while the catalog loads", CatalogList)},
    ),
    Route(
        "GET",
        "/api/markets",
        list_markets,
        name="list_markets",
        summary="Per model: best price, sellers, jobs and volume",
        tag="market",
        replies={200: Reply("One market per model", MarketList)},
        errors={503: "catalog_unavailable: the model catalog is loading"},
    ),
    Route(
        "GET",
        "/api/markets/{model}",
        order_book,
        name="get_order_book",
        summary="The order book of one model, cheapest first",
        tag="market",
        replies={200: Reply("The market and every active offer", OrderBook)},
        errors={
            404: "model_not_found",
            503: "catalog_unavailable: the model catalog is loading",
        },
    ),
]
