"""The production topology (SPEC 8) as plain processes on one fresh PostgreSQL database.

A standalone provider simulator, two ``mediamarket serve --no-worker`` API processes and two
``mediamarket worker`` processes, the same processes compose.yaml runs. A stream of jobs is
submitted over both APIs while one worker is SIGKILLed in the middle of driving jobs and one API
process is SIGKILLed mid-load and started again. Then every job must end, the books must
reconcile and replay, each process must have kept to its PostgreSQL connection budget, and the
dead worker's jobs must have been taken over within 15 s.

The scenario runs once (a module fixture) and each claim is its own test, so a failure names
the claim that broke. Run with ``make test-cluster`` (not part of ``make test``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import pytest
import urllib3

from adapters.eventstore import Connections, MarketApp, open_market
from domain.aggregates import Job
from services.audit import job_history
from services.worker import WORK_LEASE_SECONDS
from tests.harness import (
    ADMIN_TOKEN,
    BIN,
    Response,
    Server,
    base_env,
    free_port,
    postgres_available,
    postgres_database,
)
from tests.test_lifecycle import (
    PENDING,
    SEEDANCE,
    TERMINAL,
    assert_money_invariants,
    list_jobs,
    wait_until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.postgres, pytest.mark.slow]

JOBS = 40
# Long enough that jobs are mid-render when a worker dies, short enough for a ~25 s test.
RENDER_SECONDS = "2.5"
SUBMIT_INTERVAL = 0.12  # seconds between the stream's submits: ~5 s of load
POOL_SIZE = 8  # DATABASE_POOL_SIZE given to every process
TAKEOVER_LIMIT = 15.0  # SPEC 8: a dead worker's jobs are taken over within 15 s
DEPOSIT = 50_000_000
WORKER_IDS = ("cluster-worker-0", "cluster-worker-1")
# Each process names its connections mediamarket-<role>-<pid>. The long-running ones hold at
# most DATABASE_POOL_SIZE, one-off commands at most two (api/bootstrap.py).
APP_NAME_PREFIX = "mediamarket-"
LONG_RUNNING_ROLES = {"api", "serve", "worker", "projections-run"}
TOOL_POOL_SIZE = 2
# A replay or rebuild also holds its scratch storage's connections (two, projections/dialects.py)
# and the one that created the scratch schema and drops it at the end.
SCRATCH_CONNECTIONS = 3
SCRATCH_ROLES = {"replay", "projections-rebuild"}


# --------------------------------------------------------------------------- processes


@dataclass
class Process:
    """A ``mediamarket`` subprocess other than ``serve`` (which tests.harness.Server runs)."""

    name: str
    args: list[str]
    env: dict[str, str]
    cwd: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.cwd / f"{self.name}.log"

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(BIN), *self.args],
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_for_line(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.logs():
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited: {tail(self.log_path)}")
            time.sleep(0.05)
        raise AssertionError(f"{self.name} never printed {text!r}: {tail(self.log_path)}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)
        self.proc = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return f"({path.name} missing)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def start_simulator(cwd: Path) -> tuple[Process, str]:
    """``mediamarket sim`` on a free port; its Venice-protocol base URL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIAMARKET_", "PROVIDER_"))}
    env["SIM_RENDER_SECONDS"] = RENDER_SECONDS
    cwd.mkdir(parents=True, exist_ok=True)
    for _ in range(5):
        port = free_port()
        sim = Process("sim", ["sim", "--port", str(port)], env, cwd)
        sim.start()
        base = f"http://127.0.0.1:{port}/api/v1"
        http = urllib3.PoolManager(retries=False, timeout=2)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert sim.proc is not None
            if sim.proc.poll() is not None:
                break  # most likely the port was taken meanwhile: another one
            try:
                if http.request("GET", f"{base}/models").status == 200:
                    return sim, base
            except urllib3.exceptions.HTTPError:
                pass
            time.sleep(0.05)
        sim.kill()
    raise AssertionError(f"the simulator did not start: {tail(cwd / 'sim.log')}")


# --------------------------------------------------------------------------- connections


