"""Routing as a table (SPEC 1, 3, 5.2): every simulator magic key, alone and in mixes of offers.

One real engine per backend serves the whole table. Each row gets a fresh funded buyer and a
fresh seller, creates its offers in the order listed, submits (with its ``/min{N}`` prefix, if
any) and checks, end to end:

- the submit's answer: an HTTP error (status, ``error.code``, and for
  ``minimum_discount_not_met`` the best discount named in the message), or a 202 priced on the
  offer the row expects (``estimated_cost_usdc`` and the hold ``max_cost_usdc``);
- the job's end: its status and error code, which offer ran it (by ``usage.seller_cost_usdc``,
  since multipliers differ, and by what the simulator billed each provider key during the row),
  what the buyer was charged;
- each offer's health afterwards as its seller sees it in ``GET /v1/seller/offers``;
- the money invariants over the buyer's whole history, and that nothing else was charged.

A row may submit a second time (``then``) after its first job ended, to show what backoff and
deactivation do to later submits. Its offers are deleted when the row ends (and any job still
pending is canceled), so the next row starts from an empty market.

Prices follow from the simulator's fixed catalog with the default fees (none): buyer cost =
seller cost = ceil(list price * multiplier). The hold is ceil(estimate * 1.10) exactly (SPEC 1),
or the row's own ``max_cost_usdc`` when it sends one. A fallback costing more than the hold is
skipped; when the chosen offer refused and every fallback costs more than the hold, the job
fails ``no_sellers_available`` (``price_changed`` is for the chosen offer's own price rising,
which the simulator's fixed prices cannot do: see test_lifecycle).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from tests.harness import (
    Client,
    Server,
    base_env,
    free_port,
    postgres_available,
    postgres_database,
)
from tests.test_lifecycle import (
    PENDING,
    PIXVERSE,
    RUNWAY,
    SEEDANCE,
    assert_money_invariants,
    billed,
    list_jobs,
    wait_status,
    wait_until,
)

ALIAS = "venice-video-gen"  # SPEC 5.2: an alias of seedance
DEPOSIT = 10_000_000
# Default requests (SPEC 5.2): the lowest resolution and the shortest duration, no audio.
LIST_PRICE = {
    SEEDANCE: 160_000,  # 480p, 4 s at 0.04 USD/s
    RUNWAY: 500_000,  # 720p, 5 s at 0.10 USD/s
    PIXVERSE: 250_000,  # 720p, 5 s at 0.05 USD/s
}
CANONICAL = {ALIAS: SEEDANCE}
RELEASED = {"seller_cost_usdc": "0", "buyer_cost_usdc": "0", "settlement_status": "released"}


# --------------------------------------------------------------------------- the table's vocabulary


@dataclass(frozen=True)
class Offer:
    key: str  # the seller's provider key: a simulator magic key
    multiplier: str
    model: str | None = None  # None: the row's model

    def cost(self, list_price: int) -> int:
        """Seller cost = buyer cost with the default fees (SPEC 1)."""
        return math.ceil(list_price * Fraction(self.multiplier))


@dataclass(frozen=True)
class Refused:
    """The submit itself is turned away; nothing is written, nothing held."""

    status: int
    code: str
    best_discount: str | None = None  # named in the message of minimum_discount_not_met


@dataclass(frozen=True)
class Ends:
    """The submit is accepted (202) and the job ends like this."""

    status: str  # succeeded | failed | canceled
    priced_on: int  # the offer whose quote is the estimate (and so the hold)
    ran_on: int | None  # the offer whose provider accepted (and billed) the job, if any
    error: str | None = None


def succeeds(on: int, priced_on: int | None = None) -> Ends:
    return Ends("succeeded", on if priced_on is None else priced_on, on)


def fails(code: str, priced_on: int = 0, accepted_by: int | None = None) -> Ends:
    """Failed: nothing charged; ``accepted_by`` is the offer billed by the provider, if any."""
    return Ends("failed", priced_on, accepted_by, code)


def canceled_after_dispatch(on: int, priced_on: int | None = None) -> Ends:
    """Canceled once the provider has it: the buyer pays the buyer cost (SPEC 1)."""
    return Ends("canceled", on if priced_on is None else priced_on, on)


Outcome = Refused | Ends

HEALTHY, BACKOFF, DEACTIVATED = "healthy", "backoff", "deactivated"


@dataclass(frozen=True)
class Row:
    id: str
    offers: tuple[Offer, ...]
    expect: Outcome
    health: tuple[str, ...]  # per offer, after the row: healthy | backoff | deactivated
    prefix: str = ""
    model: str = ALIAS
    then: Outcome | None = None  # a second submit, once the first job has ended
    deposit: int = DEPOSIT
    ceiling: int | None = None  # the buyer's own max_cost_usdc, sent with each submit

    def list_price(self) -> int:
        return LIST_PRICE[CANONICAL.get(self.model, self.model)]

    def offer_model(self, offer: Offer) -> str:
        return offer.model or CANONICAL.get(self.model, self.model)


NO_HEALTHY = Refused(503, "no_healthy_sellers")
ROWS: list[Row] = [
    # ---- succeeding keys, and the ranking: cheapest buyer cost first, then the older offer
    Row("sim_ok", (Offer("sim_ok", "0.80"),), succeeds(0), (HEALTHY,)),
    Row("sim_flaky", (Offer("sim_flaky", "0.75"),), succeeds(0), (HEALTHY,)),
    Row(
        "cheapest_first_whatever_the_creation_order",
        (Offer("sim_ok", "0.90"), Offer("sim_flaky", "0.70"), Offer("sim_ok", "0.76")),
        succeeds(1),
        (HEALTHY, HEALTHY, HEALTHY),
    ),
    Row(
        "tie_goes_to_the_older_offer_any_sim_key_succeeds",
        (Offer("sim_tie_older", "0.80"), Offer("sim_tie_newer", "0.80")),
        succeeds(0),
        (HEALTHY, HEALTHY),
    ),
    Row(
        "no_offer_for_the_model",
        (Offer("sim_ok", "0.50", model=PIXVERSE),),
        Refused(404, "no_sellers_for_model"),
        (HEALTHY,),
        model=RUNWAY,
    ),
    # ---- refused at queue time, alone: the job fails cleanly, the market is then unavailable
    Row(
        "sim_401_alone",
        (Offer("sim_401", "0.80"),),
        fails("no_sellers_available"),
        (DEACTIVATED,),
        then=NO_HEALTHY,
    ),
    Row(
        "sim_402_alone",
        (Offer("sim_402", "0.80"),),
        fails("no_sellers_available"),
        (BACKOFF,),
        then=NO_HEALTHY,
    ),
    Row(
        "sim_429_alone",
        (Offer("sim_429", "0.80"),),
        fails("no_sellers_available"),
        (BACKOFF,),
        then=NO_HEALTHY,
    ),
    # ---- refused in a mix: fail over to the next cheapest, within the hold
    Row(
        "sim_402_fails_over_to_the_next_cheapest",
        (Offer("sim_402", "0.75"), Offer("sim_ok", "0.80"), Offer("sim_ok", "0.90")),
        succeeds(1, priced_on=0),
        (BACKOFF, HEALTHY, HEALTHY),
    ),
    Row(
        # The next cheapest (0.80: 128000) is above the hold priced on 0.70 (123200): skipped,
        # and so is 0.90; nothing is left within the hold.
        "sim_402_then_every_fallback_above_the_hold",
        (Offer("sim_402", "0.70"), Offer("sim_ok", "0.80"), Offer("sim_ok", "0.90")),
        fails("no_sellers_available"),
        (BACKOFF, HEALTHY, HEALTHY),
    ),
    Row(
        # The same market, with the buyer's own ceiling covering the 0.80 offer.
        "sim_402_fails_over_within_the_buyers_ceiling",
        (Offer("sim_402", "0.70"), Offer("sim_ok", "0.80"), Offer("sim_ok", "0.90")),
        succeeds(1, priced_on=0),
        (BACKOFF, HEALTHY, HEALTHY),
        ceiling=128_000,
    ),
    Row(
        "sim_consent_alone",
        (Offer("sim_consent", "0.80"),),
        fails("no_sellers_available"),
        (BACKOFF,),
        then=NO_HEALTHY,
    ),
    Row(
        # 409 needs_consent is the seller's account refusing: fail over like any refusal.
        "sim_consent_fails_over",
        (Offer("sim_consent", "0.80"), Offer("sim_ok", "0.85")),
        succeeds(1, priced_on=0),
        (BACKOFF, HEALTHY),
    ),
    Row(
        "sim_401_then_sim_429_then_sim_ok",
        (Offer("sim_401", "0.60"), Offer("sim_429", "0.62"), Offer("sim_ok", "0.65")),
        succeeds(2, priced_on=0),
        (DEACTIVATED, BACKOFF, HEALTHY),
        model=RUNWAY,
    ),
    Row(
        "an_offer_in_backoff_is_no_longer_quoted",
        (Offer("sim_429", "0.70"), Offer("sim_ok", "0.75")),
        succeeds(1, priced_on=0),
        (BACKOFF, HEALTHY),
        then=succeeds(1),
    ),
    Row(
        "every_offer_refuses",
        (Offer("sim_401", "0.60"), Offer("sim_402", "0.62")),
        fails("no_sellers_available"),
        (DEACTIVATED, BACKOFF),
        prefix="/min30",
        then=NO_HEALTHY,
    ),
    # ---- the hold: a fallback costing more than max_cost_usdc is skipped
    Row(
        "fallback_at_exactly_the_hold",  # 0.88 * 160000 = 140800 = ceil(128000 * 1.10)
        (Offer("sim_402", "0.80"), Offer("sim_ok", "0.88")),
        succeeds(1, priced_on=0),
        (BACKOFF, HEALTHY),
    ),
    Row(
        "fallback_just_above_the_hold",  # 142400 > 140800: skipped
        (Offer("sim_402", "0.80"), Offer("sim_ok", "0.89")),
        fails("no_sellers_available"),
        (BACKOFF, HEALTHY),
    ),
    Row(
        "sim_429_fallback_far_above_the_hold",  # 144000 > 88000: skipped
        (Offer("sim_429", "0.50"), Offer("sim_ok", "0.90")),
        fails("no_sellers_available"),
        (BACKOFF, HEALTHY),
    ),
    Row(
        "sim_429_fallback_within_the_buyers_ceiling",
        (Offer("sim_429", "0.50"), Offer("sim_ok", "0.90")),
        succeeds(1, priced_on=0),
        (BACKOFF, HEALTHY),
        ceiling=150_000,
    ),
    Row(
        # A balance of exactly the hold is enough; the balance never changes the hold.
        "sim_429_with_a_balance_of_exactly_the_hold",
        (Offer("sim_429", "0.50"), Offer("sim_ok", "0.90")),
        fails("no_sellers_available"),
        (BACKOFF, HEALTHY),
        deposit=88_000,
    ),
    Row(
        "a_balance_below_the_hold_is_turned_away",
        (Offer("sim_ok", "0.50"), Offer("sim_ok", "0.90")),
        Refused(402, "insufficient_balance"),
        (HEALTHY, HEALTHY),
        deposit=87_999,
    ),
    Row(
        "refusals_then_a_fallback_above_the_hold",
        (Offer("sim_429", "0.50"), Offer("sim_ok", "0.90"), Offer("sim_402", "0.52")),
        fails("no_sellers_available"),
        (BACKOFF, HEALTHY, BACKOFF),
    ),
    # ---- unknown whether the provider accepted: fail upstream_unknown, never fail over; the
    # unknown outcome counts against the offer like a refusal (SPEC 3)
    Row(
        "sim_queue_timeout",
        (Offer("sim_queue_timeout", "0.80"),),
        fails("upstream_unknown"),
        (BACKOFF,),
        then=NO_HEALTHY,
    ),
    Row(
        "sim_queue_timeout_does_not_fail_over",
        (Offer("sim_queue_timeout", "0.80"), Offer("sim_ok", "0.85")),
        fails("upstream_unknown"),
        (BACKOFF, HEALTHY),
        # The hanging seller no longer wins: the next job goes to the one that answers.
        then=succeeds(1),
    ),
    Row(
        "sim_queue_timeout_after_a_refusal",
        (Offer("sim_429", "0.70"), Offer("sim_queue_timeout", "0.75"), Offer("sim_ok", "0.76")),
        fails("upstream_unknown"),
        (BACKOFF, BACKOFF, HEALTHY),
    ),
    # ---- failed after acceptance: the provider billed the seller, the buyer pays nothing
    Row(
        "sim_fail_inference",
        (Offer("sim_fail_inference", "0.80"),),
        fails("inference_failed", accepted_by=0),
        (HEALTHY,),
    ),
    Row(
        "sim_fail_inference_after_a_refusal",
        (Offer("sim_402", "0.70"), Offer("sim_fail_inference", "0.75"), Offer("sim_ok", "0.76")),
        fails("inference_failed", accepted_by=1),
        (BACKOFF, HEALTHY, HEALTHY),
    ),
    Row(
        "sim_content_policy",
        (Offer("sim_content_policy", "0.80"),),
        fails("content_policy", accepted_by=0),
        (HEALTHY,),
    ),
    Row(
        "sim_content_policy_does_not_fail_over",
        (Offer("sim_content_policy", "0.70"), Offer("sim_ok", "0.72")),
        fails("content_policy", accepted_by=0),
        (HEALTHY, HEALTHY),
    ),
    # ---- the video at a pre-signed link, and a slow job that reports its progress
    Row("sim_download_url", (Offer("sim_download_url", "0.80"),), succeeds(0), (HEALTHY,)),
    Row(
        "sim_download_url_after_a_refusal",
        (Offer("sim_402", "0.70"), Offer("sim_download_url", "0.75")),
        succeeds(1, priced_on=0),
        (BACKOFF, HEALTHY),
    ),
    Row("sim_slow", (Offer("sim_slow", "0.80"),), succeeds(0), (HEALTHY,)),
    Row(
        "sim_slow_cheapest_of_two",
        (Offer("sim_ok", "0.85"), Offer("sim_slow", "0.80")),
        succeeds(1),
        (HEALTHY, HEALTHY),
    ),
    # ---- never finishes: canceled once dispatched, and charged
    Row(
        "sim_never_canceled",
        (Offer("sim_never", "0.80"),),
        canceled_after_dispatch(0),
        (HEALTHY,),
    ),
    Row(
        "sim_never_after_a_refusal_canceled",
        (Offer("sim_401", "0.74"), Offer("sim_never", "0.80"), Offer("sim_ok", "0.85")),
        canceled_after_dispatch(1, priced_on=0),
        (DEACTIVATED, HEALTHY, HEALTHY),
    ),
    # ---- /min{N}: the estimated discount is (1 - multiplier) * 100, compared with >=
    Row(
        "min25_keeps_only_the_70",
        (Offer("sim_ok", "0.90"), Offer("sim_ok", "0.70"), Offer("sim_ok", "0.80")),
        succeeds(1),
        (HEALTHY, HEALTHY, HEALTHY),
        prefix="/min25",
    ),
    Row(
        "min30_admits_exactly_30",
        (Offer("sim_ok", "0.90"), Offer("sim_ok", "0.70"), Offer("sim_ok", "0.80")),
        succeeds(1),
        (HEALTHY, HEALTHY, HEALTHY),
        prefix="/min30",
    ),
    Row(
        "min35_names_the_best_30",
        (Offer("sim_ok", "0.90"), Offer("sim_ok", "0.70"), Offer("sim_ok", "0.80")),
        Refused(503, "minimum_discount_not_met", "30%"),
        (HEALTHY, HEALTHY, HEALTHY),
        prefix="/min35",
    ),
    Row(
        "min100_names_the_best_95",
        (Offer("sim_ok", "0.05"),),
        Refused(503, "minimum_discount_not_met", "95%"),
        (HEALTHY,),
        prefix="/min100",
    ),
    Row(
        # 0.85 (15%) would be in reach of the hold, but /min20 left it out of the route.
        "min20_leaves_no_fallback",
        (Offer("sim_402", "0.80"), Offer("sim_ok", "0.85")),
        fails("no_sellers_available"),
        (BACKOFF, HEALTHY),
        prefix="/min20",
    ),
    Row(
        "min10_fails_over_to_an_admitted_offer",
        (Offer("sim_429", "0.80"), Offer("sim_ok", "0.85")),
        succeeds(1, priced_on=0),
        (BACKOFF, HEALTHY),
        prefix="/min10",
    ),
    Row(
        "min101_is_not_a_minimum",
        (Offer("sim_ok", "0.80"),),
        Refused(400, "invalid_minimum_discount"),
        (HEALTHY,),
        prefix="/min101",
    ),
]


# --------------------------------------------------------------------------- one engine per backend


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def table_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    data_dir: Path = tmp_path_factory.mktemp(f"routing-table-{request.param}")
    if request.param == "sqlite":
        yield from _serve(data_dir, f"sqlite:///{data_dir}/data")
        return
    problem = postgres_available()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires PostgreSQL: {problem}")
        pytest.skip(problem)
    with postgres_database() as url:
        yield from _serve(data_dir, url)


def _serve(data_dir: Path, database_url: str) -> Iterator[Server]:
    port = free_port()
    server = Server(data_dir, base_env(database_url, port), port, [])
    try:
        yield server.start()
    finally:
        server.kill()


@dataclass
class Market:
    client: Client
    seller_key: str
    buyer_key: str = ""

    def fund_buyer(self, deposit: int) -> None:
        _, self.buyer_key = self.client.create_buyer(deposit_usdc=deposit, name="table-buyer")


@pytest.fixture
def row_market(table_server: Server) -> Iterator[Market]:
    """A seller (and its row's buyer); afterwards no job of theirs runs and no offer stays."""
    c = table_server.client
    _, seller_key = c.create_seller(name="table-seller")
    m = Market(c, seller_key)
    yield m
    if m.buyer_key:
        for job in list_jobs(c, m.buyer_key):
            if job["status"] in PENDING:
                c.delete(f"/v1/video/generations/{job['id']}", key=m.buyer_key)
    for offer in seller_offers(c, seller_key):
        r = c.delete(f"/v1/seller/offers/{offer['id']}", key=seller_key)
        assert r.status == 200, r.body


# --------------------------------------------------------------------------- checks


def seller_offers(c: Client, seller_key: str) -> list[dict[str, Any]]:
    r = c.get("/v1/seller/offers", key=seller_key)
    assert r.status == 200, r.body
    return list(r.json()["data"])


def health_of(offer: dict[str, Any]) -> str:
    """The offer's health as one of the table's words; raises on an inconsistent document."""
    health = offer["health"]
    if health == {"status": "healthy"}:
        assert offer["deactivated_reason"] is None, offer
        return HEALTHY if offer["state"] == "active" else f"healthy but {offer['state']}"
    assert health["status"] == "backoff", offer
    assert health["reason"], offer
    if offer["state"] == "deactivated":
        assert offer["deactivated_reason"], offer
        return DEACTIVATED
    assert offer["state"] == "active" and offer["deactivated_reason"] is None, offer
    return BACKOFF


def check_health(c: Client, seller_key: str, ids: list[str], expected: tuple[str, ...]) -> None:
    def current() -> list[dict[str, Any]]:
        by_id = {o["id"]: o for o in seller_offers(c, seller_key)}
        return [by_id[i] for i in ids]

    # The offer views follow the log; the job's end was written after every offer's health
    # change, so this normally matches at once.
    wait_until(
        lambda: tuple(health_of(o) for o in current()) == expected,
        timeout=10.0,
        what="the offers' health",
    )
    now = time.time()
    for offer, want in zip(current(), expected, strict=True):
        if want != HEALTHY:
            assert offer["health"]["until"] > now, offer
        if want == DEACTIVATED:
            # A bad key switches the offer off until the seller gives a new one.
            assert offer["health"]["status"] == "backoff", offer
            assert "401" in offer["deactivated_reason"], offer


def names_discount(message: str, discount: str) -> bool:
    """``discount`` ("30%") appears as a whole number in the message (not inside "130%")."""
    return re.search(rf"(?<![\d.]){re.escape(discount)}", message) is not None


def run_submit(
    m: Market, row: Row, outcome: Outcome, billed_keys: Counter[str]
) -> dict[str, Any] | None:
    """One submit and the end of its job; returns the job as it ended, or None when refused."""
    c = m.client
    extra = {} if row.ceiling is None else {"max_cost_usdc": str(row.ceiling)}
    r = c.submit(m.buyer_key, prefix=row.prefix, model=row.model, **extra)
    if isinstance(outcome, Refused):
        assert r.status == outcome.status, r.body
        error = r.json()["error"]
        assert error["code"] == outcome.code, error
        assert error["message"], error
        if outcome.best_discount is not None:
            assert names_discount(error["message"], outcome.best_discount), error
        balance = c.get("/v1/buyer/me", key=m.buyer_key).json()["balance"]
        assert balance["held_usdc"] == "0", balance
        return None

    assert r.status == 202, r.body
    job = r.json()
    list_price = row.list_price()
    estimate = row.offers[outcome.priced_on].cost(list_price)
    hold = row.ceiling or math.ceil(Fraction(estimate) * Fraction(110, 100))
    assert (job["estimated_cost_usdc"], job["max_cost_usdc"]) == (str(estimate), str(hold)), job

    if outcome.status == "canceled":
        wait_status(c, job["id"], m.buyer_key, ("submitted", "running"))
        answer = c.delete(f"/v1/video/generations/{job['id']}", key=m.buyer_key)
        assert answer.status == 200, answer.body
        assert answer.json()["status"] == "canceled", answer.body
    done = c.wait_terminal(job["id"], m.buyer_key)

    assert done["status"] == outcome.status, done
    if outcome.error is None:
        assert "error" not in done, done
    else:
        assert done["error"]["code"] == outcome.error, done
        assert done["error"]["message"], done
    if outcome.status in ("succeeded", "canceled"):
        assert outcome.ran_on is not None
        cost = row.offers[outcome.ran_on].cost(list_price)
        assert cost <= hold
        # Which offer ran it: the seller cost is that offer's, as multipliers differ.
        assert done["usage"] == {
            "seller_cost_usdc": str(cost),
            "buyer_cost_usdc": str(cost),
            "settlement_status": "confirmed",
        }, done
    else:
        assert done["usage"] == RELEASED, done
        assert done["results"] == [], done
    if outcome.status == "succeeded":
        [result] = done["results"]
        assert result["bytes"] > 0, result
    if outcome.ran_on is not None:
        billed_keys[row.offers[outcome.ran_on].key] += list_price
    return done


# --------------------------------------------------------------------------- the test


def _param(row: Row) -> Any:
    return pytest.param(row, id=row.id)


def test_table_covers_every_magic_key() -> None:
    keys = {o.key for row in ROWS for o in row.offers}
    magic = {
        "sim_ok",
        "sim_401",
        "sim_402",
        "sim_429",
        "sim_queue_timeout",
        "sim_fail_inference",
        "sim_content_policy",
        "sim_flaky",
        "sim_never",
        "sim_download_url",
        "sim_consent",
        "sim_slow",
    }
    assert magic <= keys
    for key in magic - {"sim_ok"}:
        alone = [r for r in ROWS if [o.key for o in r.offers] == [key]]
        mixed = [r for r in ROWS if key in {o.key for o in r.offers} and len(r.offers) > 1]
        assert alone and mixed, key
    assert len({row.id for row in ROWS}) == len(ROWS)
    assert all(len(row.health) == len(row.offers) for row in ROWS)


@pytest.mark.parametrize("row", [_param(row) for row in ROWS])
def test_routing(row_market: Market, row: Row) -> None:
    m = row_market
    m.fund_buyer(row.deposit)
    c = m.client
    keys = sorted({o.key for o in row.offers})
    before = {key: billed(c, key) for key in keys}
    ids = [
        c.create_offer(m.seller_key, row.offer_model(o), o.key, o.multiplier)["id"]
        for o in row.offers
    ]

    billed_keys: Counter[str] = Counter()
    ended = [run_submit(m, row, row.expect, billed_keys)]
    if row.then is not None:
        ended.append(run_submit(m, row, row.then, billed_keys))

    # The simulator billed exactly the keys whose provider accepted a job: a refused key never,
    # and no offer past a queue timeout or a failure after acceptance.
    after = {key: billed(c, key) for key in keys}
    assert {k: after[k] - before[k] for k in keys} == {k: billed_keys[k] for k in keys}

    check_health(c, m.seller_key, ids, row.health)

    jobs = assert_money_invariants(c, m.buyer_key, row.deposit)
    accepted = [j for j in ended if j is not None]
    assert len(jobs) == len(accepted)
    charged = sum(int(j["usage"]["buyer_cost_usdc"]) for j in accepted)
    spent = c.get("/v1/buyer/me", key=m.buyer_key).json()["balance"]["spent_usdc"]
    assert int(spent) == charged
