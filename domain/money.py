"""Money rules of SPEC section 1.

Every amount is an ``int`` of USDC microdollars. Ratios (multipliers, discounts) are exact
``Fraction``s; nothing here ever touches a binary float once a quote has been parsed.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from functools import cached_property, lru_cache
from typing import NamedTuple

MICROS_PER_USD = 1_000_000
BPS_DENOMINATOR = 10_000
MIN_MULTIPLIER = Fraction(5, 100)
MAX_MULTIPLIER = Fraction(1)
HOLD_MARGIN = Fraction(110, 100)
# Fraction(Decimal("1e-99999999")) builds 10**99999999; Decimal comparisons against these bounds
# are cheap, so every untrusted Decimal is range-checked before it becomes a Fraction.
MAX_QUOTE_USD = Decimal(10) ** 12
_ONE_MICRO_USD = Decimal(1) / MICROS_PER_USD
_MIN_MULTIPLIER_DECIMAL = Decimal("0.05")
_MAX_MULTIPLIER_DECIMAL = Decimal(1)


class MoneyError(ValueError):
    pass


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def ceil_fraction(value: Fraction) -> int:
    return ceil_div(value.numerator, value.denominator)


def usd_to_micros(quote: object) -> int:
    """A provider's USD quote as microdollars, rounded up.

    The quote arrives as a JSON number; ``str()`` of the parsed value gives back the shortest
    decimal that names it, so ``0.42`` stays exactly 0.42 rather than its binary neighbour.
    """
    if isinstance(quote, bool):
        raise MoneyError(f"quote is not a number: {quote!r}")
    try:
        amount = Decimal(str(quote))
    except InvalidOperation as e:
        raise MoneyError(f"quote is not a number: {quote!r}") from e
    if not amount.is_finite() or amount < 0:
        raise MoneyError(f"quote must be a finite non-negative amount: {quote!r}")
    if amount > MAX_QUOTE_USD:
        raise MoneyError(f"quote is implausibly large: {quote!r}")
    if 0 < amount < _ONE_MICRO_USD:
        return 1
    return ceil_fraction(Fraction(amount) * MICROS_PER_USD)


def parse_multiplier(text: object) -> Fraction:
    """A seller's ``cost_multiplier``: a decimal string between 0.05 and 1.00 inclusive."""
    if not isinstance(text, str):
        raise MoneyError('cost_multiplier must be a decimal string such as "0.80"')
    if len(text) <= _CACHED_MULTIPLIER_LENGTH:
        return _cached_multiplier(text)
    return _parse_multiplier(text)


# Every submit prices every offer of its model from its stored multiplier: a market has few
# distinct ones, and parsing each through Decimal and Fraction was a sixth of routing. Only
# short texts are kept (a seller's valid "0.5000...0" could otherwise pin megabytes).
_CACHED_MULTIPLIER_LENGTH = 32


@lru_cache(maxsize=4096)
def _cached_multiplier(text: str) -> Fraction:
    return _parse_multiplier(text)


def _parse_multiplier(text: str) -> Fraction:
    if not text.strip():
        raise MoneyError('cost_multiplier must be a decimal string such as "0.80"')
    try:
        value = Decimal(text.strip())
    except InvalidOperation as e:
        raise MoneyError(f"cost_multiplier is not a decimal: {text!r}") from e
    if not value.is_finite():
        raise MoneyError(f"cost_multiplier is not a decimal: {text!r}")
    if not _MIN_MULTIPLIER_DECIMAL <= value <= _MAX_MULTIPLIER_DECIMAL:
        raise MoneyError("cost_multiplier must be between 0.05 and 1.00")
    return Fraction(value)


def format_multiplier(multiplier: Fraction) -> str:
    """The canonical decimal string of a multiplier (at least two decimals: ``0.80``)."""
    text = str(Decimal(multiplier.numerator) / Decimal(multiplier.denominator))
    whole, _, decimals = text.partition(".")
    return f"{whole}.{decimals.ljust(2, '0')}"


