"""Routing with live quotes (SPEC 3): which offers can take a request, and in what order.

The I/O lives here (quotes over HTTP, concurrently, cached briefly per credential and
parameters); the decision itself is the pure ``domain.routing.choose``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import partial
from typing import Any
from uuid import UUID

import structlog

from adapters.outbound import Outbound
from adapters.venice import ProviderError, QuoteFailed, VeniceClient, VideoParams
from domain.catalog import ModelSpec, VideoRequest
from domain.money import (
    FeeSchedule,
    format_multiplier,
    parse_multiplier,
    price_buyer_owned,
    price_offer,
)
from domain.routing import Candidate, choose, hold_for
from projections.views import BuyerProviderRow, OfferRow

log = structlog.get_logger("routing")
QUOTE_CACHE_SECONDS = 5.0
# How many marketplace offers a job keeps on its route, cheapest first.
MAX_ROUTE_OFFERS = 10
# Refusals that say the key itself is bad: the offer is switched off until the seller sets a new
# key. Other refusals (402, 429, 5xx, no answer) only put it into backoff.
DEACTIVATING_STATUSES = frozenset({401, 403})
# Quote failures that describe the request rather than the seller's account or the provider's
# health; they do not count against an offer.
REQUEST_STATUSES = frozenset({400, 413, 422})
# Priced candidates a router keeps (see Router.candidate); all forgotten when it fills.
MAX_CANDIDATES_KEPT = 10_000


def request_data(request: VideoRequest) -> dict[str, Any]:
    """The request as stored in the job's creation event: plain JSON, enough to dispatch."""
    return {
        **request.canonical(),
        "provider": request.model.provider,
        "provider_model": request.model.provider_model,
        # Sent to the provider only for models that know the parameter.
        "audio": request.audio if request.model.audio else None,
    }


def video_params(data: dict[str, Any]) -> VideoParams:
    return VideoParams(
        model=data["provider_model"],
        duration_seconds=data["duration_seconds"],
        resolution=data["resolution"],
        aspect_ratio=data["aspect_ratio"],
        audio=data["audio"],
    )


def default_params(spec: ModelSpec) -> VideoParams:
    """A model's cheapest default request: what key checks and market prices quote."""
    return VideoParams(
        model=spec.provider_model,
        duration_seconds=spec.default_duration,
        resolution=spec.default_resolution,
        aspect_ratio=spec.default_aspect_ratio,
        audio=spec.default_audio if spec.audio else None,
    )