class ConnectionSampler(threading.Thread):
    """Counts the database's connections by application_name every ~100 ms."""

    def __init__(self, database_url: str) -> None:
        super().__init__(daemon=True, name="pg-connection-sampler")
        self.database_url = database_url
        self.peaks: Counter[str] = Counter()
        self.total_peak = 0
        self.samples = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        import psycopg

        try:
            with psycopg.connect(
                self.database_url, autocommit=True, application_name="mm-cluster-sampler"
            ) as conn:
                while not self._halt.is_set():
                    rows = conn.execute(
                        "SELECT coalesce(application_name, ''), count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                        " GROUP BY 1"
                    ).fetchall()
                    for name, count in rows:
                        self.peaks[name] = max(self.peaks[name], count)
                    self.total_peak = max(self.total_peak, sum(count for _, count in rows))
                    self.samples += 1
                    self._halt.wait(0.1)
        except BaseException as e:
            self.error = e

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def summary(self) -> str:
        named = ", ".join(f"{name or '(no name)'}: {n}" for name, n in sorted(self.peaks.items()))
        return f"peak total {self.total_peak} over {self.samples} samples; peak by name: {named}"


# --------------------------------------------------------------------------- the scenario


@dataclass
class Submitted:
    index: int
    job_id: str | None = None
    via: list[str] = field(default_factory=list)  # which API answered each try
    errors: list[str] = field(default_factory=list)  # tries a dead or starting API lost


@dataclass
class Outcome:
    buyer_key: str
    submitted: list[Submitted]
    after_restart: list[str]  # jobs submitted through the restarted API
    killed_worker: str
    killed_at: float  # wall clock, just before the SIGKILL
    orphans: list[str]  # jobs the killed worker held a lease on, not ended, at the kill
    takeover: dict[str, tuple[float, str] | None]  # seconds to the next event, and its writer
    api_restart_seconds: float
    pending_at_end: list[tuple[str, str]]
    terminal_after: float  # seconds from the worker's kill until the last job ended
    reconcile: subprocess.CompletedProcess[str]
    replay: subprocess.CompletedProcess[str]
    apis: list[Server]
    sampler: ConnectionSampler
    logs: str

    @property
    def job_ids(self) -> list[str]:
        return [s.job_id for s in self.submitted if s.job_id] + self.after_restart


def pick_victim(market: MarketApp, job_ids: list[str]) -> str | None:
    """A worker holding the lease of at least two jobs mid-render (dispatched, not ended)."""
    driving: Counter[str] = Counter()
    for job_id in job_ids:
        job: Job = market.repository.get(UUID(job_id))
        if job.lease and job.is_dispatched and not job.is_terminal:
            driving[job.lease["worker_id"]] += 1
    for worker_id, n in driving.most_common(1):
        if n >= 2:
            return worker_id
    return None


def orphans_of(market: MarketApp, worker_id: str, job_ids: list[str], at: float) -> list[str]:
    """The jobs ``worker_id`` held the lease of, not ended, at the moment ``at``: each job as
    its events up to then left it (read afterwards, so a job whose submit was still being
    answered at that moment counts too)."""
    moment = datetime.fromtimestamp(at, UTC)
    found = []
    for job_id in job_ids:
        history = job_history(market, UUID(job_id))
        assert history is not None, job_id
        before = [e for e in history.events if e.aggregate == "job" and e.timestamp <= moment]
        if not before:
            continue
        job: Job = market.repository.get(UUID(job_id), version=before[-1].version)
        if job.lease and job.lease["worker_id"] == worker_id and not job.is_terminal:
            found.append(job_id)
    return found


def next_event_after(market: MarketApp, job_id: str, after: float) -> tuple[float, str] | None:
    """Seconds from ``after`` to the job's first event written after it (its audit history),
    and what wrote it: a worker's id for a lease, else the event's name."""
    history = job_history(market, UUID(job_id))
    assert history is not None, job_id
    moment = datetime.fromtimestamp(after, UTC)
    for event in history.events:
        if event.aggregate == "job" and event.timestamp > moment:
            writer = str(event.data.get("worker_id") or event.name)
            return (event.timestamp - moment).total_seconds(), writer
    return None


