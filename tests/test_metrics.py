"""SPEC 8's operations: /metrics in the Prometheus format (request latency by route and status
class, job outcomes by model and code, provider errors by kind, projection lag, pending jobs,
webhook backlog), /healthz degraded by lag, and one JSON log line per client error."""

from __future__ import annotations

import json
import random
import string
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from adapters.crypto import Secrets
from adapters.eventstore import open_market, store_env
from api import app as api_app
from api.metrics import KNOWN_METHODS, LAG_DEGRADED_SECONDS, Metrics, degraded_reasons
from projections.runner import ProjectionRunner
from projections.views import VIEWS_NAME, open_views
from services.commands import Commands
from tests.conftest import ServerFactory
from tests.harness import BIN, Client, Server, free_port
from tests.test_lifecycle import RUNWAY, SEEDANCE, market, submit_ok, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
HTTP_SERIES = ("mediamarket_http_requests_total", "mediamarket_http_request_duration_seconds_count")


def scrape(c: Client) -> Samples:
    r = c.get("/metrics")
    assert r.status == 200, r.body
    assert r.headers["content-type"] == CONTENT_TYPE_LATEST, r.headers
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.body.decode())
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def test_outcomes_provider_errors_latency_and_lag(make_server: ServerFactory) -> None:
    server = make_server()
    c = server.client
    _, buyer_key, seller_key = market(c)
    # Flaky: retrieve answers 503 every other call, then the video. Failing inference: accepted,
    # then retrieve 500, so the job fails with inference_failed.
    c.create_offer(seller_key, SEEDANCE, "sim_flaky", "0.80")
    c.create_offer(seller_key, RUNWAY, "sim_fail_inference", "0.80")
    ok = submit_ok(c, buyer_key, model=SEEDANCE)
    bad = submit_ok(c, buyer_key, model=RUNWAY)
    assert c.wait_terminal(ok["id"], buyer_key)["status"] == "succeeded"
    failed = c.wait_terminal(bad["id"], buyer_key)
    assert failed["status"] == "failed" and failed["error"]["code"] == "inference_failed"
    assert c.get("/v1/buyer/me").status == 401

    outcomes = "mediamarket_job_outcomes_total"
    # The runner counts right after it commits the batch the poll just saw, and the worker
    # writes a job's tail (the provider copy deleted) just after its end: once the views hold
    # all of that, nothing more is written.
    samples = wait_until(
        lambda: (
            (s := scrape(c))
            and value(s, outcomes, model=RUNWAY, status="failed", code="inference_failed") == 1
            and value(s, outcomes, model=SEEDANCE, status="succeeded", code="none") == 1
            and value(s, "mediamarket_projection_lag_events") == 0
            and s
        ),
        10,
        "both outcomes counted and the views caught up",
    )
    assert sum(series(samples, outcomes).values()) == 2

    errors = "mediamarket_provider_errors_total"
    assert value(samples, errors, provider="venice", kind="inference_failed") >= 1
    assert value(samples, errors, provider="venice", kind="transient") >= 1
    assert {dict(labels)["provider"] for labels in series(samples, errors)} == {"venice"}

    # Latency: the two submits and the 401, each in its route's histogram, buckets cumulative.
    hist = "mediamarket_http_request_duration_seconds"
    submits = {"method": "POST", "route": "/v1/video/generations", "status_class": "2xx"}
    assert value(samples, f"{hist}_count", **submits) == 2
    assert value(samples, f"{hist}_sum", **submits) > 0
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for labels, v in series(samples, f"{hist}_bucket").items()
        if {k: v for k, v in labels if k != "le"} == submits
    )
    assert buckets[-1] == (float("inf"), 2)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    unauthorised = {"method": "GET", "route": "/v1/buyer/me", "status_class": "4xx"}
    assert value(samples, f"{hist}_count", **unauthorised) == 1
    me = {"method": "GET", "route": "/v1/buyer/me", "status": "401"}
    assert value(samples, "mediamarket_http_requests_total", **me) == 1

    assert value(samples, "mediamarket_projection_lag_seconds") == 0
    assert value(samples, "mediamarket_projection_position") > 0
    assert value(samples, "mediamarket_projection_failed") == 0
    for gauge in ("jobs_pending", "jobs_claimed", "webhook_backlog", "worker_active_jobs"):
        assert (f"mediamarket_{gauge}", frozenset()) in samples, gauge
    health = c.get("/healthz").json()
    assert health["status"] == "ok" and health["degraded_reasons"] == [], health
    assert health["projection_lag_events"] >= 0
    assert 0 <= health["projection_lag_seconds"] < LAG_DEGRADED_SECONDS


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_each_outcome_is_counted_by_exactly_one_process(make_server: ServerFactory) -> None:
    """Two engines on one database, both with a worker and a projection runner racing for
    every batch: the outcome counters of both add up to the jobs, none counted twice."""
    a = make_server()
    # One provider for both: B's worker must find the videos A's worker queued.
    b = make_server(PROVIDER_BASE_URL_VENICE=f"http://127.0.0.1:{a.port}/sim/api/v1")
    ca, cb = a.client, b.client
    _, buyer_key, seller_key = market(ca)
    ca.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    jobs = [submit_ok(c, buyer_key, prompt=f"job {n}")["id"] for n, c in enumerate([ca, cb] * 3)]
    for job_id in jobs:
        assert ca.wait_terminal(job_id, buyer_key)["status"] == "succeeded"

    def counted() -> float:
        labels = {"model": SEEDANCE, "status": "succeeded", "code": "none"}
        return sum(value(scrape(c), "mediamarket_job_outcomes_total", **labels) for c in (ca, cb))

    # A runner counts just after its commit: wait for the counts, then for the views to hold
    # the whole log (the jobs' tails too), so that nothing is left to count twice.
    wait_until(lambda: counted() >= len(jobs), 10, "every outcome counted")
    wait_until(
        lambda: all(c.get("/healthz").json()["projection_lag_events"] == 0 for c in (ca, cb)),
        10,
        "both engines' views caught up",
    )
    assert counted() == len(jobs)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_views_rebuilt_at_start_do_not_count_old_outcomes_again(
    make_server: ServerFactory, database_url: str
) -> None:
    server = make_server()
    c = server.client
    _, buyer_key, seller_key = market(c)
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    job = submit_ok(c, buyer_key)
    assert c.wait_terminal(job["id"], buyer_key)["status"] == "succeeded"
    labels = {"model": SEEDANCE, "status": "succeeded", "code": "none"}
    wait_until(
        lambda: value(scrape(c), "mediamarket_job_outcomes_total", **labels) == 1, 10, "counted"
    )
    server.stop()
    # As a new schema version does: the views are dropped and rebuilt from the log at start.
    views = open_views(store_env(database_url, role=VIEWS_NAME))
    try:
        with views.datastore.transaction(commit=True) as cursor:
            cursor.execute("DELETE FROM mm_schema")
    finally:
        views.datastore.close()
    server.start()
    samples = wait_until(
        lambda: (s := scrape(c)) and value(s, "mediamarket_projection_lag_events") == 0 and s,
        10,
        "the rebuild",
    )
    assert value(samples, "mediamarket_projection_position") > 0
    assert series(samples, "mediamarket_job_outcomes_total") == {}


