"""The servers under load, each its own process: the bare aiohttp baseline (``bench.bare``) and
``mediamarket serve --no-worker``, started, waited for, set up through the real admin and
seller API (a tiny HTTP client), and stopped."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.common import MODEL, ROOT
from bench.measure import Processes, free_port

BIN = Path(sys.executable).parent / "mediamarket"
ADMIN_TOKEN = "bench-admin-token"
SECRET_KEY = "bench-secret-key-0123456789abcdef"
SUBMIT_BODY = {"model": MODEL, "prompt": "bench"}


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


def answer_of(base: str, path: str, key: str | None = None) -> tuple[int, int]:
    """A GET's status and body size: what the poll row and its baseline must agree on."""
    req = urllib.request.Request(base + path)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, len(r.read())
    except urllib.error.HTTPError as e:
        return e.code, len(e.read())


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


# ---------------------------------------------------------------------- the baseline


@contextlib.contextmanager
def running_bare(procs: Processes, workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A ready ``bench.bare`` server: its process and base URL."""
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
        yield proc, base
    finally:
        procs.stop(proc)


# ---------------------------------------------------------------------- the engine


def engine_env(database_url: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIAMARKET_", "PROVIDER_"))}
    env.update(
        {
            # The engine of this checkout: the venv's editable install maps the packages to
            # wherever it was last installed from (another worktree sharing the venv, say).
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
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
    more), one finished (canceled) job, and what its poll answers: (status, body bytes)."""

    proc: subprocess.Popen[bytes]
    base: str
    log: Path
    keys: list[str]
    job_id: str
    db_name: str | None
    poll_answer: tuple[int, int]

    def workload(self, name: str) -> dict[str, Any]:
        """``run_load`` arguments for a workload ("poll" or "submit")."""
        if name == "poll":
            return {
                "method": "GET",
                "url": f"{self.base}/v1/video/generations/{self.job_id}",
                "ok": [200],
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


def start_api(
    procs: Processes, database_url: str, workdir: Path
) -> tuple[subprocess.Popen[bytes], str, Path]:
    """A ``serve --no-worker`` process starting on a free port: (process, base URL, log)."""
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
    return proc, f"http://127.0.0.1:{port}", log


@contextlib.contextmanager
def more_api(
    procs: Processes, database_url: str, workdir: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """One more API process on the database of a running, set-up engine (the production
    topology's second API process; PostgreSQL only): its process and base URL."""
    proc, base, log = start_api(procs, database_url, workdir)
    try:
        wait_ready(base, proc, log)
        yield proc, base
        if proc.poll() is not None:
            raise RuntimeError(f"server died during the run: {log.read_text()[-2000:]}")
    finally:
        procs.stop(proc)


@contextlib.contextmanager
def running_engine(
    procs: Processes, database_url: str, workdir: Path, buyers: int, offers: int = 1
) -> Iterator[EngineRun]:
    proc, base, log = start_api(procs, database_url, workdir)
    try:
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
        # Polled finished, as a client's last poll of a job is: no worker runs, so cancel it.
        path = f"/v1/video/generations/{job['id']}"
        expect(call(base, "DELETE", path, keys[0]), 200)
        poll_answer = answer_of(base, path, keys[0])
        db_name = None if database_url.startswith("sqlite") else database_url.rsplit("/", 1)[1]
        yield EngineRun(proc, base, log, keys, job["id"], db_name, poll_answer)
        if proc.poll() is not None:
            raise RuntimeError(f"server died during the run: {log.read_text()[-2000:]}")
    finally:
        procs.stop(proc)