class Load:
    """Submits the stream, each job through one API and, when that API is down, through the
    other with the same Idempotency-Key, so a submit lost with its API never makes two jobs."""

    def __init__(self, apis: list[Server], buyer_key: str) -> None:
        self.apis = apis
        self.buyer_key = buyer_key
        self.submitted = [Submitted(i) for i in range(JOBS)]
        self.done = 0
        self.lock = threading.Lock()

    def submit(self, s: Submitted) -> None:
        key = f"cluster-{s.index}"
        deadline = time.monotonic() + 30
        api = s.index % len(self.apis)
        while True:
            r: Response | None = None
            try:
                r = self.apis[api].client.post(
                    "/v1/video/generations",
                    key=self.buyer_key,
                    json_body={"model": SEEDANCE, "prompt": f"cluster job {s.index}"},
                    headers={"Idempotency-Key": key},
                )
            except urllib3.exceptions.HTTPError as e:
                s.errors.append(f"api {api}: {type(e).__name__}")
            if r is not None and r.status == 503:
                # A process still starting (engine_starting) takes no job: the other one does,
                # as a load balancer would send it there.
                s.errors.append(f"api {api}: 503 {r.body[:80]!r}")
                r = None
            if r is not None:
                assert r.status == 202, (s.index, api, r.status, r.body)
                s.job_id = r.json()["id"]
                s.via.append(f"api {api}")
                break
            assert time.monotonic() < deadline, f"submit {s.index} never answered: {s.errors}"
            api = (api + 1) % len(self.apis)
            time.sleep(0.05)
        with self.lock:
            self.done += 1

    def run(self) -> None:
        start = time.monotonic()

        def paced(s: Submitted) -> None:
            time.sleep(max(0.0, start + s.index * SUBMIT_INTERVAL - time.monotonic()))
            self.submit(s)

        with ThreadPoolExecutor(6) as pool:
            list(pool.map(paced, self.submitted))

    def ids(self) -> list[str]:
        return [s.job_id for s in self.submitted if s.job_id]


