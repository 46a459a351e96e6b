"""Which offer runs a submit (SPEC 3): the ``/min{N}`` prefix and the ranking of candidates.

Pure: the caller has already read the offers, dropped those in backoff or at capacity, and
priced each from its live quote; this module only decides the order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

from domain.money import Price, format_discount, max_cost

MIN_PREFIX = "/min"
MEDIA_ROOT = "/v1/"
_DISCOUNT = re.compile(r"0|[1-9][0-9]{0,2}", re.ASCII)


class MinimumDiscountError(ValueError):
    code = "invalid_minimum_discount"


def parse_min_prefix(path: str) -> tuple[int | None, str]:
    """Split ``/min{N}/v1/...`` into ``(N, "/v1/...")``; any other path is ``(None, path)``.

    Only a segment starting ``min`` directly followed by ``/v1/`` is a prefix, and then its N
    must be valid or ``MinimumDiscountError`` is raised. ``/min30``, ``/min30/api/markets`` or
    ``/min30/v1`` have no ``/v1/`` path behind them, so they are left alone for the router to 404.
    Whether the path behind the prefix exists is the router's business too. The path is expected
    already percent-decoded, as aiohttp's ``request.path`` is.
    """
    if not path.startswith(MIN_PREFIX):
        return None, path
    segment, slash, rest = path[len(MIN_PREFIX) :].partition("/")
    rest = slash + rest
    if not rest.startswith(MEDIA_ROOT):
        return None, path
    if not _DISCOUNT.fullmatch(segment) or int(segment) > 100:
        raise MinimumDiscountError(
            f"invalid minimum discount {'min' + segment!r}: "
            "use /min{N}/ with N a whole number from 0 to 100, such as /min30/"
        )
    return int(segment), rest


@dataclass(frozen=True)
class Candidate:
    offer_id: str
    seller_id: str | None
    multiplier: Fraction | None
    created_seq: int
    price: Price
    # Only for a buyer-owned key (seller_id None): a key registered with ``model: null`` is the
    # last resort (SPEC 3 step 3), while one registered for the model goes first (step 1).
    catch_all: bool = False

    @property
    def buyer_owned(self) -> bool:
        return self.seller_id is None


@dataclass(frozen=True)
class Ranking:
    eligible: list[Candidate]
    best_discount: Fraction | None
    filtered_by_min: list[Candidate]


def _offer_order(candidate: Candidate) -> tuple[tuple[int, Fraction], int, str]:
    return (candidate.price.rank, candidate.created_seq, candidate.offer_id)


def _key_order(candidate: Candidate) -> tuple[int, str]:
    return (candidate.created_seq, candidate.offer_id)


def rank_candidates(candidates: Sequence[Candidate], min_discount: int | None) -> Ranking:
    """Order candidates as SPEC 3 tries them; drop marketplace offers below ``min_discount``.

    Buyer-owned keys are outside the market: ``min{N}`` does not apply to them, the model's own
    key goes before every offer and a catch-all key after them. ``best_discount`` is therefore
    taken over marketplace offers only, since it explains a ``minimum_discount_not_met``.
    """
    own_keys = [c for c in candidates if c.buyer_owned and not c.catch_all]
    catch_alls = [c for c in candidates if c.buyer_owned and c.catch_all]
    offers = [c for c in candidates if not c.buyer_owned]

    best_discount = max((c.price.discount for c in offers), default=None)
    if min_discount is None:
        admitted, filtered = offers, []
    else:
        admitted = [c for c in offers if c.price.discount >= min_discount]
        filtered = [c for c in offers if c.price.discount < min_discount]

    eligible = [
        *sorted(own_keys, key=_key_order),
        *sorted(admitted, key=_offer_order),
        *sorted(catch_alls, key=_key_order),
    ]
    return Ranking(
        eligible=eligible,
        best_discount=best_discount,
        filtered_by_min=sorted(filtered, key=_offer_order),
    )


class RoutingError(Exception):
    def __init__(self, code: str, message: str, best_discount: Fraction | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.best_discount = best_discount


def choose(offers_listed: int, priced: Sequence[Candidate], min_discount: int | None) -> Ranking:
    """The candidates to try, in order, or the reason there are none.

    ``offers_listed`` counts the model's marketplace offers before health and capacity were
    considered; ``priced`` are the candidates (offers and the buyer's own keys) that could be
    quoted now.
    """
    ranking = rank_candidates(priced, min_discount)
    if ranking.eligible:
        return ranking
    if offers_listed == 0:
        raise RoutingError("no_sellers_for_model", "no seller offers this model")
    if ranking.best_discount is None:
        raise RoutingError(
            "no_healthy_sellers", "no seller of this model is available right now; retry later"
        )
    best = ranking.best_discount
    raise RoutingError(
        "minimum_discount_not_met",
        f"no offer meets the minimum discount of {min_discount}%; "
        f"the best available is {format_discount(best)}",
        best_discount=best,
    )


class CeilingBelowEstimate(ValueError):
    """A buyer's own ``max_cost_usdc`` that would not even cover the estimate."""

    def __init__(self, ceiling: int, estimate: int) -> None:
        super().__init__(
            f"max_cost_usdc {ceiling} is below the estimated cost of {estimate} microdollars"
        )
        self.ceiling = ceiling
        self.estimate = estimate


def hold_for(route: Sequence[Candidate], ceiling: int | None = None) -> int:
    """The amount a job holds, its ``max_cost`` (SPEC 1), for a route ranked by ``choose``.

    The estimate plus 10%, rounded up, exactly; or the buyer's own ceiling when it sent one.
    The one other case is a job that starts on the buyer's own key: its estimate is only the
    flat fee, so it holds 10% over the first marketplace offer behind the key, so that the
    market can take over if the key is refused. Nothing else (other offers' prices, the buyer's
    balance) moves it.
    """
    estimate = route[0].price.buyer_cost
    if ceiling is not None:
        if ceiling < estimate:
            raise CeilingBelowEstimate(ceiling, estimate)
        return ceiling
    hold = max_cost(estimate)
    if route[0].buyer_owned:
        behind = next((c for c in route if not c.buyer_owned), None)
        if behind is not None:
            hold = max(hold, max_cost(behind.price.buyer_cost))
    return hold


@dataclass(frozen=True)
class Exhausted:
    """Why a job failed when no offer on its route could take it (SPEC 1)."""

    code: str
    message: str
    retryable: bool = True


def route_exhausted(chosen_offer_id: str, over_hold: Sequence[str], hold: int) -> Exhausted:
    """The failure of a job whose route has no offer left within its hold.

    ``price_changed`` only when the offer chosen at submit itself got dearer than the hold;
    when it refused and the offers behind it cost too much, that is ``no_sellers_available``.
    """
    if chosen_offer_id in over_hold:
        return Exhausted(
            "price_changed",
            f"the chosen offer's price rose above max_cost_usdc ({hold} microdollars)",
        )
    if over_hold:
        return Exhausted(
            "no_sellers_available",
            f"the remaining offers cost more than max_cost_usdc ({hold} microdollars)",
        )
    return Exhausted("no_sellers_available", "no seller could accept the job")
