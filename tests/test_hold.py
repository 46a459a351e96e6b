"""The hold contract of SPEC 1, as properties: what a submit holds and what a job may charge.

The hold is ``ceil(estimate x 1.10)`` exactly, or the buyer's own ceiling, or for a job that
starts on the buyer's own key 10% over the first marketplace offer behind it; never anything
else, whatever the other offers cost and whatever the buyer's balance. And whatever the prices
do between submit and dispatch, a dispatch never costs more than the hold.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.crypto import Secrets
from adapters.eventstore import open_market
from api.validation import validate_video_request
from domain.aggregates import IllegalTransition, InsufficientBalance, Job
from domain.money import FeeSchedule, price_buyer_owned, price_offer, settle
from domain.routing import (
    Candidate,
    CeilingBelowEstimate,
    RoutingError,
    choose,
    hold_for,
    route_exhausted,
)
from services.commands import Commands
from tests.test_ledger import CATALOG


def ceil_110(amount: int) -> int:
    """SPEC 1's rule written out independently of ``domain.money``."""
    value = Fraction(amount) * Fraction(11, 10)
    return -(-value.numerator // value.denominator)


fees = st.builds(
    FeeSchedule,
    multiplier_bps=st.sampled_from([10_000, 10_500, 12_000]),
    flat_usdc=st.sampled_from([0, 1, 1_000]),
)
list_prices = st.integers(min_value=0, max_value=5_000_000)
multipliers = st.integers(min_value=5, max_value=100).map(lambda n: Fraction(n, 100))


@st.composite
def markets(draw: st.DrawFn) -> tuple[FeeSchedule, list[Candidate]]:
    schedule = draw(fees)
    candidates = [
        Candidate(
            offer_id=f"o{n}",
            seller_id=f"s{n}",
            multiplier=(m := draw(multipliers)),
            created_seq=n,
            price=price_offer(draw(list_prices), m, schedule),
        )
        for n in range(draw(st.integers(min_value=0, max_value=6)))
    ]
    for n in range(draw(st.integers(min_value=0, max_value=2))):
        candidates.append(
            Candidate(
                offer_id=f"k{n}",
                seller_id=None,
                multiplier=None,
                created_seq=n,
                price=price_buyer_owned(draw(list_prices), schedule),
                catch_all=draw(st.booleans()),
            )
        )
    return schedule, candidates


def expected_hold(route: list[Candidate], ceiling: int | None) -> int:
    if ceiling is not None:
        return ceiling
    first = route[0]
    hold = ceil_110(first.price.buyer_cost)
    if first.buyer_owned:
        offers = [c for c in route if not c.buyer_owned]
        if offers:
            hold = max(hold, ceil_110(offers[0].price.buyer_cost))
    return hold


@given(markets(), st.none() | st.integers(min_value=0, max_value=20_000_000))
def test_the_hold_is_the_rule(market: tuple[FeeSchedule, list[Candidate]], ceiling: int | None):
    _, candidates = market
    try:
        route = choose(len(candidates), candidates, None).eligible
    except RoutingError:
        return
    estimate = route[0].price.buyer_cost
    if ceiling is not None and ceiling < estimate:
        with pytest.raises(CeilingBelowEstimate):
            hold_for(route, ceiling)
        return
    assert hold_for(route, ceiling) == expected_hold(route, ceiling)
    if ceiling is None and not route[0].buyer_owned:
        # The seed page's promise: the estimate plus 10%, whatever the other offers cost.
        assert hold_for(route) == ceil_110(estimate)


@given(markets(), st.data())
def test_a_dispatch_never_charges_more_than_the_hold(
    market: tuple[FeeSchedule, list[Candidate]], data: st.DataObject
) -> None:
    schedule, candidates = market
    try:
        route = choose(len(candidates), candidates, None).eligible
    except RoutingError:
        return
    hold = hold_for(route)
    job = Job(
        id=uuid.uuid4(),
        buyer_id="b",
        request={},
        fingerprint="f",
        token_hash="t",
        created=0,
        expires_at=1800,
        estimated_cost=route[0].price.buyer_cost,
        max_cost=hold,
        route=[],
        min_discount=None,
    )
    over_hold: list[str] = []
    for candidate in route:
        # Prices move between submit and dispatch: each offer is quoted again, anything goes.
        list_price = data.draw(list_prices)
        if candidate.buyer_owned:
            now = price_buyer_owned(list_price, schedule)
        else:
            assert candidate.multiplier is not None
            now = price_offer(list_price, candidate.multiplier, schedule)
        attempt = {
            "offer_id": candidate.offer_id,
            "seller_id": candidate.seller_id,
            "buyer_cost": now.buyer_cost,
            "seller_cost": now.seller_cost,
        }
        if now.buyer_cost > hold:
            over_hold.append(candidate.offer_id)
            # The aggregate itself refuses it, whoever calls it.
            with pytest.raises(IllegalTransition):
                job.start_dispatch(attempt)
            continue
        job.start_dispatch(attempt)
        amounts = settle(hold, now.buyer_cost, now.seller_cost)
        assert amounts.charged <= hold
        assert amounts.charged + amounts.released == hold
        return
    exhausted = route_exhausted(route[0].offer_id, over_hold, hold)
    chosen_rose = route[0].offer_id in over_hold
    assert exhausted.code == ("price_changed" if chosen_rose else "no_sellers_available")
    if over_hold:
        assert "max_cost_usdc" in exhausted.message


# The real submit command: the balance decides whether the job is taken, never what it holds.


@pytest.fixture(scope="module")
def commands() -> Iterator[Commands]:
    with tempfile.TemporaryDirectory() as directory:
        market = open_market(f"sqlite:///{directory}/data")
        try:
            yield Commands(market, Secrets("k" * 32))
        finally:
            market.close()


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hold=st.integers(min_value=0, max_value=3_000_000),
    balance=st.integers(min_value=0, max_value=3_000_000),
)
def test_the_balance_never_changes_the_hold(commands: Commands, hold: int, balance: int) -> None:
    buyer_id, _, _ = commands.create_buyer("b")
    if balance:
        commands.deposit(buyer_id, balance)
    request = validate_video_request(
        {"model": "venice-seedance-2-fast-t2v", "prompt": "p"},
        CATALOG,
        allow_http_webhooks=False,
        allow_private_webhooks=False,
    )
    submit = dict(
        buyer_id=buyer_id,
        request=request,
        route=[],
        routing={},
        estimated_cost=hold * 10 // 11,
        hold=hold,
        ttl_seconds=60,
        min_discount=None,
        idempotency_key=None,
    )
    if hold > balance:
        with pytest.raises(InsufficientBalance):
            commands.submit(**submit)  # type: ignore[arg-type]
        assert commands.buyer(buyer_id).held == 0
        return
    submitted = commands.submit(**submit)  # type: ignore[arg-type]
    assert commands.job(submitted.job_id).max_cost == hold
    assert commands.buyer(buyer_id).held == hold


def test_examples_from_the_spec() -> None:
    schedule = FeeSchedule()
    # The seed page: 192000 estimated, 211200 held (not 237600 for a dearer offer behind it).
    cheap = Candidate(
        "a", "s", Fraction(80, 100), 0, price_offer(240_000, Fraction(80, 100), schedule)
    )
    dear = Candidate("b", "s", Fraction(1), 1, price_offer(240_000, Fraction(1), schedule))
    route = choose(2, [dear, cheap], None).eligible
    assert route[0].price.buyer_cost == 192_000
    assert hold_for(route) == 211_200
    # The buyer's own ceiling replaces the rule, when it covers the estimate.
    assert hold_for(route, 300_000) == 300_000
    assert hold_for(route, 192_000) == 192_000
    with pytest.raises(CeilingBelowEstimate):
        hold_for(route, 191_999)
    # A job on the buyer's own key holds for the market behind it, 0 with no market.
    mine = Candidate("k", None, None, 0, price_buyer_owned(240_000, schedule))
    assert hold_for(choose(1, [mine, dear, cheap], None).eligible) == 211_200
    assert hold_for(choose(0, [mine], None).eligible) == 0
