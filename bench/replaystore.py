"""Where the replay bench's logs live: the SQLite log of N jobs, generated once and cached in
``bench/.cache/``, and its event-for-event copy in the PostgreSQL database ``mm_bench_replay``,
kept for the next run while it holds the same log."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import shutil
import sqlite3
import tempfile
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from statistics import median
from typing import Any

from eventsourcing.persistence import StoredEvent

from bench.common import ROOT
from bench.databases import shared_database, sqlite_url
from bench.project import Progress, open_market
from bench.replaylog import SECRET_KEY, VERSION, LogGenerator, Row, RowEncoder

CACHE = ROOT / "bench" / ".cache"
PG_LOG_DB = "mm_bench_replay"
COPY_BATCH = 10_000  # events per insert when copying the log to PostgreSQL
MERGE_CHUNK = 1000  # notifications of one shard's log before the next shard's, when merging
COMPACT_ROWS = 100_000  # rows written from a shard's buffer before it is trimmed
MARKET_FILE = "market.db"  # the log's file in a SQLite market directory


def sqlite_log(
    jobs: int,
    rate: float,
    say: Callable[[str], None],
    *,
    shards: int = 1,
    secret_key: str = SECRET_KEY,
    name: str = "replay",
) -> tuple[str, dict[str, Any]]:
    """The cached SQLite log of ``jobs`` jobs (generated first when absent): its URL and meta.

    ``shards`` > 1: that many markets (each its own buyers, seller and offers, and an equal
    share of the jobs at an equal share of the rate) generated at once in as many processes,
    then their logs interleaved into one, as the events of one busy market with that many
    sellers would be. ``name`` keeps logs of different shapes (and secret keys) apart."""
    suffix = "" if shards == 1 else f"-s{shards}"
    directory = CACHE / f"{name}-v{VERSION}-{jobs}{suffix}"
    meta_file = directory / "meta.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("version") == VERSION and meta.get("jobs") == jobs:
            return sqlite_url(directory), {**meta, "generated": False}
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"{directory.name}-", dir=CACHE))
    try:
        say(f"generating a log of {jobs:,} jobs (once; cached in {directory.relative_to(ROOT)})")
        started = time.perf_counter()
        seed = jobs * 1000 + VERSION
        if shards == 1:
            meta = _generate(scratch, jobs, rate, seed, secret_key)
        else:
            meta = _generate_shards(scratch, jobs, rate, seed, secret_key, shards, say)
        meta.update(
            version=VERSION,
            generate_seconds=round(time.perf_counter() - started, 1),
            log_id=uuid.uuid4().hex,  # which generation: the PostgreSQL copy must be of this one
        )
        (scratch / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        scratch.rename(directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    say(
        f"generated {meta['notifications']:,} events for {jobs:,} jobs "
        f"in {meta['generate_seconds']:.0f} s"
    )
    return sqlite_url(directory), {**meta, "generated": True}


def _generate(
    directory: Path, jobs: int, rate: float, seed: int, secret_key: str
) -> dict[str, Any]:
    """One market's log of ``jobs`` jobs in ``directory``: its meta."""
    app = open_market(sqlite_url(directory))
    try:
        with Progress(jobs, "generate", unit="jobs") as progress:
            generator = LogGenerator(
                app, jobs, rate, seed, on_progress=progress.update, secret_key=secret_key
            )
            meta = generator.generate()
        meta["notifications"] = app.recorder.max_notification_id() or 0
    finally:
        app.close()
    return meta


class _PipeSink:
    """A shard's flushes, as rows, sent to the process writing the interleaved log."""

    def __init__(self, conn: Connection, encoder: RowEncoder) -> None:
        self.conn = conn
        self.encoder = encoder
        self.sent = 0

    def __call__(self, events: list[Any], snapshots: list[Any]) -> None:
        rows = self.encoder.rows(events)
        self.conn.send(("rows", (rows, self.encoder.rows(snapshots))))
        self.sent += len(rows)


def _generate_shard(
    directory: str, jobs: int, rate: float, seed: int, secret_key: str, conn: Connection
) -> None:
    """In a shard's process: one market's log of ``jobs`` jobs, sent through ``conn`` as it is
    generated (``("rows", (events, snapshots))``, ``("done", jobs done)``), then its meta
    (``("meta", meta)``) or what went wrong (``("error", traceback)``). ``directory`` holds
    only the empty tables of the market whose mapper encodes the rows."""
    try:
        app = open_market(sqlite_url(Path(directory)))
        try:
            sink = _PipeSink(conn, RowEncoder(app.mapper))

            def publish(n: int, _: int) -> None:
                conn.send(("done", n))

            meta = LogGenerator(app, jobs, rate, seed, publish, secret_key, sink).generate()
            meta["notifications"] = sink.sent
        finally:
            app.close()
        conn.send(("meta", meta))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


