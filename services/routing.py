"""Routing with live quotes (SPEC 3): which offers can take a request, and in what order.

The I/O lives here (quotes over HTTP, concurrently, cached briefly per credential and
parameters); the decision itself is the pure ``domain.routing.choose``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import aiohttp

from adapters.venice import ProviderError, VeniceClient, VideoParams
from domain.catalog import ModelSpec, VideoRequest
from domain.money import FeeSchedule, parse_multiplier, price_offer
from domain.routing import Candidate, choose
from projections.views import OfferRow

QUOTE_CACHE_SECONDS = 5.0


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
        audio=False if spec.audio else None,
    )


class Providers:
    """One client per provider base URL, sharing one HTTP session, plus a short quote cache."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        default_base_urls: dict[str, str],
        *,
        quote_timeout: float,
        queue_timeout: float,
        queue_session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.session = session
        self.queue_session = queue_session
        self.default_base_urls = default_base_urls
        self.quote_timeout = quote_timeout
        self.queue_timeout = queue_timeout
        self.clock = clock
        self._clients: dict[str, VeniceClient] = {}
        self._quotes: dict[tuple[str, str, VideoParams], tuple[float, int]] = {}

    def client(self, provider: str, base_url: str | None) -> VeniceClient:
        url = base_url or self.default_base_urls[provider]
        client = self._clients.get(url)
        if client is None:
            client = VeniceClient(
                self.session,
                url,
                quote_timeout=self.quote_timeout,
                queue_timeout=self.queue_timeout,
                queue_session=self.queue_session,
            )
            self._clients[url] = client
        return client

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
        micros = await self.client(provider, base_url).quote(api_key, params)
        if len(self._quotes) > 10_000:
            self._quotes = {k: v for k, v in self._quotes.items() if v[0] > now}
        self._quotes[cache_key] = (now + QUOTE_CACHE_SECONDS, micros)
        return micros


@dataclass(frozen=True)
class Route:
    candidates: list[Candidate]

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    def as_event_data(self) -> list[dict[str, Any]]:
        return [candidate_data(c) for c in self.candidates]


def candidate_data(c: Candidate) -> dict[str, Any]:
    return {
        "offer_id": c.offer_id,
        "seller_id": c.seller_id,
        "cost_multiplier": None if c.multiplier is None else str(c.multiplier),
        "list_price": c.price.list_price,
        "seller_cost": c.price.seller_cost,
        "buyer_cost": c.price.buyer_cost,
    }


def is_available(offer: OfferRow, now: float) -> bool:
    return offer.state == "active" and offer.backoff_until <= now


class Router:
    def __init__(
        self,
        providers: Providers,
        fees: FeeSchedule,
        open_key: Callable[[str, dict[str, str]], str],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.providers = providers
        self.fees = fees
        self.open_key = open_key
        self.wall_clock = wall_clock

    async def price(self, offer: OfferRow, params: VideoParams) -> Candidate | None:
        """The live price of one offer for one request, or None when it can't quote."""
        api_key = self.open_key(offer.offer_id, offer.sealed_key)
        try:
            list_price = await self.providers.quote(
                offer.provider, offer.base_url, offer.key_sha256, api_key, params
            )
        except ProviderError:
            return None
        multiplier: Fraction = parse_multiplier(offer.cost_multiplier)
        return Candidate(
            offer_id=offer.offer_id,
            seller_id=offer.seller_id,
            multiplier=multiplier,
            created_seq=offer.seq,
            price=price_offer(list_price, multiplier, self.fees),
        )

    async def route(
        self, request: VideoRequest, offers: list[OfferRow], min_discount: int | None
    ) -> Route:
        """Quote every available offer concurrently and rank them; raises ``RoutingError``."""
        return await self.route_params(video_params(request_data(request)), offers, min_discount)

    async def route_params(
        self, params: VideoParams, offers: list[OfferRow], min_discount: int | None
    ) -> Route:
        listed = [o for o in offers if o.state in ("active", "deactivated")]
        now = self.wall_clock()
        available = [o for o in listed if is_available(o, now)]
        priced = await asyncio.gather(*(self.price(o, params) for o in available))
        healthy = [c for c in priced if c is not None]
        return Route(choose(len(listed), healthy, min_discount))
