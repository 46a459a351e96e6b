from __future__ import annotations

import math
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.money import (
    FeeSchedule,
    MoneyError,
    Price,
    format_discount,
    format_multiplier,
    max_cost,
    parse_multiplier,
    price_buyer_owned,
    price_offer,
    seller_cost,
    settle,
    usd_to_micros,
)

amounts = st.integers(min_value=0, max_value=10**12)
percent_multipliers = st.integers(min_value=5, max_value=100).map(lambda n: Fraction(n, 100))
multipliers = percent_multipliers | st.fractions(
    min_value=Fraction(5, 100), max_value=1, max_denominator=10**6
)
fee_schedules = st.builds(
    FeeSchedule,
    multiplier_bps=st.integers(min_value=10_000, max_value=30_000),
    flat_usdc=st.integers(min_value=0, max_value=1_000_000),
)


# usd_to_micros


@pytest.mark.parametrize(
    ("quote", "micros"),
    [
        (0.42, 420_000),
        ("0.42", 420_000),
        (0.1, 100_000),
        (0.3, 300_000),
        (0.0000001, 1),
        (1e-7, 1),
        ("0.0000001", 1),
        (0.1000001, 100_001),
        ("0.1000000000000000000000000000001", 100_001),
        (0, 0),
        (0.0, 0),
        (1, 1_000_000),
        (12.5, 12_500_000),
        (Decimal("0.000001"), 1),
        ("1e-99999999", 1),
    ],
)
def test_usd_to_micros_exact_and_rounds_up(quote: object, micros: int) -> None:
    assert usd_to_micros(quote) == micros


@pytest.mark.parametrize(
    "quote", [True, False, None, "abc", "", "NaN", float("nan"), float("inf"), -0.01, "1e99999999"]
)
def test_usd_to_micros_rejects(quote: object) -> None:
    with pytest.raises(MoneyError):
        usd_to_micros(quote)


@given(st.decimals(min_value=0, max_value=10**6, allow_nan=False, allow_infinity=False))
def test_usd_to_micros_is_the_ceiling_of_the_decimal(amount: Decimal) -> None:
    micros = usd_to_micros(str(amount))
    exact = Fraction(amount) * 1_000_000
    assert micros == math.ceil(exact)
    assert micros - 1 < exact <= micros


@given(st.floats(min_value=0, max_value=10**6, allow_nan=False, allow_infinity=False))
def test_usd_to_micros_of_a_float_uses_its_shortest_decimal(quote: float) -> None:
    assert usd_to_micros(quote) == math.ceil(Fraction(Decimal(repr(quote))) * 1_000_000)


@given(st.integers(min_value=0, max_value=10**9))
def test_usd_to_micros_of_whole_micros_is_exact(micros: int) -> None:
    assert usd_to_micros(str(Decimal(micros) / 1_000_000)) == micros
    assert usd_to_micros(str(Decimal(micros) / 1_000_000 + Decimal("1e-12"))) == micros + 1


# seller cost, buyer cost, hold


@given(amounts, multipliers)
def test_seller_cost_is_ceil_of_list_times_multiplier(
    list_price: int, multiplier: Fraction
) -> None:
    cost = seller_cost(list_price, multiplier)
    assert cost == math.ceil(list_price * multiplier)
    assert cost <= list_price


def test_seller_cost_examples() -> None:
    assert seller_cost(1_000_000, Fraction(70, 100)) == 700_000
    assert seller_cost(1, Fraction(5, 100)) == 1
    assert seller_cost(333_333, Fraction(1, 3)) == 111_111
    assert seller_cost(100_000, Fraction(1, 3)) == 33_334


@given(amounts, multipliers, fee_schedules)
def test_buyer_cost_is_seller_cost_plus_fee(
    list_price: int, multiplier: Fraction, fees: FeeSchedule
) -> None:
    price = price_offer(list_price, multiplier, fees)
    expected = math.ceil(Fraction(price.seller_cost * fees.multiplier_bps, 10_000))
    assert price.buyer_cost == expected + fees.flat_usdc
    assert price.buyer_cost >= price.seller_cost
    assert price.platform_fee == price.buyer_cost - price.seller_cost >= 0


def test_default_fees_charge_nothing() -> None:
    price = price_offer(102_000, Fraction(80, 100), FeeSchedule())
    assert (price.seller_cost, price.buyer_cost, price.platform_fee) == (81_600, 81_600, 0)


def test_fee_schedule_refuses_rebates() -> None:
    with pytest.raises(MoneyError):
        FeeSchedule(multiplier_bps=9_999)
    with pytest.raises(MoneyError):
        FeeSchedule(flat_usdc=-1)


def test_buyer_owned_key_costs_only_the_flat_fee() -> None:
    assert price_buyer_owned(500_000, FeeSchedule()) == Price(500_000, 0, 0)
    assert price_buyer_owned(500_000, FeeSchedule(12_000, 1_000)) == Price(500_000, 0, 1_000)


@given(amounts)
def test_max_cost_is_ceil_of_estimate_times_1_10(estimate: int) -> None:
    hold = max_cost(estimate)
    assert hold == math.ceil(Fraction(estimate * 11, 10))
    assert hold >= estimate


def test_max_cost_matches_spec_example() -> None:
    assert max_cost(102_000) == 112_200
    assert max_cost(1) == 2
    assert max_cost(0) == 0


# discount


def test_discount_is_exact_at_the_boundary() -> None:
    price = price_offer(1_000_000, parse_multiplier("0.70"), FeeSchedule())
    assert price.discount == 30
    assert price.discount >= 30
    assert not price.discount >= 31


