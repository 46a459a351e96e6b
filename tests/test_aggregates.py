"""The aggregates' rules: legal transitions only, one resolution per hold, replay equality."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.application import project_aggregate
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.eventstore import open_market
from domain.aggregates import (
    BuyerAccount,
    DepositConflict,
    IllegalTransition,
    InsufficientBalance,
    Job,
    Offer,
    Settlement,
)


def new_job(max_cost: int = 110, expires_at: int = 1000) -> Job:
    return Job(
        id=uuid.uuid4(),
        buyer_id="b",
        request={"model": "m", "prompt": "p"},
        fingerprint="f",
        token_hash="t",
        created=0,
        expires_at=expires_at,
        estimated_cost=100,
        max_cost=max_cost,
        route=[{"offer_id": "o1"}],
        min_discount=None,
    )


def attempt(buyer_cost: int = 100, offer_id: str = "o1") -> dict[str, Any]:
    return {
        "offer_id": offer_id,
        "seller_id": "s",
        "list_price": 125,
        "seller_cost": 90,
        "buyer_cost": buyer_cost,
    }


def test_job_happy_path_and_terminal_is_final() -> None:
    job = new_job()
    job.start_dispatch(attempt())
    job.dispatched("q1")
    assert job.status == "submitted"
    job.progressed(0.5)
    assert job.status == "running"
    with pytest.raises(IllegalTransition):
        job.succeed(now=5)  # no artifact yet
    job.artifact_stored({"index": 0})
    job.succeed(now=5)
    assert job.charge == (100, 90)
    for command in (
        lambda: job.fail("x", "y", False, 6),
        lambda: job.cancel(6),
        lambda: job.expire(2000),
        lambda: job.progressed(0.7),
        lambda: job.start_dispatch(attempt()),
    ):
        with pytest.raises(IllegalTransition):
            command()


def test_dispatch_never_costs_more_than_the_hold() -> None:
    job = new_job(max_cost=110)
    with pytest.raises(IllegalTransition):
        job.start_dispatch(attempt(buyer_cost=111))
    job.start_dispatch(attempt(buyer_cost=110))
    with pytest.raises(IllegalTransition):
        job.start_dispatch(attempt())  # one dispatch in flight at a time


def test_cancel_waits_for_an_in_flight_queue_call_and_bills_after_dispatch() -> None:
    job = new_job()
    job.start_dispatch(attempt())
    with pytest.raises(IllegalTransition):
        job.cancel(now=1)
    job.request_cancel()
    job.dispatched("q1")
    job.cancel(now=2)
    assert job.status == "canceled" and job.charge == (100, 90)

    clean = new_job()
    clean.cancel(now=1)
    assert clean.charge == (0, 0)


def test_expiry_only_when_due_and_free() -> None:
    job = new_job(expires_at=100)
    job.start_dispatch(attempt())
    job.dispatched("q")
    with pytest.raises(IllegalTransition):
        job.expire(now=99)
    job.expire(now=100)
    assert job.status == "expired" and job.charge == (0, 0)


def test_refusal_clears_the_dispatch_for_the_next_offer() -> None:
    job = new_job()
    job.start_dispatch(attempt(offer_id="o1"))
    with pytest.raises(IllegalTransition):
        job.refused("o2", 402, "no")
    job.refused("o1", 402, "no")
    job.start_dispatch(attempt(offer_id="o2"))
    assert job.attempts == [{"offer_id": "o1", "status": 402, "message": "no"}]


def test_settlement_resolves_exactly_once_and_never_above_the_hold() -> None:
    s = Settlement.for_job(uuid.uuid4(), "b", hold=110)
    with pytest.raises(IllegalTransition):
        s.settle(buyer_cost=111, seller_cost=100, seller_id="s", offer_id="o", outcome="x")
    with pytest.raises(IllegalTransition):
        s.settle(buyer_cost=50, seller_cost=60, seller_id="s", offer_id="o", outcome="x")
    s.settle(buyer_cost=100, seller_cost=90, seller_id="s", offer_id="o", outcome="succeeded")
    assert (s.charged, s.released, s.platform_fee) == (100, 10, 10)
    with pytest.raises(IllegalTransition):
        s.settle(buyer_cost=0, seller_cost=0, seller_id=None, offer_id=None, outcome="failed")


@settings(max_examples=200, deadline=None)
@given(
    deposit=st.integers(1, 10**9),
    holds=st.lists(st.tuples(st.integers(0, 10**8), st.integers(0, 100)), max_size=30),
)
def test_buyer_account_never_overdraws(deposit: int, holds: list[tuple[int, int]]) -> None:
    buyer = BuyerAccount(id=uuid.uuid4(), name="b", api_key_hash="h")
    buyer.deposit(deposit, "d")
    for amount, charge_percent in holds:
        job_id = uuid.uuid4()
        try:
            buyer.hold(job_id, amount)
        except InsufficientBalance:
            assert amount > buyer.available
            continue
        assert buyer.available >= 0
        charge = amount * charge_percent // 100
        buyer.resolve_hold(job_id, charge)
        with pytest.raises(IllegalTransition):
            buyer.resolve_hold(job_id, 0)
        assert buyer.deposited == buyer.available + buyer.held + buyer.spent
    assert buyer.held == 0


def test_offer_backoff_doubles_and_resets() -> None:
    offer = Offer(
        id=uuid.uuid4(),
        seller_id="s",
        model="m",
        provider="venice",
        base_url=None,
        sealed_key={"kid": "k", "ct": "c"},
        key_sha256="h",
        cost_multiplier="0.80",
        max_concurrent_jobs=None,
    )
    offer.refused("402", now=1000.0, deactivate=False)
    assert offer.backoff_until == 1030.0
    offer.refused("402", now=1000.0, deactivate=False)
    assert offer.backoff_until == 1060.0
    offer.succeeded()
    assert (offer.failures, offer.backoff_until) == (0, 0.0)


def test_replay_from_the_store_equals_the_live_aggregates(tmp_path: Path) -> None:
    app = open_market(f"sqlite:///{tmp_path}")
    buyer = BuyerAccount(id=uuid.uuid4(), name="b", api_key_hash="h")
    buyer.deposit(1_000, "d")
    job = new_job()
    buyer.hold(job.id, job.max_cost)
    settlement = Settlement.for_job(job.id, str(buyer.id), job.max_cost)
    app.save(job, settlement, buyer)
    for _ in range(250):  # past the snapshot interval
        buyer.deposit(1, "x")
    app.save(buyer)
    job.start_dispatch(attempt())
    job.dispatched("q")
    job.artifact_stored({"index": 0})
    job.succeed(now=3)
    settlement.settle(
        buyer_cost=100, seller_cost=90, seller_id="s", offer_id="o1", outcome="succeeded"
    )
    buyer.resolve_hold(job.id, 100)
    app.save(job, settlement, buyer)
    for live in (job, settlement, buyer):
        stored = app.repository.get(live.id)
        assert vars(stored) == vars(live)
    app.close()


# --------------------------------------------------------------------------- offer capacity


def new_offer(max_concurrent_jobs: int | None = 2) -> Offer:
    return Offer(
        id=uuid.uuid4(),
        seller_id="s",
        model="m",
        provider="venice",
        base_url=None,
        sealed_key={"ct": "x"},
        key_sha256="h",
        cost_multiplier="0.80",
        max_concurrent_jobs=max_concurrent_jobs,
    )


def test_offer_slots_never_exceed_capacity_and_are_given_back_once() -> None:
    offer = new_offer(2)
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    assert offer.take_slot(a, now=0) is None
    assert offer.take_slot(a, now=0) is None  # idempotent: a retried save takes no second slot
    assert offer.take_slot(b, now=0) is None
    assert offer.take_slot(c, now=0) == "at_capacity"
    assert offer.in_flight == {str(a), str(b)}
    offer.release_slot(a)
    offer.release_slot(a)
    assert offer.take_slot(c, now=0) is None
    events = offer.collect_events()
    assert [type(e).__name__ for e in events].count("SlotTaken") == 3
    assert [type(e).__name__ for e in events].count("SlotReleased") == 1


def test_offer_unavailable_reasons() -> None:
    offer = new_offer(None)
    for _ in range(50):
        assert offer.take_slot(uuid.uuid4(), now=0) is None  # no limit
    offer.refused("429", now=100.0, deactivate=False)
    assert offer.unavailable_because(100.0) == "backoff"
    assert offer.unavailable_because(100.0 + 30) is None  # 30 s, then it may be tried again
    offer.refused("429", now=200.0, deactivate=False)
    assert offer.backoff_until == 260.0  # doubled
    offer.succeeded()
    assert offer.unavailable_because(200.0) is None
    offer.update({"paused": True})
    assert offer.take_slot(uuid.uuid4(), now=0) == "paused"
    offer.update({"paused": False})
    offer.refused("401", now=0.0, deactivate=True)
    assert offer.unavailable_because(10_000.0) == "deactivated"
    offer.delete()
    assert offer.unavailable_because(0.0) == "deleted"


def test_job_holds_its_offer_slot_from_dispatch_to_the_end() -> None:
    job = new_job()
    job.start_dispatch(attempt(offer_id="o1"))
    assert job.slot_offer_id == "o1"
    job.refused("o1", 429, "busy")
    assert job.slot_offer_id is None
    job.start_dispatch(attempt(offer_id="o2"))
    job.dispatched("q")
    job.fail("inference_failed", "x", True, now=1)
    assert job.slot_offer_id == "o2"  # released by the command that saves the outcome
    own = new_job()
    own.start_dispatch({**attempt(offer_id="k"), "seller_id": None})
    assert own.slot_offer_id is None  # a buyer's own key has no seller capacity


def test_a_held_lease_is_not_rewritten_until_half_spent() -> None:
    job = new_job()
    assert job.claim("w", now=0.0, lease_seconds=60)
    job.collect_events()
    assert job.claim("w", now=10.0, lease_seconds=60)
    assert job.collect_events() == []
    assert job.claim("w", now=31.0, lease_seconds=60)
    assert len(job.collect_events()) == 1
    assert not job.claim("other", now=40.0, lease_seconds=60)


def test_a_deposit_id_is_credited_once() -> None:
    account = BuyerAccount(id=uuid.uuid4(), name="b", api_key_hash="h")
    assert account.deposit(500, "d1")
    assert not account.deposit(500, "d1")
    with pytest.raises(DepositConflict):
        account.deposit(501, "d1")
    assert account.deposit(500, "d2")
    assert account.deposited == 1000
    # An account restored from a snapshot taken before deposit ids were kept still works.
    del account.deposit_ids
    assert account.deposit(1, "d3") and account.deposited == 1001


def test_a_buyer_snapshot_taken_at_save_is_the_state_the_log_rebuilds(tmp_path: Path) -> None:
    """MarketApp snapshots the aggregate it just saved instead of rebuilding it from the log:
    the two must be the same state."""
    market = open_market(f"sqlite:///{tmp_path}/data")
    buyer = BuyerAccount(id=uuid.uuid4(), name="b", api_key_hash="h")
    buyer.deposit(10_000, "d")
    market.save(buyer)
    jobs = [uuid.uuid4() for _ in range(100)]
    for n, job in enumerate(jobs):  # created, deposited, 100 holds, 98 resolved: version 200
        buyer.hold(job, 7)
        market.save(buyer)
        if n < 98:
            buyer.resolve_hold(job, n % 8)
            market.save(buyer)
    assert buyer.version == 200
    assert_snapshot_at_200(market, buyer.id)
    market.close()


def test_a_save_that_passes_the_interval_snapshots_its_newest_state_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch saves several holds of one buyer at once: when they pass a multiple of the
    snapshotting interval, the snapshot is of the account after the save, taken from memory
    (the log is not read back inside the save), and restores what the log gives."""
    market = open_market(f"sqlite:///{tmp_path}/data")
    buyer = BuyerAccount(id=uuid.uuid4(), name="b", api_key_hash="h")
    for n in range(196):  # versions 2 to 197
        buyer.deposit(1, f"d{n}")
    market.save(buyer)
    assert market.snapshots is not None and not list(market.snapshots.get(buyer.id))

    def rebuilt_from_the_log(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the snapshot was rebuilt from the log")

    monkeypatch.setattr(market, "take_snapshot", rebuilt_from_the_log)
    for _ in range(5):  # 198 to 202: past 200
        buyer.hold(uuid.uuid4(), 1)
    market.save(buyer)
    (snapshot,) = market.snapshots.get(buyer.id)
    assert snapshot.originator_version == 202
    rebuilt = project_aggregate(None, market.repository.event_store.get(buyer.id))
    assert vars(snapshot.mutate(None)) == vars(rebuilt)
    for _ in range(3):  # 203 to 205: no multiple passed, no snapshot
        buyer.hold(uuid.uuid4(), 1)
    market.save(buyer)
    assert len(list(market.snapshots.get(buyer.id))) == 1
    market.close()


def assert_snapshot_at_200(market: Any, aggregate_id: uuid.UUID) -> Any:
    """The aggregate's last snapshot is at version 200 and restores exactly the state its
    first 200 events give: what it restores."""
    assert market.snapshots is not None
    (snapshot,) = market.snapshots.get(aggregate_id, desc=True, limit=1)
    assert snapshot.originator_version == 200
    rebuilt = project_aggregate(None, market.repository.event_store.get(aggregate_id, lte=200))
    restored = snapshot.mutate(None)
    assert vars(restored) == vars(rebuilt)
    return restored


def test_a_buyer_with_a_snapshot_loads_in_a_process_that_never_took_one(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/data"
    market = open_market(url)
    buyer = BuyerAccount(id=uuid.uuid4(), name="b", api_key_hash="h")
    for n in range(210):  # past the snapshotting interval
        buyer.deposit(1, f"d{n}")
        market.save(buyer)
    market.close()
    script = (
        "import sys, uuid; from adapters.eventstore import open_market; "
        "m = open_market(sys.argv[1]); print(m.repository.get(uuid.UUID(sys.argv[2])).deposited)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, url, str(buyer.id)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "210"


def test_an_offer_loads_from_its_snapshot_with_its_slots(tmp_path: Path) -> None:
    """An offer takes and gives back a slot per dispatch, so its history grows with the log: it
    is snapshotted as a buyer is, its slots (a set) kept across the snapshot's JSON."""
    url = f"sqlite:///{tmp_path}/data"
    market = open_market(url)
    offer = new_offer(max_concurrent_jobs=None)
    market.save(offer)
    held = [uuid.uuid4() for _ in range(3)]
    for job in held:
        offer.take_slot(job, now=0.0)
    market.save(offer)
    while offer.version < 205:  # past the snapshotting interval
        job = uuid.uuid4()
        offer.take_slot(job, now=0.0)
        market.save(offer)
        offer.release_slot(job)
        market.save(offer)
    restored = assert_snapshot_at_200(market, offer.id)
    assert restored.in_flight == {str(j) for j in held}
    market.close()

    fresh = open_market(url)  # no cached aggregate: the snapshot and the events after it
    loaded = fresh.repository.get(offer.id)
    assert vars(loaded) == vars(offer)
    loaded.release_slot(held[0])
    fresh.save(loaded)
    assert fresh.repository.get(offer.id).in_flight == {str(j) for j in held[1:]}
    fresh.close()
