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
  (``--offers``, default 1, 10 and 100), each with its own provider key and multiplier.

Each row also accounts for the CPU (server, its PostgreSQL backends, load generator, the rest of
the machine) and reports server CPU per request, which stays meaningful when other processes
share the cores; the run first waits (up to ``--wait-quiet`` s) for the machine to go quiet.

Then the replay rows, from a ``bench.replay`` process: every projection rebuilt from a log of
``--replay-jobs`` jobs (default 100,000; 5,000 with ``--quick``) on SQLite and on PostgreSQL,
against the baseline of reading and deserialising the same log (see ``bench.replay``).

Prints a markdown table and, with ``--update-readme``, puts it between the bench markers.
``python -m bench.profile`` profiles the engine under the same workloads.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "mediamarket"
ADMIN_TOKEN = "bench-admin-token"
SECRET_KEY = "bench-secret-key-0123456789abcdef"
POSTGRES_URL = os.environ.get("MM_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
MODEL = "venice-seedance-2-fast-t2v"
SUBMIT_BODY = {"model": MODEL, "prompt": "bench"}
START_MARK = "<!-- bench:start -->"
END_MARK = "<!-- bench:end -->"
OFFER_COUNTS = (1, 10, 100)  # offers on the model in the "submit, N offers" rows
QUOTE_CACHE_SECONDS = 5.0  # the engine's quote cache lifetime (services.routing), for the note
POLL_GOAL = 0.60  # of bare aiohttp's GET rate
SUBMIT_GOAL = 500.0  # jobs/s on SQLite
REPLAY_GOAL = 50_000.0  # events/s rebuilding the projections on SQLite
REPLAY_JOBS = 100_000  # jobs in the replayed log (--quick: QUICK_REPLAY_JOBS)
QUICK_REPLAY_JOBS = 5_000


# ---------------------------------------------------------------------- processes


class Processes:
    """Every child this run starts; all of them are ended on the way out, whatever happens."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(args, **kw)
        self.children.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.children:
            self.children.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.children)):
            self.stop(proc)


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def busy_seconds() -> float:
    """CPU seconds all cores of the machine have spent busy since boot, from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_wait: float, threshold: float = 0.3) -> tuple[float, float]:
    """Wait up to ``max_wait`` s for the machine to use under ``threshold`` cores; returns
    (seconds waited, cores busy in the last one-second sample)."""
    started = time.monotonic()
    while True:
        busy0 = busy_seconds()
        time.sleep(1.0)
        busy = busy_seconds() - busy0
        waited = time.monotonic() - started
        if busy < threshold or waited >= max_wait:
            return waited, busy
        time.sleep(1.0)


def db_seconds(db_name: str | None) -> float:
    """CPU seconds of the PostgreSQL backends connected to ``db_name`` (by process title)."""
    if db_name is None:
        return 0.0
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if f" {db_name} ".encode() in (entry / "cmdline").read_bytes():
                total += cpu_seconds(int(entry.name))
    return total