def random_token(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_labels_stay_bounded_whatever_paths_and_methods_clients_send(server: Server) -> None:
    c = server.client
    rng = random.Random(13)
    junk_methods = [random_token(rng, string.ascii_uppercase, 8) for _ in range(1000)]
    kinds: list[Any] = [
        lambda: "/" + random_token(rng, string.ascii_letters + string.digits, 12),
        lambda: "/v1/video/generations/" + random_token(rng, string.hexdigits, 32),
        lambda: "/v1/nothing/" + random_token(rng, string.digits, 6) + "/here",
    ]

    # Methods the HTTP parser knows besides the usual ones; made-up ones it answers 400 itself,
    # before any route or middleware sees them (they are sent too, and change nothing).
    rare = ["TRACE", "PROPFIND", "PURGE", "LINK", "MKCOL", "REPORT", "SEARCH", "NOTIFY"]

    def send(method: str, path: str) -> None:
        status = c.request(method, path).status
        assert status in (401, 404, 405) or (method in junk_methods and status == 400), status

    # Every kind of path with every kind of method once: the label values these make.
    for kind in kinds:
        for method in [*sorted(KNOWN_METHODS), "PROPFIND"]:
            send(method, kind())
    scrape(c)  # a scrape is counted once answered: the next one shows its series
    before = scrape(c)
    for _ in range(1000):
        method = rng.choice([*KNOWN_METHODS, *rare, *rng.sample(junk_methods, 7)])
        send(method, rng.choice(kinds)())
    after = scrape(c)

    for name in HTTP_SERIES:
        assert set(series(after, name)) == set(series(before, name)), name
    templates = {p for r in api_app.ROUTES for p in (r.path, "/{min_prefix}" + r.path)}
    templates.add("unmatched")
    for labels in series(after, "mediamarket_http_request_duration_seconds_count"):
        found = dict(labels)
        assert found["method"] in KNOWN_METHODS | {"other"}, found
        # The embedded simulator's own routes (the catalog load) are under /sim.
        assert found["route"] in templates or found["route"].startswith("/sim/"), found
        assert found["status_class"] in ("2xx", "4xx"), found
    # The later thousand were counted, in the series the first few made.
    total = sum(series(after, "mediamarket_http_requests_total").values())
    assert total - sum(series(before, "mediamarket_http_requests_total").values()) >= 500


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_client_error_is_logged_once_with_its_request_id_status_and_route(
    server: Server,
) -> None:
    c = server.client
    request_id = f"req-metrics-{time.monotonic_ns()}"
    r = c.get(
        "/v1/video/generations/00000000-0000-0000-0000-000000000000",
        headers={"X-Request-Id": request_id},
    )
    assert r.status == 401 and r.headers["x-request-id"] == request_id
    ok = f"req-ok-{time.monotonic_ns()}"
    assert c.get("/healthz", headers={"X-Request-Id": ok}).status == 200

    def lines(rid: str) -> list[dict[str, Any]]:
        found = []
        for line in server.logs().splitlines():
            if rid in line and line.startswith("{"):
                found.append(json.loads(line))
        return found

    # The line is written before the answer is sent, so it is already in the log.
    [line] = lines(request_id)
    assert line["event"] == "request" and line["level"] == "info", line
    assert line["request_id"] == request_id
    assert line["status"] == 401
    assert line["route"] == "/v1/video/generations/{job_id}"
    assert line["method"] == "GET"
    # A success that isn't slow is logged at debug, which LOG_LEVEL=info leaves out.
    assert lines(ok) == []


def test_lag_in_events_and_seconds_and_when_it_degrades_health(database_url: str) -> None:
    market_app = open_market(database_url)
    views = open_views(store_env(database_url, role=VIEWS_NAME))
    try:
        views.ensure_schema(market_app.name)
        runner = ProjectionRunner(market_app, views)
        commands = Commands(market_app, Secrets("x" * 32))
        buyer_id, _, _ = commands.create_buyer("b")
        runner.catch_up()
        now = time.time()
        metrics = Metrics(clock=lambda: now)
        assert metrics.projection_lag(market_app, views).events == 0
        assert metrics.projection_lag(market_app, views).seconds == 0

        first = commands.deposit(buyer_id, 1).position
        commands.deposit(buyer_id, 2)
        end = market_app.recorder.max_notification_id()
        behind = views.position(market_app.name)
        # A moment later: behind, but well within the limit.
        now = time.time() + 1
        lag = metrics.projection_lag(market_app, views)
        assert lag.events == end - behind >= 2
        assert 0 < lag.seconds < LAG_DEGRADED_SECONDS
        assert degraded_reasons(None, lag) == []
        # Still not applied long after: the age of the oldest of them degrades health.
        now = time.time() + LAG_DEGRADED_SECONDS + 5
        lag = metrics.projection_lag(market_app, views)
        assert lag.seconds > LAG_DEGRADED_SECONDS
        assert degraded_reasons(None, lag) == ["projection_lagging"]

        # Up to the first deposit: the age is now the second's, the count one less.
        runner.catch_up(until=first)
        assert metrics.projection_lag(market_app, views).events == end - first
        runner.catch_up()
        now = time.time() + 3600
        assert metrics.projection_lag(market_app, views) == type(lag)(0, 0.0)
    finally:
        views.datastore.close()
        market_app.close()


def test_each_engine_counts_in_its_own_registry() -> None:
    """Not the library's global registry: several engines in one process count apart."""
    a, b = Metrics(), Metrics()
    a.observe_request("GET", "/healthz", 200, 0.001)
    a.provider_error("venice", "transient")
    labels = {"method": "GET", "route": "/healthz", "status": "200"}
    assert a.registry.get_sample_value("mediamarket_http_requests_total", labels) == 1
    assert b.registry.get_sample_value("mediamarket_http_requests_total", labels) is None
    errors = {"provider": "venice", "kind": "transient"}
    assert a.registry.get_sample_value("mediamarket_provider_errors_total", errors) == 1
    assert b.registry.get_sample_value("mediamarket_provider_errors_total", errors) is None


def _sample(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no {name} in /metrics")


def test_pending_jobs_are_counted_with_every_worker_down_and_a_worker_has_its_own_metrics(
    make_server: ServerFactory, database_url: str, tmp_path: Path
) -> None:
    api = make_server("--no-worker")
    c = api.client
    _, buyer_key, seller_key = market(c)
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    jobs = [submit_ok(c, buyer_key, prompt=f"waits {n}")["id"] for n in range(3)]

    def pending() -> float:
        return _sample(c.get("/metrics").body.decode(), "mediamarket_jobs_pending")

    wait_until(lambda: pending() == 3, timeout=20, what="three pending jobs")
    assert _sample(c.get("/metrics").body.decode(), "mediamarket_jobs_claimed") == 0

    port = free_port()
    env = {
        **api.env,
        "METRICS_PORT": str(port),
        "PROVIDER_BASE_URL_VENICE": f"http://127.0.0.1:{api.port}/sim/api/v1",
    }
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            [str(BIN), "worker"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        for job_id in jobs:
            assert c.wait_terminal(job_id, buyer_key, timeout=60)["status"] == "succeeded"
        ops = Client(f"http://127.0.0.1:{port}")
        assert ops.get("/healthz").json()["status"] == "ok"
        text = ops.get("/metrics").body.decode()
        succeeded = [
            s
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "mediamarket_job_outcomes_total" and s.labels["status"] == "succeeded"
        ]
        assert sum(s.value for s in succeeded) + _succeeded_on(c) == 3
        assert ops.get("/v1/video/generations").status == 404  # no API on a worker's port
        assert pending() == 0
    finally:
        worker.terminate()
        worker.wait(15)


def _succeeded_on(c: Client) -> float:
    """Outcomes are counted by whichever process applied the job's end."""
    return sum(
        s.value
        for f in text_string_to_metric_families(c.get("/metrics").body.decode())
        for s in f.samples
        if s.name == "mediamarket_job_outcomes_total" and s.labels["status"] == "succeeded"
    )
