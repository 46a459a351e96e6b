"""The scale row: an engine whose log holds 1,000,000 jobs, against one whose log holds 10,000.

    .venv/bin/python -m bench.scale                    # 1,000,000 jobs against 10,000
    .venv/bin/python -m bench.scale --jobs 100000 --small 5000

Each log is generated once (``bench.replaystore.sqlite_log``: two markets generated at once in
two processes, their events interleaved into one log as they come; the offers sealed with the
bench server's key, so the engine can route over them) and cached in ``bench/.cache/`` together
with its views, built once by ``services.replay.rebuild`` (the rebuild ``mediamarket replay``
runs), and the work queue's store, folded once by its runner (every serving process keeps it).
Each row then runs ``mediamarket serve --no-worker`` on a copy of that directory (the cache
stays as generated), sets it up through the API as the other rows do (8 funded buyers, one more
offer, one queued job) and measures the poll and submit workloads. Compared: poll p99 and submit
server CPU per job at the big log against the small one, and the server's resident memory (its
peak, ``VmHWM``) after both workloads on the big log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import common
from bench.databases import sqlite_url
from bench.measure import Cpu, Load, Processes, run_load
from bench.servers import SECRET_KEY, running_engine

SCALE_JOBS = 1_000_000
SMALL_JOBS = 10_000
SHARDS = 2  # generating processes: one per core of the bench machine
RATE = 5.0  # jobs per simulated second, as the replay's log
RSS_GOAL_MB = 300.0
RATIO_GOAL = 1.2


@dataclass
class ScaleRun:
    """One engine on a log of ``jobs`` jobs: its poll and submit loads, and its memory."""

    jobs: int
    notifications: int
    poll: dict[str, Any]
    poll_cpu: Cpu
    submit: dict[str, Any]
    submit_cpu: Cpu
    rss_mb: float  # resident now (after both workloads)
    peak_rss_mb: float  # the most it was resident at any time

    @property
    def poll_p99_ms(self) -> float:
        return float(self.poll["p99_ms"])

    @property
    def submit_cpu_ms(self) -> float:
        rps = float(self.submit["ok_rps"])
        return self.submit_cpu.server / rps * 1000 if rps else float("nan")

    @property
    def poll_cpu_ms(self) -> float:
        rps = float(self.poll["ok_rps"])
        return self.poll_cpu.server / rps * 1000 if rps else float("nan")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScaleRun:
        fields = {k: data[k] for k in cls.__dataclass_fields__}
        fields["poll_cpu"] = Cpu(**data["poll_cpu"])
        fields["submit_cpu"] = Cpu(**data["submit_cpu"])
        return cls(**fields)

    def as_json(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "poll_cpu": self.poll_cpu.__dict__,
            "submit_cpu": self.submit_cpu.__dict__,
            "poll_p99_ms": self.poll_p99_ms,
            "poll_cpu_ms": self.poll_cpu_ms,
            "submit_cpu_ms": self.submit_cpu_ms,
        }


def scale_log(jobs: int, say: Callable[[str], None]) -> tuple[Path, dict[str, Any]]:
    """The cached directory of a log of ``jobs`` jobs with its views built: (path, meta)."""
    # Imported here: ``bench.run`` and ``bench.report`` read this module's results without
    # loading the project (the HTTP bench drives it only as a separate process).
    from bench.project import (
        VIEWS_NAME,
        WORK_NAME,
        LogSource,
        ProjectionRunner,
        open_market,
        open_views,
        open_work,
        rebuild,
        store_env,
    )
    from bench.replaystore import sqlite_log

    url, meta = sqlite_log(jobs, RATE, say, shards=SHARDS, secret_key=SECRET_KEY, name="scale")
    directory = Path(url.removeprefix("sqlite:///"))

    def build(what: str, role: str, opener: Callable[..., Any], fold: Callable[..., Any]) -> None:
        """Fold the whole log into the store of ``role``, once, and record it in the meta."""
        if meta.get(f"{what}_built"):
            return
        label = {"views": "views", "work": "work queue"}[what]
        say(f"building the {label} of {meta['notifications']:,} events (once; cached beside)")
        (directory / f"{role}.db").unlink(missing_ok=True)
        started = time.perf_counter()
        app = open_market(url)
        try:
            env = store_env(url, role=role)
            store = opener(env)
            try:
                store.ensure_schema(app.name)
                fold(app, store, app.recorder.max_notification_id() or 0, env)
            finally:
                store.datastore.close()
        finally:
            app.close()
        meta[f"{what}_built"] = True
        meta[f"{what}_seconds"] = round(time.perf_counter() - started, 1)
        _store_meta(directory, meta)
        say(f"{label} built in {meta[f'{what}_seconds']:.0f} s")

    build(
        "views",
        VIEWS_NAME,
        open_views,
        lambda app, views, end, env: rebuild(app, views, end, LogSource(url, env)),
    )
    # The work queue's store, which every serving process feeds and ``replay`` does not build:
    # without it the engine under test would spend its first minutes (at 1M jobs, the whole
    # measurement) folding the log from the start in its runner thread, and the row would time
    # that catch-up instead of a running engine's polls and submits.
    build(
        "work",
        WORK_NAME,
        open_work,
        lambda app, work, end, env: ProjectionRunner(app, work).catch_up(until=end),
    )
    return directory, meta


def _store_meta(directory: Path, meta: dict[str, Any]) -> None:
    stored = {k: v for k, v in meta.items() if k != "generated"}
    (directory / "meta.json").write_text(json.dumps(stored, indent=1) + "\n")


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident now, peak resident) of a live process, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def measure(
    procs: Processes,
    load: Load,
    jobs: int,
    workdir: Path,
    buyers: int,
    say: Callable[[str], None],
) -> ScaleRun:
    source, meta = scale_log(jobs, say)
    data = workdir / f"scale-{jobs}" / "data"
    data.mkdir(parents=True)
    say(f"copying the {jobs:,}-job log and its views for the engine")
    for f in source.iterdir():
        if f.is_file() and f.name != "meta.json":
            shutil.copyfile(f, data / f.name)
    # The copy's dirty pages (7-8 GB at 1M jobs) would otherwise be written back by the kernel
    # during the first workload, on the cores the engine and the load generator share.
    os.sync()
    try:
        say(f"engine on a log of {jobs:,} jobs")
        with running_engine(procs, sqlite_url(data), data.parent, buyers) as engine:
            poll, poll_cpu = run_load(procs, engine.proc, load, **engine.workload("poll"))
            submit, submit_cpu = run_load(procs, engine.proc, load, **engine.workload("submit"))
            rss, peak = memory_mb(engine.proc.pid)
    finally:
        shutil.rmtree(data, ignore_errors=True)
    return ScaleRun(jobs, meta["notifications"], poll, poll_cpu, submit, submit_cpu, rss, peak)


def measure_scale(
    procs: Processes,
    load: Load,
    workdir: Path,
    buyers: int,
    jobs: int = SCALE_JOBS,
    small: int = SMALL_JOBS,
    say: Callable[[str], None] = common.say,
) -> tuple[ScaleRun, ScaleRun]:
    """The engine on the small log, then on the big one."""
    return (
        measure(procs, load, small, workdir, buyers, say),
        measure(procs, load, jobs, workdir, buyers, say),
    )


def summary(small: ScaleRun, big: ScaleRun) -> list[str]:
    """One line per goal: the figure at both sizes, their ratio, met or not."""
    poll = big.poll_p99_ms / small.poll_p99_ms
    submit = big.submit_cpu_ms / small.submit_cpu_ms
    met = {True: "met", False: "**not met**"}
    return [
        f"poll p99 at {big.jobs:,} jobs within {RATIO_GOAL}x of {small.jobs:,}: "
        f"{big.poll_p99_ms:.2f} ms against {small.poll_p99_ms:.2f} ms, {poll:.2f}x "
        f"— {met[poll <= RATIO_GOAL]}",
        f"submit server CPU at {big.jobs:,} jobs within {RATIO_GOAL}x of {small.jobs:,}: "
        f"{big.submit_cpu_ms:.2f} ms against {small.submit_cpu_ms:.2f} ms per job, "
        f"{submit:.2f}x — {met[submit <= RATIO_GOAL]}",
        f"server RSS at {big.jobs:,} jobs ≤ {RSS_GOAL_MB:.0f} MB: peak {big.peak_rss_mb:.0f} MB "
        f"({big.rss_mb:.0f} MB after the loads) — {met[big.peak_rss_mb <= RSS_GOAL_MB]}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--jobs", type=int, default=SCALE_JOBS)
    parser.add_argument("--small", type=int, default=SMALL_JOBS)
    parser.add_argument("--buyers", type=int, default=8)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--generate-only", action="store_true", help="build the cached logs, measure nothing"
    )
    parser.add_argument("--json", action="store_true", help="one JSON line per log size")
    args = parser.parse_args(argv)

    def say(text: str) -> None:
        common.say(text, who="bench.scale")

    if args.generate_only:
        for jobs in (args.small, args.jobs):
            scale_log(jobs, say)
        return 0
    load = Load(warmup=args.warmup, duration=args.duration, concurrency=args.concurrency)
    procs = Processes()
    try:
        with tempfile.TemporaryDirectory(prefix="mm_scale_") as tmp:
            small, big = measure_scale(
                procs, load, Path(tmp), args.buyers, args.jobs, args.small, say
            )
    finally:
        procs.stop_all()
    if args.json:
        for run in (small, big):
            print(json.dumps(run.as_json()), flush=True)
    for line in summary(small, big):
        say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