def cpu_seconds(pid: int, children: bool = False) -> float:
    """User + system CPU time of a live process (all its threads), from /proc; with
    ``children``, plus that of the child processes it has waited for."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------- a tiny HTTP client


def call(base: str, method: str, path: str, key: str | None = None, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def expect(result: tuple[int, Any], *statuses: int) -> Any:
    status, body = result
    if status not in statuses:
        raise RuntimeError(f"setup call answered {status}: {body}")
    return body


def wait_ready(base: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError, ValueError):
            status, body = call(base, "GET", "/healthz")
            if status == 200 and body.get("catalog"):
                return
        time.sleep(0.05)
    raise RuntimeError(f"server at {base} not ready after {timeout}s")


# ---------------------------------------------------------------------- measurements


@dataclass
class Load:
    warmup: float
    duration: float
    concurrency: int


@dataclass(frozen=True)
class Cpu:
    """CPU used over one row, in cores (1.0 = one core busy the whole time)."""

    server: float
    db: float | None  # the PostgreSQL backends serving the engine's database
    loadgen: float
    other: float  # everything else on the machine: competition for the same 2 cores


@dataclass
class Row:
    backend: str
    workload: str
    result: dict[str, Any] | None
    baseline: dict[str, Any] | None = None
    cpu: Cpu | None = None
    note: str = ""
    offers: int | None = None  # the offer count of a "submit, N offers" row

    @property
    def rps(self) -> float:
        return 0.0 if self.result is None else float(self.result["ok_rps"])

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline["ok_rps"]:
            return None
        return self.rps / float(self.baseline["ok_rps"])

    @property
    def cpu_ms(self) -> float | None:
        """Server CPU per successful response: robust to other load on the machine."""
        if self.cpu is None or not self.rps:
            return None
        return self.cpu.server / self.rps * 1000


def run_load(
    procs: Processes,
    server: subprocess.Popen[bytes],
    load: Load,
    *,
    method: str,
    url: str,
    ok: list[int],
    keys: list[str] | None = None,
    body: Any = None,
    db_name: str | None = None,
) -> tuple[dict[str, Any], Cpu]:
    """One load-generator process against one server: its result and who used the CPU."""
    spec = {
        "method": method,
        "url": url,
        "keys": keys,
        "body": body,
        "ok_statuses": [str(s) for s in ok],
        "concurrency": load.concurrency,
        "warmup": load.warmup,
        "duration": load.duration,
        "max_requests": 2_000_000,
    }
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    db0 = db_seconds(db_name)
    busy0, cpu0, t0 = busy_seconds(), cpu_seconds(server.pid), time.monotonic()
    gen = procs.start(
        [sys.executable, "-m", "bench.load", json.dumps(spec)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        out, _ = gen.communicate(timeout=load.warmup + load.duration + 60)
    finally:
        procs.stop(gen)
    busy1, cpu1, t1 = busy_seconds(), cpu_seconds(server.pid), time.monotonic()
    db1 = db_seconds(db_name)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if gen.returncode != 0:
        raise RuntimeError(f"load generator failed ({gen.returncode})")
    wall = t1 - t0
    loader = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    used, db = cpu1 - cpu0, db1 - db0
    other = max(0.0, (busy1 - busy0) - used - db - loader)
    result = json.loads(out.decode().strip().splitlines()[-1])
    cpu = Cpu(used / wall, None if db_name is None else db / wall, loader / wall, other / wall)
    return result, cpu


def measure_bare(procs: Processes, load: Load, workdir: Path) -> dict[str, Row]:
    port = free_port()
    log = workdir / "bare.log"
    with open(log, "ab") as out:
        proc = procs.start(
            [sys.executable, "-m", "bench.bare", "--port", str(port)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, log)
        rows = {}
        res, cpu = run_load(procs, proc, load, method="GET", url=base + "/json", ok=[200, 202])
        rows["poll"] = Row("bare aiohttp", "GET /json", res, None, cpu)
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
        return rows
    finally:
        procs.stop(proc)


def engine_env(database_url: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIAMARKET_", "PROVIDER_"))}
    env.update(
        {
            "DATABASE_URL": database_url,
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "MEDIAMARKET_ADMIN_TOKEN": ADMIN_TOKEN,
            "MEDIAMARKET_SECRET_KEY": SECRET_KEY,
            "MEDIAMARKET_DEMO": "false",
            "SIM_RENDER_SECONDS": "3600",
            "LOG_LEVEL": "info",
        }
    )
    return env


@dataclass
class EngineRun:
    """A running, set-up ``mediamarket serve``: funded buyers, offers (one unless asked for
    more), one queued job."""

    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    keys: list[str]
    job_id: str
    db_name: str | None

    def workload(self, name: str) -> dict[str, Any]:
        """``run_load`` arguments for a workload ("poll" or "submit")."""
        if name == "poll":
            return {
                "method": "GET",
                "url": f"{self.base}/v1/video/generations/{self.job_id}",
                "ok": [200, 202],
                "keys": [self.keys[0]],
            }
        return {
            "method": "POST",
            "url": f"{self.base}/v1/video/generations",
            "ok": [202],
            "keys": self.keys,
            "body": SUBMIT_BODY,
        }


def offer_multipliers(count: int) -> list[str]:
    """``count`` cost multipliers: one offer is at 0.80; more are spread evenly over 0.50..0.95
    in a fixed shuffled order, so the cheapest offer is neither the oldest nor the newest."""
    if count == 1:
        return ["0.80"]
    low, high = Decimal("0.50"), Decimal("0.95")
    step = (high - low) / (count - 1)
    values = [str((low + step * i).quantize(Decimal("0.01"))) for i in range(count)]
    random.Random(count).shuffle(values)
    return values


def create_offers(base: str, count: int) -> None:
    """``count`` sellers with one offer each on the model, through the real admin and seller API.

    Every offer has its own simulator key (``sim_ok_bench_<n>``; any ``sim_`` key is accepted),
    so each has its own quote-cache entry in the engine, as real sellers' keys would."""
    for n, multiplier in enumerate(offer_multipliers(count)):
        seller = expect(
            call(base, "POST", "/admin/sellers", ADMIN_TOKEN, {"name": f"bench seller {n}"}), 201
        )
        expect(
            call(
                base,
                "POST",
                "/v1/seller/offers",
                seller["api_key"],
                {
                    "model": MODEL,
                    "provider": "venice",
                    "api_key": f"sim_ok_bench_{n}",
                    "pricing_mode": "cost_multiplier",
                    "cost_multiplier": multiplier,
                    "max_concurrent_jobs": None,
                },
            ),
            201,
        )


