"""Public market data (SPEC 4.4): the catalog with prices, market summaries, order books."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from api.schemas.accounts import Capacity, OfferHealth
from api.schemas.common import Document, Micros, Percent, Uuid


class Defaults(Document):
    """What an omitted parameter becomes: the model's cheapest request."""

    duration_seconds: int
    resolution: str | None
    aspect_ratio: str | None
    audio: bool


class Prices(Document):
    estimated_cost_usdc: Micros | None = Field(
        description="The best offer's buyer cost for the default parameters; null: no offer"
    )
    list_price_usdc: Micros | None = Field(description="The provider's own price for them")
    discount_percent: Percent | None


class CatalogModel(Prices):
    id: str
    object: Literal["model"]
    kind: Literal["video"]
    provider: str
    name: str
    aliases: list[str]
    durations: list[int]
    resolutions: list[str]
    aspect_ratios: list[str]
    audio: bool
    audio_configurable: bool = Field(description="false: the model always generates audio")
    image_input: bool = Field(description="true: image_url is required")
    max_prompt_characters: int
    defaults: Defaults


class CatalogList(Document):
    object: Literal["list"]
    data: list[CatalogModel]


class SellerCounts(Document):
    active: int
    healthy: int


class OfferCounts(Document):
    active: int
    available: int


class Activity(Document):
    jobs: int
    volume_usdc: Micros


class Market(Prices):
    object: Literal["market"]
    model: str
    aliases: list[str]
    defaults: Defaults
    best_offer_id: Uuid | None
    sellers: SellerCounts
    offer_counts: OfferCounts
    last_24h: Activity
    all_time: Activity


class MarketList(Document):
    object: Literal["list"]
    data: list[Market]


class BookEntry(Prices):
    offer_id: Uuid
    seller_id: Uuid
    cost_multiplier: str
    available: bool
    capacity: Capacity
    health: OfferHealth
    jobs: int
    volume_usdc: Micros


class OrderBook(Market):
    """Every active offer of one model, cheapest first."""

    object: Literal["order_book"]  # type: ignore[assignment]
    offers: list[BookEntry]
