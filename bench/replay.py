"""Replay throughput: rebuild every projection from a market log of N jobs (issue 4, point 6).

    .venv/bin/python -m bench.replay                       # SQLite and PostgreSQL, 100,000 jobs
    .venv/bin/python -m bench.replay --jobs 5000 --backend sqlite
    .venv/bin/python -m bench.replay --backend sqlite --profile   # cProfile of the replay

**The log.** Generated in-process, without HTTP, by driving the real command side
(``services.commands.Commands`` over the real aggregates) through a small discrete-event
simulation of a busy market, so the events have exactly the shapes and the interleaving a
running engine writes: 100 buyers with deposits, one seller with three offers on one model, and
jobs arriving at ``--rate`` jobs per simulated second, each driven like the worker drives it
(claim, dispatch with a slot on the offer, progress, a stored artifact and settlement in one
save, then the provider's copy deleted), with a mix of outcomes (see ``OUTCOMES``). Commands
save through ``BufferedMarket``, which keeps every save's events in order and writes many saves
at once (encoded as the application's mapper encodes them, written with its recorders' insert
statements): the same log, written in minutes instead of hours.

The SQLite log is cached under ``bench/.cache/`` by job count and ``VERSION`` (bump it when the
generator changes what it writes). The PostgreSQL log is a copy of the SQLite one, event for
event, in the database ``mm_bench_replay`` (created when absent, kept for the next run while it
holds the same log, and never dropped while another run on the server reads it).

**The measurement.** Fresh, empty views in the storage ``mediamarket replay --verify`` rebuilds
into (``projections.views.scratch_views``: a temporary SQLite file written without fsyncs, or a
temporary schema in a scratch PostgreSQL database of the run's own, ``mm_bench_replay_views_*``,
dropped after it), then that
command's rebuild timed (``services.replay.rebuild``: with two cores, the job views and the
order book folded here while a second process folds the ledger into scratch storage of its own,
then copied in): events/s is notifications applied per second. The baseline, measured in the same
run just before, is the event-store library's own way to read a log: the same notifications in
the runner's batches (``select_notifications``), each deserialised (``mapper.to_domain_event``),
projecting nothing. (The runner reads through ``adapters.logreader``, which does the same work
in less time, and the rebuild runs on two cores, so the replay is not bounded by it.)
``--profile`` folds in one process, for cProfile to see it all. ``--json`` prints one JSON line
per backend for ``bench.run``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys

from bench import common
from bench.databases import POSTGRES_URL, postgres_version
from bench.replaylog import LogGenerator
from bench.replaymeasure import Result, measure_postgres, measure_sqlite
from bench.replaystore import sqlite_log

# The generator is also imported from here (by the tests that replay a generated log).
__all__ = ["LogGenerator", "main"]


def summary(r: Result) -> str:
    return (
        f"{r.backend}: replayed {r.notifications:,} events ({r.jobs:,} jobs) in "
        f"{r.replay_seconds:.1f} s: {r.events_per_s:,.0f} events/s, {r.jobs_per_s:,.0f} jobs/s; "
        f"baseline (read + deserialise) {r.baseline_events_per_s:,.0f} events/s, so the replay "
        f"runs at {r.baseline_seconds / r.replay_seconds:.0%} of it (read only: "
        f"{r.notifications / r.select_seconds:,.0f} events/s); {r.cpu_us_per_event:.1f} us of "
        f"CPU per event; cores busy: {r.cpu_process:.0%} this process and its children"
        + ("" if r.cpu_db is None else f", {r.cpu_db:.0%} PostgreSQL")
        + f", {r.cpu_other:.0%} everything else"
    )


def print_profile(profile: cProfile.Profile, top: int) -> None:
    for sort in ("tottime", "cumulative"):
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.strip_dirs().sort_stats(sort).print_stats(top)
        print(f"\n===== replay profile, top {top} by {sort} =====", file=sys.stderr)
        print(out.getvalue(), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.replay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--jobs", type=int, default=common.REPLAY_JOBS)
    parser.add_argument(
        "--backend", choices=["sqlite", "postgres", "both"], default="both", help="default both"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=5.0,
        help="jobs submitted per simulated second while generating (how many jobs' events "
        "interleave in the log; default 5)",
    )
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    parser.add_argument("--json", action="store_true", help="one JSON line per backend on stdout")
    parser.add_argument(
        "--profile",
        nargs="?",
        const="-",
        metavar="FILE",
        help="profile the replay with cProfile: print the top functions, and with FILE also "
        "dump the stats there (for snakeviz or pstats)",
    )
    parser.add_argument("--top", type=int, default=40, help="functions in the profile printout")
    args = parser.parse_args(argv)

    def say(text: str) -> None:
        common.say(text, who="bench.replay")

    source_url, meta = sqlite_log(args.jobs, args.rate, say)
    profile = cProfile.Profile() if args.profile else None
    results: list[Result] = []
    if args.backend in ("sqlite", "both"):
        say(f"replaying {meta['notifications']:,} events into fresh SQLite views")
        results.append(measure_sqlite(source_url, meta, profile))
        say(summary(results[-1]))
    if args.backend in ("postgres", "both"):
        _, why = postgres_version(args.postgres_url)
        if why is not None:
            say(f"PostgreSQL skipped: not reachable at {args.postgres_url} ({why})")
            if args.json:
                print(json.dumps({"backend": "PostgreSQL", "skipped": why}), flush=True)
        else:
            say(f"replaying {meta['notifications']:,} events into fresh PostgreSQL views")
            results.append(measure_postgres(args.postgres_url, source_url, meta, say, profile))
            say(summary(results[-1]))
    if args.json:
        for r in results:
            print(json.dumps(r.as_json()), flush=True)
    if profile is not None:
        print_profile(profile, args.top)
        if args.profile != "-":
            profile.dump_stats(args.profile)
            say(f"profile written to {args.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