@contextlib.contextmanager
def running_engine(
    procs: Processes, database_url: str, workdir: Path, buyers: int, offers: int = 1
) -> Iterator[EngineRun]:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "server.log"
    with open(log, "ab") as out:
        proc = procs.start(
            [str(BIN), "serve", "--no-worker"],
            cwd=workdir,
            env=engine_env(database_url, port),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, log)
        # Set up through the real API, as an operator and a seller would.
        keys = []
        for n in range(buyers):
            buyer = expect(
                call(base, "POST", "/admin/buyers", ADMIN_TOKEN, {"name": f"bench buyer {n}"}), 201
            )
            expect(
                call(
                    base,
                    "POST",
                    f"/admin/buyers/{buyer['buyer_id']}/deposits",
                    ADMIN_TOKEN,
                    {"amount_usdc": "1000000000000"},
                ),
                201,
            )
            keys.append(buyer["api_key"])
        create_offers(base, offers)
        job = expect(call(base, "POST", "/v1/video/generations", keys[0], SUBMIT_BODY), 202)
        db_name = None if database_url.startswith("sqlite") else database_url.rsplit("/", 1)[1]
        yield EngineRun(proc, base, log, keys, job["id"], db_name)
        if proc.poll() is not None:
            raise RuntimeError(f"server died during the run: {log.read_text()[-2000:]}")
    finally:
        procs.stop(proc)


def measure_engine(
    procs: Processes,
    load: Load,
    backend: str,
    database_url: str,
    workdir: Path,
    baseline: dict[str, Row],
    buyers: int,
) -> list[Row]:
    rows = []
    with running_engine(procs, database_url, workdir, buyers) as engine:
        for name in ("poll", "submit"):
            res, cpu = run_load(
                procs, engine.proc, load, db_name=engine.db_name, **engine.workload(name)
            )
            rows.append(Row(backend, name, res, baseline[name].result, cpu))
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
        print(f"bench: {backend}, {offers_workload(count)}", file=sys.stderr, flush=True)
        engine_dir = workdir / f"offers-{count}"
        with (
            database(engine_dir) as url,
            running_engine(procs, url, engine_dir, buyers, offers=count) as engine,
        ):
            res, cpu = run_load(
                procs, engine.proc, load, db_name=engine.db_name, **engine.workload("submit")
            )
        workload = offers_workload(count)
        rows.append(Row(backend, workload, res, baseline["submit"].result, cpu, offers=count))
    return rows


@dataclass
class ReplayRow:
    """One ``bench.replay`` measurement (its JSON), or why there is none."""

    backend: str
    jobs: int
    result: dict[str, Any] | None
    note: str = ""

    @property
    def workload(self) -> str:
        return f"replay, {jobs_label(self.jobs)} jobs"

    @property
    def events_per_s(self) -> float:
        return 0.0 if self.result is None else float(self.result["events_per_s"])