def cli(api: Server, *args: str) -> subprocess.CompletedProcess[str]:
    """A one-off admin command, as compose.yaml's ``admin`` service runs it."""
    return subprocess.run(
        [str(BIN), *args],
        cwd=api.data_dir,
        env=api.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def run_scenario(database_url: str, tmp_path: Path) -> Iterator[Outcome]:
    sim, sim_url = start_simulator(tmp_path / "sim")
    env = {
        "PROVIDER_BASE_URL_VENICE": sim_url,
        "SIM_RENDER_SECONDS": RENDER_SECONDS,
        "DATABASE_POOL_SIZE": str(POOL_SIZE),
        "PROVIDER_QUEUE_TIMEOUT_SECONDS": "5",
    }
    sampler = ConnectionSampler(database_url)
    sampler.start()
    apis: list[Server] = []
    workers = [
        Process(wid, ["worker"], {**base_env(database_url, 0, **env), "WORKER_ID": wid}, tmp_path)
        for wid in WORKER_IDS
    ]
    market: MarketApp | None = None
    try:
        for _ in range(2):
            port = free_port()
            apis.append(
                Server(tmp_path, base_env(database_url, port, **env), port, ["--no-worker"])
            )
            apis[-1].start()
        for w in workers:
            w.start()
        for w in workers:
            w.wait_for_line(f"mediamarket worker {w.name} running")

        c = apis[0].client
        _, buyer_key = c.create_buyer(DEPOSIT, name="cluster buyer")
        _, seller_key = c.create_seller(name="cluster seller")
        # Two offers, so routing has a choice; no capacity limit, so no job waits for a slot.
        c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
        c.create_offer(seller_key, SEEDANCE, "sim_ok_2", "0.85")

        # The test's own reads of the log, told apart from the processes' connections.
        market = open_market(database_url, Connections(application_name="test-itself"))
        load = Load(apis, buyer_key)
        loader = threading.Thread(target=load.run, name="cluster-load")
        loader.start()

        # A worker in the middle of driving jobs: at least two of its jobs rendering.
        victim_id = wait_until(
            lambda: pick_victim(market, load.ids()), 30, "a worker driving two rendering jobs"
        )
        victim = next(w for w in workers if w.name == victim_id)
        killed_at = time.time()
        victim.kill()

        # An API process dies mid-load (requests in flight to it fail; their submits go to the
        # other API with the same Idempotency-Key) and is started again.
        wait_until(lambda: load.done >= JOBS * 0.6, 30, "60% of the jobs submitted")
        apis[1].kill()
        time.sleep(0.5)  # submits meanwhile find it down
        restart_began = time.monotonic()
        apis[1].start()
        api_restart_seconds = time.monotonic() - restart_began
        loader.join(timeout=60)
        assert not loader.is_alive(), "the load did not finish"

        # The restarted API serves: new jobs through it, and jobs the other API created.
        after_restart = []
        for n in range(4):
            r = apis[1].client.post(
                "/v1/video/generations",
                key=buyer_key,
                json_body={"model": SEEDANCE, "prompt": f"after restart {n}"},
                headers={"Idempotency-Key": f"after-restart-{n}"},
            )
            assert r.status == 202, (r.status, r.body)
            after_restart.append(r.json()["id"])

        # Every job ends: the dead worker's leases run out and the live worker takes them.
        all_ids = load.ids() + after_restart
        deadline = time.monotonic() + WORK_LEASE_SECONDS + 45
        pending: list[tuple[str, str]] = []
        while time.monotonic() < deadline:
            jobs = list_jobs(apis[int(time.monotonic()) % 2].client, buyer_key)
            pending = [(j["id"], j["status"]) for j in jobs if j["status"] in PENDING]
            if not pending and len(jobs) >= len(all_ids):
                break
            time.sleep(0.25)
        terminal_after = time.time() - killed_at

        orphans = orphans_of(market, victim_id, load.ids(), killed_at)
        takeover = {job_id: next_event_after(market, job_id, killed_at) for job_id in orphans}
        reconcile = cli(apis[0], "ledger", "reconcile")
        replay = cli(apis[0], "replay", "--verify")
        logs = "\n".join(
            f"--- {p.name}:\n{tail(p)}"
            for p in [*(a.log_path for a in apis), *(w.log_path for w in workers), sim.log_path]
        )
        yield Outcome(
            buyer_key=buyer_key,
            submitted=load.submitted,
            after_restart=after_restart,
            killed_worker=victim_id,
            killed_at=killed_at,
            orphans=orphans,
            takeover=takeover,
            api_restart_seconds=api_restart_seconds,
            pending_at_end=pending,
            terminal_after=terminal_after,
            reconcile=reconcile,
            replay=replay,
            apis=apis,
            sampler=sampler,
            logs=logs,
        )
    finally:
        sampler.stop()
        if market is not None:
            market.close()
        for w in workers:
            w.kill()
        for api in apis:
            api.kill(signal.SIGKILL)
        sim.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    problem = postgres_available()
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires PostgreSQL: {problem}")
        pytest.skip(problem)
    with postgres_database() as url:
        yield from run_scenario(url, tmp_path_factory.mktemp("cluster"))


# --------------------------------------------------------------------------- the claims


def test_every_job_ends_and_the_books_balance(cluster: Outcome) -> None:
    o = cluster
    assert not o.pending_at_end, f"jobs still pending: {o.pending_at_end}\n{o.logs}"
    assert o.orphans, "the killed worker held no lease on a live job: nothing was tested"
    jobs = assert_money_invariants(o.apis[0].client, o.buyer_key, DEPOSIT)
    # A submit lost with its API and sent again elsewhere under its Idempotency-Key made no
    # second job.
    assert sorted(j["id"] for j in jobs) == sorted(o.job_ids)
    assert len(set(o.job_ids)) == JOBS + len(o.after_restart)
    statuses = Counter(j["status"] for j in jobs)
    assert set(statuses) <= set(TERMINAL)
    # Nothing cancels or expires here; a job whose queue call died with its worker ends as
    # upstream_unknown (failed), every other one succeeds.
    for j in jobs:
        if j["status"] != "succeeded":
            assert j["status"] == "failed", j
            assert j["error"]["code"] == "upstream_unknown", j
            assert j["id"] in o.orphans, j
    assert statuses["succeeded"] >= len(jobs) - len(o.orphans)
    assert o.reconcile.returncode == 0, (
        f"ledger reconcile:\n{o.reconcile.stdout}\n{o.reconcile.stderr}"
    )
    assert o.replay.returncode == 0, f"replay --verify:\n{o.replay.stdout}\n{o.replay.stderr}"
    retried = [s for s in o.submitted if s.errors]
    takeover = sorted(round(t[0], 1) for t in o.takeover.values() if t is not None)
    print(
        f"{len(jobs)} jobs {dict(statuses)}; worker {o.killed_worker} killed with"
        f" {len(o.orphans)} jobs, taken over after {takeover} s; last job ended"
        f" {o.terminal_after:.1f}s after the kill; {len(retried)} submits retried on the"
        " other API after the API kill"
    )


def test_a_killed_api_process_restarts_and_serves(cluster: Outcome) -> None:
    o = cluster
    restarted = o.apis[1].client
    assert restarted.get("/healthz").json()["status"] == "ok"
    assert len(o.after_restart) == 4
    for job_id in o.job_ids:
        r = restarted.get(f"/v1/video/generations/{job_id}", key=o.buyer_key)
        assert r.status == 200, (job_id, r.status, r.body)
    r = restarted.get("/admin/ledger/trial-balance", key=ADMIN_TOKEN)
    assert r.status == 200, r.body
    print(f"the killed API answered again {o.api_restart_seconds:.1f}s after its restart")


def role_of(application_name: str) -> str:
    """``mediamarket-projections-run-123`` -> ``projections-run``."""
    return application_name.removeprefix(APP_NAME_PREFIX).rsplit("-", 1)[0]


def budget(role: str) -> int:
    if role in LONG_RUNNING_ROLES:
        return POOL_SIZE
    return TOOL_POOL_SIZE + (SCRATCH_CONNECTIONS if role in SCRATCH_ROLES else 0)


def test_connections_per_process_within_budget(cluster: Outcome) -> None:
    sampler = cluster.sampler
    assert sampler.error is None, f"the sampler failed: {sampler.error!r}"
    assert sampler.samples > 50, sampler.summary()
    print(sampler.summary())
    processes = {n: peak for n, peak in sampler.peaks.items() if n.startswith(APP_NAME_PREFIX)}
    roles = Counter(role_of(name) for name in processes)
    # Both APIs (one restarted: a new pid) and both workers, each named. (The checks may come
    # and go between two samples: a reconcile of this log takes about as long as the interval.)
    assert roles["api"] >= 3 and roles["worker"] >= 2, sampler.summary()
    over = {name: peak for name, peak in processes.items() if peak > budget(role_of(name))}
    assert not over, (
        f"over budget (DATABASE_POOL_SIZE={POOL_SIZE}; one-off commands {TOOL_POOL_SIZE}, and"
        f" {SCRATCH_CONNECTIONS} more for a replay's scratch storage): {over};"
        f" {sampler.summary()}"
    )
    unnamed = {n: peak for n, peak in sampler.peaks.items() if n not in processes}
    assert set(unnamed) <= {"test-itself"}, f"connections no process named: {unnamed}"


def test_dead_workers_jobs_are_taken_over_within_15s(cluster: Outcome) -> None:
    o = cluster
    assert o.orphans, "the killed worker held no lease on a live job: nothing was tested"
    missing = [job_id for job_id, t in o.takeover.items() if t is None]
    assert not missing, f"no event at all after the kill for {missing}"
    by_itself = {j: t for j, t in o.takeover.items() if t is not None and t[1] == o.killed_worker}
    assert not by_itself, f"the killed worker wrote after its death? {by_itself}"
    slow = {j: t for j, t in o.takeover.items() if t is not None and t[0] > TAKEOVER_LIMIT}
    seconds = sorted(t[0] for t in o.takeover.values() if t is not None)
    assert not slow, (
        f"{len(slow)} of {len(o.orphans)} jobs of the killed worker waited over"
        f" {TAKEOVER_LIMIT:.0f}s for their next event (takeover times {seconds})"
    )
