"""The SSE fan-out row: N concurrent ``/stream`` clients on one job of one engine.

``measure_sse`` starts ``mediamarket serve --no-worker`` (the job stays queued), then one client
process (``python -m bench.sse CLIENT-SPEC``) that opens N event streams on the job and says
"ready" once every stream has its first event. The server's CPU and RSS are then read over an
idle window (every client waiting: it should use nothing), the job is canceled through the API,
and read again until every client has its terminal event and the end of its stream.

The client is plain asyncio on raw sockets, so a thousand streams cost it little.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT
from bench.measure import Processes, cpu_seconds
from bench.servers import SUBMIT_BODY, call, expect, running_engine


@dataclass(frozen=True)
class SseResult:
    clients: int
    idle_seconds: float
    idle_cpu: float  # cores, over the idle window
    base_cpu: float  # cores, over as long a window before any stream opened
    rss_before_mb: float  # before the streams opened
    rss_idle_mb: float  # with every stream open and waiting
    change_cpu_s: float  # server CPU seconds from the cancel to the last stream's end
    fanout_ms: float  # from the cancel to the last client's terminal event
    delivered: int  # clients that got the terminal event


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def measure_sse(
    procs: Processes, database_url: str, workdir: Path, clients: int, idle_seconds: float
) -> SseResult:
    with running_engine(procs, database_url, workdir, buyers=1) as engine:
        # A job of its own, queued: the setup's job is canceled for the poll row, and a
        # stream of a finished job ends after its one event.
        job_id = expect(
            call(engine.base, "POST", "/v1/video/generations", engine.keys[0], SUBMIT_BODY), 202
        )["id"]
        rss_before = rss_mb(engine.proc.pid)
        # The same window with no stream open: what the process spends idle anyway (its
        # projection runner tailing the log), for comparison.
        cpu0, t0 = cpu_seconds(engine.proc.pid), time.monotonic()
        time.sleep(idle_seconds)
        base_cpu = (cpu_seconds(engine.proc.pid) - cpu0) / (time.monotonic() - t0)
        spec = {
            "base": engine.base,
            "path": f"/v1/video/generations/{job_id}/stream",
            "key": engine.keys[0],
            "clients": clients,
        }
        client = procs.start(
            [sys.executable, "-m", "bench.sse", json.dumps(spec)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        try:
            assert client.stdout is not None
            ready = json.loads(client.stdout.readline() or b"{}")
            if ready.get("ready") != clients:
                raise RuntimeError(f"the SSE clients did not all connect: {ready}")
            cpu0, t0 = cpu_seconds(engine.proc.pid), time.monotonic()
            time.sleep(idle_seconds)
            cpu1, t1 = cpu_seconds(engine.proc.pid), time.monotonic()
            rss_idle = rss_mb(engine.proc.pid)
            canceled_at = time.monotonic()
            expect(
                call(
                    engine.base,
                    "DELETE",
                    f"/v1/video/generations/{job_id}",
                    engine.keys[0],
                ),
                200,
            )
            done = json.loads(client.stdout.readline() or b"{}")
            cpu2 = cpu_seconds(engine.proc.pid)
            client.wait(timeout=60)
        finally:
            procs.stop(client)
    return SseResult(
        clients=clients,
        idle_seconds=t1 - t0,
        idle_cpu=(cpu1 - cpu0) / (t1 - t0),
        base_cpu=base_cpu,
        rss_before_mb=rss_before,
        rss_idle_mb=rss_idle,
        change_cpu_s=cpu2 - cpu1,
        fanout_ms=max(0.0, (float(done.get("last_at", canceled_at)) - canceled_at) * 1000),
        delivered=int(done.get("done", 0)),
    )


# ---------------------------------------------------------------------- the client process


async def _one(
    host: str, port: int, request: bytes, first: asyncio.Event, counts: dict[str, Any]
) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        errors = counts["errors"]
        errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        raise
    writer.write(request)
    await writer.drain()
    got_first = False
    head = b""
    try:
        while line := await reader.readline():
            if not head:
                head = line.strip()
            if not line.startswith(b"data:"):
                continue
            status = json.loads(line[5:])["status"]
            if not got_first:
                got_first = True
                counts["ready"] += 1
                if counts["ready"] == counts["clients"]:
                    first.set()
            if status in ("canceled", "succeeded", "failed", "expired"):
                counts["done"] += 1
                counts["last_at"] = time.monotonic()
    finally:
        writer.close()
        if not got_first:
            # Ended before its first event: what the server answered instead.
            errors = counts["errors"]
            what = head.decode("latin-1")[:80] or "closed"
            errors[what] = errors.get(what, 0) + 1


async def _clients(spec: dict[str, Any]) -> None:
    base = spec["base"].removeprefix("http://")
    host, port = base.split(":")
    request = (
        f"GET {spec['path']} HTTP/1.1\r\nHost: {base}\r\n"
        f"Authorization: Bearer {spec['key']}\r\nAccept: text/event-stream\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    counts: dict[str, Any] = {
        "clients": spec["clients"],
        "ready": 0,
        "done": 0,
        "last_at": 0.0,
        "errors": {},
    }
    first = asyncio.Event()
    tasks = []
    # Connect in slices, so the server's accept backlog never overflows.
    for n in range(spec["clients"]):
        tasks.append(asyncio.create_task(_one(host, int(port), request, first, counts)))
        if n % 100 == 99:
            await asyncio.sleep(0.01)
    waiting = asyncio.create_task(first.wait())
    await asyncio.wait([waiting, *tasks], return_when=asyncio.FIRST_COMPLETED, timeout=60)
    print(json.dumps({"ready": counts["ready"], "errors": counts["errors"]}), flush=True)
    await asyncio.wait(tasks, timeout=60)
    print(json.dumps({"done": counts["done"], "last_at": counts["last_at"]}), flush=True)


if __name__ == "__main__":
    asyncio.run(_clients(json.loads(sys.argv[1])))
