"""Proof by simulation: a seeded, replayable random run of the whole engine (issue 4, point 5).

In the spirit of TigerBeetle's VOPR. One integer seed drives ``random.Random(seed)``, which writes
a *plan*: buyers and deposits (some too small, so submits get 402), sellers and offers on every
simulator magic key at various multipliers and concurrency limits, PATCHes and deletions of
offers, submits (models, durations, resolutions, audio, ``/min{N}/`` prefixes, repeated and
conflicting Idempotency-Keys, concurrent duplicates), cancels of recent and older jobs, pauses
that let jobs finish or expire, and SIGKILLs of worker processes at chosen points. The API runs
as ``serve --no-worker``; the work is done by separate ``mediamarket worker`` processes.

The plan is executed against a real engine (SQLite and PostgreSQL) while invariants are checked
through the API: during the run every buyer's ``available + held + spent == deposited`` and
``available >= 0``, every job's charge stays within its hold, and a job seen terminal never
changes again; after the run (every job terminal) the money invariants of SPEC 1 per buyer and
per job, seller earnings against the jobs and the offers, market volume, the simulator's billing
against what the marketplace charged, and no capacity left held. Then ``mediamarket ledger
reconcile`` and ``mediamarket replay --verify`` must both exit 0.

What the seed reproduces, honestly: the plan (the sequence of operations, their arguments and
the crash points) is a pure function of the seed and the op count, printed in full on failure,
with the command to rerun just that seed. What it does not: the timing of threads, processes and
HTTP is real, so where a crash lands inside a worker's step and how the engine's concurrent work
interleaves differ from one run to the next. A failing seed is therefore a strong lead, usually
reproducing the failure, not a bit-for-bit replay. Run more seeds with ``MM_VOPR_SEED=random``
(the chosen seed is printed in the report) in a loop; ``MM_VOPR_OPS`` sets the plan's
length.

Worker takeover: a job's lease lasts ``services.worker.LEASE_SECONDS`` (60 s, not configurable),
and only the holder of a live lease may drive the job. A crashed worker here is restarted under
its own ``WORKER_ID`` (a process supervisor restarting a pod with a stable identity), which takes
its leases back at once; the other worker keeps working meanwhile. Takeover by a *different*
worker after a lease runs out would need a minute per crash, beyond this test's budget.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import Any

import pytest

from adapters.crypto import sha256_hex
from domain.rules import JOB_FAILURE_CODES
from tests.harness import ADMIN_TOKEN, BIN, Client, Response, Server
from tests.test_lifecycle import (
    PENDING,
    TERMINAL,
    ServerFactory,
    assert_money_invariants,
    list_jobs,
)

SEED_ENV = "MM_VOPR_SEED"
OPS_ENV = "MM_VOPR_OPS"
# Different default seeds per backend cover more plans per suite run; both are fixed so the
# suite asks the same of the engine every time. Both were picked for plans whose jobs end in
# all four terminal states.
DEFAULT_SEEDS = {"sqlite": 3, "postgres": 8}
DEFAULT_OPS = {"sqlite": 240, "postgres": 150}
WORKERS = 2
TTL_SECONDS = 5
ENGINE_ENV = {
    "JOB_TTL_SECONDS": str(TTL_SECONDS),
    "SIM_RENDER_SECONDS": "0.4",
    "PROVIDER_QUEUE_TIMEOUT_SECONDS": "1",
}

# --------------------------------------------------------------------------- the catalog

SEEDANCE = "venice-seedance-2-fast-t2v"
RUNWAY = "venice-runway-gen4-5-text"
PIXVERSE = "venice-pixverse-c1-t2v"
WAN = "venice-wan-2-5-i2v"
ALIAS = "venice-video-gen"


@dataclass(frozen=True)
class ModelSpec:
    durations: tuple[int, ...]
    usd_per_second: dict[str, str]
    audio: bool = False
    image: bool = False


# SPEC 5.2: the simulator's fixed catalog and prices, so every list price is known exactly.
CATALOG = {
    RUNWAY: ModelSpec((5, 10), {"720p": "0.10", "1080p": "0.15"}),
    SEEDANCE: ModelSpec((4, 6, 8, 12), {"480p": "0.04", "720p": "0.06", "1080p": "0.10"}, True),
    PIXVERSE: ModelSpec((5, 8), {"720p": "0.05", "1080p": "0.09"}, True),
    WAN: ModelSpec((5, 10), {"480p": "0.03", "720p": "0.05", "1080p": "0.085"}, image=True),
}
HEIGHTS = {"480p": (854, 480), "720p": (1280, 720), "1080p": (1920, 1080)}
SUBMIT_MODELS = [SEEDANCE, ALIAS, RUNWAY, PIXVERSE, WAN]
SUBMIT_MODEL_WEIGHTS = [4, 2, 3, 3, 1]
OFFER_MODELS = [SEEDANCE, RUNWAY, PIXVERSE, WAN]
OFFER_MODEL_WEIGHTS = [4, 3, 3, 1]

REFUSING_KEYS = ("sim_401", "sim_402", "sim_429", "sim_queue_timeout")
MAGIC_KEYS = (
    "sim_ok",
    *REFUSING_KEYS,
    "sim_fail_inference",
    "sim_content_policy",
    "sim_flaky",
    "sim_never",
)
MULTIPLIERS = ["0.05", "0.30", "0.50", "0.70", "0.75", "0.80", "0.85", "0.90", "1.00"]
SUBMIT_REFUSALS = {
    402: {"insufficient_balance"},
    404: {"no_sellers_for_model"},
    503: {"no_healthy_sellers", "minimum_discount_not_met"},
}


def resolve(model: str) -> str:
    return SEEDANCE if model == ALIAS else model


def list_price(body: dict[str, Any]) -> int:
    """The provider's price for a request in microdollars, rounded up (SPEC 1, 5.2)."""
    spec = CATALOG[resolve(body["model"])]
    resolution = body.get("resolution") or next(iter(spec.usd_per_second))
    seconds = body.get("duration_seconds") or min(spec.durations)
    usd = Decimal(spec.usd_per_second[resolution]) * seconds
    if body.get("audio"):
        usd *= Decimal("1.25")
    return int((usd * 1_000_000).to_integral_value(ROUND_CEILING))


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Op:
    index: int
    kind: str
    args: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"#{self.index:03d} {self.kind} {json.dumps(self.args, sort_keys=True)}"


