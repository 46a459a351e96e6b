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
per ``MarketApp.save`` call: the same log, written in minutes instead of hours.

The SQLite log is cached under ``bench/.cache/`` by job count and ``VERSION`` (bump it when the
generator changes what it writes). The PostgreSQL log is a copy of the SQLite one, event for
event, in the database ``mm_bench_replay`` (created when absent, kept for the next run while it
holds the same log).

**The measurement.** Fresh, empty views in the storage ``mediamarket replay --verify`` rebuilds
into (``projections.views.scratch_views``: a temporary SQLite file written without fsyncs, or a
temporary schema in the scratch PostgreSQL database ``mm_bench_replay_views``), then that
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
import contextlib
import cProfile
import heapq
import io
import json
import os
import pstats
import random
import shutil
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from operator import methodcaller
from pathlib import Path
from statistics import median
from typing import Any, cast
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import StoredEvent

from adapters.crypto import Secrets
from adapters.eventstore import MarketApp, open_market, store_env
from adapters.settings import Settings
from adapters.simulator import CATALOG, catalog_entry, parse_video_request
from bench.run import POSTGRES_URL, busy_seconds, cpu_seconds, db_seconds, postgres_version
from domain.aggregates import Offer, settlement_id
from domain.catalog import Catalog, VideoRequest, parse_venice_models, validate_video_request
from domain.money import FeeSchedule, parse_multiplier, price_offer, usd_to_micros
from domain.routing import Candidate, RoutingError, choose
from projections.runner import CATCH_UP_BATCH_SIZE
from projections.views import VIEWS_NAME, scratch_views
from services.commands import Commands
from services.replay import LogSource, rebuild
from services.routing import MAX_ROUTE_OFFERS, Route
from services.worker import LEASE_SECONDS

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / ".cache"
# Bump whenever the generator writes a different log: cached logs of another version are
# generated again.
VERSION = 1
DEFAULT_JOBS = 100_000
QUICK_JOBS = 5_000
GOAL = 50_000.0  # events/s on SQLite (issue 4)
PG_LOG_DB = "mm_bench_replay"
PG_VIEWS_DB = "mm_bench_replay_views"
SECRET_KEY = "bench-replay-secret-key-0123456789abcdef"
MODEL = "venice-seedance-2-fast-t2v"
BUYERS = 100
OFFER_MULTIPLIERS = ("0.80", "0.85", "0.90")
WORKER_ID = "bench-replay-worker"
JOB_TTL_SECONDS = int(Settings.model_fields["JOB_TTL_SECONDS"].default)
FEES = FeeSchedule()
FLUSH_EVENTS = 10_000  # events per MarketApp.save while generating
COPY_BATCH = 10_000  # events per insert when copying the log to PostgreSQL

# What becomes of the jobs, by share. Refused-then-failover jobs are refused by the first
# offer they are dispatched to, which backs it off (later jobs route around it or skip it).
OUTCOMES: tuple[tuple[str, float], ...] = (
    ("succeeded", 0.85),
    ("failed", 0.04),  # accepted by the provider, then inference failed or content policy
    ("canceled_queued", 0.03),  # canceled through the API before dispatch: free
    ("canceled_running", 0.02),  # canceled while rendering: billed
    ("expired_queued", 0.01),  # claimed, never dispatched, expired at the TTL
    ("expired_running", 0.01),  # dispatched, the provider never finished
    ("refused_failover", 0.04),  # first offer refused before accepting; the next one succeeds
)


# ---------------------------------------------------------------------- generating the log


class BufferedMarket:
    """Stands in for ``MarketApp`` under ``Commands``: each save's events are kept in order and
    many saves are written by one ``MarketApp.save``. Aggregates live in memory (every one was
    created here), so a command reads what the previous one saved without a database read."""

    def __init__(self, app: MarketApp, flush_events: int = FLUSH_EVENTS) -> None:
        self.app = app
        self.recorder = app.recorder
        self.repository = self
        self.flush_events = flush_events
        self.live: dict[UUID, Any] = {}
        self.pending: list[Any] = []
        self.touched: dict[UUID, Any] = {}
        self.emitted = 0
        self.topics: Counter[str] = Counter()

    def get(self, aggregate_id: UUID, **_: Any) -> Any:
        try:
            return self.live[aggregate_id]
        except KeyError:
            raise AggregateNotFoundError(aggregate_id) from None

    def save(self, *aggregates: Any) -> list[Any]:
        for aggregate in aggregates:
            self.live[aggregate.id] = aggregate
            self.touched[aggregate.id] = aggregate
            for e in aggregate.collect_events():
                self.pending.append(e)
                self.topics[type(e).__qualname__] += 1
        self.emitted = self.topics.total()
        if len(self.pending) >= self.flush_events:
            self.flush()
        return []

    def forget(self, *aggregate_ids: UUID) -> None:
        for aggregate_id in aggregate_ids:
            self.live.pop(aggregate_id, None)

    def flush(self) -> None:
        if self.pending:
            # The aggregates after their events: they carry no events of their own any more,
            # but let the application take its snapshots (buyer accounts) as a real save would.
            self.app.save(*self.pending, *self.touched.values())
            self.pending = []
            self.touched = {}