def jobs_label(jobs: int) -> str:
    return f"{jobs // 1000}k" if jobs >= 1000 and jobs % 1000 == 0 else f"{jobs:,}"


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


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    import psycopg

    name = f"mm_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_version(admin_url: str) -> tuple[str | None, str | None]:
    """(server version, None) when PostgreSQL answers, else (None, why not)."""
    try:
        import psycopg

        with psycopg.connect(admin_url, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return (str(row[0]).split()[0] if row else "?"), None
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"


# ---------------------------------------------------------------------- the report


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return re.sub(r"\s+", " ", line.split(":", 1)[1]).strip()
    return platform.processor() or platform.machine()


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(
    rows: list[Row],
    load: Load,
    buyers: int,
    quick: bool,
    pg_version: str | None,
    skipped: list[str],
    replays: list[ReplayRow] | None = None,
) -> str:
    replays = replays or []
    lines = [
        f"Measured {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} by `make bench` on "
        f"{os.cpu_count()} cores ({cpu_model()}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}"
        + (f", PostgreSQL {pg_version}" if pg_version else "")
        + ".",
        "",
    ]
    if quick:
        lines += ["**Quick smoke run (`--quick`): too short to be representative.**", ""]
    lines += [
        "| backend | workload | req/s | p50 ms | p99 ms | baseline req/s | % of baseline "
        "| errors | server CPU ms/req | CPU server / db / loadgen / other |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        r = row.result
        if r is None:
            lines.append(f"| {row.backend} | {row.workload} | {row.note} | | | | | | | |")
            continue
        errors = str(r["errors"])
        if r["errors"]:
            bad = sorted(r["error_statuses"].items())
            errors += " (" + ", ".join(f"{s}: {n}" for s, n in bad) + ")"
        ratio = row.ratio
        cpu = "-"
        if row.cpu is not None:
            c = row.cpu
            db = "-" if c.db is None else f"{c.db:.0%}"
            cpu = f"{c.server:.0%} / {db} / {c.loadgen:.0%} / {c.other:.0%}"
        lines.append(
            f"| {row.backend} | {row.workload} | {fmt(row.rps, 0)} | {fmt(r['p50_ms'], 2)} "
            f"| {fmt(r['p99_ms'], 2)} "
            f"| {fmt(row.baseline['ok_rps'] if row.baseline else None, 0)} "
            f"| {'-' if ratio is None else f'{ratio:.0%}'} | {errors} | {fmt(row.cpu_ms, 2)} "
            f"| {cpu} |"
        )
    lines += [
        "",
        f"Load: {load.concurrency} concurrent keep-alive connections from a separate aiohttp "
        f"client process, {load.warmup:g} s warm-up then {load.duration:g} s measured per row, "
        "loopback; one server process at a time. req/s counts successful responses only "
        "(200/202 for polls, 202 for submits); p50/p99 are over every measured response. "
        "The engine runs as `mediamarket serve --no-worker` (API, projection runner and "
        "embedded simulator; no worker, so the queued jobs are never dispatched and polls "
        "answer 202) with `LOG_LEVEL=info` (failed and slow requests are logged as JSON to a "
        "file; the others at debug, so not). "
        "Setup goes through the real API: "
        f"{buyers} buyers funded by admin deposits, one seller offer for the model, one job. Poll "
        "reads that job with its buyer's key; submit posts "
        f'`{{"model": "{MODEL}", "prompt": "bench"}}` round-robin over the buyers; '
        "poll runs first, then submit. Server CPU ms/req is the server process's CPU time "
        "(all threads) per successful response: unlike req/s it hardly depends on what else "
        "the machine is doing, so it is the fairer engine-versus-bare comparison on a busy "
        "machine. The last column is in cores (100% = one core busy for the whole row): the "
        "server process, the PostgreSQL backends of its database, the load generator, and "
        "everything else on the machine meanwhile. To see where the engine's time goes: "
        "`.venv/bin/pip install py-spy && .venv/bin/python -m bench.profile poll` (or "
        "`submit`, `--backend postgres`).",
    ]
    if any(row.offers is not None for row in rows):
        lines += ["", offers_note(load)]
    if replays:
        lines += ["", *replay_table(replays)]
    noisy = max((row.cpu.other for row in rows if row.cpu is not None), default=0.0)
    noisy = max([noisy, *(float(r.result["cpu_other"]) for r in replays if r.result)])
    if noisy > 0.25:
        lines += [
            "",
            f"**Warning:** other processes used up to {noisy:.0%} of a core during this run, "
            "competing for the same cores: absolute numbers are depressed; rerun on an idle "
            "machine for a clean baseline.",
        ]
    for reason in skipped:
        lines += ["", reason]
    lines += ["", "Goals (from the issue; reported, not asserted):", ""]
    polls = [r for r in rows if r.workload == "poll" and r.result is not None]
    for row in polls:
        ratio = row.ratio or 0.0
        met = "met" if ratio >= POLL_GOAL else "**not met**"
        cost = ""
        bare = next((r for r in rows if r.result is row.baseline), None)
        if bare is not None and bare.cpu_ms and row.cpu_ms:
            cost = f" (a poll costs {row.cpu_ms / bare.cpu_ms:.1f}x the server CPU of a bare GET)"
        lines.append(
            f"- poll ≥ {POLL_GOAL:.0%} of bare aiohttp on {row.backend}: {ratio:.0%}{cost} — {met}"
        )
    sqlite_submit = [r for r in rows if r.backend == "SQLite" and r.workload == "submit"]
    for row in sqlite_submit:
        met = "met" if row.rps >= SUBMIT_GOAL else "**not met**"
        cost = ""
        if row.cpu_ms:
            cost = (
                f" ({row.cpu_ms:.1f} ms of server CPU per job, so about "
                f"{1000 / row.cpu_ms:,.0f} jobs/s per fully busy core)"
            )
        lines.append(
            f"- submit ≥ {SUBMIT_GOAL:.0f} jobs/s on SQLite: {row.rps:,.0f} jobs/s{cost} — {met}"
        )
    for replay in replays:
        if replay.backend != "SQLite" or replay.result is None:
            continue
        met = "met" if replay.events_per_s >= REPLAY_GOAL else "**not met**"
        per_core = 1e6 / float(replay.result["cpu_us_per_event"])
        lines.append(
            f"- replay ≥ {REPLAY_GOAL:,.0f} events/s on SQLite ({replay.workload}): "
            f"{replay.events_per_s:,.0f} events/s ({per_core:,.0f} events/s per fully busy core) "
            f"— {met}"
        )
    lines += offers_scaling(rows)
    return "\n".join(lines) + "\n"


def replay_table(rows: list[ReplayRow]) -> list[str]:
    lines = [
        "| backend | workload | events | replay s | events/s | jobs/s | baseline events/s "
        "| % of baseline | CPU µs/event replay / db | CPU replay / db / other |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        r = row.result
        if r is None:
            lines.append(f"| {row.backend} | {row.workload} | {row.note} | | | | | | | |")
            continue
        db_us = "-" if r["db_us_per_event"] is None else f"{r['db_us_per_event']:.1f}"
        db = "-" if r["cpu_db"] is None else f"{r['cpu_db']:.0%}"
        lines.append(
            f"| {row.backend} | {row.workload} | {r['notifications']:,} "
            f"| {r['replay_seconds']:.1f} | {r['events_per_s']:,.0f} | {r['jobs_per_s']:,.0f} "
            f"| {r['baseline_events_per_s']:,.0f} | {r['ratio']:.0%} "
            f"| {r['cpu_us_per_event']:.1f} / {db_us} "
            f"| {r['cpu_process']:.0%} / {db} / {r['cpu_other']:.0%} |"
        )
    log = next((r.result["log"] for r in rows if r.result is not None), None)
    if log is not None:
        lines += ["", replay_note(log, int(rows[0].result["batch_size"]) if rows[0].result else 0)]
    return lines


def replay_note(log: dict[str, Any], batch_size: int) -> str:
    outcomes = sorted(log["outcomes"].items(), key=lambda kv: -kv[1])
    mix = ", ".join(f"{name.replace('_', ' ')} {n / log['jobs']:.0%}" for name, n in outcomes)
    return (
        "Replay rows (`python -m bench.replay`): every projection rebuilt from a log of "
        f"{log['jobs']:,} jobs ({log['notifications']:,} events, "
        f"{log['notifications'] / log['jobs']:.1f} per job), generated in-process through the "
        "real command side (`services.commands.Commands` over the real aggregates) by a "
        f"simulation of a busy market: 100 funded buyers, one seller with three offers, jobs "
        f"arriving at {log['rate']:g} per simulated second and driven as the worker drives them "
        f"(outcomes: {mix}), so one job's events are spread over a median of "
        f"{log['job_span_median']:,.0f} notifications, interleaved with other jobs' as a running "
        "engine writes them. The SQLite log is cached in `bench/.cache/`; the PostgreSQL one is "
        "a copy of it, event for event, kept in the database `mm_bench_replay`. Each row: "
        "fresh views in the storage `mediamarket replay --verify` rebuilds into (a temporary "
        "SQLite file written without fsyncs, or a temporary PostgreSQL schema), then that "
        "command's rebuild timed (`services.replay.rebuild`, batches of "
        f"{batch_size}: with two cores, the job views and the order book are folded in the "
        "bench process while a second process folds the ledger into scratch storage of its own, "
        "copied in at the end); events/s is notifications applied per second, jobs/s the log's "
        "jobs per second. The baseline is the event-store library's own read of the same log "
        "in the same batches, deserialising every event (`select_notifications` + "
        "`mapper.to_domain_event`) and projecting nothing; the runner reads through "
        "`adapters.logreader`, which does that work faster, and the rebuild uses two cores, so "
        "a replay can come close to it. CPU µs/event is the replay processes' (and the "
        "PostgreSQL backends') CPU time per event, which, like server CPU "
        "ms/req above, hardly depends on other load; the last column is in cores, as above. "
        "To see where a replay's time goes: `.venv/bin/python -m bench.replay --backend sqlite "
        "--profile`."
    )


def offers_note(load: Load) -> str:
    refreshes = load.duration / QUOTE_CACHE_SECONDS
    how_often = "at most once" if refreshes < 1.5 else f"about {refreshes:.0f} times"
    return (
        "Submit, N offers: a fresh engine per row, set up as above except that N sellers "
        "each put one offer on the model, each with its own simulator key (`sim_ok_bench_<n>`) "
        "and a cost multiplier spread over 0.50..0.95 in a fixed shuffled order (one offer: "
        "0.80); then only the submit load, the same as the submit row's. Routing prices every "
        "available offer on each submit, but the engine caches each quote per (seller key, "
        f"parameters) for {QUOTE_CACHE_SECONDS:g} s and every submit here has the same "
        "parameters, so after warm-up most submits hit the cache: the cached quotes expire "
        f"and are fetched again from the embedded simulator {how_often} in a "
        f"{load.duration:g} s measured window. These rows therefore mostly show what N offers "
        "cost a submit inside the engine, not N quote round trips. Their baseline is bare "
        "aiohttp's `POST /json`, like the submit row's; the list after the goals compares them "
        "with the 1-offer row of the same backend."
    )


def offers_scaling(rows: list[Row]) -> list[str]:
    """One line per backend: each offer count's rate, CPU and p99 relative to 1 offer."""
    lines: list[str] = []
    backends = dict.fromkeys(r.backend for r in rows if r.offers is not None)
    for backend in backends:
        mine = [r for r in rows if r.backend == backend and r.offers is not None and r.result]
        one = next((r for r in mine if r.offers == 1), None)
        if one is None or one.result is None or not one.rps:
            continue
        parts = []
        for row in mine:
            if row is one or row.result is None:
                continue
            part = f"{row.offers} offers: {row.rps / one.rps:.0%} of the 1-offer rate"
            if row.cpu_ms and one.cpu_ms:
                part += f", {row.cpu_ms / one.cpu_ms:.1f}x its server CPU per job"
            if row.result["p99_ms"] and one.result["p99_ms"]:
                part += f", {row.result['p99_ms'] / one.result['p99_ms']:.1f}x its p99"
            parts.append(part)
        if parts:
            lines.append(f"- {backend}: " + "; ".join(parts) + ".")
    if not lines:
        return []
    return ["", "Submit with more offers on the model, against 1 offer (same backend):", "", *lines]


def update_readme(path: Path, report: str) -> None:
    block = f"{START_MARK}\n{report}{END_MARK}"
    text = path.read_text() if path.exists() else ""
    start, end = text.find(START_MARK), text.find(END_MARK)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(END_MARK) :]
    else:
        if text and not text.endswith("\n"):
            text += "\n"
        text += ("\n" if text else "") + f"## Performance\n\n{block}\n"
    path.write_text(text)


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
        "--replay-jobs",
        type=int,
        metavar="N",
        help=f"jobs in the replay rows' log (default {REPLAY_JOBS:,}; {QUICK_REPLAY_JOBS:,} "
        "quick; 0 for no replay rows)",
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
    replay_jobs = args.replay_jobs
    if replay_jobs is None:
        replay_jobs = QUICK_REPLAY_JOBS if args.quick else REPLAY_JOBS
    max_wait = args.wait_quiet if args.wait_quiet is not None else (0.0 if args.quick else 60.0)
    if max_wait > 0:
        waited, busy = wait_for_quiet(max_wait)
        print(
            f"bench: machine busy {busy:.0%} of a core after waiting {waited:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    try:
        with tempfile.TemporaryDirectory(prefix="mm_bench_") as tmp:
            workdir = Path(tmp)
            print(
                f"bench: bare aiohttp baseline ({load.warmup:g}+{load.duration:g} s per row)",
                file=sys.stderr,
                flush=True,
            )
            baseline = measure_bare(procs, load, workdir)
            rows = list(baseline.values())
            print("bench: engine on SQLite", file=sys.stderr, flush=True)
            rows += measure_engine(
                procs,
                load,
                "SQLite",
                f"sqlite:///{workdir / 'data'}",
                workdir / "sqlite",
                baseline,
                args.buyers,
            )
            rows += measure_offers(
                procs,
                load,
                "SQLite",
                lambda engine_dir: contextlib.nullcontext(f"sqlite:///{engine_dir / 'data'}"),
                workdir / "sqlite",
                baseline,
                args.buyers,
                args.offers,
            )
            if args.no_postgres:
                skipped.append("PostgreSQL rows skipped: --no-postgres.")
            else:
                pg_version, why = postgres_version(args.postgres_url)
                if why is not None:
                    pg_problem = f"not reachable at {args.postgres_url} ({why})"
                    skipped.append(
                        f"PostgreSQL rows skipped: not reachable at {args.postgres_url} ({why})."
                    )
                    print(f"bench: {skipped[-1]}", file=sys.stderr, flush=True)
                else:
                    print("bench: engine on PostgreSQL", file=sys.stderr, flush=True)
                    before = len(rows)
                    try:
                        with postgres_database(args.postgres_url) as url:
                            rows += measure_engine(
                                procs,
                                load,
                                "PostgreSQL",
                                url,
                                workdir / "postgres",
                                baseline,
                                args.buyers,
                            )
                        rows += measure_offers(
                            procs,
                            load,
                            "PostgreSQL",
                            lambda _engine_dir: postgres_database(args.postgres_url),
                            workdir / "postgres",
                            baseline,
                            args.buyers,
                            args.offers,
                        )
                    except (RuntimeError, OSError, ImportError) as e:
                        which = "The other PostgreSQL" if len(rows) > before else "PostgreSQL"
                        skipped.append(f"{which} rows skipped: the run failed ({e}).")
                        print(f"bench: {skipped[-1]}", file=sys.stderr, flush=True)
            if replay_jobs > 0:
                print(
                    f"bench: replay of {replay_jobs:,} jobs' events (bench.replay)",
                    file=sys.stderr,
                    flush=True,
                )
                pg_url = None if pg_problem is not None else args.postgres_url
                replays = measure_replay(procs, replay_jobs, pg_url, pg_problem)
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    report = render(rows, load, args.buyers, args.quick, pg_version, skipped, replays)
    print(report)
    print(f"bench: done in {time.monotonic() - started:.0f} s", file=sys.stderr)
    if args.update_readme is not None:
        update_readme(args.update_readme, report)
        print(f"bench: updated {args.update_readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
