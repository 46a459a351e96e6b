"""Every series ``/metrics`` serves (SPEC 8), in one Prometheus registry per engine.

A registry of its own, not the library's global one: tests run several engines in one process,
and each must count only its own requests. Every label is drawn from a bounded set (a route's
template, a fixed list of methods, a status, a catalog model, an engine failure code, an error
class's kind), so no client can grow the series by what it sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from adapters.eventstore import MarketApp
from adapters.logreader import LogReader, UnreadableEvent
from domain.aggregates import Job
from domain.rules import JOB_FAILURE_CODES
from projections.ids import id_text
from projections.views import Views

if TYPE_CHECKING:
    from api.bootstrap import Engine
    from projections.runner import Failure

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
# Any other method a client sends (HTTP allows any token) is counted as "other".
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
# A poll takes about a millisecond and a submit tens; long polls and streams last seconds.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
# The views are lagging when the oldest event they have not applied is older than this. By age,
# not count: a burst of thousands applied within a second is no trouble, one event left for half
# a minute is (a stuck or starved runner, or a rebuild whose reads are still stale). A healthy
# runner sees another process's write within 50 ms, so 30 s is far from any normal delay; and
# the age is read from the log, so every process reports the same whichever runner applies.
LAG_DEGRADED_SECONDS = 30.0

JobEvent: Any = Job  # generated event classes
TERMINAL: dict[type, str] = {
    JobEvent.Succeeded: "succeeded",
    JobEvent.Failed: "failed",
    JobEvent.Canceled: "canceled",
    JobEvent.Expired: "expired",
}

# The ``_created`` series would double the output, and nothing reads them.
prometheus_client.disable_created_metrics()


@dataclass(frozen=True)
class Lag:
    """How far the views are behind the log: notifications not applied, and the age of the
    oldest of them in seconds (0 when caught up)."""

    events: int
    seconds: float


def degraded_reasons(failure: Failure | None, lag: Lag) -> list[str]:
    """Why ``/healthz`` says degraded (empty: ok)."""
    reasons = []
    if failure is not None:
        reasons.append("projection_failed")
    if lag.seconds > LAG_DEGRADED_SECONDS:
        reasons.append("projection_lagging")
    return reasons


class Metrics:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        # Outcomes that ended before this engine started are history, not news: views built in
        # place from the log (none there yet, or reset) apply it all again through the runner,
        # and must not count it twice.
        self.counting_since = clock()
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "mediamarket_http_requests",
            "HTTP requests by method, route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "mediamarket_http_request_duration_seconds",
            "Time from a request's arrival to its answer, by method, route template and status"
            " class (a stream's whole life).",
            ["method", "route", "status_class"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.job_outcomes = Counter(
            "mediamarket_job_outcomes",
            "Jobs ended, by catalog model, final status and failure code (none unless failed);"
            " each counted by exactly one process, the one whose projection applied it.",
            ["model", "status", "code"],
            registry=registry,
        )
        self.provider_errors = Counter(
            "mediamarket_provider_errors",
            "Failed provider calls by provider and kind (the engine's classification).",
            ["provider", "kind"],
            registry=registry,
        )

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, registry=registry)

        self.projection_position = gauge(
            "mediamarket_projection_position", "Last log position applied to the views."
        )
        self.projection_failed = gauge(
            "mediamarket_projection_failed",
            "1 when the projection stopped on an event it could not apply (see /healthz), else 0.",
        )
        self.projection_failed_position = gauge(
            "mediamarket_projection_failed_position",
            "Log position of the event the projection stopped on (0 while it runs).",
        )
        self.projection_lag_events = gauge(
            "mediamarket_projection_lag_events", "Log notifications the views have not applied."
        )
        self.projection_lag_seconds = gauge(
            "mediamarket_projection_lag_seconds",
            "Age of the oldest log event the views have not applied (0 when caught up).",
        )
        self.worker_active_jobs = gauge(
            "mediamarket_worker_active_jobs", "Jobs this process is driving now."
        )
        self.webhook_backlog = gauge(
            "mediamarket_webhook_backlog", "Webhooks not yet delivered and still to be tried."
        )
        self.jobs_pending = gauge("mediamarket_jobs_pending", "Jobs waiting for a worker.")
        self.jobs_claimed = gauge("mediamarket_jobs_claimed", "Jobs a worker holds now.")
        # The labelled children per (method, route, status): labels() is a lock and a tuple
        # hash per call, and this runs on every request.
        self._http: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._log: LogReader | None = None

    # ---------------------------------------------------------------- as things happen

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """``route`` is the matched route's template (or "unmatched"), never the path."""
        if method not in KNOWN_METHODS:
            method = "other"
        key = (method, route, status)
        children = self._http.get(key)
        if children is None:
            children = self._http[key] = (
                self.requests.labels(method, route, str(status)),
                self.latency.labels(method, route, f"{status // 100}xx"),
            )
        children[0].inc()
        children[1].observe(seconds)

    def provider_error(self, provider: str, kind: str) -> None:
        self.provider_errors.labels(provider, kind).inc()

    def count_outcomes(self, views: Views, items: Sequence[tuple[int, Any]]) -> None:
        """The projection runner's ``on_applied``: count the jobs a batch ended. The terminal
        events do not carry the model, so it is read from the job views, for those jobs only."""
        ended = []
        for _, e in items:
            status = TERMINAL.get(type(e))
            if status is not None and e.timestamp.timestamp() >= self.counting_since:
                ended.append((id_text(e.originator_id), status, e))
        if not ended:
            return
        models = views.job_models([job_id for job_id, _, _ in ended])
        for job_id, status, e in ended:
            code = "none"
            if status == "failed":
                # A code outside SPEC's (a newer worker's) is counted as "other".
                code = e.code if e.code in JOB_FAILURE_CODES else "other"
            self.job_outcomes.labels(models.get(job_id, "unknown"), status, code).inc()

    # ---------------------------------------------------------------- at scrape time

    def projection_lag(self, market: MarketApp, views: Views) -> Lag:
        """Blocking: the log's end, the views' position and, when behind, the first event
        not applied (three point reads)."""
        end = market.recorder.max_notification_id() or 0
        position = views.position(market.name)
        if end <= position:
            return Lag(0, 0.0)
        if self._log is None:
            self._log = LogReader(market)
        try:
            batch = self._log.read(position, 1)
        except UnreadableEvent:
            # The projection stopped on it (projection_failed says so); its age is unknowable.
            return Lag(end - position, 0.0)
        if not batch.items:
            return Lag(end - position, 0.0)
        written = batch.items[0][1].timestamp.timestamp()
        return Lag(end - position, max(0.0, self.clock() - written))

    def scrape(self, engine: Engine) -> bytes:
        """Blocking: set the gauges read at scrape time, then render every series."""
        runner = engine.runner
        failure = runner.failure
        self.projection_position.set(runner.position)
        self.projection_failed.set(0 if failure is None else 1)
        self.projection_failed_position.set(0 if failure is None else failure.position)
        lag = self.projection_lag(engine.market, engine.views)
        self.projection_lag_events.set(lag.events)
        self.projection_lag_seconds.set(lag.seconds)
        self.worker_active_jobs.set(engine.worker.active_jobs if engine.worker else 0)
        self.webhook_backlog.set(engine.views.webhook_backlog())
        # From the work queue every worker claims from, so any process (an API one included)
        # reports the whole deployment's.
        pending, claimed = engine.work_counts()
        self.jobs_pending.set(pending)
        self.jobs_claimed.set(claimed)
        return prometheus_client.generate_latest(self.registry)
