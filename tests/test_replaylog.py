"""The bench's log generator writes what the library would: the fast paths (rows encoded
without the mapper's method, written with ``executemany``, shards interleaved as they are
generated) give stored events and snapshots byte for byte equal to the library's own mapper,
recorder and snapshot store, and to interleaving the finished shards' logs, for one seed.

Generating is made repeatable for the comparison: ids, keys, nonces and the library's event
timestamps come from a seeded generator, the simulation starts at a fixed time."""

from __future__ import annotations

import base64
import itertools
import os
import random
import secrets
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import eventsourcing.domain
import pytest

import bench.project
import bench.replaylog
from adapters.eventstore import MarketApp, open_market
from bench.databases import sqlite_url
from bench.replaylog import LibrarySink, LogGenerator, Row, RowEncoder, SQLiteSink
from bench.replaystore import MARKET_FILE, LogWriter, _generate_shards
from domain.aggregates import BuyerAccount, Offer

JOBS = 240
# Small flushes, chunks and intervals: many of each in a small log.
FLUSH_EVENTS = 150
CHUNK = 97
INTERVALS = {BuyerAccount: 5, Offer: 20}

Dump = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]


@contextmanager
def repeatable(seed: int) -> Iterator[None]:
    """Seeded ids, keys, nonces and timestamps for this thread; any other thread (another
    test's leftover pool or runner) gets the real ones and leaves the sequence alone."""
    rng = random.Random(seed)
    ticks = itertools.count()
    start = datetime(2026, 1, 1, tzinfo=UTC)
    here = threading.get_ident()

    def ours(fake: Callable[..., Any], real: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *a: fake(*a) if threading.get_ident() == here else real(*a)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            uuid,
            "uuid4",
            ours(lambda: uuid.UUID(int=rng.getrandbits(128), version=4), uuid.uuid4),
        )
        mp.setattr(os, "urandom", ours(rng.randbytes, os.urandom))
        mp.setattr(
            secrets,
            "token_urlsafe",
            ours(
                lambda n=32: base64.urlsafe_b64encode(rng.randbytes(n)).decode().rstrip("="),
                secrets.token_urlsafe,
            ),
        )
        mp.setattr(
            eventsourcing.domain,
            "datetime_now_with_tzinfo",
            ours(
                lambda: start + timedelta(microseconds=next(ticks)),
                eventsourcing.domain.datetime_now_with_tzinfo,
            ),
        )
        yield


def generate(
    directory: Path, make_sink: Callable[[MarketApp], Any], jobs: int = JOBS, seed: int = 3
) -> MarketApp:
    """A market of ``jobs`` jobs whose flushes go to ``make_sink(app)``: the app, closed.
    With the library's sink, the generator takes none of its shortcuts: the commands keep
    their locks and group commit, every request is quoted and ranked afresh."""
    library = make_sink is LibrarySink
    with repeatable(seed), pytest.MonkeyPatch.context() as mp:
        if library:
            mp.setattr(bench.replaylog, "single_threaded", lambda _: None)
            quote: Any = bench.project._simulator_quote
            mp.setattr(bench.project, "_simulator_quote", quote.__wrapped__)
        app = open_market(sqlite_url(directory))
        try:
            app.snapshotting_intervals = INTERVALS
            generator = LogGenerator(app, jobs, rate=5.0, seed=seed, sink=make_sink(app))
            generator.memo = not library
            generator.sim.now = 1_700_000_000.0
            generator.market.flush_events = FLUSH_EVENTS
            generator.generate()
        finally:
            app.close()
    return app


def dump(directory: Path) -> Dump:
    conn = sqlite3.connect(directory / MARKET_FILE)
    try:
        events = conn.execute(
            "SELECT rowid, originator_id, originator_version, topic, state "
            "FROM stored_events ORDER BY rowid"
        ).fetchall()
        snapshots = conn.execute(
            "SELECT * FROM stored_snapshots ORDER BY originator_id, originator_version"
        ).fetchall()
    finally:
        conn.close()
    return events, snapshots


