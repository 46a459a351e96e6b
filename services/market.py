"""Market data (SPEC 4.4, 6): the order book of a model and its summary, priced live.

Prices come from the same path routing uses (``Router.price`` on the model's default
parameters, through the short quote cache), so what the book shows is what a submit would get.
Reading the book never changes an offer's health: only routing and dispatch do that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from domain.catalog import ModelSpec
from domain.routing import Candidate
from domain.rules import BACKOFF
from projections.views import OfferRow, Views
from services.routing import Router, default_params

DAY_SECONDS = 86_400
Read = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class BookEntry:
    offer: OfferRow
    # None when the offer's key could not be quoted just now.
    candidate: Candidate | None
    # Why a submit would leave it out now (backoff, at_capacity), or None.
    unavailable: str | None


@dataclass(frozen=True)
class Activity:
    jobs_24h: int = 0
    volume_24h: int = 0
    jobs: int = 0
    volume: int = 0


@dataclass(frozen=True)
class MarketSummary:
    spec: ModelSpec
    book: list[BookEntry]
    activity: Activity

    @property
    def best(self) -> BookEntry | None:
        """The offer a submit with default parameters would go to now."""
        return next(
            (e for e in self.book if e.candidate is not None and e.unavailable is None), None
        )

    @property
    def active_sellers(self) -> int:
        return len({e.offer.seller_id for e in self.book})

    @property
    def healthy_sellers(self) -> int:
        return len({e.offer.seller_id for e in self.book if e.unavailable != BACKOFF})


def _book_order(entry: BookEntry) -> tuple[int, tuple[int, Fraction], int, str]:
    # Cheapest first, exactly as routing ranks; offers without a price go last, oldest first.
    c = entry.candidate
    if c is None:
        return (1, (0, Fraction(0)), entry.offer.seq, entry.offer.offer_id)
    return (0, c.price.rank, entry.offer.seq, entry.offer.offer_id)


class Market:
    def __init__(self, read: Read, views: Views, router: Router) -> None:
        self.read = read
        self.views = views
        self.router = router

    async def book(self, spec: ModelSpec) -> list[BookEntry]:
        """Every active offer of the model (paused, deactivated and deleted ones are not on the
        book), cheapest first."""
        offers: list[OfferRow] = await self.read(self.views.offers, model=spec.id)
        active = [o for o in offers if o.state == "active"]
        params = default_params(spec)
        prices = await self.router.price_all(active, params, count_failure=False)
        now = self.router.wall_clock()
        entries = [
            BookEntry(o, c, o.unavailable_because(now)) for o, c in zip(active, prices, strict=True)
        ]
        return sorted(entries, key=_book_order)

    async def activity(self) -> dict[str, Activity]:
        since = int(self.router.wall_clock()) - DAY_SECONDS
        rows: dict[str, dict[str, int]] = await self.read(self.views.market_activity, since)
        return {model: Activity(**values) for model, values in rows.items()}

    async def summaries(self, specs: list[ModelSpec]) -> list[MarketSummary]:
        activity = await self.activity()
        books = await asyncio.gather(*(self.book(spec) for spec in specs))
        return [
            MarketSummary(spec, book, activity.get(spec.id, Activity()))
            for spec, book in zip(specs, books, strict=True)
        ]