def _amount(rng: random.Random) -> int:
    # Small amounts make the 402 path common; large ones keep most buyers trading.
    return rng.choice([0, 1, 60_000, 200_000, 500_000, 2_000_000, 8_000_000])


def _offer_args(rng: random.Random, sellers: int) -> dict[str, Any]:
    seller = rng.randrange(sellers)
    key = rng.choice([*MAGIC_KEYS, f"sim_ok_seller{seller}", f"sim_ok_seller{seller}"])
    return {
        "seller": seller,
        "model": rng.choices(OFFER_MODELS, OFFER_MODEL_WEIGHTS)[0],
        "api_key": key,
        "cost_multiplier": rng.choice(MULTIPLIERS),
        "max_concurrent_jobs": rng.choice([None, None, 1, 2, 3]),
    }


def _submit_args(rng: random.Random, index: int, buyers: int) -> dict[str, Any]:
    model = rng.choices(SUBMIT_MODELS, SUBMIT_MODEL_WEIGHTS)[0]
    spec = CATALOG[resolve(model)]
    body: dict[str, Any] = {"model": model, "prompt": f"vopr op {index}: a lighthouse at dusk"}
    if rng.random() < 0.5:
        body["duration_seconds"] = rng.choice(spec.durations)
    if rng.random() < 0.5:
        body["resolution"] = rng.choice(sorted(spec.usd_per_second))
    if spec.audio and rng.random() < 0.2:
        body["audio"] = True
    if spec.image:
        body["image_url"] = "https://example.com/first-frame.png"
    if rng.random() < 0.2:
        body["metadata"] = {"op": str(index)}
    return {
        "buyer": rng.randrange(buyers),
        "body": body,
        "min": rng.choice([0, 10, 20, 30, 50, 70, 95]) if rng.random() < 0.25 else None,
        "idem": f"vopr-{index}" if rng.random() < 0.3 else None,
    }


