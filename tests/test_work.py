"""The work queue (projections/work.py): what the log puts in it, how workers claim it, and what
a claim guarantees, on SQLite and PostgreSQL.

SPEC 8: each job is worked by one worker at a time, a dead worker's jobs are taken over within
15 s, and expiry, retention and webhook retries run exactly once across processes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from adapters.eventstore import store_env
from domain.webhooks import WebhookDelivery
from projections.work import EXPIRE, JOB, PURGE, WEBHOOK, WorkStore, open_work
from services.worker import WORK_LEASE_SECONDS
from tests.fakes import (
    TTL_SECONDS,
    Gate,
    InProcessEngine,
    WorkerAsyncio,
    in_process_engine,
    skip_worker_waits,
)

# A dead worker's jobs must be taken over within this (SPEC 8).
TAKEOVER_SECONDS = 15.0


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> WorkerAsyncio:
    return skip_worker_waits(monkeypatch)


@pytest.fixture
async def engine(
    tmp_path: Path, database_url: str, waits: WorkerAsyncio
) -> AsyncIterator[InProcessEngine]:
    async with in_process_engine(tmp_path, database_url=database_url) as e:
        yield e


def rows(engine: InProcessEngine, kind: str) -> dict[str, Any]:
    engine.project()
    found = engine.raw_work.all(
        "SELECT subject, due_at, owner FROM mm_work WHERE kind = ?", (kind,)
    )
    return {r["subject"]: (float(r["due_at"]), r["owner"]) for r in found}


# --------------------------------------------------------------------------- fed from the log


async def test_the_log_puts_each_job_and_its_expiry_in_and_takes_them_out(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    job_id = await engine.submit(buyer)
    job = engine.job(job_id)

    assert rows(engine, JOB) == {str(job_id): (float(job.created), None)}
    assert rows(engine, EXPIRE) == {str(job_id): (float(job.expires_at), None)}

    await engine.drive(job_id)

    assert engine.job(job_id).status == "succeeded"
    assert rows(engine, JOB) == {} and rows(engine, EXPIRE) == {}
    # Retention is due from when the video was stored (the claimer adds its TTL).
    stored_at = engine.job(job_id).artifacts[0]["stored_at"]
    assert rows(engine, PURGE) == {str(job_id): (float(stored_at), None)}
    engine.commands.update_job(job_id, lambda j: j.purge_artifacts(stored_at + 1))
    assert rows(engine, PURGE) == {}


async def test_a_cancel_takes_the_jobs_work_out(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    waiting = await engine.submit(buyer, prompt="never dispatched")
    engine.commands.cancel(waiting)
    assert str(waiting) not in rows(engine, JOB) and str(waiting) not in rows(engine, EXPIRE)

    hang = Gate()
    engine.provider.script("retrieve", "key-a", hang)
    job_id = await engine.submit(buyer)
    driving = asyncio.create_task(engine.drive(job_id))
    await hang.entered.wait()
    driving.cancel()
    await asyncio.gather(driving, return_exceptions=True)
    engine.commands.cancel(job_id)  # dispatched: billed, ended, nothing left to drive

    assert engine.job(job_id).status == "canceled"
    assert rows(engine, JOB) == {} and rows(engine, EXPIRE) == {}


async def test_webhook_tries_are_due_when_the_log_says(engine: InProcessEngine) -> None:
    job_id = UUID(int=7)
    delivery = WebhookDelivery.for_job(job_id, "buyer", "https://example.com/hook", 1000.0)
    engine.market.save(delivery)
    subject = str(delivery.id)
    assert rows(engine, WEBHOOK) == {subject: (1000.0, None)}

    claimed = engine.raw_work.claim(WEBHOOK, "w1", 1000.0, WORK_LEASE_SECONDS, 10, 1000.0)
    assert claimed == [subject]
    delivery.claim("w1", now=1000.0, lease_seconds=30)
    delivery.attempted(
        at=1001.0, status_code=500, latency_ms=3, error="HTTP 500", schedule=(5.0, 60.0), jitter=0
    )
    engine.market.save(delivery)
    # The next try's time replaces the old; the holder keeps its row until it hands it back.
    due, owner = rows(engine, WEBHOOK)[subject]
    assert due == delivery.due_at and due > 1001.0 and owner == "w1"

    delivery.claim("w1", now=due, lease_seconds=30)
    delivery.attempted(at=due, status_code=204, latency_ms=3, error=None, schedule=(5.0,), jitter=0)
    engine.market.save(delivery)
    assert rows(engine, WEBHOOK) == {}


# --------------------------------------------------------------------------- claiming


def fill(work: WorkStore, n: int) -> None:
    work.write(
        "INSERT INTO mm_work (kind, subject, due_at) VALUES "
        + ", ".join(["(?, ?, ?)"] * n)
        + " RETURNING subject",
        [v for i in range(n) for v in (JOB, f"job-{i:04d}", float(i))],
    )


def test_concurrent_claimers_never_take_the_same_row(database_url: str) -> None:
    env = store_env(database_url, role="work")
    stores = [open_work(env) for _ in range(4)]
    try:
        stores[0].ensure_schema("market")
        fill(stores[0], 400)
        taken: list[list[str]] = [[] for _ in stores]
        # Rounds in step: each claimer tries once per round, all at once. Claiming as fast as
        # each could, one thread could take all 400 rows on SQLite while the others slept in
        # its busy handler (the file's one write lock is not first come, first served), and
        # the check below failed on a busy machine.
        rounds = 400 // (7 * len(stores)) + 2
        step = threading.Barrier(len(stores))

        def claimer(i: int) -> None:
            for _ in range(rounds):
                step.wait(30)
                taken[i].extend(stores[i].claim(JOB, f"w{i}", 10_000.0, 10.0, 7, 10_000.0))

        threads = [threading.Thread(target=claimer, args=(i,)) for i in range(len(stores))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        everything = [s for batch in taken for s in batch]
        assert len(everything) == len(set(everything)) == 400
        # Nobody was starved out by the others' locks (SKIP LOCKED, not waiting in line).
        assert sum(1 for batch in taken if batch) >= 2
    finally:
        for store in stores:
            store.datastore.close()


def test_leases_heartbeats_and_takeover(database_url: str) -> None:
    env = store_env(database_url, role="work")
    work = open_work(env)
    try:
        work.ensure_schema("market")
        fill(work, 3)
        now = 100.0
        mine = work.claim(JOB, "alive", now, 10.0, 2, now)
        assert mine == ["job-0000", "job-0001"]  # oldest due first
        # Held rows are nobody else's while the lease lives...
        assert work.claim(JOB, "other", now + 5, 10.0, 10, now + 5) == ["job-0002"]
        # ...and a heartbeat keeps them: the holder learns what it still holds.
        assert work.heartbeat("alive", now + 9, 10.0) == {(JOB, "job-0000"), (JOB, "job-0001")}
        assert work.claim(JOB, "third", now + 15, 10.0, 10, now + 15) == []
        # "other" died after its claim: its row comes free once the lease runs out.
        assert work.claim(JOB, "third", now + 15.5, 10.0, 10, now + 15.5) == ["job-0002"]
        assert work.heartbeat("other", now + 16, 10.0) == set()
        # A row handed back is due when its holder says; a done row is gone.
        work.release(JOB, "job-0000", "alive", now + 60)
        work.done(JOB, "job-0001", "alive")
        assert work.claim(JOB, "third", now + 20, 10.0, 10, now + 20) == []
        work.hurry(JOB, now + 20, 60.0)
        assert work.claim(JOB, "third", now + 20, 10.0, 10, now + 20) == ["job-0000"]
        # Only the holder may hand a row back or finish it.
        work.done(JOB, "job-0000", "alive")
        assert work.counts(now + 20)[JOB] == (0, 2)
        # A restarted worker under the same id frees what its last life held.
        work.release_all("third")
        assert work.counts(now + 20)[JOB] == (2, 0)
    finally:
        work.datastore.close()


# --------------------------------------------------------------------------- workers


async def test_a_dead_workers_job_is_taken_over_within_15_seconds(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    hang = Gate()
    engine.provider.script("retrieve", "key-a", hang)
    job_id = await engine.submit(buyer)
    dead = engine.worker("dead", poll_interval=0.01)
    async with engine.running(dead):
        await hang.entered.wait()
        # It dies mid-job, holding the job's row and the log's lease: no hand-back.
        dead.stop = _vanish  # type: ignore[method-assign]
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task() and "drive" in repr(task.get_coro()):
                task.cancel()
    held = rows(engine, JOB)[str(job_id)]
    assert held[1] == "dead"

    heir = engine.worker("heir", poll_interval=0.01)
    engine.clock.advance(TAKEOVER_SECONDS - 0.5)
    async with engine.running(heir):
        await engine.until(lambda: engine.job(job_id).is_terminal)

    job = engine.job(job_id)
    assert job.status == "succeeded" and job.lease["worker_id"] == "heir"
    assert engine.provider.billed("key-a") == 1  # polled by the heir, never queued again
    assert rows(engine, JOB) == {}
    engine.assert_money_invariants(buyer)


async def _vanish() -> None:
    """A worker that dies hands nothing back."""


async def test_an_expiry_runs_once_with_many_workers_and_none_driving(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    engine.offer("key-a", max_concurrent_jobs=1)
    hang = Gate()
    engine.provider.script("retrieve", "key-a", hang)
    first = await engine.submit(buyer, prompt="holds the only slot")
    waiting = await engine.submit(buyer, prompt="waits for it")
    drivers = [engine.worker(f"w{i}", poll_interval=0.01) for i in range(3)]

    async with engine.running(drivers[0]), engine.running(drivers[1]), engine.running(drivers[2]):
        await hang.entered.wait()
        engine.clock.advance(TTL_SECONDS + 1)
        for w in drivers:
            w.wake()
        await engine.until(lambda: engine.job(waiting).is_terminal)
        await engine.until(lambda: engine.job(first).is_terminal)
        hang.release()

    assert engine.job(waiting).status == "expired"
    assert engine.job(first).status == "expired"
    expired = [name for save in engine.saves for _, name in save.events if name == "Job.Expired"]
    assert expired
    assert len(expired) == 2
    assert rows(engine, EXPIRE) == {} and rows(engine, JOB) == {}
    engine.assert_money_invariants(buyer)


async def test_a_worker_that_stalled_past_its_lease_stops_driving_the_job(
    engine: InProcessEngine,
) -> None:
    """The other side of a takeover: the stalled worker comes back, learns from its heartbeat
    that the job is another's, and stops at its next step; the job runs once."""
    buyer = engine.buyer()
    engine.offer("key-a")
    hang = Gate()
    engine.provider.script("retrieve", "key-a", hang)
    job_id = await engine.submit(buyer)
    stalled = engine.worker("stalled", poll_interval=0.01)
    engine.project()
    [claimed] = engine.work.claim(
        JOB, "stalled", engine.clock(), WORK_LEASE_SECONDS, 10, engine.clock()
    )
    stalled._holding[claimed] = time.monotonic()
    driving = asyncio.create_task(stalled.drive(job_id, claimed=True))
    await hang.entered.wait()

    engine.clock.advance(TAKEOVER_SECONDS)  # no heartbeat all that time
    heir = engine.worker("heir", poll_interval=0.01)
    async with engine.running(heir):
        await engine.until(lambda: engine.job(job_id).is_terminal)
    await stalled._heartbeat()
    assert claimed in stalled._lost

    hang.release()
    assert await asyncio.wait_for(driving, 10) == "lost"
    assert engine.job(job_id).status == "succeeded"
    assert engine.provider.billed("key-a") == 1
    engine.assert_money_invariants(buyer)
