from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.money import FeeSchedule, Price, parse_multiplier, price_buyer_owned, price_offer
from domain.routing import (
    Candidate,
    MinimumDiscountError,
    RoutingError,
    choose,
    parse_min_prefix,
    rank_candidates,
)

# the /min{N} prefix


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/min30/v1/video/generations", (30, "/v1/video/generations")),
        ("/min0/v1/video/generations", (0, "/v1/video/generations")),
        ("/min7/v1/video/generations", (7, "/v1/video/generations")),
        ("/min100/v1/video/generations", (100, "/v1/video/generations")),
        ("/min99/v1/video/generations/abc", (99, "/v1/video/generations/abc")),
        ("/min10/v1/", (10, "/v1/")),
        ("/v1/video/generations", (None, "/v1/video/generations")),
        ("/api/markets", (None, "/api/markets")),
        ("/", (None, "/")),
        ("", (None, "")),
        # Not a prefix (nothing under /v1/ behind it): left for the router to 404.
        ("/min30", (None, "/min30")),
        ("/min30/", (None, "/min30/")),
        ("/min30/v1", (None, "/min30/v1")),
        ("/min30/v2/video/generations", (None, "/min30/v2/video/generations")),
        ("/min30/api/markets", (None, "/min30/api/markets")),
        ("/min30/min40/v1/video/generations", (None, "/min30/min40/v1/video/generations")),
        ("/min030", (None, "/min030")),
        ("/v1/min30/video/generations", (None, "/v1/min30/video/generations")),
        ("/MIN30/v1/video/generations", (None, "/MIN30/v1/video/generations")),
    ],
)
def test_parse_min_prefix(path: str, expected: tuple[int | None, str]) -> None:
    assert parse_min_prefix(path) == expected


@pytest.mark.parametrize(
    "segment",
    [
        "min030",
        "min00",
        "min01",
        "min-1",
        "min30.5",
        "min101",
        "min1000",
        "min",
        "minx",
        "min+5",
        "min 5",
        "min5 ",
        "min1e1",
        "min٣",  # an Arabic-Indic digit: a digit to str.isdigit, not to SPEC
        "min²",
        "minutes",
    ],
)
def test_invalid_min_prefix(segment: str) -> None:
    with pytest.raises(MinimumDiscountError) as excinfo:
        parse_min_prefix(f"/{segment}/v1/video/generations")
    assert excinfo.value.code == "invalid_minimum_discount"
    assert isinstance(excinfo.value, ValueError)


@given(st.integers(min_value=0, max_value=100))
def test_every_valid_min_prefix(n: int) -> None:
    assert parse_min_prefix(f"/min{n}/v1/video/generations/x") == (n, "/v1/video/generations/x")


@given(st.integers().filter(lambda n: not 0 <= n <= 100))
def test_out_of_range_min_prefix(n: int) -> None:
    with pytest.raises(MinimumDiscountError):
        parse_min_prefix(f"/min{n}/v1/video/generations")


# ranking

FEES = FeeSchedule()


def offer(
    offer_id: str,
    multiplier: str,
    *,
    list_price: int = 1_000_000,
    seq: int = 0,
    fees: FeeSchedule = FEES,
) -> Candidate:
    m = parse_multiplier(multiplier)
    return Candidate(
        offer_id=offer_id,
        seller_id=f"seller-{offer_id}",
        multiplier=m,
        created_seq=seq,
        price=price_offer(list_price, m, fees),
    )


def own_key(offer_id: str, *, seq: int = 0, catch_all: bool = False) -> Candidate:
    return Candidate(
        offer_id=offer_id,
        seller_id=None,
        multiplier=None,
        created_seq=seq,
        price=price_buyer_owned(1_000_000, FEES),
        catch_all=catch_all,
    )


def ids(candidates: list[Candidate]) -> list[str]:
    return [c.offer_id for c in candidates]


def test_cheapest_first() -> None:
    ranking = rank_candidates(
        [offer("a", "0.90"), offer("b", "0.70"), offer("c", "0.80")], min_discount=None
    )
    assert ids(ranking.eligible) == ["b", "c", "a"]
    assert ranking.best_discount == 30
    assert ranking.filtered_by_min == []


