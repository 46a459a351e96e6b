"""The replay bench's market log: a small discrete-event simulation of a busy market that
drives the real command side (``services.commands.Commands`` over the real aggregates), so the
events have exactly the shapes and the interleaving a running engine writes (see
``bench.replay`` for the whole story; ``bench.replaystore`` keeps the logs it writes).
"""

from __future__ import annotations

import gc
import heapq
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from json import encoder as json_encoder
from operator import methodcaller
from statistics import median
from typing import Any, cast
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import JSONTranscoder, Mapper
from eventsourcing.sqlite import SQLiteApplicationRecorder
from eventsourcing.utils import get_topic

from bench.common import MODEL
from bench.project import (
    JOB_TTL_SECONDS,
    LEASE_SECONDS,
    MAX_ROUTE_OFFERS,
    Candidate,
    Commands,
    FeeSchedule,
    MarketApp,
    Offer,
    Ranking,
    Route,
    RoutingError,
    Secrets,
    VideoRequest,
    choose,
    parse_multiplier,
    price_offer,
    settlement_id,
    simulator_catalog,
    simulator_list_price,
    single_threaded,
    validate_video_request,
)

# Bump whenever the generator writes a different log: cached logs of another version are
# generated again.
VERSION = 1
SECRET_KEY = "bench-replay-secret-key-0123456789abcdef"
BUYERS = 100
OFFER_MULTIPLIERS = ("0.80", "0.85", "0.90")
WORKER_ID = "bench-replay-worker"
FEES = FeeSchedule()
FLUSH_EVENTS = 10_000  # events per MarketApp.save while generating
PROGRESS_EVERY_JOBS = 100  # how often the generator reports the jobs it has finished

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


# A stored event as the SQLite recorder inserts it: originator id (hex), version, topic, state.
Row = tuple[str, int, str, bytes]


class RowEncoder:
    """What the application's mapper makes of an event (``Mapper.to_stored_event``), as the row
    the SQLite recorder inserts. The same JSON bytes from the same encoder settings and hooks,
    less building a C encoder for each event (the library's ``JSONEncoder.encode`` does): a
    tenth of generating a log. A mapper that compresses, encrypts or transcodes otherwise goes
    through the library's own method."""

    def __init__(self, mapper: Mapper[UUID]) -> None:
        self.mapper = mapper
        self.topics: dict[type, str] = {}
        self.encode: Callable[[Any, int], Sequence[str]] | None = None
        transcoder = mapper.transcoder
        if (
            type(mapper).to_stored_event is Mapper.to_stored_event
            and mapper.compressor is None
            and mapper.cipher is None
            and type(transcoder) is JSONTranscoder
            and transcoder.encoder.indent is None
            and json_encoder.c_make_encoder is not None
        ):
            e = transcoder.encoder
            self.encode = json_encoder.c_make_encoder(
                None,  # no check for circular references: they raise either way
                e.default,
                json_encoder.encode_basestring_ascii
                if e.ensure_ascii
                else json_encoder.encode_basestring,
                None,
                e.key_separator,
                e.item_separator,
                e.sort_keys,
                e.skipkeys,
                e.allow_nan,
            )

    def rows(self, events: Sequence[Any]) -> list[Row]:
        encode = self.encode
        if encode is None:
            return [_row(self.mapper.to_stored_event(e)) for e in events]
        topics = self.topics
        rows: list[Row] = []
        for e in events:
            cls = type(e)
            topic = topics.get(cls)
            if topic is None:
                topic = topics[cls] = get_topic(cls)
            state = dict(vars(e))
            originator_id = state.pop("originator_id")
            version = state.pop("originator_version")
            class_version = getattr(cls, "class_version", 1)
            if class_version > 1:
                state["class_version"] = class_version
            rows.append(
                (
                    originator_id.hex if isinstance(originator_id, UUID) else originator_id,
                    version,
                    topic,
                    "".join(encode(state, 0)).encode("utf8"),
                )
            )
        return rows