def make_plan(seed: int, n_ops: int) -> list[Op]:
    """The operations a seed stands for: a pure function of ``seed`` and ``n_ops``.

    Targets are indices into what the plan itself created (the k-th submit, the j-th offer),
    never into what the engine answered, so the plan does not depend on timing.
    """
    rng = random.Random(seed)
    plan: list[Op] = []
    n = Counter[str]()
    keyed_submits: list[int] = []  # plan indices of submits that carried an Idempotency-Key
    submits: list[int] = []
    down: dict[int, int] = {}  # crashed worker -> plan length at which it is restarted

    def emit(kind: str, **args: Any) -> None:
        plan.append(Op(len(plan), kind, args))

    for _ in range(rng.randint(2, 4)):
        emit("new_buyer", deposit=rng.choice([60_000, 2_000_000, 8_000_000]))
        n["buyers"] += 1
    for _ in range(rng.randint(2, 3)):
        emit("new_seller")
        n["sellers"] += 1
    for _ in range(rng.randint(3, 6)):
        emit("new_offer", **_offer_args(rng, n["sellers"]))
        n["offers"] += 1

    kinds = {
        "submit": 34,
        "replay": 4,
        "conflict": 2,
        "burst": 2,
        "cancel": 12,
        "deposit": 5,
        "new_buyer": 2,
        "new_seller": 1,
        "new_offer": 5,
        "patch_offer": 5,
        "delete_offer": 1,
        "crash": 3,
        "sleep": 7,
        "check": 4,
    }
    names, weights = list(kinds), list(kinds.values())
    while len(plan) < n_ops:
        for worker, back_at in sorted(down.items()):
            if len(plan) >= back_at:
                emit("restart_worker", worker=worker)
                del down[worker]
        kind = rng.choices(names, weights)[0]
        if kind == "submit":
            submits.append(len(plan))
            args = _submit_args(rng, len(plan), n["buyers"])
            if args["idem"] is not None:
                keyed_submits.append(len(plan))
            emit("submit", **args)
        elif kind in ("replay", "conflict") and keyed_submits:
            original = plan[rng.choice(keyed_submits)]
            args = json.loads(json.dumps(original.args))
            if kind == "conflict":
                args["body"]["prompt"] += " (another body)"
            submits.append(len(plan))
            emit("submit", **args, of=original.index)
        elif kind == "burst":
            submits.append(len(plan))
            args = _submit_args(rng, len(plan), n["buyers"])
            emit("burst", **{**args, "idem": f"vopr-burst-{len(plan)}"}, copies=3)
        elif kind == "cancel" and submits:
            # Mostly the latest submits (cancelled before dispatch), sometimes older ones.
            back = min(int(rng.expovariate(1 / 3)), len(submits) - 1)
            emit("cancel", submit=submits[-1 - back], auth=rng.choice(["key", "job_token"]))
        elif kind == "deposit":
            emit("deposit", buyer=rng.randrange(n["buyers"]), amount=_amount(rng) or 1)
        elif kind == "new_buyer":
            emit("new_buyer", deposit=_amount(rng))
            n["buyers"] += 1
        elif kind == "new_seller":
            emit("new_seller")
            n["sellers"] += 1
        elif kind == "new_offer":
            emit("new_offer", **_offer_args(rng, n["sellers"]))
            n["offers"] += 1
        elif kind == "patch_offer":
            change = rng.choice(
                [
                    {"api_key": rng.choice(MAGIC_KEYS)},
                    {"api_key": "sim_ok"},
                    {"cost_multiplier": rng.choice(MULTIPLIERS)},
                    {"max_concurrent_jobs": rng.choice([None, 1, 2, 4])},
                    {"paused": True},
                    {"paused": False},
                ]
            )
            emit("patch_offer", offer=rng.randrange(n["offers"]), change=change)
        elif kind == "delete_offer":
            emit("delete_offer", offer=rng.randrange(n["offers"]))
        elif kind == "crash":
            up = [w for w in range(WORKERS) if w not in down]
            if up:
                worker = rng.choice(up)
                emit("crash_worker", worker=worker)
                down[worker] = len(plan) + rng.choice([0, 0, 1, 2, 4, 8])
        elif kind == "sleep":
            emit("sleep", seconds=rng.choice([0.05, 0.1, 0.3, 0.6, 1.0, 2.0]))
        elif kind == "check":
            emit("check")
    for worker in sorted(down):
        emit("restart_worker", worker=worker)
    return plan


# --------------------------------------------------------------------------- processes