@dataclass(frozen=True)
class FeeSchedule:
    multiplier_bps: int = BPS_DENOMINATOR
    flat_usdc: int = 0

    def __post_init__(self) -> None:
        if self.multiplier_bps < BPS_DENOMINATOR:
            raise MoneyError("FEE_MULTIPLIER_BPS must be at least 10000 (a fee, never a rebate)")
        if self.flat_usdc < 0:
            raise MoneyError("FLAT_FEE_USDC must not be negative")

    def buyer_cost(self, seller_cost: int) -> int:
        return ceil_div(seller_cost * self.multiplier_bps, BPS_DENOMINATOR) + self.flat_usdc


def seller_cost(list_price: int, multiplier: Fraction) -> int:
    return ceil_fraction(list_price * multiplier)


@dataclass(frozen=True)
class Price:
    """What one offer would cost for one request, all derived from the provider's quote."""

    list_price: int
    seller_cost: int
    buyer_cost: int

    @property
    def platform_fee(self) -> int:
        return self.buyer_cost - self.seller_cost

    # Ranking reads it several times per candidate (order, best, minimum), each a few Fraction
    # operations; a Price never changes.
    @cached_property
    def discount(self) -> Fraction:
        """Estimated discount in percent, exact: ``(1 - buyer_cost / list_price) * 100``."""
        if self.list_price == 0:
            return Fraction(0)
        return (1 - Fraction(self.buyer_cost, self.list_price)) * 100

    @cached_property
    def rank(self) -> tuple[int, Fraction]:
        """How routing orders prices (SPEC 3): the cheapest for the buyer first, then the
        biggest discount. Kept, so equal prices (one shared Price) compare by identity."""
        return (self.buyer_cost, -self.discount)


# Immutable, and shared: a model's offers repeat few (quote, multiplier) pairs between submits,
# so each is priced (and its discount worked out) once, not per offer per submit.
@lru_cache(maxsize=16_384)
def price_offer(list_price: int, multiplier: Fraction, fees: FeeSchedule) -> Price:
    cost = seller_cost(list_price, multiplier)
    return Price(list_price=list_price, seller_cost=cost, buyer_cost=fees.buyer_cost(cost))


def price_buyer_owned(list_price: int, fees: FeeSchedule) -> Price:
    """A buyer's own provider key: no seller is paid; only a configured flat fee is charged."""
    return Price(list_price=list_price, seller_cost=0, buyer_cost=fees.flat_usdc)


def max_cost(estimated: int) -> int:
    """The hold placed at submit: the estimate plus 10%, rounded up."""
    return ceil_fraction(estimated * HOLD_MARGIN)


class SettlementAmounts(NamedTuple):
    charged: int
    released: int
    seller_paid: int
    platform_fee: int


def settle(hold: int, charge: int | None, seller_cost: int) -> SettlementAmounts:
    """Resolve a hold: ``charge`` is the buyer cost to take, or ``None`` when nothing is charged.

    Keeps SPEC's invariants by construction: held = charged + released and
    charged = seller_paid + platform_fee; anything that would break them is refused.
    """
    if hold < 0:
        raise MoneyError(f"hold must not be negative: {hold}")
    if charge is None:
        return SettlementAmounts(charged=0, released=hold, seller_paid=0, platform_fee=0)
    if charge < 0:
        raise MoneyError(f"charge must not be negative: {charge}")
    if charge > hold:
        raise MoneyError(f"charge {charge} exceeds the hold {hold}")
    if not 0 <= seller_cost <= charge:
        raise MoneyError(f"seller cost {seller_cost} must be between 0 and the charge {charge}")
    return SettlementAmounts(
        charged=charge,
        released=hold - charge,
        seller_paid=seller_cost,
        platform_fee=charge - seller_cost,
    )


def format_discount(discount: Fraction) -> str:
    """A discount for people: percent with at most two decimals, rounded down (never flattering)."""
    # Floor, not truncation: a negative discount (fees above list price) must not look better.
    hundredths = discount.numerator * 100 // discount.denominator
    sign = "-" if hundredths < 0 else ""
    whole, rest = divmod(abs(hundredths), 100)
    if rest == 0:
        return f"{sign}{whole}%"
    return f"{sign}{whole}.{rest:02d}".rstrip("0") + "%"


def to_json(amount: int) -> str:
    """Amounts in JSON are decimal strings of microdollars."""
    return str(amount)