def _row(stored: Any) -> Row:
    originator_id = stored.originator_id
    return (
        originator_id.hex if isinstance(originator_id, UUID) else originator_id,
        stored.originator_version,
        stored.topic,
        stored.state,
    )


# Where a flush's events and snapshots go (in that order within the flush).
Sink = Callable[[list[Any], list[Any]], None]


class LibrarySink:
    """The events and snapshots written as the application writes them: its mapper, its
    recorder's ``insert_events``, its snapshot store's ``put``. Any backend."""

    def __init__(self, app: MarketApp) -> None:
        self.app = app

    def __call__(self, events: list[Any], snapshots: list[Any]) -> None:
        app = self.app
        app.recorder.insert_events([app.mapper.to_stored_event(e) for e in events])
        if snapshots:
            assert app.snapshots is not None
            app.snapshots.put(snapshots)


class SQLiteSink:
    """The same rows into the application's SQLite tables, with its recorders' own insert
    statements, in one ``executemany`` each (the recorder runs one statement per event, to
    return the notification ids a log being generated has no use for)."""

    def __init__(self, app: MarketApp) -> None:
        recorder: Any = app.recorder
        self.datastore = recorder.datastore
        self.events_sql = recorder.insert_events_statement
        snapshots: Any = app.snapshots
        self.snapshots_sql = (
            None if snapshots is None else snapshots.recorder.insert_events_statement
        )
        self.encoder = RowEncoder(app.mapper)

    def __call__(self, events: list[Any], snapshots: list[Any]) -> None:
        with self.datastore.transaction(commit=True) as c:
            c.executemany(self.events_sql, self.encoder.rows(events))
            if snapshots:
                assert self.snapshots_sql is not None
                c.executemany(self.snapshots_sql, self.encoder.rows(snapshots))


def default_sink(app: MarketApp) -> Sink:
    if isinstance(app.recorder, SQLiteApplicationRecorder):
        return SQLiteSink(app)
    return LibrarySink(app)


