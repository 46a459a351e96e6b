"""Routing with live quotes (services.routing): holds, the kept route, quote sharing and
passive health from failed quotes, against a real HTTP quote endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from fractions import Fraction
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from adapters.outbound import Outbound, OutboundPolicy
from adapters.venice import VideoParams
from domain.money import FeeSchedule, max_cost, price_buyer_owned, price_offer
from domain.routing import Candidate
from projections.views import OfferRow
from services.routing import MAX_ROUTE_OFFERS, OfferHealth, Providers, Route, Router

FEES = FeeSchedule()
PARAMS = VideoParams(
    model="seedance-2-fast-t2v",
    duration_seconds=4,
    resolution="480p",
    aspect_ratio="16:9",
    audio=None,
)


def offer_candidate(offer_id: str, multiplier: str, list_price: int = 1_000_000) -> Candidate:
    m = Fraction(multiplier)
    return Candidate(offer_id, f"s-{offer_id}", m, 0, price_offer(list_price, m, FEES))


def own_candidate(key_id: str, catch_all: bool = False) -> Candidate:
    return Candidate(key_id, None, None, 0, price_buyer_owned(1_000_000, FEES), catch_all)


def route(*candidates: Candidate) -> Route:
    return Route(list(candidates), considered=len(candidates), skipped=[])


def test_the_hold_is_the_estimate_plus_ten_percent_whatever_is_behind() -> None:
    # SPEC 1: the chosen offer's estimate plus 10%, however dear the failover behind it.
    assert route(offer_candidate("a", "0.70")).hold() == max_cost(700_000)
    r = route(offer_candidate("a", "0.70"), offer_candidate("b", "0.80"), offer_candidate("c", "1"))
    assert r.hold() == max_cost(700_000)
    # Or the buyer's own ceiling.
    assert r.hold(900_000) == 900_000
    # On the buyer's own key, the hold covers the best offer behind it; 0 with none.
    r = route(own_candidate("k"), offer_candidate("a", "0.70"), offer_candidate("b", "0.90"))
    assert r.hold() == max_cost(700_000)
    assert route(own_candidate("k"), own_candidate("c", catch_all=True)).hold() == 0


def offer_row(n: int, key: str = "k", multiplier: str = "0.80") -> OfferRow:
    return OfferRow(
        offer_id=f"offer-{n:03d}",
        seq=n,
        seller_id=f"seller-{n}",
        model="venice-seedance-2-fast-t2v",
        provider="venice",
        base_url=None,
        sealed_key={"ct": key},
        key_sha256=f"sha-{key}",
        cost_multiplier=multiplier,
        max_concurrent_jobs=None,
        state="active",
        deactivated_reason=None,
        backoff_until=0.0,
        backoff_reason=None,
        failures=0,
        in_flight=0,
        jobs=0,
        volume=0,
        payout=0,
    )


class QuoteServer:
    """A provider quote endpoint that counts calls and answers slowly, or fails per key."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing: dict[str, int] = {}

    async def quote(self, request: web.Request) -> web.Response:
        self.calls += 1
        await asyncio.sleep(0.05)
        key = request.headers["Authorization"].removeprefix("Bearer ")
        if key in self.failing:
            return web.json_response({"error": "no"}, status=self.failing[key])
        return web.json_response({"quote": 0.16})


@pytest.fixture
async def quote_server() -> AsyncIterator[tuple[QuoteServer, str, Outbound]]:
    state = QuoteServer()
    app = web.Application()
    app.router.add_post("/api/v1/video/quote", state.quote)
    server = TestServer(app)
    await server.start_server()
    base_url = str(server.make_url("/api/v1"))
    outbound = Outbound(OutboundPolicy(trusted_prefixes=(base_url + "/",)))
    yield state, base_url, outbound
    await outbound.close()
    await server.close()


def make_router(base_url: str, outbound: Outbound, **kw: Any) -> tuple[Router, Providers]:
    providers = Providers(outbound, {"venice": base_url}, quote_timeout=2.0, queue_timeout=2.0)
    return Router(providers, FEES, lambda context, sealed: sealed["ct"], **kw), providers