def test_the_fast_sink_writes_what_the_library_writes(tmp_path: Path) -> None:
    generate(tmp_path / "library", LibrarySink)
    generate(tmp_path / "fast", SQLiteSink)
    events, snapshots = dump(tmp_path / "library")
    assert len(events) > JOBS * 10 and len(snapshots) > 20
    assert {type(s) for _, _, _, _, s in events} == {bytes}
    assert dump(tmp_path / "fast") == (events, snapshots)


def test_the_rows_are_what_the_mapper_makes_of_every_event(tmp_path: Path) -> None:
    captured: list[Any] = []
    app = generate(tmp_path, lambda _: lambda events, snaps: captured.extend(events + snaps))
    encoder = RowEncoder(app.mapper)
    assert encoder.encode is not None  # the fast path is taken
    expected = [app.mapper.to_stored_event(e) for e in captured]
    assert encoder.rows(captured) == [
        (s.originator_id.hex, s.originator_version, s.topic, s.state) for s in expected
    ]


def reference_merge(target: Path, parts: list[Path], chunk: int) -> None:
    """The finished shards' logs interleaved, ``chunk`` notifications of each in turn (what
    the bench did before it interleaved them as they were generated)."""
    open_market(sqlite_url(target)).close()
    conn = sqlite3.connect(target / MARKET_FILE, isolation_level=None)
    try:
        ends = []
        for n, part in enumerate(parts):
            conn.execute(f"ATTACH DATABASE ? AS part{n}", (str(part / MARKET_FILE),))
            ends.append(conn.execute(f"SELECT MAX(rowid) FROM part{n}.stored_events").fetchone()[0])
        columns = "originator_id, originator_version, topic, state"
        conn.execute("BEGIN")
        for low in range(0, max(ends), chunk):
            for n in range(len(parts)):
                conn.execute(
                    f"INSERT INTO main.stored_events ({columns}) SELECT {columns} "
                    f"FROM part{n}.stored_events WHERE rowid > ? AND rowid <= ? ORDER BY rowid",
                    (low, low + chunk),
                )
        for n in range(len(parts)):
            conn.execute(
                f"INSERT INTO main.stored_snapshots SELECT * FROM part{n}.stored_snapshots"
            )
        conn.execute("COMMIT")
    finally:
        conn.close()


def test_shards_interleaved_as_they_come_equal_the_finished_shards_merged(
    tmp_path: Path,
) -> None:
    # Shards of unequal length: the longer one's tail is written alone.
    sizes = (JOBS, JOBS // 2)
    parts = [tmp_path / f"library-{n}" for n in range(2)]
    for n, (part, jobs) in enumerate(zip(parts, sizes, strict=True)):
        generate(part, LibrarySink, jobs=jobs, seed=10 + n)
    reference_merge(tmp_path / "merged", parts, CHUNK)

    flushes: list[list[tuple[list[Row], list[Row]]]] = [[], []]
    for n, jobs in enumerate(sizes):

        def capture(app: MarketApp, n: int = n) -> Callable[[list[Any], list[Any]], None]:
            encoder = RowEncoder(app.mapper)
            return lambda events, snaps: flushes[n].append(
                (encoder.rows(events), encoder.rows(snaps))
            )

        generate(tmp_path / f"rows-{n}", capture, jobs=jobs, seed=10 + n)
    assert len(flushes[0]) > 5 and len(flushes[1]) > 2
    # The shards' flushes arrive in an order of their own: the second shard first and fast.
    writer = LogWriter(tmp_path / "written", 2, chunk=CHUNK)
    arrivals = [1, 1, 1, 0] * len(flushes[0])
    queues = [list(f) for f in flushes]
    for n in arrivals:
        if queues[n]:
            writer.add(n, *queues[n].pop(0))
            if not queues[n]:
                writer.finish(n)
    written = writer.close()
    expected = dump(tmp_path / "merged")
    assert written == len(expected[0])
    assert dump(tmp_path / "written") == expected


def test_a_sharded_log_is_generated_in_processes(tmp_path: Path) -> None:
    meta = _generate_shards(tmp_path, 60, 5.0, 7, "k" * 40, 2, lambda _: None)
    events, _ = dump(tmp_path)
    assert meta["jobs"] == 60 and meta["notifications"] == len(events) > 600
    assert [r[0] for r in events] == list(range(1, len(events) + 1))
    assert not (tmp_path / "shard-0").exists()