@given(amounts.filter(lambda n: n > 0), multipliers, fee_schedules)
def test_discount_is_the_exact_fraction(
    list_price: int, multiplier: Fraction, fees: FeeSchedule
) -> None:
    price = price_offer(list_price, multiplier, fees)
    assert price.discount == (1 - Fraction(price.buyer_cost, list_price)) * 100
    assert price.discount <= 95


def test_discount_of_a_free_list_price_is_zero() -> None:
    assert Price(0, 0, 0).discount == 0


# multipliers


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0.05", Fraction(5, 100)),
        ("1.00", Fraction(1)),
        ("1", Fraction(1)),
        ("0.80", Fraction(4, 5)),
        (" 0.5 ", Fraction(1, 2)),
        ("0.333", Fraction(333, 1000)),
    ],
)
def test_parse_multiplier_accepts(text: str, value: Fraction) -> None:
    assert parse_multiplier(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "0.049",
        "1.01",
        "0",
        "-0.5",
        "abc",
        "NaN",
        "Infinity",
        "sNaN",
        " ",
        "",
        0.5,
        1,
        None,
        True,
        "1e-99999999",
        "1e99999999",
    ],
)
def test_parse_multiplier_rejects(text: object) -> None:
    with pytest.raises(MoneyError):
        parse_multiplier(text)


@given(st.integers(min_value=500, max_value=10_000))
def test_parse_multiplier_round_trips_through_format(bps: int) -> None:
    multiplier = Fraction(bps, 10_000)
    assert parse_multiplier(format_multiplier(multiplier)) == multiplier


@given(st.integers(min_value=0, max_value=10_000))
def test_parse_multiplier_range_is_inclusive(bps: int) -> None:
    text = str(Decimal(bps) / 10_000)
    if 500 <= bps <= 10_000:
        assert parse_multiplier(text) == Fraction(bps, 10_000)
    else:
        with pytest.raises(MoneyError):
            parse_multiplier(text)


def test_format_multiplier() -> None:
    assert format_multiplier(Fraction(4, 5)) == "0.80"
    assert format_multiplier(Fraction(1)) == "1.00"
    assert format_multiplier(Fraction(333, 1000)) == "0.333"


# format_discount


@pytest.mark.parametrize(
    ("discount", "text"),
    [
        (Fraction(30), "30%"),
        (Fraction(0), "0%"),
        (Fraction(100), "100%"),
        (Fraction(61, 2), "30.5%"),
        (Fraction(3005, 100), "30.05%"),
        (Fraction(100, 3), "33.33%"),
        (Fraction(200, 3), "66.66%"),
        (Fraction(2999999, 100000), "29.99%"),
        (Fraction(-1, 1000), "-0.01%"),
        (Fraction(-1, 3), "-0.34%"),
        (Fraction(-20), "-20%"),
    ],
)
def test_format_discount(discount: Fraction, text: str) -> None:
    assert format_discount(discount) == text


@given(st.fractions(min_value=-200, max_value=100, max_denominator=10**7))
def test_format_discount_never_flatters(discount: Fraction) -> None:
    shown = Fraction(Decimal(format_discount(discount).removesuffix("%")))
    assert shown <= discount < shown + Fraction(1, 100)


# settlement (SPEC 1: held = charged + released, charged = seller cost + platform fee)


@st.composite
def settlements(draw: st.DrawFn) -> tuple[int, int | None, int]:
    list_price = draw(amounts)
    price = price_offer(list_price, draw(multipliers), draw(fee_schedules))
    hold = max_cost(price.buyer_cost)
    # The table of SPEC 1: success and cancel-after-dispatch charge the buyer cost; every other
    # ending charges nothing.
    outcome = draw(
        st.sampled_from(
            [
                "succeeded",
                "failed_before_acceptance",
                "failed_after_acceptance",
                "canceled_before_dispatch",
                "canceled_after_dispatch",
                "expired",
            ]
        )
    )
    # The dispatch-time quote may differ from the submit-time one, as long as it fits the hold.
    dispatch_buyer_cost = draw(st.integers(min_value=price.seller_cost, max_value=hold))
    dispatch_seller_cost = draw(st.integers(min_value=0, max_value=dispatch_buyer_cost))
    if outcome in ("succeeded", "canceled_after_dispatch"):
        return hold, dispatch_buyer_cost, dispatch_seller_cost
    return hold, None, dispatch_seller_cost


@given(settlements())
def test_settlement_invariants(case: tuple[int, int | None, int]) -> None:
    hold, charge, cost = case
    charged, released, seller_paid, platform_fee = settle(hold, charge, cost)
    assert hold == charged + released
    assert charged == seller_paid + platform_fee
    assert 0 <= charged <= hold
    assert released >= 0
    assert platform_fee >= 0
    if charge is None:
        assert (charged, released, seller_paid, platform_fee) == (0, hold, 0, 0)
    else:
        assert (charged, seller_paid) == (charge, cost)


def test_settle_examples() -> None:
    assert settle(112_200, 96_000, 80_000) == (96_000, 16_200, 80_000, 16_000)
    assert settle(112_200, None, 80_000) == (0, 112_200, 0, 0)
    assert settle(112_200, 112_200, 112_200) == (112_200, 0, 112_200, 0)
    assert settle(0, 0, 0) == (0, 0, 0, 0)
    assert settle(112_200, 96_000, 80_000).released == 16_200


@pytest.mark.parametrize(
    ("hold", "charge", "cost"),
    [
        (100, 101, 50),
        (-1, None, 0),
        (100, -1, 0),
        (100, 50, 51),
        (100, 50, -1),
    ],
)
def test_settle_refuses_what_would_break_the_invariants(
    hold: int, charge: int | None, cost: int
) -> None:
    with pytest.raises(MoneyError):
        settle(hold, charge, cost)