@dataclass
class Simulation:
    """Discrete-event time: processes are generators that yield how long they wait."""

    now: float
    queue: list[tuple[float, int, Iterator[float]]] = field(default_factory=list)
    seq: int = 0

    def clock(self) -> float:
        return self.now

    def start(self, process: Iterator[float], delay: float = 0.0) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (self.now + delay, self.seq, process))

    def run(self) -> None:
        while self.queue:
            at, _, process = heapq.heappop(self.queue)
            self.now = max(self.now, at)
            delay = next(process, None)
            if delay is not None:
                self.start(process, delay)


PROMPT_TEXT = (
    "a slow dolly shot through a neon-lit market at night, rain on the cobblestones, "
    "a red fox crossing a snowy field at dawn, cinematic lighting, shallow depth of field, "
    "aerial view of a coastline with waves breaking on black sand, golden hour, 35mm film, "
    "a robot barista pouring latte art in a sunlit cafe, handheld camera, soft focus"
)
PROMPT_WORDS = PROMPT_TEXT.split()


class LogGenerator:
    def __init__(self, app: MarketApp, jobs: int, rate: float, seed: int) -> None:
        self.jobs = jobs
        self.rate = rate
        self.rng = random.Random(seed)
        self.market = BufferedMarket(app)
        # Ends about now: the jobs' times read like a recent busy stretch.
        self.sim = Simulation(now=time.time() - jobs / rate - JOB_TTL_SECONDS)
        self.secrets = Secrets(SECRET_KEY)
        self.commands = Commands(cast(MarketApp, self.market), self.secrets, self.sim.clock)
        self.catalog = Catalog(parse_venice_models("venice", [catalog_entry(m) for m in CATALOG]))
        self.buyers: list[UUID] = []
        self.offers: list[Offer] = []
        self.submitted = 0
        self.rejected = 0  # submits routing turned away (every offer backed off)
        self.outcomes: Counter[str] = Counter()
        self.started_at: dict[UUID, int] = {}
        self.spans: list[int] = []

    def generate(self) -> dict[str, Any]:
        c = self.commands
        for n in range(BUYERS):
            buyer_id, _, _ = c.create_buyer(f"bench buyer {n}")
            c.deposit(buyer_id, 10**12)
            self.buyers.append(buyer_id)
        seller_id, _, _ = c.create_seller("bench seller")
        for n, multiplier in enumerate(OFFER_MULTIPLIERS):
            offer_id, _ = c.create_offer(
                seller_id=seller_id,
                model=MODEL,
                provider="venice",
                base_url=None,
                api_key=f"sim_ok_replay_{n}",
                cost_multiplier=multiplier,
                max_concurrent_jobs=None,
            )
            self.offers.append(self.market.live[offer_id])
        self.sim.start(self._arrivals())
        self.sim.run()
        self.market.flush()
        return {
            "jobs": self.submitted,
            "rejected_submits": self.rejected,
            "outcomes": dict(self.outcomes),
            "events": dict(sorted(self.market.topics.items())),
            "job_span_median": median(self.spans) if self.spans else 0,
            "job_span_p90": sorted(self.spans)[int(len(self.spans) * 0.9)] if self.spans else 0,
            "rate": self.rate,
        }

    # -- the API side: submits (and top-ups)

    def _arrivals(self) -> Iterator[float]:
        names = [name for name, _ in OUTCOMES]
        weights = [share for _, share in OUTCOMES]
        while self.submitted < self.jobs:
            yield self.rng.expovariate(self.rate)
            request = self._request()
            try:
                route = self._route(request)
            except RoutingError:
                self.rejected += 1
                continue
            buyer_id = self.buyers[self.submitted % BUYERS]
            submitted = self.commands.submit(
                buyer_id=buyer_id,
                request=request,
                route=route.as_event_data(),
                routing=route.decision(),
                estimated_cost=route.best.price.buyer_cost,
                hold=route.hold(),
                ttl_seconds=JOB_TTL_SECONDS,
                min_discount=None,
                idempotency_key=None,
            )
            self.submitted += 1
            self.started_at[submitted.job_id] = self.market.emitted - 3
            outcome = self.rng.choices(names, weights)[0]
            self.outcomes[outcome] += 1
            self.sim.start(self._job(submitted.job_id, outcome), self.rng.uniform(0.05, 0.5))
            if self.submitted % 1000 == 0:
                self.commands.deposit(self.rng.choice(self.buyers), 10**9)

    def _request(self) -> VideoRequest:
        rng = self.rng
        words = rng.randint(8, 60)
        body: dict[str, Any] = {
            "model": MODEL,
            "prompt": " ".join(rng.choice(PROMPT_WORDS) for _ in range(words)),
            "duration_seconds": rng.choice((4, 6, 8, 12)),
            "resolution": rng.choices(("480p", "720p", "1080p"), (5, 3, 2))[0],
        }
        if rng.random() < 0.3:
            body["aspect_ratio"] = rng.choice(("9:16", "1:1", "4:3"))
        if rng.random() < 0.2:
            body["audio"] = True
        if rng.random() < 0.3:
            body["metadata"] = {"user": f"u{rng.randint(1, 5000)}", "campaign": "spring"}
        if rng.random() < 0.1:
            body["webhook_url"] = f"https://hooks.example.com/mm/{rng.randint(1, 100)}"
        return validate_video_request(
            body, self.catalog, allow_http_webhooks=False, allow_private_webhooks=False
        )

    def _route(self, request: VideoRequest) -> Route:
        """What ``Router.route_params`` decides, with the simulator's price for the request."""
        list_price = usd_to_micros(parse_video_request(request.provider_params()).quote())
        now = self.sim.now
        skipped: list[dict[str, str]] = []
        candidates: list[Candidate] = []
        for seq, offer in enumerate(self.offers, start=1):
            reason = offer.unavailable_because(now)
            if reason is not None:
                skipped.append({"offer_id": str(offer.id), "reason": reason})
                continue
            multiplier = parse_multiplier(offer.cost_multiplier)
            candidates.append(
                Candidate(
                    offer_id=str(offer.id),
                    seller_id=offer.seller_id,
                    multiplier=multiplier,
                    created_seq=seq,
                    price=price_offer(list_price, multiplier, FEES),
                )
            )
        ranking = choose(len(self.offers), candidates, None)
        return Route(ranking.eligible[:MAX_ROUTE_OFFERS], len(self.offers), skipped)

    # -- the worker side: one job, as ``services.worker.Worker.drive`` takes it

    def _job(self, job_id: UUID, outcome: str) -> Iterator[float]:
        c, rng = self.commands, self.rng
        if outcome == "canceled_queued":
            c.cancel(job_id)
            self._done(job_id)
            return
        c.claim(job_id, WORKER_ID, LEASE_SECONDS)
        lease = [self.sim.now]
        expires_at = c.job(job_id).expires_at
        if outcome == "expired_queued":
            yield from self._wait(job_id, lease, expires_at + rng.uniform(0, 1))
            c.expire_due(job_id)
            self._done(job_id)
            return
        refuse = outcome == "refused_failover"
        dispatched = price_changed = False
        job = c.job(job_id)
        for entry in job.route:
            offer: Any = self.market.live[UUID(entry["offer_id"])]
            if entry["buyer_cost"] > job.max_cost:
                # The worker's check of a fresh quote against the hold (here the routed price:
                # only a failover beyond the one the hold covers costs more).
                price_changed = True
                c.update_job(job_id, methodcaller("skipped", entry["offer_id"], "price_changed"))
                continue
            attempt = {
                "offer_id": entry["offer_id"],
                "seller_id": entry["seller_id"],
                "provider": offer.provider,
                "key_sha256": offer.key_sha256,
                "list_price": entry["list_price"],
                "seller_cost": entry["seller_cost"],
                "buyer_cost": entry["buyer_cost"],
            }
            if c.start_dispatch(job_id, attempt) is not None:
                continue  # skipped (recorded on the job): the offer backed off since routing
            yield rng.uniform(0.2, 1.5)  # the queue call
            if refuse:
                refuse = False
                status = rng.choice((429, 503))
                c.queue_refused(job_id, entry["offer_id"], status, "busy", deactivate=False)
                continue
            c.dispatched(job_id, str(uuid.UUID(int=rng.getrandbits(128), version=4)))
            dispatched = True
            break
        if not dispatched:
            code, message = (
                ("price_changed", "every offer now costs more than the amount held for this job")
                if price_changed
                else ("no_sellers_available", "no seller could accept the job")
            )
            now = int(self.sim.now)
            c.terminate(job_id, methodcaller("fail", code, message, retryable=True, now=now))
            self._done(job_id)
            return
        render = rng.uniform(10, 50)
        if outcome == "expired_running":
            render = expires_at - self.sim.now + 1
        done_at = self.sim.now + render
        steps = rng.randint(1, 3)
        if outcome in ("failed", "canceled_running"):
            done_at = self.sim.now + render * rng.uniform(0.2, 0.9)
        for step in range(steps):
            yield from self._wait(job_id, lease, self.sim.now + render / (steps + 1))
            if self.sim.now >= min(done_at, expires_at):
                break
            progress = (step + 1) / (steps + 1)
            c.update_job(job_id, methodcaller("progressed", progress))
        yield from self._wait(job_id, lease, min(done_at, expires_at))
        now = int(self.sim.now)
        if self.sim.now >= expires_at:
            c.expire_due(job_id)
        elif outcome == "failed":
            code, message = rng.choice(
                (
                    ("inference_failed", "the provider failed to render the video"),
                    ("content_policy", "the prompt was rejected by the provider's policy"),
                )
            )
            retryable = code == "inference_failed"
            c.terminate(job_id, methodcaller("fail", code, message, retryable=retryable, now=now))
        elif outcome == "canceled_running":
            c.cancel(job_id)
        else:
            request = c.job(job_id).request
            width, height = {"480p": (854, 480), "720p": (1280, 720), "1080p": (1920, 1080)}[
                request["resolution"]
            ]
            artifact = {
                "index": 0,
                "path": f"data/artifacts/{job_id}/0.mp4",
                "content_type": "video/mp4",
                "width": width,
                "height": height,
                "duration_seconds": float(request["duration_seconds"]),
                "bytes": rng.randint(500_000, 8_000_000),
                "stored_at": now,
            }

            def succeed(job: Any) -> None:
                job.artifact_stored(artifact)
                job.succeed(now)

            c.terminate(job_id, succeed)
        # The worker then deletes the provider's copy of a dispatched job.
        yield rng.uniform(0.1, 0.5)
        c.update_job(job_id, methodcaller("upstream_media_deleted"))
        self._done(job_id)

    def _wait(self, job_id: UUID, lease: list[float], until: float) -> Iterator[float]:
        """Wait until ``until``, renewing the job's lease as the worker's drive loop does."""
        while self.sim.now < until:
            renew_at = lease[0] + LEASE_SECONDS / 2
            if renew_at >= until:
                yield until - self.sim.now
                return
            if renew_at > self.sim.now:
                yield renew_at - self.sim.now
            self.commands.claim(job_id, WORKER_ID, LEASE_SECONDS)
            lease[0] = self.sim.now

    def _done(self, job_id: UUID) -> None:
        self.spans.append(self.market.emitted - self.started_at.pop(job_id))
        self.market.forget(job_id, settlement_id(job_id))