def test_equal_cost_prefers_higher_discount() -> None:
    # Same buyer cost, but "b" is measured against a higher list price, so its discount is larger.
    a = offer("a", "0.50", list_price=1_000_000)
    b = offer("b", "0.25", list_price=2_000_000)
    assert a.price.buyer_cost == b.price.buyer_cost
    assert b.price.discount > a.price.discount
    assert ids(rank_candidates([a, b], None).eligible) == ["b", "a"]


def test_equal_cost_and_discount_prefers_the_older_offer_then_the_id() -> None:
    candidates = [
        offer("z", "0.80", seq=5),
        offer("y", "0.80", seq=2),
        offer("b", "0.80", seq=9),
        offer("a", "0.80", seq=9),
    ]
    assert ids(rank_candidates(candidates, None).eligible) == ["y", "z", "a", "b"]


def test_min_discount_admits_equality_exactly() -> None:
    candidates = [offer("thirty", "0.70"), offer("twenty", "0.80")]
    at_30 = rank_candidates(candidates, 30)
    assert ids(at_30.eligible) == ["thirty"]
    assert ids(at_30.filtered_by_min) == ["twenty"]
    at_31 = rank_candidates(candidates, 31)
    assert at_31.eligible == []
    assert ids(at_31.filtered_by_min) == ["thirty", "twenty"]
    assert at_31.best_discount == 30
    assert ids(rank_candidates(candidates, 0).eligible) == ["thirty", "twenty"]


def test_fees_count_against_the_discount() -> None:
    # Seller cost 700000 with a 10% fee is a buyer cost of 770000: a 23% discount, not 30%.
    candidate = offer("a", "0.70", fees=FeeSchedule(multiplier_bps=11_000))
    assert candidate.price.discount == 23
    assert rank_candidates([candidate], 30).eligible == []
    assert ids(rank_candidates([candidate], 23).eligible) == ["a"]


def test_buyer_owned_keys_bracket_the_market_and_ignore_min() -> None:
    candidates = [
        own_key("catch-all", catch_all=True),
        offer("cheap", "0.50"),
        own_key("mine-new", seq=8),
        offer("dear", "0.95"),
        own_key("mine-old", seq=3),
    ]
    ranking = rank_candidates(candidates, 40)
    assert ids(ranking.eligible) == ["mine-old", "mine-new", "cheap", "catch-all"]
    assert ids(ranking.filtered_by_min) == ["dear"]
    assert ranking.best_discount == 50


def test_best_discount_of_nothing_is_none() -> None:
    assert rank_candidates([], 10).best_discount is None
    assert rank_candidates([own_key("k")], 10).best_discount is None


# choose


def test_choose_returns_the_ranked_list() -> None:
    candidates = [offer("a", "0.90"), offer("b", "0.70")]
    assert ids(choose(2, candidates, None).eligible) == ["b", "a"]
    assert ids(choose(5, candidates, 10).eligible) == ["b", "a"]
    ranking = choose(5, candidates, 30)
    assert ids(ranking.eligible) == ["b"]
    assert ids(ranking.filtered_by_min) == ["a"]


def test_own_keys_route_without_any_offer() -> None:
    # A buyer's catch-all key serves a model no seller offers, and min{N} does not apply to it.
    assert ids(choose(0, [own_key("k", catch_all=True)], 90).eligible) == ["k"]
    # Every offer below the minimum: the catch-all still takes the job.
    ranking = choose(1, [offer("a", "0.90"), own_key("k", catch_all=True)], 50)
    assert ids(ranking.eligible) == ["k"]


def test_choose_without_offers() -> None:
    with pytest.raises(RoutingError) as excinfo:
        choose(0, [], None)
    assert excinfo.value.code == "no_sellers_for_model"


def test_choose_without_healthy_offers() -> None:
    with pytest.raises(RoutingError) as excinfo:
        choose(3, [], 30)
    assert excinfo.value.code == "no_healthy_sellers"