@dataclass
class WorkerProcess:
    """A ``mediamarket worker`` with a stable WORKER_ID, so a restart takes its leases back."""

    worker_id: str
    env: dict[str, str]
    cwd: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.cwd / f"{self.worker_id}.log"

    def start(self) -> None:
        assert self.proc is None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN), "worker"],
                cwd=self.cwd,
                env={**self.env, "WORKER_ID": self.worker_id},
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        """SIGKILL: no chance to finish a step, release a lease or flush anything."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self.proc = None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"worker {self.worker_id} exited by itself: {tail(self.log_path)}")


def tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"({path} missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_check(api: Server, *args: str) -> list[str]:
    """Run a verification command against the live engine; its report when it fails."""
    result = api.cli(*args, timeout=120)
    if result.returncode == 0:
        return []
    return [
        f"`mediamarket {' '.join(args)}` exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    ]


def command_available(command: str) -> bool:
    result = subprocess.run([str(BIN), command, "--help"], capture_output=True, timeout=60)
    return result.returncode == 0


# --------------------------------------------------------------------------- the run


@dataclass
class Buyer:
    id: str
    key: str
    deposited: int
    job_ids: set[str] = field(default_factory=set)


@dataclass
class Seller:
    id: str
    key: str
    provider_keys: set[str] = field(default_factory=set)
    deleted_an_offer: bool = False


@dataclass
class OfferRecord:
    id: str
    seller: int
    deleted: bool = False


@dataclass
class JobRecord:
    buyer: int
    body: dict[str, Any]
    token: str
    list_price: int
    max_cost: int


class Vopr:
    def __init__(self, api: Server, workers: list[WorkerProcess]) -> None:
        self.api = api
        self.c: Client = api.client
        self.workers = workers
        self.buyers: list[Buyer] = []
        self.sellers: list[Seller] = []
        self.offers: list[OfferRecord] = []
        self.submitted: dict[int, str] = {}  # plan index of a submit -> the job it created
        self.jobs: dict[str, JobRecord] = {}
        self.terminal: dict[str, tuple[str, dict[str, Any]]] = {}
        # (buyer, Idempotency-Key) -> (the body that first created a job, that job's id)
        self.keys: dict[tuple[int, str], tuple[dict[str, Any], str]] = {}
        self.log: list[str] = []
        self.answers: Counter[str] = Counter()  # how submits were answered, for the summary

    # ------------------------------------------------------------------ driving

    def run(self, plan: list[Op]) -> None:
        for op in plan:
            self.log.append(str(op))
            outcome = getattr(self, f"op_{op.kind}")(**op.args, op=op)
            self.log[-1] += f"  -> {outcome}"
            for worker in self.workers:
                worker.check_alive()

    def op_new_buyer(self, deposit: int, op: Op) -> str:
        buyer_id, key = self.c.create_buyer(deposit_usdc=deposit, name=f"buyer {op.index}")
        self.buyers.append(Buyer(buyer_id, key, deposit))
        return f"buyer {len(self.buyers) - 1}"

    def op_deposit(self, buyer: int, amount: int, op: Op) -> str:
        b = self.buyers[buyer]
        r = self.c.post(
            f"/admin/buyers/{b.id}/deposits",
            key=ADMIN_TOKEN,
            json_body={"amount_usdc": str(amount)},
        )
        expect(r.status == 201, "deposit refused", r)
        b.deposited += amount
        balance = r.json()["balance"]
        self.check_balance(buyer, balance)
        return f"available {balance['available_usdc']}"

    def op_new_seller(self, op: Op) -> str:
        seller_id, key = self.c.create_seller(name=f"seller {op.index}")
        self.sellers.append(Seller(seller_id, key))
        return f"seller {len(self.sellers) - 1}"

    def op_new_offer(
        self,
        seller: int,
        model: str,
        api_key: str,
        cost_multiplier: str,
        max_concurrent_jobs: int | None,
        op: Op,
    ) -> str:
        s = self.sellers[seller]
        offer = self.c.create_offer(
            s.key, model, api_key, cost_multiplier, max_concurrent_jobs=max_concurrent_jobs
        )
        s.provider_keys.add(api_key)
        self.offers.append(OfferRecord(offer["id"], seller))
        return f"offer {len(self.offers) - 1} {offer['id'][:8]}"

    def op_patch_offer(self, offer: int, change: dict[str, Any], op: Op) -> str:
        o = self.offers[offer]
        s = self.sellers[o.seller]
        r = self.c.patch(f"/v1/seller/offers/{o.id}", key=s.key, json_body=change)
        if o.deleted:
            expect(r.status == 404, "PATCH of a deleted offer", r)
            return "404 (deleted)"
        expect(r.status == 200, "PATCH refused", r)
        if "api_key" in change:
            s.provider_keys.add(change["api_key"])
        doc = r.json()
        return f"{doc['state']} x{doc['cost_multiplier']} max={doc['max_concurrent_jobs']}"

    def op_delete_offer(self, offer: int, op: Op) -> str:
        o = self.offers[offer]
        s = self.sellers[o.seller]
        r = self.c.delete(f"/v1/seller/offers/{o.id}", key=s.key)
        expect(r.status == (404 if o.deleted else 200), "DELETE of an offer", r)
        o.deleted = s.deleted_an_offer = True
        return str(r.status)

    def op_submit(
        self,
        buyer: int,
        body: dict[str, Any],
        min: int | None,
        idem: str | None,
        op: Op,
        of: int | None = None,
    ) -> str:
        r = self._post_submit(buyer, body, min, idem)
        return self._judge_submit(op, buyer, body, min, idem, [r])

    def op_burst(
        self,
        buyer: int,
        body: dict[str, Any],
        min: int | None,
        idem: str,
        copies: int,
        op: Op,
    ) -> str:
        # Concurrent duplicates must create exactly one job (SPEC 4.1).
        with ThreadPoolExecutor(copies) as pool:
            responses = list(
                pool.map(lambda _: self._post_submit(buyer, body, min, idem), range(copies))
            )
        return self._judge_submit(op, buyer, body, min, idem, responses)

    def _post_submit(
        self, buyer: int, body: dict[str, Any], min_discount: int | None, idem: str | None
    ) -> Response:
        prefix = "" if min_discount is None else f"/min{min_discount}"
        headers = {"Idempotency-Key": idem} if idem is not None else None
        return self.c.post(
            f"{prefix}/v1/video/generations",
            key=self.buyers[buyer].key,
            json_body=body,
            headers=headers,
        )

    def _judge_submit(
        self,
        op: Op,
        buyer: int,
        body: dict[str, Any],
        min_discount: int | None,
        idem: str | None,
        responses: list[Response],
    ) -> str:
        remembered = self.keys.get((buyer, idem)) if idem is not None else None
        if remembered is not None:
            first_body, job_id = remembered
            for r in responses:
                if first_body == body:
                    expect(r.status == 202, "an idempotent replay was not answered 202", r)
                    expect(r.json()["id"] == job_id, "a replay returned another job", r)
                    expect(r.headers.get("idempotent-replayed") == "true", "no replay header", r)
                else:
                    expect(r.status == 422, "a reused key with another body was accepted", r)
                    expect(error_code(r) == "idempotency_key_reused", "wrong 422 code", r)
            self.submitted[op.index] = job_id
            self.answers["replay"] += len(responses)
            what = "replay" if first_body == body else "key reused"
            return f"{responses[0].status} {what} of {job_id[:8]}"
        created: set[str] = set()
        for r in responses:
            self.answers[f"{r.status} {error_code(r) or ''}".strip()] += 1
            if r.status != 202:
                codes = SUBMIT_REFUSALS.get(r.status, set())
                expect(error_code(r) in codes, "unexpected submit answer", r)
                continue
            doc = r.json()
            created.add(doc["id"])
            expect(len(created) == 1, "concurrent duplicates created more than one job", r)
            self._check_new_job(doc, body, min_discount, r)
            if doc["id"] not in self.jobs:
                self.jobs[doc["id"]] = JobRecord(
                    buyer, body, doc["job_token"], list_price(body), int(doc["max_cost_usdc"])
                )
                self.buyers[buyer].job_ids.add(doc["id"])
        if not created:
            return " ".join(f"{r.status} {error_code(r)}" for r in responses)
        [job_id] = created
        self.submitted[op.index] = job_id
        if idem is not None:
            self.keys[(buyer, idem)] = (body, job_id)
        return f"202 job {job_id[:8]} " + ",".join(str(r.status) for r in responses)

    def _check_new_job(
        self, doc: dict[str, Any], body: dict[str, Any], min_discount: int | None, r: Response
    ) -> None:
        price = list_price(body)
        estimated, max_cost = int(doc["estimated_cost_usdc"]), int(doc["max_cost_usdc"])
        # The hold is the estimate plus 10%, or the same margin on the first failover's price
        # when that is dearer (services/routing.py, Route.holds); no offer costs over the list.
        holds_ok = ceil_div(estimated * 11, 10) <= max_cost <= ceil_div(price * 11, 10)
        expect(holds_ok, f"max_cost outside [1.1 * estimate, 1.1 * list {price}]", r)
        # Multipliers are 0.05..1.00 and there are no fees: the estimate is within the list.
        expect(ceil_div(price * 5, 100) <= estimated <= price, "estimate outside the list", r)
        if min_discount is not None:
            met = (price - estimated) * 100 >= min_discount * price
            expect(met, f"/min{min_discount} routed below its discount (list {price})", r)
        expect(doc["expires_at"] - doc["created"] == TTL_SECONDS, "wrong expires_at", r)
        self.observe(doc)

    def op_cancel(self, submit: int, auth: str, op: Op) -> str:
        job_id = self.submitted.get(submit)
        if job_id is None:
            return "no job (that submit was refused)"
        job = self.jobs[job_id]
        if auth == "key":
            r = self.c.delete(f"/v1/video/generations/{job_id}", key=self.buyers[job.buyer].key)
        else:
            r = self.c.delete(f"/v1/video/generations/{job_id}", headers={"X-Job-Token": job.token})
        expect(r.status == 200, "cancel refused", r)
        doc = r.json()
        self.observe(doc)
        return f"{doc['status']} {doc['usage']['settlement_status']} {job_id[:8]}"

    def op_crash_worker(self, worker: int, op: Op) -> str:
        self.workers[worker].kill()
        return "SIGKILL"

    def op_restart_worker(self, worker: int, op: Op) -> str:
        self.workers[worker].start()
        return "started"

    def op_sleep(self, seconds: float, op: Op) -> str:
        time.sleep(seconds)
        return "slept"

    def op_check(self, op: Op) -> str:
        pending = 0
        for index, buyer in enumerate(self.buyers):
            self.check_balance(index, self.me(index)["balance"])
            for doc in list_jobs(self.c, buyer.key):
                self.observe(doc)
                pending += doc["status"] in PENDING
        return f"ok, {pending} pending"

    # ------------------------------------------------------------------ invariants

    def me(self, buyer: int) -> dict[str, Any]:
        r = self.c.get("/v1/buyer/me", key=self.buyers[buyer].key)
        expect(r.status == 200, "GET /v1/buyer/me", r)
        return dict(r.json())

    def check_balance(self, buyer: int, balance: dict[str, str]) -> None:
        """SPEC 1 at any instant: nothing created or lost, never overdrawn."""
        available, held, spent, deposited = (
            int(balance[f"{name}_usdc"]) for name in ("available", "held", "spent", "deposited")
        )
        where = f"buyer {buyer}: {balance}, deposited by the test {self.buyers[buyer].deposited}"
        assert deposited == self.buyers[buyer].deposited, where
        assert available + held + spent == deposited, where
        assert available >= 0 and held >= 0 and spent >= 0, where

    def observe(self, doc: dict[str, Any]) -> None:
        """Per job at any instant: the charge within the hold; terminal means terminal."""
        job_id, usage = doc["id"], doc["usage"]
        buyer_cost, seller_cost = int(usage["buyer_cost_usdc"]), int(usage["seller_cost_usdc"])
        assert 0 <= seller_cost <= buyer_cost <= int(doc["max_cost_usdc"]), doc
        seen = self.terminal.get(job_id)
        if doc["status"] in TERMINAL:
            now = (doc["status"], usage)
            assert seen is None or seen == now, f"job {job_id} changed after {seen}: {doc}"
            self.terminal[job_id] = now
        else:
            assert seen is None, f"job {job_id} came back from {seen}: {doc}"

    def drain(self, timeout: float) -> None:
        """Every worker up, then every job terminal: expiry bounds how long that takes."""
        for worker in self.workers:
            if worker.proc is None:
                worker.start()
        deadline = time.monotonic() + timeout
        while True:
            pending = [
                (doc["id"], doc["status"])
                for buyer in self.buyers
                for doc in list_jobs(self.c, buyer.key)
                if doc["status"] in PENDING
            ]
            if not pending:
                return
            for worker in self.workers:
                worker.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"jobs still pending after {timeout}s: {pending}")
            time.sleep(0.25)

    def check_final(self) -> tuple[str, list[str]]:
        """Every invariant over the whole run; returns a summary and every break found."""
        breaks: list[str] = []

        def check(ok: bool, what: str) -> None:
            if not ok:
                breaks.append(what)

        charged_by_model: Counter[str] = Counter()
        charged_jobs_by_model: Counter[str] = Counter()
        payout_total = charged_jobs = provider_accepted = provider_price = 0
        statuses: Counter[str] = Counter()
        for index, buyer in enumerate(self.buyers):
            try:
                jobs = assert_money_invariants(self.c, buyer.key, buyer.deposited)
            except AssertionError as e:
                breaks.append(f"buyer {index} money: {e}")
                jobs = list_jobs(self.c, buyer.key)
            ids = {j["id"] for j in jobs}
            check(ids == buyer.job_ids, f"buyer {index}: jobs {ids} vs accepted {buyer.job_ids}")
            for doc in jobs:
                try:
                    self.observe(doc)
                    self.check_final_job(doc, self.jobs[doc["id"]])
                except (AssertionError, KeyError, ValueError) as e:
                    breaks.append(f"job {doc['id']}: {e!r}")
                statuses[doc["status"]] += 1
                record = self.jobs[doc["id"]]
                seller_cost = int(doc["usage"]["seller_cost_usdc"])
                if seller_cost:
                    model = resolve(record.body["model"])
                    charged_by_model[model] += int(doc["usage"]["buyer_cost_usdc"])
                    charged_jobs_by_model[model] += 1
                    payout_total += seller_cost
                    charged_jobs += 1
                # These jobs were certainly accepted, so billed, by the provider.
                code = doc.get("error", {}).get("code")
                if seller_cost or code in ("inference_failed", "content_policy"):
                    provider_accepted += 1
                    provider_price += record.list_price

        earned_total = earned_jobs = 0
        billing = self.c.billing()
        for index, seller in enumerate(self.sellers):
            earnings = self.get("/v1/seller/earnings", seller.key)
            offers = self.get("/v1/seller/offers", seller.key)["data"]
            payout, paid_jobs = int(earnings["payout_usdc"]), int(earnings["jobs"])
            earned_total += payout
            earned_jobs += paid_jobs
            for offer in offers:
                # Every job is over, so every slot of capacity it took is back.
                check(offer["capacity"]["in_flight"] == 0, f"capacity still taken: {offer}")
                check(offer["volume_usdc"] == offer["payout_usdc"], f"fee with no fees: {offer}")
            if not seller.deleted_an_offer:
                offer_payout = sum(int(o["payout_usdc"]) for o in offers)
                offer_jobs = sum(o["jobs"] for o in offers)
                check(
                    (offer_payout, offer_jobs) == (payout, paid_jobs),
                    f"seller {index}: offers total {offer_payout} for {offer_jobs} jobs, "
                    f"earnings {payout} for {paid_jobs}",
                )
            could_have_billed = sum(
                int(billing.get(sha256_hex(k), {}).get("billed_micros", 0))
                for k in seller.provider_keys
            )
            check(
                payout <= could_have_billed,
                f"seller {index} earned {payout}; the provider billed its keys {could_have_billed}",
            )
        check(
            (earned_total, earned_jobs) == (payout_total, charged_jobs),
            f"sellers earned {earned_total} for {earned_jobs} jobs; "
            f"the jobs paid sellers {payout_total} for {charged_jobs}",
        )

        r = self.c.get("/api/markets")
        expect(r.status == 200, "GET /api/markets", r)
        for entry in r.json()["data"]:
            model = entry["model"]
            expected = {
                "jobs": charged_jobs_by_model[model],
                "volume_usdc": str(charged_by_model[model]),
            }
            check(entry["all_time"] == expected, f"market {model}: {entry} vs jobs {expected}")

        # The simulator's own books (SPEC 5.2): refusals bill nothing; every job reaches the
        # provider at most once (no failover after acceptance, never a retried queue call);
        # every charged or failed-after-acceptance job was billed at its list price.
        for key in REFUSING_KEYS:
            check(sha256_hex(key) not in billing, f"{key} was billed: {billing}")
        billed_jobs = sum(int(b["jobs"]) for b in billing.values())
        billed_micros = sum(int(b["billed_micros"]) for b in billing.values())
        check(
            provider_accepted <= billed_jobs <= len(self.jobs),
            f"{provider_accepted} jobs certainly accepted by the provider, {billed_jobs} billed,"
            f" {len(self.jobs)} jobs in all",
        )
        check(
            billed_micros >= provider_price,
            f"provider billed {billed_micros}, below the list price {provider_price} of the jobs"
            " it certainly accepted",
        )
        summary = (
            f"{len(self.jobs)} jobs {dict(sorted(statuses.items()))}, {charged_jobs} charged, "
            f"{billed_jobs} billed by the provider; submits answered {dict(self.answers)}"
        )
        return summary, breaks

    def check_final_job(self, doc: dict[str, Any], record: JobRecord) -> None:
        status, usage = doc["status"], doc["usage"]
        assert int(doc["max_cost_usdc"]) == record.max_cost, (record.max_cost, doc)
        seller_cost, buyer_cost = int(usage["seller_cost_usdc"]), int(usage["buyer_cost_usdc"])
        if seller_cost:
            # Charged at the dispatch-time price of some offer: 0.05..1.00 of the list, no fee.
            assert buyer_cost == seller_cost, doc
            low = ceil_div(record.list_price * 5, 100)
            assert low <= seller_cost <= record.list_price, (record.list_price, doc)
        if status == "succeeded":
            assert seller_cost > 0 and "error" not in doc, doc
            [result] = doc["results"]
            spec = CATALOG[resolve(record.body["model"])]
            resolution = record.body.get("resolution") or next(iter(spec.usd_per_second))
            duration = record.body.get("duration_seconds") or min(spec.durations)
            assert (result["width"], result["height"]) == HEIGHTS[resolution], doc
            assert result["duration_seconds"] == duration and result["bytes"] > 0, doc
        elif status == "failed":
            assert doc["error"]["code"] in JOB_FAILURE_CODES, doc
            assert doc["results"] == [], doc
        elif status == "expired":
            assert doc["results"] == [], doc

    def get(self, path: str, key: str) -> dict[str, Any]:
        r = self.c.get(path, key=key)
        expect(r.status == 200, f"GET {path}", r)
        return dict(r.json())

    def report(self, limit: int = 400) -> str:
        lines = self.log if len(self.log) <= limit else ["...", *self.log[-limit:]]
        return "\n".join(lines)


def error_code(r: Response) -> str | None:
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


def expect(ok: bool, what: str, r: Response) -> None:
    if not ok:
        raise AssertionError(f"{what}: HTTP {r.status} {r.body[:600]!r}")


# --------------------------------------------------------------------------- the test


def vopr_seed(backend: str) -> int:
    chosen = os.environ.get(SEED_ENV, "").strip()
    if chosen == "random":
        return random.SystemRandom().randrange(2**32)
    return int(chosen) if chosen else DEFAULT_SEEDS[backend]


def test_vopr(
    make_server: ServerFactory, database_url: str, request: pytest.FixtureRequest
) -> None:
    backend = "sqlite" if database_url.startswith("sqlite") else "postgres"
    seed = vopr_seed(backend)
    n_ops = int(os.environ.get(OPS_ENV) or DEFAULT_OPS[backend])
    plan = make_plan(seed, n_ops)
    rerun = f"{SEED_ENV}={seed} " + (f"{OPS_ENV}={n_ops} " if os.environ.get(OPS_ENV) else "")
    rerun += f".venv/bin/pytest '{request.node.nodeid}'"
    print(f"VOPR seed {seed}, {len(plan)} ops; rerun with: {rerun}")

    api = make_server("--no-worker", **ENGINE_ENV)
    workers = [WorkerProcess(f"vopr-worker-{n}", api.env, api.data_dir) for n in range(WORKERS)]
    vopr = Vopr(api, workers)
    missing: list[str] = []
    started = time.monotonic()
    try:
        for worker in workers:
            worker.start()
        vopr.run(plan)
        vopr.drain(timeout=TTL_SECONDS + 25)
        summary, breaks = vopr.check_final()
        print(f"VOPR seed {seed}: {summary} in {time.monotonic() - started:.1f}s")
        missing = [cmd for cmd in ("ledger", "replay") if not command_available(cmd)]
        if "ledger" not in missing:
            breaks += run_check(api, "ledger", "reconcile")
        if "replay" not in missing:
            breaks += run_check(api, "replay", "--verify")
        assert not breaks, "invariants broken:\n" + "\n".join(breaks)
    except Exception as e:
        logs = "\n".join(
            f"--- {path.name}:\n{tail(path)}"
            for path in [api.log_path, *(w.log_path for w in workers)]
        )
        raise AssertionError(
            f"VOPR seed {seed} failed after {len(vopr.log)} of {len(plan)} ops: {e}\n\n"
            f"rerun just this seed: {rerun}\n\nop log:\n{vopr.report()}\n\n{logs}"
        ) from e
    finally:
        for worker in workers:
            worker.kill()
    if missing:
        pytest.skip(
            "every invariant checked through the API held, but "
            + " and ".join(f"`mediamarket {cmd}`" for cmd in missing)
            + " does not exist yet, so reconcile / replay --verify were not run"
        )
