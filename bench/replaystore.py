"""Where the replay bench's logs live: the SQLite log of N jobs, generated once and cached in
``bench/.cache/``, and its event-for-event copy in the PostgreSQL database ``mm_bench_replay``,
kept for the next run while it holds the same log."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eventsourcing.persistence import StoredEvent

from bench.common import ROOT
from bench.databases import database_url, pg_admin, sqlite_url
from bench.project import Progress, open_market
from bench.replaylog import VERSION, LogGenerator

CACHE = ROOT / "bench" / ".cache"
PG_LOG_DB = "mm_bench_replay"
COPY_BATCH = 10_000  # events per insert when copying the log to PostgreSQL


def sqlite_log(jobs: int, rate: float, say: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
    """The cached SQLite log of ``jobs`` jobs (generated first when absent): its URL and meta."""
    directory = CACHE / f"replay-v{VERSION}-{jobs}"
    meta_file = directory / "meta.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("version") == VERSION and meta.get("jobs") == jobs:
            return sqlite_url(directory), {**meta, "generated": False}
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"replay-v{VERSION}-{jobs}-", dir=CACHE))
    try:
        say(f"generating a log of {jobs:,} jobs (once; cached in {directory.relative_to(ROOT)})")
        started = time.perf_counter()
        app = open_market(sqlite_url(scratch))
        try:
            with Progress(jobs, "generate", unit="jobs") as progress:
                generator = LogGenerator(
                    app, jobs, rate, seed=jobs * 1000 + VERSION, on_progress=progress.update
                )
                meta = generator.generate()
            meta["notifications"] = app.recorder.max_notification_id() or 0
        finally:
            app.close()
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
