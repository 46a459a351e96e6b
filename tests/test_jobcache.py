"""The cache of finished jobs' views a poll is answered from (api/jobcache.py): what it keeps,
what spoils a read, and that every change reaches it, whether this process's projection runner
applied it or another process's did (on SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from uuid import UUID, uuid4

from adapters.crypto import Secrets
from adapters.eventstore import open_market, store_env
from api.jobcache import JobCache
from domain.aggregates import settlement_id
from projections.jobviews import JobRow, changed_jobs
from projections.runner import ProjectionRunner
from projections.views import VIEWS_NAME, open_views
from services.commands import Commands
from tests.harness import Server
from tests.test_lifecycle import SEEDANCE, market, poll, submit_ok, wait_until
from tests.test_projection import fill_log

ServerFactory = Callable[..., Server]


def row(job_id: str, status: str = "canceled", version: int = 5) -> JobRow:
    return JobRow(job_id, "buyer", status, "hash", {"id": job_id, "status": status}, version)


def test_keeps_finished_jobs_only_and_never_a_spoiled_or_older_read() -> None:
    cache = JobCache(max_entries=2)
    for job_id, status in (("queued", "queued"), ("running", "running"), ("done", "succeeded")):
        cache.begin(job_id)
        cache.end(job_id, row(job_id, status))
    assert cache.get("queued") is None and cache.get("running") is None
    assert cache.get("done") == row("done", "succeeded")

    # A change forgotten while a read is in flight spoils that read, and every read of the
    # same job in flight with it.
    cache.begin("a")
    cache.begin("a")
    cache.forget(["a"])
    cache.end("a", row("a"))
    cache.begin("a")  # started after the change, but while a spoiled read is in flight
    cache.end("a", row("a"))
    cache.end("a", row("a"))
    assert cache.get("a") is None
    cache.begin("a")
    cache.end("a", row("a"))
    assert cache.get("a") == row("a")
    cache.forget_all()
    assert len(cache) == 0

    # An older read ending after a newer one is not kept over it.
    cache.begin("b")
    cache.begin("b")
    cache.end("b", row("b", version=9))
    cache.end("b", row("b", version=7))
    assert cache.get("b") == row("b", version=9)

    # Bounded: the oldest stored goes first.
    for job_id in ("c", "d"):
        cache.begin(job_id)
        cache.end(job_id, row(job_id))
    assert len(cache) == 2 and cache.get("b") is None and cache.get("d") is not None
    cache.forget_all()
    assert len(cache) == 0


def test_a_settlement_change_forgets_its_job() -> None:
    """Another process's changes come as aggregate ids (``forget_changed``): a job's own id
    or its settlement's forgets it, anything else does not, and the settlement ids it keeps
    go with the jobs they key."""
    cache = JobCache(max_entries=2)
    a, b, c = (str(uuid4()) for _ in range(3))
    for job_id in (a, b):
        cache.begin(job_id)
        cache.end(job_id, row(job_id))
    cache.forget_changed({str(uuid4()), str(settlement_id(UUID(a)))})
    assert cache.get(a) is None and cache.get(b) is not None
    cache.forget_changed({b})
    assert cache.get(b) is None
    # A read in flight is spoiled by its settlement's change too.
    cache.begin(c)
    cache.forget_changed({str(settlement_id(UUID(c)))})
    cache.end(c, row(c))
    assert cache.get(c) is None
    cache.begin(a)
    cache.end(a, row(a))
    cache.forget_changed(None)
    assert len(cache) == 0
    # Nothing kept, nothing read: no settlement id is left behind.
    assert not cache._settlement_of and not cache._job_of_settlement
    # An id that is no UUID is no job's: a poll of one is read, and kept from nobody.
    cache.begin("not-a-uuid")
    cache.end("not-a-uuid", None)


def test_the_runner_passes_every_change_whoever_applied_it(database_url: str) -> None:
    market_app = open_market(database_url)
    commands = Commands(market_app, Secrets("z" * 32))
    views = [open_views(store_env(database_url, role=VIEWS_NAME)) for _ in range(2)]
    here, elsewhere = (ProjectionRunner(market_app, v, batch_size=7) for v in views)
    applied: list[tuple[set[str], int]] = []  # jobs, with the position when told
    changed: list[tuple[set[str], int]] = []  # aggregates, likewise

    def seen(items: Sequence[tuple[int, Any]]) -> None:
        # Told before the position moves: a poll that sees the position sees no stale entry.
        applied.append((changed_jobs(items), here.position))

    def seen_elsewhere(ids: set[str] | None) -> None:
        assert ids is not None
        changed.append((ids, here.position))

    here.on_passed.append(seen)
    here.on_passed_elsewhere.append(seen_elsewhere)
    try:
        fill_log(commands, 6)  # six jobs, two of them canceled
        start = here.position
        elsewhere.catch_up()  # another process's runner applies all of it
        here.run_once()
        jobs = {r["job_id"] for r in views[0]._all("SELECT job_id FROM mm_job_views", ())}
        assert len(jobs) == 6 and not applied
        ids = set().union(*(ids for ids, _ in changed))
        assert jobs | {str(settlement_id(UUID(j))) for j in jobs} <= ids
        assert all(position == start for _, position in changed)
        assert here.position == elsewhere.position

        # A job canceled now, applied by this runner: passed with its events, its
        # settlement's resolution keyed by the job.
        changed.clear()
        queued = sorted(j for j in jobs if views[0].get_job(j).status == "queued")  # type: ignore[union-attr]
        commands.cancel(UUID(queued[0]))
        while here.run_once():
            pass
        assert set().union(*(ids for ids, _ in applied)) == {queued[0]} and not changed
        assert views[0].get_job(queued[0]).status == "canceled"  # type: ignore[union-attr]

        # And the cache hooked to it forgets the job, wherever the change was applied.
        cache = JobCache()
        here.on_passed.append(cache.passed)
        here.on_passed_elsewhere.append(cache.forget_changed)
        for job_id in queued[:2]:
            cache.begin(job_id)
            cache.end(job_id, views[0].get_job(job_id))
        assert cache.get(queued[0]) is not None and cache.get(queued[1]) is None  # queued
        commands.cancel(UUID(queued[1]))
        elsewhere.catch_up()
        here.run_once()
        assert cache.get(queued[0]) is not None  # another job's change
        assert queued[1] in set().union(*(ids for ids, _ in changed))
    finally:
        for v in views:
            v.datastore.close()
        market_app.close()


def test_a_finished_job_changed_through_another_process_is_polled_changed(
    make_server: ServerFactory,
) -> None:
    """A polls a finished job (kept in its cache); B's worker purges the job's artifact; once
    B answers the purge, A does too, as soon as its runner has looked at the views."""
    a = make_server("--no-worker")
    b = make_server(MEDIA_ARTIFACT_TTL_SECONDS="1")
    _, buyer_key, seller_key = market(a.client)
    a.client.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    job = submit_ok(a.client, buyer_key)
    done = a.client.wait_terminal(job["id"], buyer_key)
    assert done["status"] == "succeeded", done
    again = poll(a.client, job["id"], buyer_key)
    assert again["results"][0]["url"] is not None and again["usage"] == done["usage"]

    def purged(server: Server) -> Callable[[], bool]:
        return lambda: poll(server.client, job["id"], buyer_key)["results"][0]["url"] is None

    wait_until(purged(b), timeout=15.0, what="the purge, through B")
    # The runner looks every 50 ms; seconds here only keep a loaded machine from failing it.
    wait_until(purged(a), timeout=3.0, what="the purge, through A", interval=0.02)
    after = poll(a.client, job["id"], buyer_key)
    assert after["status"] == "succeeded" and after["usage"] == done["usage"]
