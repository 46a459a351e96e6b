"""Where does the engine's time go under a bench workload? py-spy on ``mediamarket serve``.

    .venv/bin/pip install py-spy
    .venv/bin/python -m bench.profile poll            # SQLite, GIL-holding samples
    .venv/bin/python -m bench.profile submit --backend postgres --all-threads
    .venv/bin/python -m bench.profile submit --offers 100   # 100 seller offers on the model
    .venv/bin/python -m bench.profile submit --scale-jobs 200000  # on bench.scale's cached log

Starts the engine exactly as ``bench.run`` does, drives one workload from a separate load
generator, samples the server with py-spy (non-blocking, so the server is not slowed), and
prints the hottest functions by self and by inclusive samples, plus the hottest project
functions. The collapsed stacks are kept (``--out``) for a flame graph
(``py-spy``'s raw format; e.g. speedscope.app opens them).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.common import ROOT, say
from bench.databases import POSTGRES_URL, postgres_database, sqlite_url
from bench.measure import Load, Processes, run_load
from bench.servers import running_engine

PROJECT_DIRS = ("api/", "domain/", "services/", "adapters/", "projections/")


def frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``file.py:func`` relative to the repo or site-packages."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("/lib"):
                path = "stdlib/" + path.split("/", 1)[1]
            break
    else:
        with contextlib.suppress(ValueError):
            path = str(Path(path).resolve().relative_to(ROOT))
    return f"{path}:{func}"


def summarize(raw: Path, top: int) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    project: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";") if " (" in f]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
            if name.startswith(PROJECT_DIRS):
                project[name] += count
    out = [f"{total} samples"]
    for title, counter in (
        ("self", self_time),
        ("inclusive", inclusive),
        ("project code, inclusive", project),
    ):
        out += ["", f"top {top} by {title}:"]
        for name, count in counter.most_common(top):
            out.append(f"  {count / total:6.1%}  {name}")
    return "\n".join(out)


def scale_copy(jobs: int, data: Path) -> Path:
    """``data``: a copy of bench.scale's cached log of ``jobs`` jobs, with its stores."""
    from bench.scale import scale_log  # generates (through the project) only when absent

    source, _ = scale_log(jobs, say)
    data.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and f.name != "meta.json":
            shutil.copyfile(f, data / f.name)
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("workload", choices=["poll", "submit"])
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--buyers", type=int, default=8)
    parser.add_argument("--offers", type=int, default=1, help="seller offers on the model")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="sample every non-idle thread, not only the one holding the GIL",
    )
    parser.add_argument(
        "--idle", action="store_true", help="with --all-threads: count waiting threads too"
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, help="keep the collapsed stacks here")
    parser.add_argument("--postgres-url", default=POSTGRES_URL)
    parser.add_argument(
        "--scale-jobs",
        type=int,
        help="SQLite: start on a copy of bench.scale's cached log of this many jobs "
        "(generated first when absent), as the scale row does",
    )
    args = parser.parse_args(argv)
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if pyspy is None:
        print("py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2

    load = Load(warmup=1.0, duration=args.seconds, concurrency=args.concurrency)
    procs = Processes()
    try:
        with contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mm_profile_")))
            if args.scale_jobs:
                url = sqlite_url(scale_copy(args.scale_jobs, tmp / "data"))
            elif args.backend == "sqlite":
                url = sqlite_url(tmp / "data")
            else:
                url = stack.enter_context(postgres_database(args.postgres_url))
            engine = stack.enter_context(
                running_engine(procs, url, tmp / "engine", args.buyers, offers=args.offers)
            )
            raw = args.out or tmp / "profile.txt"
            spy_args = [
                pyspy, "record", "--pid", str(engine.proc.pid), "--rate", str(args.rate),
                "--duration", str(int(args.seconds)), "--format", "raw", "--output", str(raw),
                "--nonblocking",
            ]  # fmt: skip
            if not args.all_threads:
                spy_args.append("--gil")
            elif args.idle:
                spy_args.append("--idle")
            # The load generator's warm-up doubles as py-spy's start-up time.
            spy = procs.start(spy_args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            result, cpu = run_load(procs, engine.proc, load, **engine.workload(args.workload))
            _, err = spy.communicate(timeout=60)
            procs.stop(spy)
            if not raw.exists():
                print(f"py-spy failed: {err.decode()[-2000:]}", file=sys.stderr)
                return 1
            print(
                f"{args.workload} on {args.backend}: {result['ok_rps']:,.0f} req/s, "
                f"p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
                f"errors {result['errors']}; server CPU {cpu.server:.0%}, "
                f"other {cpu.other:.0%}, {cpu.server / result['ok_rps'] * 1000:.2f} ms server CPU "
                "per request (profiling slows the server a little)"
            )
            print(summarize(raw, args.top))
            if args.out:
                print(f"\ncollapsed stacks in {args.out}")
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