def test_choose_when_the_minimum_is_not_met() -> None:
    with pytest.raises(RoutingError) as excinfo:
        choose(2, [offer("a", "0.70"), offer("b", "0.90")], 35)
    error = excinfo.value
    assert error.code == "minimum_discount_not_met"
    assert error.message == "no offer meets the minimum discount of 35%; the best available is 30%"
    assert str(error) == error.message
    assert error.best_discount == 30


def test_minimum_not_met_message_rounds_the_best_discount_down() -> None:
    candidate = offer("a", "0.667")
    assert candidate.price.discount == Fraction(333, 10)
    with pytest.raises(RoutingError) as excinfo:
        choose(1, [candidate], 34)
    assert excinfo.value.message.endswith("the best available is 33.3%")


# property: the first eligible is the cheapest admissible, and nothing below N is eligible


@st.composite
def candidate_lists(draw: st.DrawFn) -> list[Candidate]:
    fees = draw(
        st.builds(
            FeeSchedule,
            multiplier_bps=st.sampled_from([10_000, 10_500, 12_000]),
            flat_usdc=st.sampled_from([0, 1, 1_000]),
        )
    )
    count = draw(st.integers(min_value=0, max_value=8))
    candidates = []
    for index in range(count):
        multiplier = Fraction(draw(st.integers(min_value=5, max_value=100)), 100)
        list_price = draw(st.sampled_from([0, 1, 100_000, 200_000, 1_000_000, 1_234_567]))
        candidates.append(
            Candidate(
                offer_id=f"o{index}",
                seller_id=f"s{index}",
                multiplier=multiplier,
                created_seq=draw(st.integers(min_value=0, max_value=3)),
                price=price_offer(list_price, multiplier, fees),
            )
        )
    return candidates


@given(candidate_lists(), st.none() | st.integers(min_value=0, max_value=100))
def test_ranking_properties(candidates: list[Candidate], min_discount: int | None) -> None:
    ranking = rank_candidates(candidates, min_discount)
    floor = Fraction(-(10**9)) if min_discount is None else Fraction(min_discount)
    admissible = [c for c in candidates if c.price.discount >= floor]

    assert sorted(ids(ranking.eligible)) == sorted(ids(admissible))
    assert sorted(ids(ranking.eligible + ranking.filtered_by_min)) == sorted(ids(candidates))
    assert all(c.price.discount >= floor for c in ranking.eligible)
    assert all(c.price.discount < floor for c in ranking.filtered_by_min)
    if admissible:
        assert ranking.eligible[0].price.buyer_cost == min(c.price.buyer_cost for c in admissible)
    costs = [c.price.buyer_cost for c in ranking.eligible]
    assert costs == sorted(costs)
    if candidates:
        assert ranking.best_discount == max(c.price.discount for c in candidates)


@given(candidate_lists(), st.integers(min_value=0, max_value=100))
def test_choose_agrees_with_the_ranking(candidates: list[Candidate], min_discount: int) -> None:
    try:
        chosen = choose(len(candidates), candidates, min_discount).eligible
    except RoutingError as error:
        if not candidates:
            assert error.code == "no_sellers_for_model"
        else:
            assert error.code == "minimum_discount_not_met"
            assert all(c.price.discount < min_discount for c in candidates)
        return
    assert chosen == rank_candidates(candidates, min_discount).eligible
    assert chosen


@given(st.integers(min_value=0, max_value=100), st.integers(min_value=1, max_value=10**7))
def test_boundary_equality_is_admitted(n: int, list_price: int) -> None:
    # A buyer cost of exactly (100 - n)% of the list price is a discount of exactly n%.
    buyer_cost = list_price * (100 - n)
    candidate = Candidate("o", "s", Fraction(1), 0, Price(list_price * 100, buyer_cost, buyer_cost))
    assert candidate.price.discount == n
    assert rank_candidates([candidate], n).eligible == [candidate]
    if n < 100:
        assert rank_candidates([candidate], n + 1).eligible == []
