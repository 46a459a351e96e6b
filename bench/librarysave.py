"""The submit rows' library baseline: the event-store library's own ``Application.save`` of
what one submit saves (a new Job, its new Settlement and the buyer's hold), and nothing else.

    .venv/bin/python -m bench.librarysave sqlite:///tmp/x 2000

A submit cannot cost less than this save, so the difference between the two is the engine's
own overhead (HTTP, validation, routing, idempotency, group commit, the job's view). It runs in
a process of its own, one save after another on one thread, against a fresh store of the same
backend and settings the engine uses (``adapters.eventstore.store_env``), with the real
aggregates and a request, route and hold like the submit row's. Prints one JSON line: saves,
wall and CPU seconds, and per-save latency percentiles.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from typing import Any
from urllib.parse import urlparse

from eventsourcing.application import Application

from adapters.crypto import Secrets, sha256_hex
from adapters.eventstore import store_env
from adapters.simulator import models_payload
from adapters.venice import parse_venice_models
from bench.common import MODEL, ROOT
from bench.measure import Cpu, Processes, busy_seconds, db_seconds, rest_of_machine
from bench.report import LIBRARY_SAVE, Row
from domain.aggregates import BuyerAccount, Job, Settlement
from domain.catalog import Catalog, VideoRequest
from services.routing import request_data

HOLD = 211_200  # the one-offer submit's hold: ceil(192,000 x 1.10) microdollars
ROUTE = [
    {
        "offer_id": str(uuid.UUID(int=1)),
        "seller_id": str(uuid.UUID(int=2)),
        "cost_multiplier": "0.80",
        "list_price": 240_000,
        "seller_cost": 192_000,
        "buyer_cost": 192_000,
    }
]
ROUTING = {"considered": 1, "skipped": []}


def run(database_url: str, saves: int, warmup: int = 100) -> dict[str, Any]:
    # The engine's own settings for this backend, without its aggregate cache (the account
    # stays in hand here, as the engine's per-process account cache keeps it).
    app: Application[uuid.UUID] = Application(env=store_env(database_url))
    secrets = Secrets("bench-library-save-key-0123456789")
    model = Catalog(parse_venice_models("venice", models_payload()["data"])).resolve(MODEL)
    assert model is not None, MODEL
    video = VideoRequest.on_model(model, prompt="bench")
    request, fingerprint = request_data(video), video.fingerprint()
    buyer = BuyerAccount(id=uuid.uuid4(), name="bench", api_key_hash=sha256_hex("bench"))
    buyer.deposit(HOLD * (saves + warmup + 1), "bench-deposit")
    app.save(buyer)

    def one() -> None:
        job_id = uuid.uuid4()
        now = int(time.time())
        job = Job(
            id=job_id,
            buyer_id=str(buyer.id),
            request=request,
            fingerprint=fingerprint,
            token_hash=sha256_hex(secrets.job_token(str(job_id))),
            created=now,
            expires_at=now + 3600,
            estimated_cost=192_000,
            max_cost=HOLD,
            route=ROUTE,
            min_discount=None,
            routing=ROUTING,
        )
        settlement = Settlement.for_job(job_id, str(buyer.id), HOLD)
        buyer.hold(job_id, HOLD)
        app.save(job, settlement, buyer)

    for _ in range(warmup):
        one()
    latencies = []
    # The database's backends are read here, while they live: they end with the app.
    db_names = [urlparse(database_url).path.lstrip("/")] if is_postgres(database_url) else []
    db0 = db_seconds(*db_names)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(saves):
        t0 = time.perf_counter()
        one()
        latencies.append(time.perf_counter() - t0)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    db = db_seconds(*db_names) - db0
    app.close()
    latencies.sort()
    return {
        "saves": saves,
        "wall_s": wall,
        "cpu_s": cpu,
        "db_cpu_s": db if db_names else None,
        "ok_rps": saves / wall,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
        "errors": 0,
        "error_statuses": {},
    }


def is_postgres(database_url: str) -> bool:
    return urlparse(database_url).scheme in ("postgresql", "postgres")


def measure(procs: Processes, database_url: str, saves: int) -> Row:
    """The baseline row from a process of its own, with who used the CPU meanwhile."""
    backend = "PostgreSQL" if is_postgres(database_url) else "SQLite"
    busy0 = busy_seconds()
    proc = procs.start(
        [sys.executable, "-m", "bench.librarysave", database_url, str(saves)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        procs.stop(proc)
    busy = busy_seconds() - busy0
    if proc.returncode != 0:
        return Row(backend, LIBRARY_SAVE, None, note=f"failed (exit {proc.returncode})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    # Shares of its timed saves' wall time, like the load rows' (the rest of the machine is
    # an upper bound: it counts the untimed start and warm-up too).
    wall, db = result["wall_s"], result["db_cpu_s"]
    other = rest_of_machine(busy, result["cpu_s"], db or 0.0) / wall
    cpu = Cpu(result["cpu_s"] / wall, None if db is None else db / wall, 0.0, other)
    return Row(backend, LIBRARY_SAVE, result, None, cpu)


if __name__ == "__main__":
    url, count = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    print(json.dumps(run(url, count)))