class Providers:
    """One client per provider base URL, sharing the engine's outbound HTTP, plus a short quote
    cache. Identical quotes asked for at the same time (many submits, one seller key) share
    one call.
    """

    def __init__(
        self,
        outbound: Outbound,
        default_base_urls: dict[str, str],
        *,
        quote_timeout: float,
        queue_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[str, str], None] | None = None,
    ) -> None:
        self.outbound = outbound
        self.default_base_urls = default_base_urls
        # ``on_error(provider, kind)`` for every failed provider call (the engine's metrics).
        self.on_error = on_error
        self.quote_timeout = quote_timeout
        self.queue_timeout = queue_timeout
        self.clock = clock
        self._clients: dict[str, VeniceClient] = {}
        self._quotes: dict[tuple[str, str, VideoParams], tuple[float, int]] = {}
        self._in_flight: dict[tuple[str, str, VideoParams], asyncio.Future[int]] = {}

    def client(self, provider: str, base_url: str | None) -> VeniceClient:
        url = base_url or self.default_base_urls[provider]
        client = self._clients.get(url)
        if client is None:
            client = VeniceClient(
                self.outbound,
                url,
                quote_timeout=self.quote_timeout,
                queue_timeout=self.queue_timeout,
                # Labelled by provider, never by URL: a seller may type any base URL.
                on_error=None if self.on_error is None else partial(self.on_error, provider),
            )
            self._clients[url] = client
        return client

    def cached_quote(
        self, provider: str, base_url: str | None, key_sha256: str, params: VideoParams
    ) -> int | None:
        hit = self._quotes.get((key_sha256, base_url or provider, params))
        return hit[1] if hit is not None and hit[0] > self.clock() else None

    async def quote(
        self,
        provider: str,
        base_url: str | None,
        key_sha256: str,
        api_key: str,
        params: VideoParams,
    ) -> int:
        cache_key = (key_sha256, base_url or provider, params)
        now = self.clock()
        hit = self._quotes.get(cache_key)
        if hit is not None and hit[0] > now:
            return hit[1]
        pending = self._in_flight.get(cache_key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._in_flight[cache_key] = future
        try:
            micros = await self.client(provider, base_url).quote(api_key, params)
        except BaseException as e:
            future.set_exception(e)
            # Retrieved here so a failure nobody else waited for is not reported as unhandled.
            future.exception()
            raise
        else:
            future.set_result(micros)
        finally:
            del self._in_flight[cache_key]
        if len(self._quotes) > 10_000:
            self._quotes = {k: v for k, v in self._quotes.items() if v[0] > now}
        self._quotes[cache_key] = (self.clock() + QUOTE_CACHE_SECONDS, micros)
        return micros


@dataclass(frozen=True)
class Route:
    """The outcome of routing one request: the candidates in the order they will be tried,
    plus what was looked at and left out, which the job's creation event records."""

    candidates: list[Candidate]
    considered: int
    skipped: list[dict[str, str]]

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def as_event_data(self) -> list[dict[str, Any]]:
        return [candidate_data(c) for c in self.candidates]

    def decision(self) -> dict[str, Any]:
        return {"considered": self.considered, "skipped": self.skipped}

    def hold(self, ceiling: int | None = None) -> int:
        """What the job holds (SPEC 1); raises ``CeilingBelowEstimate`` for a ceiling too low."""
        return hold_for(self.candidates, ceiling)


def candidate_data(c: Candidate) -> dict[str, Any]:
    return {
        "offer_id": c.offer_id,
        "seller_id": c.seller_id,
        "cost_multiplier": None if c.multiplier is None else format_multiplier(c.multiplier),
        "list_price": c.price.list_price,
        "seller_cost": c.price.seller_cost,
        "buyer_cost": c.price.buyer_cost,
    }


def _failover_list(eligible: list[Candidate]) -> list[Candidate]:
    """The candidates a job keeps: every buyer-owned key, and the cheapest offers.

    A job is rarely refused more than a few times, and offers behind the first ten are
    unlikely to fit in its hold, so the rest of a hundred-offer market would only bloat every
    job's first event.
    """
    kept, offers = [], 0
    for c in eligible:
        if c.buyer_owned or offers < MAX_ROUTE_OFFERS:
            kept.append(c)
            offers += not c.buyer_owned
    return kept


KeyRow = OfferRow | BuyerProviderRow
QuoteFailureHandler = Callable[[OfferRow, QuoteFailed], None]


class Router:
    def __init__(
        self,
        providers: Providers,
        fees: FeeSchedule,
        open_key: Callable[[str, dict[str, str]], str],
        wall_clock: Callable[[], float] = time.time,
        on_quote_failed: QuoteFailureHandler | None = None,
    ) -> None:
        self.providers = providers
        self.fees = fees
        self.open_key = open_key
        self.wall_clock = wall_clock
        self.on_quote_failed = on_quote_failed
        # Every submit prices every offer of its model, from quotes cached for a while: the
        # same listing at the same list price is the same (immutable) candidate until either
        # changes, so it is built once (a tenth of a 100-offer submit's CPU).
        self._candidates: dict[tuple[str, str, int, str, int], Candidate] = {}

    def api_key(self, row: KeyRow) -> str:
        return self.open_key(row.key_context, row.sealed_key)

    async def price(
        self, row: KeyRow, params: VideoParams, *, count_failure: bool = True
    ) -> Candidate | None:
        """The live price of one offer (or buyer key) for one request; None when it can't quote.

        A failed quote of a marketplace offer is the seller's problem, not the buyer's: it is
        handed to ``on_quote_failed`` (backoff) unless ``count_failure`` is off.
        """
        try:
            list_price = await self.providers.quote(
                row.provider, row.base_url, row.key_sha256, self.api_key(row), params
            )
        except ProviderError as e:
            if (
                count_failure
                and isinstance(row, OfferRow)
                and isinstance(e, QuoteFailed)
                and e.status not in REQUEST_STATUSES
                and self.on_quote_failed is not None
            ):
                self.on_quote_failed(row, e)
            return None
        return self.candidate(row, list_price)

    async def price_all(
        self, rows: Sequence[KeyRow], params: VideoParams, *, count_failure: bool = True
    ) -> list[Candidate | None]:
        """``price`` for many rows at once; quotes still cached cost no task or round trip."""
        prices: list[Candidate | None] = []
        misses: list[tuple[int, KeyRow]] = []
        for row in rows:
            cached = self.providers.cached_quote(row.provider, row.base_url, row.key_sha256, params)
            if cached is None:
                misses.append((len(prices), row))
                prices.append(None)
            else:
                prices.append(self.candidate(row, cached))
        if misses:
            fetched = await asyncio.gather(
                *(self.price(row, params, count_failure=count_failure) for _, row in misses)
            )
            for (i, _), candidate in zip(misses, fetched, strict=True):
                prices[i] = candidate
        return prices

    def candidate(self, row: KeyRow, list_price: int) -> Candidate:
        if isinstance(row, BuyerProviderRow):
            return Candidate(
                offer_id=row.provider_id,
                seller_id=None,
                multiplier=None,
                created_seq=row.seq,
                price=price_buyer_owned(list_price, self.fees),
                catch_all=row.model is None,
            )
        key = (row.offer_id, row.seller_id, row.seq, row.cost_multiplier, list_price)
        made = self._candidates.get(key)
        if made is None:
            multiplier: Fraction = parse_multiplier(row.cost_multiplier)
            made = Candidate(
                offer_id=row.offer_id,
                seller_id=row.seller_id,
                multiplier=multiplier,
                created_seq=row.seq,
                price=price_offer(list_price, multiplier, self.fees),
            )
            if len(self._candidates) >= MAX_CANDIDATES_KEPT:
                self._candidates.clear()
            self._candidates[key] = made
        return made

    async def route(
        self,
        request: VideoRequest,
        offers: list[OfferRow],
        min_discount: int | None,
        own_keys: Sequence[BuyerProviderRow] = (),
    ) -> Route:
        """Quote every available candidate concurrently and rank them; raises ``RoutingError``."""
        params = video_params(request_data(request))
        return await self.route_params(params, offers, min_discount, own_keys)

    async def route_params(
        self,
        params: VideoParams,
        offers: list[OfferRow],
        min_discount: int | None,
        own_keys: Sequence[BuyerProviderRow] = (),
    ) -> Route:
        listed = [o for o in offers if o.state in ("active", "deactivated")]
        now = self.wall_clock()
        skipped: list[dict[str, str]] = []
        available: list[KeyRow] = []
        for offer in listed:
            reason = offer.unavailable_because(now)
            if reason is None:
                available.append(offer)
            else:
                skipped.append({"offer_id": offer.offer_id, "reason": reason})
        available.extend(own_keys)
        priced = await self.price_all(available, params)
        candidates: list[Candidate] = []
        for row, candidate in zip(available, priced, strict=True):
            if candidate is None:
                skipped.append({"offer_id": row.key_id, "reason": "quote_failed"})
            else:
                candidates.append(candidate)
        ranking = choose(len(listed), candidates, min_discount)
        skipped.extend(
            {"offer_id": c.offer_id, "reason": "below_minimum_discount"}
            for c in ranking.filtered_by_min
        )
        return Route(
            _failover_list(ranking.eligible),
            considered=len(listed) + len(own_keys),
            skipped=skipped,
        )


class OfferHealth:
    """Passive health from quotes: a failed quote puts its offer into backoff, off the caller's
    path. One report per offer per quote-cache period, so a burst of submits that all saw the
    same failure backs the offer off once, not once each."""

    def __init__(
        self,
        commands: Any,
        blocking: Callable[..., Awaitable[Any]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.commands = commands
        self.blocking = blocking
        self.clock = clock
        self._reported: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def quote_failed(self, offer: OfferRow, error: QuoteFailed) -> None:
        now = self.clock()
        if self._reported.get(offer.offer_id, 0.0) > now:
            return
        if len(self._reported) > 10_000:
            self._reported = {k: v for k, v in self._reported.items() if v > now}
        self._reported[offer.offer_id] = now + QUOTE_CACHE_SECONDS
        task = asyncio.get_running_loop().create_task(self._report(offer, error))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _report(self, offer: OfferRow, error: QuoteFailed) -> None:
        try:
            await self.blocking(
                self.commands.offer_refused,
                UUID(offer.offer_id),
                f"quote failed ({error.status}): {error.message}",
                error.status in DEACTIVATING_STATUSES,
            )
        except Exception:
            log.exception("offer_health_report_failed", offer_id=offer.offer_id)
