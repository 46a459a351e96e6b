"""The views projection: exactly-once under racing runners, and rebuild equals live."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import IntegrityError, Tracking

from adapters.crypto import Secrets, sha256_hex
from adapters.eventstore import open_market, store_env
from adapters.venice import parse_venice_models
from api.validation import validate_video_request
from domain.catalog import Catalog
from projections.runner import ProjectionRunner
from projections.views import VIEWS_NAME, open_views
from services.commands import Commands

MODELS = [
    {
        "id": "seedance-2-fast-t2v",
        "type": "video",
        "model_spec": {
            "name": "S",
            "constraints": {
                "model_type": "text-to-video",
                "durations": ["4s"],
                "resolutions": ["480p"],
                "aspect_ratios": ["16:9"],
                "audio": False,
                "audio_configurable": False,
            },
        },
    }
]


def fill_log(commands: Commands, jobs: int) -> None:
    catalog = Catalog(parse_venice_models("venice", MODELS))
    buyer_id, _, _ = commands.create_buyer("b")
    commands.deposit(buyer_id, 10**9)
    for n in range(jobs):
        request = validate_video_request(
            {"model": "venice-seedance-2-fast-t2v", "prompt": f"p{n}"},
            catalog,
            allow_http_webhooks=False,
            allow_private_webhooks=False,
        )
        submitted = commands.submit(
            buyer_id=buyer_id,
            request=request,
            route=[],
            routing={},
            estimated_cost=100,
            hold=110,
            ttl_seconds=60,
            min_discount=None,
            idempotency_key=None,
        )
        if n % 3 == 0:
            commands.cancel(submitted.job_id)


def test_racing_runners_apply_each_event_once_and_rebuild_is_identical(database_url: str) -> None:
    market = open_market(database_url)
    commands = Commands(market, Secrets("x" * 32))
    fill_log(commands, 60)
    views = [open_views(store_env(database_url, role=VIEWS_NAME)) for _ in range(2)]
    runners = [ProjectionRunner(market, v, batch_size=7) for v in views]
    threads = [threading.Thread(target=r.catch_up) for r in runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = market.recorder.max_notification_id()
    assert views[0].position(market.name) == end
    live = views[0].digest()
    assert live["mm_job_views"][0] == 60
    docs = views[0].list_jobs(str(next(iter(_buyers(views[0])))), 100, None, None)
    assert docs is not None
    assert sum(d["status"] == "canceled" for d in docs) == 20
    assert all(
        d["usage"]["settlement_status"] == "released" for d in docs if d["status"] == "canceled"
    )

    views[1].reset(market.name)
    assert views[1].digest()["mm_job_views"][0] == 0
    runners[1].catch_up()
    assert views[1].digest() == live
    for v in views:
        v.datastore.close()
    market.close()


def test_a_runner_reads_the_log_only_once_another_runners_batch_is_in(database_url: str) -> None:
    """Runners sharing the views (one per API process) read the log under the batch lock: one
    waiting for another's batch then reads only what follows it, instead of reading and
    decoding the same range to throw it away at the lock."""
    market = open_market(database_url)
    commands = Commands(market, Secrets("w" * 32))
    fill_log(commands, 3)
    end = market.recorder.max_notification_id()
    views = [open_views(store_env(database_url, role=VIEWS_NAME)) for _ in range(2)]
    first, second = (ProjectionRunner(market, v) for v in views)
    reading, release = threading.Event(), threading.Event()
    read_first, read_second = first.reader.read, second.reader.read
    second_starts: list[int] = []
    changed: list[set[str] | None] = []

    def slow(start: int, limit: int, stop: int | None = None) -> Any:
        batch = read_first(start, limit, stop)
        reading.set()
        release.wait(10)
        return batch

    def spied(start: int, limit: int, stop: int | None = None) -> Any:
        second_starts.append(start)
        return read_second(start, limit, stop)

    first.reader.read = slow  # type: ignore[method-assign]
    second.reader.read = spied  # type: ignore[method-assign]
    second.on_passed_elsewhere.append(changed.append)
    applying = threading.Thread(target=first.run_once, kwargs={"limit": 10_000})
    applying.start()
    try:
        assert reading.wait(10)
        waiting = threading.Thread(target=second.run_once)
        waiting.start()
        waiting.join(0.3)
        assert waiting.is_alive() and second_starts == []
    finally:
        release.set()
        applying.join(10)
    waiting.join(10)
    assert second_starts == [end]
    assert second.position == end == views[1].position(market.name)
    assert changed and changed[0]  # what the first one applied, by aggregate id
    for v in views:
        v.datastore.close()
    market.close()


def _buyers(views: object) -> set[str]:
    rows = views._all("SELECT DISTINCT buyer_id FROM mm_job_views", ())  # type: ignore[attr-defined]
    return {r["buyer_id"] for r in rows}


def test_read_your_writes_wait(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/data"
    market = open_market(url)
    views = open_views(store_env(url, role=VIEWS_NAME))
    runner = ProjectionRunner(market, views)
    market.on_saved.append(runner.wake)
    runner.start()
    try:
        commands = Commands(market, Secrets("y" * 32))
        for _ in range(20):
            buyer_id, key, written = commands.create_buyer("b")
            assert runner.wait_for(written.position, timeout=2.0)
            assert views.principal(sha256_hex(key))
            assert views.principal(sha256_hex(key)) == ("buyer", str(buyer_id), "b")
        assert not runner.wait_for(10**9, timeout=0.05)
    finally:
        runner.stop()
        views.datastore.close()
        market.close()


def test_a_woken_runner_reads_the_log_once_per_save(tmp_path: Path) -> None:
    """A pass that applied less than a full batch has seen every save before it: the runner
    then waits to be woken instead of reading the log (and its position) again for nothing."""
    url = f"sqlite:///{tmp_path}/data"
    market = open_market(url)
    views = open_views(store_env(url, role=VIEWS_NAME))
    # No timer passes during the test: only the saves wake it.
    runner = ProjectionRunner(market, views, poll_interval=60.0)
    passes = 0
    run_once = runner.run_once

    def counting(until: int | None = None, limit: int | None = None) -> int:
        nonlocal passes
        passes += 1
        return run_once(until, limit)

    runner.run_once = counting  # type: ignore[method-assign]
    advanced = threading.Condition()
    runner.on_advance.append(lambda _: _notify(advanced))
    market.on_saved.append(runner.wake)
    runner.start()
    try:
        commands = Commands(market, Secrets("z" * 32))
        saves = 20
        for _ in range(saves):
            position = commands.create_buyer("b")[2].position
            with advanced:
                assert advanced.wait_for(lambda p=position: runner.position >= p, 5.0)
        # One pass at start, then one per save (a second, empty pass per save before).
        assert passes <= saves + 2
    finally:
        runner.stop()
        views.datastore.close()
        market.close()


def _notify(condition: threading.Condition) -> None:
    with condition:
        condition.notify_all()


def test_views_of_another_schema_version_are_rebuilt_from_the_log(database_url: str) -> None:
    market = open_market(database_url)
    views = open_views(store_env(database_url, role=VIEWS_NAME))
    try:
        commands = Commands(market, Secrets(Secrets.generate_master_key()))
        fill_log(commands, 3)
        assert views.ensure_schema(market.name) in (True, False)
        assert not views.ensure_schema(market.name)  # the same version: left alone
        ProjectionRunner(market, views).catch_up()
        live = views.digest()
        with views.datastore.transaction(commit=True) as c:
            c.execute(views.q("UPDATE mm_schema SET version = 1"), ())
        assert views.ensure_schema(market.name)
        assert views.position(market.name) == 0
        assert all(rows == 0 for rows, _ in views.digest().values())
        ProjectionRunner(market, views).catch_up()
        assert views.digest() == live
    finally:
        # On PostgreSQL each holds a connection pool, whose threads outlived the test.
        views.datastore.close()
        market.close()


def test_a_batch_overlapping_one_already_applied_is_refused(database_url: str) -> None:
    """Two runners that read the same position: the one with the longer batch commits second
    and must not apply the overlap again (the tracking upsert alone would let it)."""
    market = open_market(database_url)
    views = open_views(store_env(database_url, role=VIEWS_NAME))
    fill_log(Commands(market, Secrets("z" * 32)), 3)
    notifications = market.recorder.select_notifications(start=1, limit=100)
    items = [(n.id, market.mapper.to_domain_event(n)) for n in notifications]
    views.apply_batch(items[:5], Tracking(market.name, items[4][0]), 0)
    with pytest.raises(IntegrityError):
        views.apply_batch(items[:8], Tracking(market.name, items[7][0]), 0)
    assert views.position(market.name) == items[4][0]
    views.apply_batch(items[5:], Tracking(market.name, items[-1][0]), items[4][0])
    live = views.digest()
    views.reset(market.name)
    ProjectionRunner(market, views).catch_up()
    assert views.digest() == live
    views.datastore.close()
    market.close()


def test_offer_rows_are_shared_only_while_their_values_are_the_same() -> None:
    """The order book's rows are memoised by value (every submit reads its model's whole
    book): an unchanged row gives back the same OfferRow, a changed one a fresh one, from
    SQLite's positional rows and PostgreSQL's dict rows alike."""
    from projections import orderbook

    values = {
        "offer_id": "o1",
        "seq": 1,
        "seller_id": "s1",
        "model": "venice-m",
        "provider": "venice",
        "base_url": None,
        "sealed_key": '{"ct": "x", "nonce": "y"}',
        "key_sha256": "k",
        "cost_multiplier": "0.80",
        "max_concurrent_jobs": None,
        "state": "active",
        "deactivated_reason": None,
        "backoff_until": 0,
        "backoff_reason": None,
        "failures": 0,
        "in_flight": 0,
        "jobs": 0,
        "volume": 0,
        "payout": 0,
    }
    assert list(values) == orderbook.COLUMNS
    first = orderbook._offer_row(dict(values))
    assert orderbook._offer_row(tuple(values.values())) is first
    assert first.sealed_key == {"ct": "x", "nonce": "y"} and first.backoff_until == 0.0
    paused = orderbook._offer_row({**values, "state": "paused", "in_flight": 1})
    assert (paused.state, paused.in_flight) == ("paused", 1)
    assert (first.state, first.in_flight) == ("active", 0)
    assert orderbook._offer_row(dict(values)) is first


def test_a_views_snapshot_may_idle_past_the_pools_idle_timeout(database_url: str) -> None:
    """Checks that read every row (replay --verify, reconcile) work in Python between their
    statements, inside one snapshot: PostgreSQL must not end it for idling."""
    if not database_url.startswith("postgres"):
        pytest.skip("PostgreSQL's idle-in-transaction timeout")
    market = open_market(database_url)
    env = {**store_env(database_url, role=VIEWS_NAME)}
    env["POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT"] = "1"
    views = open_views(env)
    try:
        views.ensure_schema(market.name)
        with views.snapshot(market.name) as snapshot:
            time.sleep(1.5)  # what is tested: idling longer than the timeout
            assert snapshot.cursor.execute("SELECT 1").fetchone() is not None
    finally:
        views.datastore.close()
        market.close()