async def test_identical_quotes_in_flight_share_one_call(
    quote_server: tuple[QuoteServer, str, Outbound],
) -> None:
    state, base_url, outbound = quote_server
    router, _ = make_router(base_url, outbound)
    # A hundred offers on one key, quoted by ten concurrent submits: one provider call.
    offers = [offer_row(n, multiplier=f"0.{50 + n % 45}") for n in range(100)]
    routes = await asyncio.gather(*(router.route_params(PARAMS, offers, None) for _ in range(10)))
    assert state.calls == 1
    for r in routes:
        assert len(r.candidates) == MAX_ROUTE_OFFERS  # the cheapest ten are kept
        assert r.considered == 100 and r.skipped == []
        assert r.best.price.buyer_cost == 80_000  # 0.16 USD list at 0.50
    # Distinct keys: one call each, concurrently, then cached.
    keyed = [offer_row(n, key=f"key-{n}") for n in range(20)]
    await router.route_params(PARAMS, keyed, None)
    await router.route_params(PARAMS, keyed, None)
    assert state.calls == 21


async def test_a_failed_quote_counts_against_the_offer_once(
    quote_server: tuple[QuoteServer, str, Outbound],
) -> None:
    state, base_url, outbound = quote_server
    state.failing = {"bad": 503, "revoked": 401, "odd": 422}
    reports: list[tuple[str, str, bool]] = []

    class Recorder:
        def offer_refused(self, offer_id: Any, reason: str, deactivate: bool) -> None:
            reports.append((str(offer_id), reason, deactivate))

    async def inline(fn: Any, *args: Any) -> Any:
        return fn(*args)

    health = OfferHealth(Recorder(), inline)
    router, _ = make_router(base_url, outbound, on_quote_failed=health.quote_failed)
    offers = [
        offer_row(1, key="good"),
        offer_row(2, key="bad"),
        offer_row(3, key="revoked"),
        offer_row(4, key="odd"),
    ]
    offers = [
        OfferRow(**{**o.__dict__, "offer_id": f"00000000-0000-0000-0000-00000000000{i}"})
        for i, o in enumerate(offers, 1)
    ]
    for _ in range(3):
        r = await router.route_params(PARAMS, offers, None)
        assert [c.offer_id for c in r.candidates] == [offers[0].offer_id]
        assert {s["reason"] for s in r.skipped} == {"quote_failed"}
    await asyncio.sleep(0)
    await asyncio.gather(*health._tasks)
    # One report per failing offer, not one per submit; a 422 describes the request, not the
    # seller; a 401 switches the offer off.
    assert sorted((o, d) for o, _, d in reports) == [
        (offers[1].offer_id, False),
        (offers[2].offer_id, True),
    ]
    assert all(reason.startswith("quote failed (") for _, reason, _ in reports)
    # The order book prices offers without touching their health.
    assert await router.price(offers[1], PARAMS, count_failure=False) is None
    await asyncio.sleep(0)
    assert len(reports) == 2


async def test_a_candidate_is_priced_again_when_its_listing_or_quote_changes() -> None:
    """Candidates are kept between submits; a new multiplier, a new quote or a new offer is a
    new candidate, never one priced for the old listing."""
    outbound = Outbound(OutboundPolicy())
    providers = Providers(outbound, {}, quote_timeout=1.0, queue_timeout=1.0)
    router = Router(providers, FEES, lambda context, sealed: sealed["ct"])
    first = router.candidate(offer_row(1, multiplier="0.80"), 100_000)
    assert router.candidate(offer_row(1, multiplier="0.80"), 100_000) is first
    assert first.price == price_offer(100_000, Fraction(80, 100), FEES)
    repriced = router.candidate(offer_row(1, multiplier="0.50"), 100_000)
    assert repriced.multiplier == Fraction(1, 2)
    assert repriced.price == price_offer(100_000, Fraction(1, 2), FEES)
    requoted = router.candidate(offer_row(1, multiplier="0.80"), 200_000)
    assert requoted.price.list_price == 200_000
    other = router.candidate(offer_row(2, multiplier="0.80"), 100_000)
    assert (other.offer_id, other.created_seq) == ("offer-002", 2)
    await outbound.close()
