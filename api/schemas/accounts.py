"""Buyers, sellers, offers and the operator's routes (SPEC 4.4)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, Field, StrictBool, StrictInt, StrictStr

from api.schemas.common import Day, Document, Micros, Query, RequestBody, Uuid
from services.exports import parse_day

# A provider key goes into an Authorization header upstream: visible ASCII only.
ProviderKey = Annotated[StrictStr, Field(pattern=r"^[!-~]{1,500}$", examples=["sim_ok"])]
BaseUrl = Annotated[
    StrictStr,
    Field(
        pattern=r"^[Hh][Tt][Tt][Pp][Ss]?://",
        max_length=2048,
        description="The provider's API base URL; only hosts the operator allows",
    ),
]
# SPEC 1: from 0.05 to 1.00; at most four decimals (a basis point of the list price), plain
# decimal notation, so what is stored is what the seller wrote and nothing finer.
MULTIPLIER_PATTERN = r"^(0\.(0[5-9][0-9]{0,2}|[1-9][0-9]{0,3})|1(\.0{1,4})?)$"
Multiplier = Annotated[
    StrictStr,
    Field(
        pattern=MULTIPLIER_PATTERN,
        description="Seller cost as a fraction of the provider's list price, 0.05 to 1.00",
        examples=["0.80"],
    ),
]
KEY_PROBLEMS = {
    "api_key": "api_key must be 1 to 500 visible ASCII characters",
    "base_url": "base_url must be an http(s) URL of at most 2048 characters",
}
MULTIPLIER_PROBLEM = (
    "cost_multiplier must be a decimal string from 0.05 to 1.00 with at most 4 decimals, "
    'such as "0.80"'
)
Concurrency = Annotated[StrictInt, Field(ge=1, le=10_000)]


class NameBody(RequestBody):
    name: StrictStr = Field(min_length=1, max_length=200)


class DepositBody(RequestBody):
    problems: ClassVar[dict[str, str]] = {
        "amount_usdc": "amount_usdc must be a positive integer of microdollars (at most 10^15), "
        'as a string such as "2500000"',
        "deposit_id": "deposit_id must be a string of 1 to 255 characters",
    }

    # SPEC 1: amounts travel as decimal strings, never as JSON numbers.
    amount_usdc: Annotated[StrictStr, Field(pattern=r"^([1-9][0-9]{0,14}|1000000000000000)$")] = (
        Field(description="Microdollars, 1 to 10^15, as a decimal string", examples=["2500000"])
    )
    deposit_id: StrictStr | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description="Your reference: a deposit retried with the same id is credited once",
    )


class OfferBody(RequestBody):
    problems: ClassVar[dict[str, str]] = {"cost_multiplier": MULTIPLIER_PROBLEM, **KEY_PROBLEMS}

    model: StrictStr = Field(description="A catalog model id or alias")
    provider: Literal["venice"]
    api_key: ProviderKey = Field(description="Your provider key: encrypted, never shown again")
    base_url: BaseUrl | None = None
    pricing_mode: Literal["cost_multiplier"] = "cost_multiplier"
    cost_multiplier: Multiplier
    max_concurrent_jobs: Concurrency | None = None


class OfferPatch(RequestBody):
    problems: ClassVar[dict[str, str]] = {"cost_multiplier": MULTIPLIER_PROBLEM, **KEY_PROBLEMS}

    cost_multiplier: Multiplier | None = None
    max_concurrent_jobs: Concurrency | None = Field(
        default=None, description="null lifts the limit"
    )
    paused: StrictBool | None = None
    api_key: ProviderKey | None = None


class BuyerProviderBody(RequestBody):
    problems: ClassVar[dict[str, str]] = KEY_PROBLEMS

    provider: Literal["venice"]
    api_key: ProviderKey
    model: StrictStr | None = Field(
        description="The model this key is tried first for; null: every model, after the market"
    )
    base_url: BaseUrl | None = None


class Balance(Document):
    available_usdc: Micros
    held_usdc: Micros
    spent_usdc: Micros
    deposited_usdc: Micros


class BuyerUsage(Document):
    jobs: int
    spent_usdc: Micros
    held_usdc: Micros


class Buyer(Document):
    id: Uuid
    object: Literal["buyer"]
    name: str
    balance: Balance
    usage: BuyerUsage


class BuyerCreated(Document):
    buyer_id: Uuid
    object: Literal["buyer"]
    name: str
    api_key: str = Field(description="Shown this once; only its hash is stored")


class SellerCreated(Document):
    seller_id: Uuid
    object: Literal["seller"]
    name: str
    api_key: str = Field(description="Shown this once; only its hash is stored")


class Deposit(Document):
    object: Literal["deposit"]
    buyer_id: Uuid
    amount_usdc: Micros
    balance: Balance


class OfferHealth(Document):
    status: Literal["healthy", "backoff"]
    until: int | None = Field(default=None, description="Unix seconds the backoff ends")
    reason: str | None = None
    failures: int | None = None


class Capacity(Document):
    max_concurrent_jobs: int | None
    in_flight: int
    left: int | None


class Offer(Document):
    id: Uuid
    object: Literal["offer"]
    seller_id: Uuid
    model: str
    provider: str
    base_url: str | None
    pricing_mode: Literal["cost_multiplier"]
    cost_multiplier: str
    max_concurrent_jobs: int | None
    state: Literal["active", "paused", "deactivated", "deleted"]
    deactivated_reason: str | None
    health: OfferHealth
    capacity: Capacity
    jobs: int
    volume_usdc: Micros
    payout_usdc: Micros


class OfferList(Document):
    object: Literal["list"]
    data: list[Offer]


class BuyerProvider(Document):
    id: Uuid
    object: Literal["buyer.provider"]
    provider: str
    model: str | None
    base_url: str | None
    created: int


class BuyerProviderList(Document):
    object: Literal["list"]
    data: list[BuyerProvider]


# A real calendar day, not only its shape (2026-02-30 is no day).
QueryDay = Annotated[Day, AfterValidator(parse_day)]


class DayRange(Query):
    problems: ClassVar[dict[str, str]] = {
        "from": "from must be a date as YYYY-MM-DD",
        "to": "to must be a date as YYYY-MM-DD",
    }

    from_: QueryDay | None = Field(default=None, alias="from", description="First UTC day")
    to: QueryDay | None = Field(default=None, description="Last UTC day")


class Earning(Document):
    model: str
    jobs: int
    payout_usdc: Micros


class DayEarnings(Document):
    day: Day
    jobs: int
    payout_usdc: Micros
    models: list[Earning]


class Earnings(Document):
    object: Literal["seller.earnings"]
    seller_id: Uuid
    from_: Day | None = Field(alias="from")
    to: Day | None
    jobs: int
    payout_usdc: Micros
    by_model: list[Earning]
    by_day: list[DayEarnings]
