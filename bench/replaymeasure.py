"""The replay bench's measurement: fresh, empty views in the storage ``mediamarket replay
--verify`` rebuilds into, that command's rebuild timed over a whole log, against the baseline of
reading and deserialising the same log, with who used the CPU meanwhile."""

from __future__ import annotations

import cProfile
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.databases import database_name, postgres_database
from bench.measure import busy_seconds, cpu_seconds, db_seconds, rest_of_machine
from bench.project import (
    CATCH_UP_BATCH_SIZE,
    VIEWS_NAME,
    LogSource,
    MarketApp,
    job_view_count,
    open_market,
    rebuild,
    scratch_views,
    store_env,
)
from bench.replaystore import PG_LOG_DB, postgres_log

PG_VIEWS_DB = "mm_bench_replay_views"  # and a random part, per run


@dataclass
class Result:
    backend: str
    jobs: int
    notifications: int
    replay_seconds: float
    baseline_seconds: float
    select_seconds: float
    batch_size: int
    cpu_process: float  # cores used by this process (and a rebuild's second one)
    cpu_db: float | None  # cores used by the PostgreSQL backends during the replay
    cpu_other: float  # cores used by everything else on the machine meanwhile
    job_rows: int
    log: dict[str, Any]

    @property
    def events_per_s(self) -> float:
        return self.notifications / self.replay_seconds

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.replay_seconds

    @property
    def baseline_events_per_s(self) -> float:
        return self.notifications / self.baseline_seconds

    @property
    def cpu_us_per_event(self) -> float:
        """This process's CPU per event: unlike events/s, hardly affected by other load."""
        return self.cpu_process * self.replay_seconds / self.notifications * 1e6

    def as_json(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "events_per_s": self.events_per_s,
            "jobs_per_s": self.jobs_per_s,
            "baseline_events_per_s": self.baseline_events_per_s,
            "select_events_per_s": self.notifications / self.select_seconds,
            "ratio": self.baseline_seconds / self.replay_seconds,
            "cpu_us_per_event": self.cpu_us_per_event,
            "db_us_per_event": None
            if self.cpu_db is None
            else self.cpu_db * self.replay_seconds / self.notifications * 1e6,
        }


def read_log(app: MarketApp, batch_size: int, decode: bool) -> tuple[int, float]:
    """Read the whole log in the runner's batches, deserialising each event when ``decode``:
    (notifications, seconds)."""
    recorder, to_domain_event = app.recorder, app.mapper.to_domain_event
    position = count = 0
    started = time.perf_counter()
    while True:
        notifications = recorder.select_notifications(
            start=position, limit=batch_size, inclusive_of_start=False
        )
        if not notifications:
            return count, time.perf_counter() - started
        if decode:
            for n in notifications:
                to_domain_event(n)
        count += len(notifications)
        position = notifications[-1].id


def measure(
    backend: str,
    log_url: str,
    views_url: str,
    meta: dict[str, Any],
    db_names: list[str],
    profile: cProfile.Profile | None = None,
) -> Result:
    app = open_market(log_url)
    views_env = store_env(views_url, role=VIEWS_NAME)
    try:
        # The storage and the rebuild of `mediamarket replay --verify` (on SQLite, no fsyncs;
        # with two cores, the order book and ledger folded by a second process).
        with scratch_views(views_env, app.name) as views:
            # First a read without decoding (also brings the log into the OS cache), then the
            # baseline: the same read, deserialising every event.
            _, select_seconds = read_log(app, CATCH_UP_BATCH_SIZE, decode=False)
            count, baseline_seconds = read_log(app, CATCH_UP_BATCH_SIZE, decode=True)
            end = app.recorder.max_notification_id() or 0
            db0 = db_seconds(*db_names)
            pid = os.getpid()
            busy0, cpu0, started = busy_seconds(), cpu_seconds(pid, True), time.perf_counter()
            if profile is not None:
                profile.enable()
            # A profile sees one process: then the whole fold runs in it.
            parallel = None if profile is None else False
            applied = rebuild(app, views, end, LogSource(log_url, views_env), parallel)
            if profile is not None:
                profile.disable()
            seconds = time.perf_counter() - started
            cpu = cpu_seconds(pid, True) - cpu0
            db = db_seconds(*db_names) - db0
            other = rest_of_machine(busy_seconds() - busy0, cpu, db)
            job_rows = job_view_count(views)
    finally:
        app.close()
    if applied != count or job_rows != meta["jobs"]:
        raise RuntimeError(
            f"replay applied {applied} of {count} notifications, {job_rows} of {meta['jobs']} jobs"
        )
    return Result(
        backend=backend,
        jobs=meta["jobs"],
        notifications=applied,
        replay_seconds=seconds,
        baseline_seconds=baseline_seconds,
        select_seconds=select_seconds,
        batch_size=CATCH_UP_BATCH_SIZE,
        cpu_process=cpu / seconds,
        cpu_db=db / seconds if db_names else None,
        cpu_other=other / seconds,
        job_rows=job_rows,
        log=dict(meta),
    )


def measure_sqlite(
    source_url: str, meta: dict[str, Any], profile: cProfile.Profile | None = None
) -> Result:
    # scratch_views puts the views in a temporary directory of their own.
    return measure("SQLite", source_url, source_url, meta, [], profile)


def measure_postgres(
    admin_url: str,
    source_url: str,
    meta: dict[str, Any],
    say: Callable[[str], None],
    profile: cProfile.Profile | None = None,
) -> Result:
    # The views database is this run's own: runs on one server no longer drop each other's.
    with (
        postgres_log(admin_url, source_url, meta, say) as log_url,
        postgres_database(admin_url, PG_VIEWS_DB) as views_url,
    ):
        db_names = [PG_LOG_DB, database_name(views_url)]
        return measure("PostgreSQL", log_url, views_url, meta, db_names, profile)
