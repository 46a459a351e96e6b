"""``make bench``: the engine's HTTP throughput against a bare aiohttp baseline, in one run.

Every server and every load generator is its own process on loopback:

* baseline: ``bench.bare`` (``GET /json`` and ``POST /json``);
* engine: ``mediamarket serve --no-worker`` on SQLite, then on PostgreSQL (a fresh database,
  dropped afterwards; skipped with a reason when the server is not reachable), set up through
  the real admin and seller API.

Workloads, each from a separate ``bench.load`` process with a fixed number of keep-alive
connections, a warm-up and a fixed measured window:

* poll: ``GET /v1/video/generations/{id}`` of one existing job (baseline ``GET /json``);
* submit: ``POST /v1/video/generations`` round-robin over several funded buyers
  (baseline ``POST /json``); anything but 202 counts as an error;
* submit, N offers: the submit workload on a fresh engine whose model has N seller offers
  (``--offers``, default 1, 10 and 100), each with its own provider key and multiplier;
* submit, 1 and 2 API processes (PostgreSQL only): the submit workload on one
  ``serve --no-worker``, then on two of them on the same database (the production topology's
  API role), the load generator dealing its connections out over both ports; once with every
  buyer sent to either process, once with the buyers split between them.

Each row also accounts for the CPU (server, its PostgreSQL backends, load generator, the rest of
the machine) and reports server CPU per request, which stays meaningful when other processes
share the cores; the run first waits (up to ``--wait-quiet`` s) for the machine to go quiet.

Then the SSE row (``bench.sse``): ``--sse-clients`` (default 1,000) event streams on one job
of an engine on SQLite, the server's CPU and memory while they wait and when the job changes.

Then the replay rows, from a ``bench.replay`` process: every projection rebuilt from a log of
``--replay-jobs`` jobs (default 100,000; 5,000 with ``--quick``) on SQLite and on PostgreSQL,
against the baseline of reading and deserialising the same log (see ``bench.replay``).

Prints a markdown table and, with ``--update-readme``, puts it between the bench markers.
``python -m bench.profile`` profiles the engine under the same workloads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import librarysave
from bench.common import QUICK_REPLAY_JOBS, REPLAY_JOBS, ROOT, say
from bench.databases import POSTGRES_URL, postgres_database, postgres_version, sqlite_url
from bench.measure import Load, Processes, run_load, wait_for_quiet
from bench.report import ReplayRow, Row, render, update_readme
from bench.scale import SCALE_JOBS, SMALL_JOBS, ScaleRun
from bench.servers import SUBMIT_BODY, answer_of, more_api, running_bare, running_engine
from bench.sse import SseResult, measure_sse

LIBRARY_SAVES = 2000  # saves timed in the library baseline of the submit rows
OFFER_COUNTS = (1, 10, 100)  # offers on the model in the "submit, N offers" rows
# What --only can choose.
PARTS = ("poll", "submit", "offers", "processes", "sse", "replay", "scale")


# ---------------------------------------------------------------------- the rows


def measure_bare(
    procs: Processes, load: Load, workdir: Path, only: set[str]
) -> tuple[dict[str, Row], tuple[int, int]]:
    """The baseline rows, by the engine row they are the baseline of ("poll", "submit"), and
    what ``GET /json`` answers: (status, body bytes)."""
    rows = {}
    with running_bare(procs, workdir) as (proc, base):
        answer = answer_of(base, "/json")
        if "poll" in only:
            res, cpu = run_load(procs, proc, load, method="GET", url=base + "/json", ok=[200])
            rows["poll"] = Row("bare aiohttp", "GET /json", res, None, cpu)
        if only.isdisjoint(("submit", "offers", "processes")):
            return rows, answer
        res, cpu = run_load(
            procs,
            proc,
            load,
            method="POST",
            url=base + "/json",
            ok=[202],
            body=SUBMIT_BODY,
        )
        rows["submit"] = Row("bare aiohttp", "POST /json", res, None, cpu)
    return rows, answer


def check_like_with_like(
    backend: str, engine: tuple[int, int], bare: tuple[int, int], skipped: list[str]
) -> None:
    """The poll row is only comparable with its baseline if both answer the same status and
    the same number of body bytes; say so in the report when they do not."""
    if engine != bare:
        skipped.append(
            f"**Warning:** the {backend} poll answers {engine[0]} with {engine[1]} body bytes, "
            f"bare aiohttp's GET {bare[0]} with {bare[1]}: the poll row is not like with like."
        )
        say(skipped[-1])


def measure_engine(
    procs: Processes,
    load: Load,
    backend: str,
    database_url: str,
    workdir: Path,
    baseline: dict[str, Row],
    buyers: int,
    only: set[str],
    bare_answer: tuple[int, int],
    skipped: list[str],
) -> list[Row]:
    rows: list[Row] = []
    names = [name for name in ("poll", "submit") if name in only]
    if not names:
        return rows
    with running_engine(procs, database_url, workdir, buyers) as engine:
        check_like_with_like(backend, engine.poll_answer, bare_answer, skipped)
        for name in names:
            res, cpu = run_load(
                procs, engine.proc, load, db_name=engine.db_name, **engine.workload(name)
            )
            rows.append(Row(backend, name, res, baseline[name].result, cpu))
    if "submit" in names:
        # Beside the engine's database (its own tables), after the engine has stopped.
        library_url = database_url if backend == "PostgreSQL" else sqlite_url(workdir / "library")
        say(f"{backend}, the library's own save() of a submit's aggregates (bench.librarysave)")
        rows.append(librarysave.measure(procs, library_url, LIBRARY_SAVES))
    return rows


def offers_workload(count: int) -> str:
    return f"submit, {count} offer{'' if count == 1 else 's'}"


def measure_offers(
    procs: Processes,
    load: Load,
    backend: str,
    database: Callable[[Path], contextlib.AbstractContextManager[str]],
    workdir: Path,
    baseline: dict[str, Row],
    buyers: int,
    counts: list[int],
) -> list[Row]:
    """The submit workload on a fresh engine per offer count; ``database(engine_dir)`` gives
    each engine its own database URL."""
    rows = []
    for count in counts:
        workload = offers_workload(count)
        say(f"{backend}, {workload}")
        engine_dir = workdir / f"offers-{count}"
        with (
            database(engine_dir) as url,
            running_engine(procs, url, engine_dir, buyers, offers=count) as engine,
        ):
            res, cpu = run_load(
                procs, engine.proc, load, db_name=engine.db_name, **engine.workload("submit")
            )
        rows.append(Row(backend, workload, res, baseline["submit"].result, cpu, offers=count))
    return rows


def measure_processes(
    procs: Processes,
    load: Load,
    url: str,
    workdir: Path,
    baseline: dict[str, Row],
    buyers: int,
) -> list[Row]:
    """Submit on one API process, then on two on the same database, in that order on one
    fresh database (so the second row's log is the longer one, which costs it a little)."""
    rows = []
    base_result = baseline["submit"].result if "submit" in baseline else None
    with running_engine(procs, url, workdir / "api-1", buyers) as engine:
        say("PostgreSQL, submit on 1 API process")
        submit = engine.workload("submit")
        res, cpu = run_load(procs, engine.proc, load, db_name=engine.db_name, **submit)
        rows.append(Row("PostgreSQL", "submit, 1 API process", res, base_result, cpu, processes=1))
        with more_api(procs, url, workdir / "api-2") as (second, base):
            urls = [submit["url"], submit["url"].replace(engine.base, base)]
            both = [engine.proc, second]
            for split in (False, True):
                label = "buyers split" if split else "any buyer to either"
                say(f"PostgreSQL, submit on 2 API processes, {label}")
                res, cpu = run_load(
                    procs,
                    both,
                    load,
                    db_name=engine.db_name,
                    **{**submit, "url": urls, "keys_by_url": split},
                )
                workload = f"submit, 2 API processes, {label}"
                rows.append(Row("PostgreSQL", workload, res, base_result, cpu, processes=2))
    return rows


def measure_postgres(
    procs: Processes,
    load: Load,
    admin_url: str,
    workdir: Path,
    baseline: dict[str, Row],
    buyers: int,
    counts: list[int],
    skipped: list[str],
    only: set[str],
    bare_answer: tuple[int, int],
) -> tuple[list[Row], str | None, str | None]:
    """The engine rows on PostgreSQL, each engine on a fresh database: (rows, the server's
    version, why it is not reachable); why rows are missing is added to ``skipped``."""
    version, why = postgres_version(admin_url)
    if why is not None:
        problem = f"not reachable at {admin_url} ({why})"
        skipped.append(f"PostgreSQL rows skipped: {problem}.")
        say(skipped[-1])
        return [], None, problem
    say("engine on PostgreSQL")
    rows: list[Row] = []
    try:
        with postgres_database(admin_url) as url:
            rows += measure_engine(
                procs,
                load,
                "PostgreSQL",
                url,
                workdir,
                baseline,
                buyers,
                only,
                bare_answer,
                skipped,
            )
        if "processes" in only:
            with postgres_database(admin_url) as url:
                rows += measure_processes(procs, load, url, workdir / "processes", baseline, buyers)
        rows += measure_offers(
            procs,
            load,
            "PostgreSQL",
            lambda _engine_dir: postgres_database(admin_url),
            workdir,
            baseline,
            buyers,
            counts,
        )
    except (RuntimeError, OSError, ImportError) as e:
        which = "The other PostgreSQL" if rows else "PostgreSQL"
        skipped.append(f"{which} rows skipped: the run failed ({e}).")
        say(skipped[-1])
    return rows, version, None


def measure_replay(
    procs: Processes, jobs: int, postgres_url: str | None, why_not_postgres: str | None
) -> list[ReplayRow]:
    """The replay rows from one ``bench.replay`` process: SQLite, then PostgreSQL unless
    ``postgres_url`` is None (``why_not_postgres`` says why)."""
    backend = "sqlite" if postgres_url is None else "both"
    args = [sys.executable, "-m", "bench.replay", "--jobs", str(jobs), "--backend", backend]
    args += ["--json", *(["--postgres-url", postgres_url] if postgres_url else [])]
    proc = procs.start(args, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        # Generating a 100k-job log the first time takes minutes; later runs reuse it.
        out, _ = proc.communicate(timeout=3600)
    except subprocess.TimeoutExpired:
        out = b""
    finally:
        procs.stop(proc)
    rows: dict[str, ReplayRow] = {}
    for line in out.decode().splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            backend_name = result["backend"]
            if "skipped" in result:
                note = f"skipped: {result['skipped']}"
                rows[backend_name] = ReplayRow(backend_name, jobs, None, note)
            else:
                rows[backend_name] = ReplayRow(backend_name, jobs, result)
    failed = f"failed (exit {proc.returncode}; its output is above)"
    for name in ("SQLite", "PostgreSQL"):
        if name not in rows:
            note = failed if name == "SQLite" or postgres_url else f"skipped: {why_not_postgres}"
            rows[name] = ReplayRow(name, jobs, None, note)
    return [rows["SQLite"], rows["PostgreSQL"]]


def measure_scale(
    procs: Processes, load: Load, jobs: int, small: int
) -> tuple[ScaleRun, ScaleRun] | str:
    """The scale rows from one ``bench.scale`` process, or why there are none."""
    args = [sys.executable, "-m", "bench.scale", "--json", "--jobs", str(jobs)]
    args += ["--small", str(small), "--warmup", str(load.warmup)]
    args += ["--duration", str(load.duration), "--concurrency", str(load.concurrency)]
    proc = procs.start(args, cwd=ROOT, stdout=subprocess.PIPE)
    try:
        # The first run generates the big log and builds its views: many minutes.
        out, _ = proc.communicate(timeout=4 * 3600)
    except subprocess.TimeoutExpired:
        out = b""
    finally:
        procs.stop(proc)
    runs = [ScaleRun.from_json(json.loads(line)) for line in out.decode().splitlines() if line]
    if len(runs) != 2:
        return f"failed (exit {proc.returncode}; its output is above)"
    return runs[0], runs[1]


# ---------------------------------------------------------------------- main


# ---------------------------------------------------------------------- main


def offer_counts(text: str) -> list[int]:
    """``--offers``: comma-separated offer counts, each at least 1."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of counts: {text!r}") from None
    if any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError("offer counts must be at least 1")
    return counts


def parts(text: str) -> set[str]:
    """``--only``: comma-separated parts of the run."""
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = chosen.difference(PARTS)
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(PARTS)}: not {text!r}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="1 s per row, for a smoke test")
    parser.add_argument(
        "--update-readme",
        type=Path,
        metavar="README",
        help="replace the text between the bench markers in this file",
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration", type=float, help="measured seconds per row (default 5)")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per row (default 1)")
    parser.add_argument("--buyers", type=int, default=8)
    parser.add_argument(
        "--offers",
        type=offer_counts,
        default=list(OFFER_COUNTS),
        metavar="N,N,...",
        help="offer counts for the 'submit, N offers' rows (default 1,10,100; '' for none)",
    )
    parser.add_argument(
        "--postgres-url",
        default=POSTGRES_URL,
        help="an admin URL to create and drop a scratch database with",
    )
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument(
        "--scale-jobs",
        type=int,
        metavar="N",
        help=f"jobs in the scale rows' big log (default {SCALE_JOBS:,}, against {SMALL_JOBS:,}; "
        "0 for no scale rows, the default with --quick)",
    )
    parser.add_argument(
        "--only",
        type=parts,
        default=set(PARTS),
        metavar="PART,...",
        help=f"run only these parts ({', '.join(PARTS)}; default all), e.g. --only poll",
    )
    parser.add_argument(
        "--replay-jobs",
        type=int,
        metavar="N",
        help=f"jobs in the replay rows' log (default {REPLAY_JOBS:,}; {QUICK_REPLAY_JOBS:,} "
        "quick; 0 for no replay rows)",
    )
    parser.add_argument(
        "--sse-clients",
        type=int,
        default=1000,
        metavar="N",
        help="concurrent SSE clients on one job in the SSE row (default 1000; 0 for no row)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        metavar="SECONDS",
        help="first wait up to this long for other processes to go quiet (default 60; 0 quick)",
    )
    args = parser.parse_args(argv)
    load = Load(
        warmup=args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0),
        duration=args.duration if args.duration is not None else (1.0 if args.quick else 5.0),
        concurrency=args.concurrency,
    )

    # SIGTERM (make interrupted, CI timeout) unwinds through the finally blocks like Ctrl-C.
    def terminate(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    procs = Processes()
    started = time.monotonic()
    skipped: list[str] = []
    pg_version: str | None = None
    pg_problem: str | None = "--no-postgres" if args.no_postgres else None
    replays: list[ReplayRow] = []
    sse: SseResult | str | None = None
    offers = args.offers if "offers" in args.only else []
    scale: tuple[ScaleRun, ScaleRun] | str | None = None
    scale_jobs = args.scale_jobs
    if scale_jobs is None:
        scale_jobs = 0 if args.quick else SCALE_JOBS
    if "scale" not in args.only:
        scale_jobs = 0
    replay_jobs = args.replay_jobs
    if replay_jobs is None:
        replay_jobs = QUICK_REPLAY_JOBS if args.quick else REPLAY_JOBS
    max_wait = args.wait_quiet if args.wait_quiet is not None else (0.0 if args.quick else 60.0)
    if max_wait > 0:
        waited, busy = wait_for_quiet(max_wait)
        say(f"machine busy {busy:.0%} of a core after waiting {waited:.0f} s")
    try:
        with tempfile.TemporaryDirectory(prefix="mm_bench_") as tmp:
            workdir = Path(tmp)
            say(f"bare aiohttp baseline ({load.warmup:g}+{load.duration:g} s per row)")
            baseline, bare_answer = measure_bare(procs, load, workdir, args.only)
            rows = list(baseline.values())
            say("engine on SQLite")
            rows += measure_engine(
                procs,
                load,
                "SQLite",
                sqlite_url(workdir / "data"),
                workdir / "sqlite",
                baseline,
                args.buyers,
                args.only,
                bare_answer,
                skipped,
            )
            rows += measure_offers(
                procs,
                load,
                "SQLite",
                lambda engine_dir: contextlib.nullcontext(sqlite_url(engine_dir / "data")),
                workdir / "sqlite",
                baseline,
                args.buyers,
                offers,
            )
            if args.no_postgres:
                skipped.append("PostgreSQL rows skipped: --no-postgres.")
            else:
                pg_rows, pg_version, pg_problem = measure_postgres(
                    procs,
                    load,
                    args.postgres_url,
                    workdir / "postgres",
                    baseline,
                    args.buyers,
                    offers,
                    skipped,
                    args.only,
                    bare_answer,
                )
                rows += pg_rows
            if args.sse_clients > 0 and "sse" in args.only:
                say(f"SSE fan-out, {args.sse_clients:,} clients on SQLite (bench.sse)")
                try:
                    sse = measure_sse(
                        procs,
                        sqlite_url(workdir / "sse" / "data"),
                        workdir / "sse",
                        args.sse_clients,
                        idle_seconds=load.duration,
                    )
                except (RuntimeError, OSError, ValueError) as e:
                    sse = f"failed: {e}"
                    say(f"SSE row {sse}")
            if replay_jobs > 0 and "replay" in args.only:
                say(f"replay of {replay_jobs:,} jobs' events (bench.replay)")
                pg_url = None if pg_problem is not None else args.postgres_url
                replays = measure_replay(procs, replay_jobs, pg_url, pg_problem)
            if scale_jobs > 0:
                say(f"scale: {scale_jobs:,} jobs' log against {SMALL_JOBS:,} (bench.scale)")
                scale = measure_scale(procs, load, scale_jobs, SMALL_JOBS)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    finally:
        procs.stop_all()
    report = render(rows, load, args.buyers, args.quick, pg_version, skipped, replays, sse, scale)
    print(report)
    say(f"done in {time.monotonic() - started:.0f} s")
    if args.update_readme is not None:
        update_readme(args.update_readme, report)
        say(f"updated {args.update_readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
