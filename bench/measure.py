"""Measurement: the child processes a run starts, who used the CPU (from /proc), and one load
generator (``bench.load``) driven against one server."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT

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


# ---------------------------------------------------------------------- CPU, from /proc


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


def db_seconds(*db_names: str) -> float:
    """CPU seconds of the PostgreSQL backends connected to any of ``db_names`` (by process
    title); 0 without names, without reading /proc."""
    if not db_names:
        return 0.0
    titles = [f" {name} ".encode() for name in db_names]
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes()
            if any(title in cmdline for title in titles):
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


def rest_of_machine(busy: float, *accounted: float) -> float:
    """CPU seconds the machine was busy beyond what was ``accounted`` for: other processes
    competing for the same cores."""
    return max(0.0, busy - sum(accounted))


# ---------------------------------------------------------------------- one load generator


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


def run_load(
    procs: Processes,
    server: subprocess.Popen[bytes] | list[subprocess.Popen[bytes]],
    load: Load,
    *,
    method: str,
    url: str | list[str],
    ok: list[int],
    keys: list[str] | None = None,
    body: Any = None,
    db_name: str | None = None,
    keys_by_url: bool = False,
) -> tuple[dict[str, Any], Cpu]:
    """One load-generator process against one server, or against several (``url`` a list, the
    connections dealt out over them; ``server`` their processes, whose CPU is added up): its
    result and who used the CPU."""
    servers = server if isinstance(server, list) else [server]
    urls = url if isinstance(url, list) else [url]
    spec = {
        "method": method,
        "url": urls[0],
        "urls": urls,
        "keys_by_url": keys_by_url,
        "keys": keys,
        "body": body,
        "ok_statuses": [str(s) for s in ok],
        "concurrency": load.concurrency,
        "warmup": load.warmup,
        "duration": load.duration,
        "max_requests": 2_000_000,
    }
    db_names = () if db_name is None else (db_name,)
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    db0 = db_seconds(*db_names)
    busy0, t0 = busy_seconds(), time.monotonic()
    cpu0 = sum(cpu_seconds(s.pid) for s in servers)
    gen = procs.start(
        [sys.executable, "-m", "bench.load", json.dumps(spec)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        out, _ = gen.communicate(timeout=load.warmup + load.duration + 60)
    finally:
        procs.stop(gen)
    busy1, t1 = busy_seconds(), time.monotonic()
    cpu1 = sum(cpu_seconds(s.pid) for s in servers)
    db1 = db_seconds(*db_names)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if gen.returncode != 0:
        raise RuntimeError(f"load generator failed ({gen.returncode})")
    wall = t1 - t0
    loader = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    used, db = cpu1 - cpu0, db1 - db0
    other = rest_of_machine(busy1 - busy0, used, db, loader)
    result = json.loads(out.decode().strip().splitlines()[-1])
    cpu = Cpu(used / wall, None if db_name is None else db / wall, loader / wall, other / wall)
    return result, cpu
