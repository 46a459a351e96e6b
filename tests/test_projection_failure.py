"""A view's own error stops its projection, once and visibly; only a lost tracking race is
retried (issue 11: a stray ledger row used to make the runner retry for ever at full CPU)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from adapters.crypto import Secrets
from adapters.eventstore import open_market, store_env
from adapters.logreader import LogBatch
from projections.runner import ProjectionFailed, ProjectionRunner
from projections.views import VIEWS_NAME, Views, open_views
from services.commands import Commands
from tests.conftest import ServerFactory
from tests.harness import ADMIN_TOKEN
from tests.test_lifecycle import wait_until


def add_stray_ledger_entry(views: Views, entry_no: int) -> None:
    """A journal row the fold will try to write again: a deposit at log position ``n`` posts
    entry number ``4 n``."""
    with views.datastore.transaction(commit=True) as c:
        c.execute(
            views.q(
                "INSERT INTO mm_ledger_entries (entry_no, entry_id, seq, posted_at, day, kind, "
                "buyer_id, job_id, reference) VALUES (?, 'stray', 0, "
                "'2026-01-01T00:00:00.000000Z', '2026-01-01', 'deposit', 'nobody', NULL, NULL)"
            ),
            (entry_no,),
        )


class CountingViews:
    """Counts the batches a runner tries to apply."""

    def __init__(self, views: Views) -> None:
        self.views = views
        self.applied = 0

    def apply_batch(self, *args: Any) -> None:
        self.applied += 1
        self.views.apply_batch(*args)

    def apply_next(self, name: str, read: Callable[[int], LogBatch], part: Any = None) -> Any:
        def counted(start: int) -> LogBatch:
            batch = read(start)
            self.applied += batch.last is not None
            return batch

        return self.views.apply_next(name, counted, part)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.views, name)


def test_a_views_own_constraint_violation_stops_the_projection_once(database_url: str) -> None:
    market = open_market(database_url)
    views = open_views(store_env(database_url, role=VIEWS_NAME))
    runner: ProjectionRunner | None = None
    try:
        views.ensure_schema(market.name)
        commands = Commands(market, Secrets("x" * 32))
        buyer_id, _, _ = commands.create_buyer("b")
        commands.deposit(buyer_id, 1_000)
        ProjectionRunner(market, views).catch_up()
        before = views.position(market.name)
        first = commands.deposit(buyer_id, 1).position
        second = commands.deposit(buyer_id, 2).position
        assert (first, second) == (before + 1, before + 2)
        add_stray_ledger_entry(views, second * 4)

        counting = CountingViews(views)
        runner = ProjectionRunner(market, counting)  # type: ignore[arg-type]
        # Stopped in the finally: a failed assertion must not leave it applying the log (and
        # holding connections to the test database) while later tests run.
        runner.start()
        assert runner.failed.wait(30)
        runner.join(30)
        # The thread ended by itself: nothing retries the batch.
        assert not runner.running
        failure = runner.failure
        assert failure is not None
        assert failure.position == second
        assert failure.error.startswith("IntegrityError")
        # The batch of both deposits failed; then each alone: the first applied, the second not.
        assert counting.applied == 3
        assert views.position(market.name) == first
        runner.wake()
        with pytest.raises(ProjectionFailed):
            runner.run_once()
        assert counting.applied == 3
        assert views.position(market.name) == first
    finally:
        if runner is not None:
            runner.stop()
        views.datastore.close()
        market.close()


def test_a_stopped_projection_shows_in_healthz_and_metrics_and_the_api_still_answers(
    make_server: ServerFactory, database_url: str
) -> None:
    server = make_server("--no-worker")
    c = server.client
    buyer_id, buyer_key = c.create_buyer(1_000_000)
    health = c.get("/healthz").json()
    assert health["status"] == "ok" and "projection_failure" not in health
    metrics = c.get("/metrics").body.decode()
    assert re.search(r"^mediamarket_projection_failed 0\.0$", metrics, re.M)

    # The next deposit lands at the next log position; its journal entry collides.
    next_position = health["projection_position"] + 1
    views = open_views(store_env(database_url, role=VIEWS_NAME))
    try:
        add_stray_ledger_entry(views, next_position * 4)
    finally:
        views.datastore.close()
    r = c.post(
        f"/admin/buyers/{buyer_id}/deposits", key=ADMIN_TOKEN, json_body={"amount_usdc": "5"}
    )
    # Saved, but the views will never show it: the write says so instead of hanging.
    assert r.status == 503 and r.json()["error"]["code"] == "projection_lagging", r.body

    health = wait_until(
        lambda: (h := c.get("/healthz").json())["status"] == "degraded" and h,
        30,
        "healthz to report the stopped projection",
    )
    assert health["projection_failure"]["position"] == next_position
    assert "IntegrityError" in health["projection_failure"]["error"]
    assert health["projection_position"] == next_position - 1
    metrics = c.get("/metrics").body.decode()
    assert re.search(r"^mediamarket_projection_failed 1\.0$", metrics, re.M)
    assert re.search(rf"^mediamarket_projection_failed_position {next_position}\.0$", metrics, re.M)

    # What the views hold is still served: the buyer's key still authenticates.
    me = c.get("/v1/buyer/me", key=buyer_key)
    assert me.status == 200, me.body
    assert c.get("/healthz").json()["projection_position"] == next_position - 1
    # Logged once, with the event's position: the runner is not retrying.
    failures = [line for line in server.logs().splitlines() if "projection_failed" in line]
    assert len(failures) == 1 and str(next_position) in failures[0], failures


def test_an_event_that_cannot_be_decoded_stops_the_projection_at_its_position(
    database_url: str,
) -> None:
    market = open_market(database_url)
    views = open_views(store_env(database_url, role=VIEWS_NAME))
    try:
        views.ensure_schema(market.name)
        commands = Commands(market, Secrets("x" * 32))
        buyer_id, _, _ = commands.create_buyer("b")
        broken = commands.deposit(buyer_id, 1).position
        commands.deposit(buyer_id, 2)
        recorder: Any = market.recorder
        sqlite = database_url.startswith("sqlite")
        key = "rowid" if sqlite else "notification_id"
        with recorder.datastore.transaction(commit=True) as c:
            c.execute(
                f"UPDATE {recorder.events_table_name} SET state = {'?' if sqlite else '%s'} "
                f"WHERE {key} = {'?' if sqlite else '%s'}",
                (b"not json", broken),
            )
        runner = ProjectionRunner(market, views)
        with pytest.raises(ProjectionFailed):
            runner.catch_up()
        assert runner.failure is not None and runner.failure.position == broken
        assert views.position(market.name) == 0  # the batch it was in is not applied
        with pytest.raises(ProjectionFailed):
            runner.run_once()
    finally:
        views.datastore.close()
        market.close()