# ---------------------------------------------------------------------- the logs on disk


def sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory}"


def sqlite_log(jobs: int, rate: float, say: Callable[[str], None]) -> tuple[str, dict[str, Any]]:
    """The cached SQLite log of ``jobs`` jobs (generated first when absent): its URL and meta."""
    directory = CACHE / f"replay-v{VERSION}-{jobs}"
    meta_file = directory / "meta.json"
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("version") == VERSION and meta.get("jobs") == jobs:
            return sqlite_url(directory), {**meta, "generated": False}
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f"replay-v{VERSION}-{jobs}-", dir=CACHE))
    try:
        say(f"generating a log of {jobs:,} jobs (once; cached in {directory.relative_to(ROOT)})")
        started = time.perf_counter()
        app = open_market(sqlite_url(scratch))
        try:
            meta = LogGenerator(app, jobs, rate, seed=jobs * 1000 + VERSION).generate()
            meta["notifications"] = app.recorder.max_notification_id() or 0
        finally:
            app.close()
        meta.update(
            version=VERSION,
            generate_seconds=round(time.perf_counter() - started, 1),
            log_id=uuid.uuid4().hex,  # which generation: the PostgreSQL copy must be of this one
        )
        (scratch / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        scratch.rename(directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    say(
        f"generated {meta['notifications']:,} events for {jobs:,} jobs "
        f"in {meta['generate_seconds']:.0f} s"
    )
    return sqlite_url(directory), {**meta, "generated": True}


def pg_url(admin_url: str, name: str) -> str:
    return f"{admin_url.rsplit('/', 1)[0]}/{name}"


def pg_admin(admin_url: str, *statements: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
        for statement in statements:
            conn.execute(statement)


def postgres_log(
    admin_url: str, source_url: str, meta: dict[str, Any], say: Callable[[str], None]
) -> str:
    """``mm_bench_replay`` holding a copy of the SQLite log, copied first unless it already
    holds exactly that log (same generation, version, jobs and notification count)."""
    import psycopg

    url = pg_url(admin_url, PG_LOG_DB)
    wanted = {k: meta.get(k) for k in ("log_id", "version", "jobs", "notifications")}
    with contextlib.suppress(psycopg.Error):
        with psycopg.connect(url, connect_timeout=3) as conn:
            row = conn.execute("SELECT meta FROM bench_replay_meta").fetchone()
        if row is not None and {k: json.loads(row[0]).get(k) for k in wanted} == wanted:
            return url
    say(f"copying the log to PostgreSQL database {PG_LOG_DB} (once; kept for the next run)")
    started = time.perf_counter()
    pg_admin(
        admin_url,
        f'DROP DATABASE IF EXISTS "{PG_LOG_DB}" WITH (FORCE)',
        f'CREATE DATABASE "{PG_LOG_DB}"',
    )
    source, target = open_market(source_url), open_market(url)
    try:
        position = 0
        while True:
            batch = source.recorder.select_notifications(
                start=position, limit=COPY_BATCH, inclusive_of_start=False
            )
            if not batch:
                break
            target.recorder.insert_events(
                [
                    StoredEvent(n.originator_id, n.originator_version, n.topic, n.state)
                    for n in batch
                ]
            )
            position = batch[-1].id
        copied = target.recorder.max_notification_id() or 0
    finally:
        source.close()
        target.close()
    if copied != meta["notifications"]:
        raise RuntimeError(f"copied {copied} notifications of {meta['notifications']}")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE bench_replay_meta (meta TEXT NOT NULL)")
        conn.execute("INSERT INTO bench_replay_meta (meta) VALUES (%s)", (json.dumps(wanted),))
    say(f"copied {copied:,} events in {time.perf_counter() - started:.0f} s")
    return url


# ---------------------------------------------------------------------- the measurement


@dataclass
class Result:
    backend: str
    jobs: int
    notifications: int
    replay_seconds: float
    baseline_seconds: float
    select_seconds: float
    batch_size: int
    cpu_process: float  # cores used by this process (and a rebuild's second one)
    cpu_db: float | None  # cores used by the PostgreSQL backends during the replay
    cpu_other: float  # cores used by everything else on the machine meanwhile
    job_rows: int
    log: dict[str, Any]

    @property
    def events_per_s(self) -> float:
        return self.notifications / self.replay_seconds

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.replay_seconds

    @property
    def baseline_events_per_s(self) -> float:
        return self.notifications / self.baseline_seconds

    @property
    def cpu_us_per_event(self) -> float:
        """This process's CPU per event: unlike events/s, hardly affected by other load."""
        return self.cpu_process * self.replay_seconds / self.notifications * 1e6

    def as_json(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "events_per_s": self.events_per_s,
            "jobs_per_s": self.jobs_per_s,
            "baseline_events_per_s": self.baseline_events_per_s,
            "select_events_per_s": self.notifications / self.select_seconds,
            "ratio": self.baseline_seconds / self.replay_seconds,
            "cpu_us_per_event": self.cpu_us_per_event,
            "db_us_per_event": None
            if self.cpu_db is None
            else self.cpu_db * self.replay_seconds / self.notifications * 1e6,
        }


def read_log(app: MarketApp, batch_size: int, decode: bool) -> tuple[int, float]:
    """Read the whole log in the runner's batches, deserialising each event when ``decode``:
    (notifications, seconds)."""
    recorder, to_domain_event = app.recorder, app.mapper.to_domain_event
    position = count = 0
    started = time.perf_counter()
    while True:
        notifications = recorder.select_notifications(
            start=position, limit=batch_size, inclusive_of_start=False
        )
        if not notifications:
            return count, time.perf_counter() - started
        if decode:
            for n in notifications:
                to_domain_event(n)
        count += len(notifications)
        position = notifications[-1].id


def measure(
    backend: str,
    log_url: str,
    views_url: str,
    meta: dict[str, Any],
    db_names: list[str],
    profile: cProfile.Profile | None = None,
) -> Result:
    app = open_market(log_url)
    views_env = store_env(views_url, role=VIEWS_NAME)
    try:
        # The storage and the rebuild of `mediamarket replay --verify` (on SQLite, no fsyncs;
        # with two cores, the order book and ledger folded by a second process).
        with scratch_views(views_env, app.name) as views:
            # First a read without decoding (also brings the log into the OS cache), then the
            # baseline: the same read, deserialising every event.
            _, select_seconds = read_log(app, CATCH_UP_BATCH_SIZE, decode=False)
            count, baseline_seconds = read_log(app, CATCH_UP_BATCH_SIZE, decode=True)
            end = app.recorder.max_notification_id() or 0
            db0 = sum(db_seconds(name) for name in db_names)
            pid = os.getpid()
            busy0, cpu0, started = busy_seconds(), cpu_seconds(pid, True), time.perf_counter()
            if profile is not None:
                profile.enable()
            # A profile sees one process: then the whole fold runs in it.
            parallel = None if profile is None else False
            applied = rebuild(app, views, end, LogSource(log_url, views_env), parallel)
            if profile is not None:
                profile.disable()
            seconds = time.perf_counter() - started
            cpu = cpu_seconds(pid, True) - cpu0
            db = sum(db_seconds(name) for name in db_names) - db0
            other = max(0.0, busy_seconds() - busy0 - cpu - db)
            rows = views._all("SELECT COUNT(*) AS n FROM mm_job_views", ())
            job_rows = int(rows[0]["n"])
    finally:
        app.close()
    if applied != count or job_rows != meta["jobs"]:
        raise RuntimeError(
            f"replay applied {applied} of {count} notifications, {job_rows} of {meta['jobs']} jobs"
        )
    return Result(
        backend=backend,
        jobs=meta["jobs"],
        notifications=applied,
        replay_seconds=seconds,
        baseline_seconds=baseline_seconds,
        select_seconds=select_seconds,
        batch_size=CATCH_UP_BATCH_SIZE,
        cpu_process=cpu / seconds,
        cpu_db=db / seconds if db_names else None,
        cpu_other=other / seconds,
        job_rows=job_rows,
        log=dict(meta),
    )


def measure_sqlite(
    source_url: str, meta: dict[str, Any], profile: cProfile.Profile | None = None
) -> Result:
    # scratch_views puts the views in a temporary directory of their own.
    return measure("SQLite", source_url, source_url, meta, [], profile)


def measure_postgres(
    admin_url: str,
    source_url: str,
    meta: dict[str, Any],
    say: Callable[[str], None],
    profile: cProfile.Profile | None = None,
) -> Result:
    log_url = postgres_log(admin_url, source_url, meta, say)
    drop = f'DROP DATABASE IF EXISTS "{PG_VIEWS_DB}" WITH (FORCE)'
    pg_admin(admin_url, drop, f'CREATE DATABASE "{PG_VIEWS_DB}"')
    try:
        views_url = pg_url(admin_url, PG_VIEWS_DB)
        return measure("PostgreSQL", log_url, views_url, meta, [PG_LOG_DB, PG_VIEWS_DB], profile)
    finally:
        pg_admin(admin_url, drop)


def report(r: Result) -> str:
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
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS)
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
        print(f"bench.replay: {text}", file=sys.stderr, flush=True)

    source_url, meta = sqlite_log(args.jobs, args.rate, say)
    profile = cProfile.Profile() if args.profile else None
    results: list[Result] = []
    if args.backend in ("sqlite", "both"):
        say(f"replaying {meta['notifications']:,} events into fresh SQLite views")
        results.append(measure_sqlite(source_url, meta, profile))
        say(report(results[-1]))
    if args.backend in ("postgres", "both"):
        _, why = postgres_version(args.postgres_url)
        if why is not None:
            say(f"PostgreSQL skipped: not reachable at {args.postgres_url} ({why})")
            if args.json:
                print(json.dumps({"backend": "PostgreSQL", "skipped": why}), flush=True)
        else:
            say(f"replaying {meta['notifications']:,} events into fresh PostgreSQL views")
            results.append(measure_postgres(args.postgres_url, source_url, meta, say, profile))
            say(report(results[-1]))
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
