"""A rebuild folded by two processes equals the live views and a one-process rebuild."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adapters.eventstore import MarketApp, open_market, store_env
from bench.replay import LogGenerator
from domain.aggregates import Job, Offer
from projections.runner import ProjectionRunner
from projections.views import (
    ALL,
    GROUP_TABLES,
    PROJECTIONS,
    REBUILD_PARTS,
    TABLES,
    VIEWS_NAME,
    Views,
    open_views,
    part_tables,
    scratch_views,
    skips,
)
from services.replay import LogSource, verify


def test_the_groups_and_the_rebuild_parts_cover_every_table_once() -> None:
    assert sorted(t for tables in GROUP_TABLES.values() for t in tables) == sorted(TABLES)
    here, there = REBUILD_PARTS
    assert here | there == ALL and not here & there
    assert sorted(part_tables(here) + part_tables(there)) == sorted(TABLES)
    # A read model that reads another's fold is always folded with it.
    for part in REBUILD_PARTS:
        for p in PROJECTIONS:
            if p.name in part:
                assert set(p.requires) <= part, p.name


def test_the_read_models_skip_exactly_the_events_none_of_them_reads() -> None:
    job: Any = Job
    skip_all = skips(ALL)
    for cls in (job.Claimed, job.Skipped, job.CancelRequested, job.UpstreamDeleted):
        assert skip_all(cls.TOPIC)
    for cls in (job.Created, job.Dispatched, job.Succeeded):
        assert not skip_all(cls.TOPIC)
    # The ledger's part reads no offer event; the other part reads every one.
    here, there = REBUILD_PARTS
    assert skips(there)(offer_slot_taken()) and not skips(here)(offer_slot_taken())
    assert not skips(there)("no.such:Topic")  # the decoder reports it as the library would


def offer_slot_taken() -> str:
    offer: Any = Offer
    return str(offer.SlotTaken.TOPIC)


@contextmanager
def generated_market(
    database_url: str, jobs: int, seed: int
) -> Iterator[tuple[MarketApp, dict[str, str], Views]]:
    """A generated market log of ``jobs`` jobs, its views' environment and its live views,
    caught up with the log; closed afterwards."""
    app = open_market(database_url)
    env = store_env(database_url, role=VIEWS_NAME)
    live = open_views(env)
    try:
        LogGenerator(app, jobs=jobs, rate=10.0, seed=seed).generate()
        live.ensure_schema(app.name)
        ProjectionRunner(app, live, batch_size=300).catch_up()
        yield app, env, live
    finally:
        live.datastore.close()
        app.close()


def test_a_two_process_rebuild_equals_the_live_views(database_url: str) -> None:
    with generated_market(database_url, jobs=150, seed=3) as (app, env, live):
        digests = []
        for parallel in (True, False):
            with scratch_views(env, app.name) as fresh:
                seen: list[tuple[int, int]] = []
                result = verify(
                    app,
                    live,
                    fresh,
                    LogSource(database_url, env),
                    parallel=parallel,
                    on_progress=lambda done, total, seen=seen: seen.append((done, total)),
                )
                assert result.ok, result.render()
                assert result.events == app.recorder.max_notification_id()
                digests.append(fresh.digest())
            # Progress only goes forward, to the whole log (in two processes: both parts).
            assert seen[0] == (0, result.events) and seen[-1] == (result.events, result.events)
            assert [done for done, _ in seen] == sorted(done for done, _ in seen), seen
        assert digests[0] == digests[1] == live.digest()
        # Both parts' tables are filled (the log has no buyer keys or deposits' principals).
        for table in ("mm_job_views", "mm_offers", "mm_trades", "mm_ledger_postings"):
            assert digests[0][table][0] > 0, table


def test_a_sqlite_two_process_rebuild_copies_the_other_part_with_its_indexes(
    tmp_path: Path,
) -> None:
    """Scratch SQLite views journal in memory, not in a write-ahead log (each page a batch
    changed was written twice); the ledger part's indexes, built in its own process, come
    across with its rows: the result passes SQLite's own integrity check (every index entry
    matches its row) and has the live views' indexes."""
    database_url = f"sqlite:///{tmp_path}/data"
    with (
        generated_market(database_url, jobs=60, seed=5) as (app, env, live),
        scratch_views(env, app.name) as fresh,
    ):
        assert fresh.one("PRAGMA journal_mode")[0] == "memory"
        result = verify(app, live, fresh, LogSource(database_url, env), parallel=True)
        assert result.ok, result.render()
        assert not Path(fresh.tracking.sqlite_file + "-wal").exists()
        assert [tuple(r) for r in fresh.all("PRAGMA integrity_check")] == [("ok",)]
        indexes = "SELECT name, sql FROM sqlite_master WHERE type = 'index' ORDER BY name"
        assert [tuple(r) for r in fresh.all(indexes)] == [tuple(r) for r in live.all(indexes)]


def test_a_rebuild_reads_the_sqlite_log_memory_mapped(tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path}/data"
    app = open_market(database_url)
    env = store_env(database_url, role=VIEWS_NAME)
    try:
        LogGenerator(app, jobs=5, rate=10.0, seed=7).generate()
        with scratch_views(env, app.name) as fresh:
            ProjectionRunner(app, fresh, headers=True).catch_up()
            assert fresh.digest()["mm_job_views"][0] == 5
        with app.recorder.datastore.transaction(commit=False) as c:
            c.execute("PRAGMA mmap_size")
            assert c.fetchone()[0] > 0
    finally:
        app.close()