class BufferedMarket:
    """Stands in for ``MarketApp`` under ``Commands``: each save's events are kept in order and
    many saves are written at once, through ``sink``. Aggregates live in memory (every one was
    created here), so a command reads what the previous one saved without a database read."""

    def __init__(
        self, app: MarketApp, flush_events: int = FLUSH_EVENTS, sink: Sink | None = None
    ) -> None:
        self.app = app
        self.recorder = app.recorder
        self.repository = self
        self.flush_events = flush_events
        self.sink = sink if sink is not None else default_sink(app)
        self.live: dict[UUID, Any] = {}
        self.pending: list[Any] = []
        self.touched: dict[UUID, Any] = {}
        self.emitted = 0  # events saved so far (the sum of ``topics``)
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
            events = aggregate.collect_events()
            self.pending += events
            self.emitted += len(events)
            for e in events:
                self.topics[type(e).__qualname__] += 1
        if len(self.pending) >= self.flush_events:
            self.flush()
        return []

    def save_together(self, groups: list[list[Any]]) -> list[Any]:
        return [self.save(*objs) for objs in groups]

    def caught_up(self, aggregate: Any) -> Any:
        return aggregate  # every aggregate lives here: nothing is saved behind its back

    def forget(self, *aggregate_ids: UUID) -> None:
        for aggregate_id in aggregate_ids:
            self.live.pop(aggregate_id, None)

    def flush(self) -> None:
        """Write the pending events, with the snapshots the application would take. What
        ``MarketApp.save`` does for a running engine, less its per-event protocol checks and
        ``Recording`` objects: they were a third of generating a log."""
        pending, touched = self.pending, self.touched
        if not pending:
            return
        self.pending, self.touched = [], {}
        app = self.app
        intervals = app.snapshotting_intervals or {}
        snapshots = []
        if app.snapshots is not None and intervals:
            # The library snapshots an aggregate whose event lands on a multiple of its
            # interval; here the aggregate is in memory (at its latest version, which is as
            # good a snapshot).
            due: dict[UUID, Any] = {}
            for e in pending:
                aggregate = touched.get(e.originator_id)
                interval = intervals.get(type(aggregate)) if aggregate is not None else None
                if interval is not None and e.originator_version % interval == 0:
                    due[e.originator_id] = aggregate
            for aggregate in due.values():
                snapshot_class: Any = getattr(type(aggregate), "Snapshot", type(app).snapshot_class)
                snapshots.append(snapshot_class.take(aggregate))
        self.sink(pending, snapshots)


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
    def __init__(
        self,
        app: MarketApp,
        jobs: int,
        rate: float,
        seed: int,
        on_progress: Callable[[int, int], None] | None = None,
        secret_key: str = SECRET_KEY,
        sink: Sink | None = None,
    ) -> None:
        """``on_progress(done, jobs)`` is called at the start, every ``PROGRESS_EVERY_JOBS``
        finished jobs (all their events emitted) and at the end. ``secret_key`` seals the
        offers' provider keys: a server that is to route over them needs the same one.
        ``sink`` takes each flush's events and snapshots (default: written to ``app``'s
        store)."""
        self.jobs = jobs
        self.on_progress = on_progress
        self.rate = rate
        self.rng = random.Random(seed)
        self.market = BufferedMarket(app, sink=sink)
        # Ends about now: the jobs' times read like a recent busy stretch.
        self.sim = Simulation(now=time.time() - jobs / rate - JOB_TTL_SECONDS)
        self.secrets = Secrets(secret_key)
        self.commands = Commands(cast(MarketApp, self.market), self.secrets, self.sim.clock)
        single_threaded(self.commands)
        self.catalog = simulator_catalog()
        self.buyers: list[UUID] = []
        self.offers: list[Offer] = []
        self.submitted = 0
        self.rejected = 0  # submits routing turned away (every offer backed off)
        self.outcomes: Counter[str] = Counter()
        self.started_at: dict[UUID, int] = {}
        self.spans: list[int] = []
        self.rankings: dict[tuple[int, tuple[int, ...]], Ranking] = {}
        self.memo = True  # reuse rankings (False: rank every request afresh)

    def generate(self) -> dict[str, Any]:
        # Millions of short-lived events and a few long-lived aggregates: the collector's
        # young-generation passes were a sixth of the time, and find nothing to free in what
        # was imported before.
        gc.freeze()
        thresholds = gc.get_threshold()
        gc.set_threshold(100_000, 50, 100)
        try:
            return self._generate()
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()

    def _generate(self) -> dict[str, Any]:
        c = self.commands
        if self.on_progress is not None:
            self.on_progress(0, self.jobs)
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
        if self.on_progress is not None:
            self.on_progress(len(self.spans), self.jobs)
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
        list_price = simulator_list_price(request)
        now = self.sim.now
        skipped: list[dict[str, str]] = []
        available: list[int] = []
        for n, offer in enumerate(self.offers):
            reason = offer.unavailable_because(now)
            if reason is None:
                available.append(n)
            else:
                skipped.append({"offer_id": str(offer.id), "reason": reason})
        # The ranking of the same offers (whose terms never change here) at the same price is
        # the same: the Fractions of pricing and ranking were a twentieth of generating a log.
        key = (list_price, tuple(available))
        ranking = self.rankings.get(key) if self.memo else None
        if ranking is None:
            candidates: list[Candidate] = []
            for n in available:
                offer = self.offers[n]
                multiplier = parse_multiplier(offer.cost_multiplier)
                candidates.append(
                    Candidate(
                        offer_id=str(offer.id),
                        seller_id=offer.seller_id,
                        multiplier=multiplier,
                        created_seq=n + 1,
                        price=price_offer(list_price, multiplier, FEES),
                    )
                )
            ranking = choose(len(self.offers), candidates, None)
            self.rankings[key] = ranking
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
        if self.on_progress is not None and len(self.spans) % PROGRESS_EVERY_JOBS == 0:
            self.on_progress(len(self.spans), self.jobs)
