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
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ALL_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing.sharedctypes import Synchronized
from pathlib import Path
from statistics import median
from typing import Any

from eventsourcing.persistence import StoredEvent

from bench.common import ROOT
from bench.databases import database_url, pg_admin, sqlite_url
from bench.project import Progress, open_market
from bench.replaylog import SECRET_KEY, VERSION, LogGenerator

CACHE = ROOT / "bench" / ".cache"
PG_LOG_DB = "mm_bench_replay"
COPY_BATCH = 10_000  # events per insert when copying the log to PostgreSQL
MERGE_CHUNK = 1000  # notifications of one shard's log before the next shard's, when merging
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
            meta = _generate(scratch, jobs, rate, seed, secret_key, None)
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


# In a shard's process: where it publishes how many of its jobs are done.
_shard_done: Synchronized[int] | None = None


def _generate(
    directory: Path,
    jobs: int,
    rate: float,
    seed: int,
    secret_key: str,
    done: Synchronized[int] | None,
) -> dict[str, Any]:
    """One market's log of ``jobs`` jobs in ``directory``: its meta."""
    app = open_market(sqlite_url(directory))
    try:
        if done is None:
            with Progress(jobs, "generate", unit="jobs") as progress:
                generator = LogGenerator(
                    app, jobs, rate, seed, on_progress=progress.update, secret_key=secret_key
                )
                meta = generator.generate()
        else:

            def publish(n: int, _: int) -> None:
                done.value = n

            meta = LogGenerator(app, jobs, rate, seed, publish, secret_key).generate()
        meta["notifications"] = app.recorder.max_notification_id() or 0
    finally:
        app.close()
    return meta


def _shard_init(done: Synchronized[int]) -> None:
    global _shard_done
    _shard_done = done


def _generate_shard(
    directory: str, jobs: int, rate: float, seed: int, secret_key: str
) -> dict[str, Any]:
    return _generate(Path(directory), jobs, rate, seed, secret_key, _shard_done)


def _generate_shards(
    directory: Path,
    jobs: int,
    rate: float,
    seed: int,
    secret_key: str,
    shards: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    spawn = multiprocessing.get_context("spawn")
    counters = [spawn.Value("q", 0) for _ in range(shards)]
    sizes = [jobs // shards + (1 if n < jobs % shards else 0) for n in range(shards)]
    parts = [directory / f"shard-{n}" for n in range(shards)]
    pools = [
        ProcessPoolExecutor(1, mp_context=spawn, initializer=_shard_init, initargs=(counter,))
        for counter in counters
    ]
    try:
        futures = [
            pool.submit(_generate_shard, str(part), size, rate / shards, seed + n, secret_key)
            for n, (pool, part, size) in enumerate(zip(pools, parts, sizes, strict=True))
        ]
        with Progress(jobs, f"generate ({shards} processes)", unit="jobs") as progress:
            progress.update(0)
            while wait(futures, 1.0, ALL_COMPLETED).not_done:
                progress.update(sum(c.value for c in counters))
            progress.update(jobs)
        metas = [f.result() for f in futures]
    finally:
        for pool in pools:
            pool.shutdown(cancel_futures=True)
    say(f"interleaving the {shards} markets' logs into one")
    notifications = merge_logs(directory, parts)
    for part in parts:
        shutil.rmtree(part)
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


def merge_logs(target: Path, parts: list[Path], chunk: int = MERGE_CHUNK) -> int:
    """The logs of ``parts`` (SQLite market directories of disjoint aggregates) interleaved into
    a new log in ``target``: ``chunk`` notifications of each in turn, so events written at the
    same simulated time stay close. Returns the notifications written."""
    open_market(sqlite_url(target)).close()  # the library's tables
    conn = sqlite3.connect(target / MARKET_FILE, isolation_level=None)
    try:
        # A scratch file renamed into the cache only once complete: no journal, no fsyncs, and
        # a cache big enough for the primary key's B-tree, which the ids fill in random order.
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-2000000")
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
        count = conn.execute("SELECT MAX(rowid) FROM main.stored_events").fetchone()[0]
        conn.execute("PRAGMA journal_mode=WAL")
    finally:
        conn.close()
    return int(count)


def postgres_log(
    admin_url: str, source_url: str, meta: dict[str, Any], say: Callable[[str], None]
) -> str:
    """``mm_bench_replay`` holding a copy of the SQLite log, copied first unless it already
    holds exactly that log (same generation, version, jobs and notification count)."""
    import psycopg

    url = database_url(admin_url, PG_LOG_DB)
    wanted = {k: meta.get(k) for k in ("log_id", "version", "jobs", "notifications")}
    with contextlib.suppress(psycopg.Error):
        with psycopg.connect(url, connect_timeout=3) as conn:
            row = conn.execute("SELECT meta FROM bench_replay_meta").fetchone()
        if row is not None and {k: json.loads(row[0]).get(k) for k in wanted} == wanted:
            return url
    say(f"copying the log to PostgreSQL database {PG_LOG_DB} (once; kept for the next run)")
    started = time.perf_counter()
    pg_admin(
        admin_url,
        f'DROP DATABASE IF EXISTS "{PG_LOG_DB}" WITH (FORCE)',
        f'CREATE DATABASE "{PG_LOG_DB}"',
    )
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
    return url