def _generate_shards(
    directory: Path,
    jobs: int,
    rate: float,
    seed: int,
    secret_key: str,
    shards: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """``shards`` markets generated at once, each in its own process, their rows interleaved
    into the log in ``directory`` by this process as they arrive (``LogWriter``): the log is
    complete moments after the last shard is, instead of a copy of every row after that."""
    spawn = multiprocessing.get_context("spawn")
    sizes = [jobs // shards + (1 if n < jobs % shards else 0) for n in range(shards)]
    parts = [directory / f"shard-{n}" for n in range(shards)]
    readers: dict[Connection, int] = {}
    processes = []
    writer = LogWriter(directory, shards)
    try:
        for n, (part, size) in enumerate(zip(parts, sizes, strict=True)):
            reader, sender = spawn.Pipe(duplex=False)
            process = spawn.Process(
                target=_generate_shard,
                args=(str(part), size, rate / shards, seed + n, secret_key, sender),
                name=f"bench-log-shard-{n}",
            )
            process.start()
            sender.close()  # the shard's end: its exit then reads as EOF here
            readers[reader] = n
            processes.append(process)
        done = [0] * shards
        metas: list[dict[str, Any]] = [{} for _ in range(shards)]
        with Progress(jobs, f"generate ({shards} processes)", unit="jobs") as progress:
            progress.update(0)
            while readers:
                for ready in wait_for(list(readers), 1.0):
                    assert isinstance(ready, Connection)
                    n = readers[ready]
                    try:
                        kind, payload = ready.recv()
                    except EOFError:
                        raise RuntimeError(f"log shard {n} ended without its meta") from None
                    if kind == "rows":
                        writer.add(n, *payload)
                    elif kind == "done":
                        done[n] = payload
                    elif kind == "meta":
                        metas[n] = payload
                        writer.finish(n)
                        del readers[ready]
                        ready.close()
                    else:
                        raise RuntimeError(f"log shard {n} failed:\n{payload}")
                progress.update(sum(done))
            generated_at = time.perf_counter()
        notifications = writer.close()
        say(
            f"interleaved the {shards} markets' logs as they were generated; "
            f"the log was complete {time.perf_counter() - generated_at:.1f} s after them"
        )
    finally:
        writer.abort()
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
    for part in parts:
        shutil.rmtree(part)
    if notifications != sum(m["notifications"] for m in metas):
        raise RuntimeError(f"wrote {notifications} notifications of the shards' {metas}")
    outcomes: Counter[str] = Counter()
    events: Counter[str] = Counter()
    for m in metas:
        outcomes.update(m["outcomes"])
        events.update(m["events"])
    return {
        "jobs": sum(m["jobs"] for m in metas),
        "rejected_submits": sum(m["rejected_submits"] for m in metas),
        "outcomes": dict(outcomes),
        "events": dict(sorted(events.items())),
        # Each shard's job spans, stretched by the other shards' events interleaved with its.
        "job_span_median": median(m["job_span_median"] for m in metas) * shards,
        "job_span_p90": median(m["job_span_p90"] for m in metas) * shards,
        "rate": rate,
        "shards": shards,
        "notifications": notifications,
    }


class LogWriter:
    """The logs of ``shards`` markets (disjoint aggregates) interleaved into a new log in
    ``target`` as their rows arrive: ``chunk`` notifications of each in turn (the first
    ``chunk`` of shard 0, then of shard 1, ..., then the second ``chunk`` of each), so events
    written at the same simulated time stay close. A shard's rows wait here until its turn; a
    finished shard's turns pass. Snapshots are written as they come."""

    def __init__(self, target: Path, shards: int, chunk: int = MERGE_CHUNK) -> None:
        open_market(sqlite_url(target)).close()  # the library's tables
        self.chunk = chunk
        self.pending: list[list[Row]] = [[] for _ in range(shards)]
        self.taken = [0] * shards  # rows of ``pending`` written
        self.finished = [False] * shards
        self.turn = 0
        self.written = 0
        self.conn: sqlite3.Connection | None = sqlite3.connect(
            target / MARKET_FILE, isolation_level=None
        )
        # A scratch file renamed into the cache only once complete: no journal, no fsyncs, and
        # a cache big enough for the primary key's B-tree, which the ids fill in random order.
        self.conn.execute("PRAGMA journal_mode=OFF")
        self.conn.execute("PRAGMA synchronous=OFF")
        self.conn.execute("PRAGMA cache_size=-2000000")
        self.conn.execute("BEGIN")

    def add(self, shard: int, events: list[Row], snapshots: list[Row]) -> None:
        assert self.conn is not None and not self.finished[shard]
        if snapshots:
            self.conn.executemany("INSERT INTO stored_snapshots VALUES (?,?,?,?)", snapshots)
        self.pending[shard] += events
        self._write()

    def finish(self, shard: int) -> None:
        self.finished[shard] = True
        self._write()

    def _write(self) -> None:
        assert self.conn is not None
        pending, taken, chunk = self.pending, self.taken, self.chunk
        rows: list[Row] = []
        while True:
            n = self.turn % len(pending)
            left = len(pending[n]) - taken[n]
            if left < chunk and not self.finished[n]:
                break  # its turn, and its next chunk is still being generated
            if all(self.finished) and all(len(p) == t for p, t in zip(pending, taken, strict=True)):
                break
            rows += pending[n][taken[n] : taken[n] + chunk]
            taken[n] += min(left, chunk)
            self.turn += 1
        for n, p in enumerate(pending):
            if taken[n] >= COMPACT_ROWS:
                del p[: taken[n]]
                taken[n] = 0
        if rows:
            self.conn.executemany("INSERT INTO stored_events VALUES (?,?,?,?)", rows)
            self.written += len(rows)

    def close(self) -> int:
        """Commit the log (every shard finished): the notifications written."""
        assert self.conn is not None and all(self.finished)
        assert all(len(p) == t for p, t in zip(self.pending, self.taken, strict=True))
        self.conn.execute("COMMIT")
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.close()
        self.conn = None
        return self.written

    def abort(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@contextlib.contextmanager
def postgres_log(
    admin_url: str, source_url: str, meta: dict[str, Any], say: Callable[[str], None]
) -> Iterator[str]:
    """``mm_bench_replay`` holding a copy of the SQLite log, copied first unless it already
    holds exactly that log (same generation, version, jobs and notification count); kept for
    the next run, and never dropped while another run reads it (``shared_database``)."""
    wanted = {k: meta.get(k) for k in ("log_id", "version", "jobs", "notifications")}

    def ready(url: str) -> bool:
        import psycopg

        with contextlib.suppress(psycopg.Error), psycopg.connect(url, connect_timeout=3) as conn:
            row = conn.execute("SELECT meta FROM bench_replay_meta").fetchone()
            return row is not None and {k: json.loads(row[0]).get(k) for k in wanted} == wanted
        return False

    def fill(url: str) -> None:
        say(f"copying the log to PostgreSQL database {PG_LOG_DB} (once; kept for the next run)")
        _copy_log(source_url, url, meta, wanted, say)

    with shared_database(admin_url, PG_LOG_DB, ready, fill, say) as url:
        yield url


def _copy_log(
    source_url: str,
    url: str,
    meta: dict[str, Any],
    wanted: dict[str, Any],
    say: Callable[[str], None],
) -> None:
    import psycopg

    started = time.perf_counter()
    source, target = open_market(source_url), open_market(url)
    try:
        with Progress(meta["notifications"], "copy") as progress:
            position = 0
            progress.update(0)
            while True:
                batch = source.recorder.select_notifications(
                    start=position, limit=COPY_BATCH, inclusive_of_start=False
                )
                if not batch:
                    break
                target.recorder.insert_events(
                    [
                        StoredEvent(n.originator_id, n.originator_version, n.topic, n.state)
                        for n in batch
                    ]
                )
                position = batch[-1].id
                progress.update(position)
        copied = target.recorder.max_notification_id() or 0
    finally:
        source.close()
        target.close()
    if copied != meta["notifications"]:
        raise RuntimeError(f"copied {copied} notifications of {meta['notifications']}")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE bench_replay_meta (meta TEXT NOT NULL)")
        conn.execute("INSERT INTO bench_replay_meta (meta) VALUES (%s)", (json.dumps(wanted),))
    say(f"copied {copied:,} events in {time.perf_counter() - started:.0f} s")
