"""The ledger projection and the reconciliation, as properties over random histories.

Each example drives the real command services over a real SQLite event store (deposits, submits
that may overdraw, dispatches, every ending), projects it into real views, and checks that the
reconciliation passes; then corrupts one projection row and checks that it is named.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import UUID

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.crypto import Secrets
from adapters.eventstore import MarketApp, open_market, store_env
from adapters.venice import parse_venice_models
from api.validation import validate_video_request
from domain.aggregates import InsufficientBalance, Job
from domain.catalog import Catalog
from projections.ledger import LedgerBatch
from projections.runner import ProjectionRunner
from projections.views import VIEWS_NAME, Views, open_views
from services import finance
from services.commands import Commands
from services.replay import verify
from tests.test_projection import MODELS

CATALOG = Catalog(parse_venice_models("venice", MODELS))
ENDINGS = ["succeed", "fail", "cancel", "expire"]
ARTIFACT = {
    "index": 0,
    "content_type": "video/mp4",
    "duration_seconds": 4,
    "width": 854,
    "height": 480,
    "bytes": 1,
    "stored_at": 1,
}

op = st.one_of(
    st.tuples(st.just("deposit"), st.integers(0, 1), st.integers(1, 2_000_000)),
    st.tuples(st.just("submit"), st.integers(0, 1), st.integers(0, 900_000)),
    st.tuples(st.just("dispatch"), st.integers(0, 50), st.integers(0, 100)),
    st.tuples(st.just("end"), st.integers(0, 50), st.sampled_from(ENDINGS)),
)


@contextmanager
def engine() -> Iterator[tuple[MarketApp, Views, Commands]]:
    with tempfile.TemporaryDirectory() as directory:
        url = f"sqlite:///{directory}/data"
        market = open_market(url)
        views = open_views(store_env(url, role=VIEWS_NAME))
        views.ensure_schema(market.name)
        try:
            yield market, views, Commands(market, Secrets("k" * 32))
        finally:
            views.datastore.close()
            market.close()


def run(commands: Commands, ops: list[tuple[Any, ...]]) -> list[UUID]:
    buyers = [commands.create_buyer(f"b{n}")[0] for n in range(2)]
    seller_id, _, _ = commands.create_seller("s")
    offer_id, _ = commands.create_offer(
        seller_id=seller_id,
        model="venice-seedance-2-fast-t2v",
        provider="venice",
        base_url=None,
        api_key="sim_ok",
        cost_multiplier="0.80",
        max_concurrent_jobs=None,
    )
    jobs: list[UUID] = []
    request = validate_video_request(
        {"model": "venice-seedance-2-fast-t2v", "prompt": "p"},
        CATALOG,
        allow_http_webhooks=False,
        allow_private_webhooks=False,
    )
    for kind, a, b in ops:
        if kind == "deposit":
            commands.deposit(buyers[a], b)
        elif kind == "submit":
            try:
                submitted = commands.submit(
                    buyer_id=buyers[a],
                    request=request,
                    route=[],
                    routing={},
                    estimated_cost=b,
                    hold=b + b // 10,
                    ttl_seconds=60,
                    min_discount=None,
                    idempotency_key=None,
                )
            except InsufficientBalance:
                continue
            jobs.append(submitted.job_id)
        elif jobs:
            job = commands.job(jobs[a % len(jobs)])
            if job.is_terminal:
                continue
            if kind == "dispatch" and job.dispatching is None and job.dispatch is None:
                buyer_cost = job.max_cost * b // 100
                attempt = {
                    "offer_id": str(offer_id),
                    "seller_id": str(seller_id),
                    "provider": "venice",
                    "key_sha256": "k",
                    "list_price": buyer_cost,
                    "seller_cost": buyer_cost * 9 // 10,
                    "buyer_cost": buyer_cost,
                }
                commands.start_dispatch(job.id, attempt)
                commands.dispatched(job.id, f"q-{job.id}")
            elif kind == "end":
                end(commands, job, b)
    return jobs


def end(commands: Commands, job: Job, how: str) -> None:
    if how == "cancel":
        commands.cancel(job.id)
        return

    def decide(j: Any) -> None:
        if how == "succeed" and j.dispatch is not None:
            j.artifact_stored(ARTIFACT)
            j.succeed(now=1)
        elif how == "fail" or how == "succeed":
            j.fail("inference_failed", "x", False, now=1)
        else:
            j.expire(now=10**10)

    commands.terminate(job.id, decide)


def reconcile(market: MarketApp, views: Views) -> finance.Reconciliation:
    ProjectionRunner(market, views, batch_size=13).catch_up()
    state = finance.read_state(views, market.name)
    buyers = finance.buyer_figures(
        lambda buyer_id, version: market.repository.get(buyer_id, version=version),
        state.buyer_versions,
    )
    billed: dict[str, int] = {}
    for row in state.settlements.values():
        if row["dispatch_state"] == "accepted":
            billed[row["key_sha256"]] = billed.get(row["key_sha256"], 0) + row["list_price"]
    return finance.reconcile(state, buyers, finance.Billing(billed))


CORRUPTIONS = {
    "a posting's amount": "UPDATE mm_ledger_postings SET credit = credit + 1 WHERE entry_no = "
    "(SELECT max(entry_no) FROM mm_ledger_postings WHERE credit > 0) AND credit > 0",
    "a lost posting": "DELETE FROM mm_ledger_postings WHERE (entry_no, line) = "
    "(SELECT entry_no, max(line) FROM mm_ledger_postings "
    "WHERE entry_no = (SELECT max(entry_no) FROM mm_ledger_postings))",
    "a settlement row's charge": "UPDATE mm_settlements SET charged = charged + 1 WHERE rowid = "
    "(SELECT max(rowid) FROM mm_settlements)",
    "a job view's status": 'UPDATE mm_job_views SET doc = replace(doc, \'"max_cost_usdc":"\', '
    '\'"max_cost_usdc":"9\') WHERE rowid = (SELECT max(rowid) FROM mm_job_views)',
    "a buyer's seen version": "UPDATE mm_ledger_buyers SET version = version - 1 WHERE rowid = "
    "(SELECT max(rowid) FROM mm_ledger_buyers)",
}


def moves_money(market: MarketApp, views: Views) -> bool:
    """Whether the last buyer's last event changed an amount (a hold of 0 changes none)."""
    with views.datastore.transaction(commit=False) as c:
        c.execute("SELECT buyer_id, version FROM mm_ledger_buyers ORDER BY rowid DESC LIMIT 1")
        buyer_id, version = c.fetchone()
    if version <= 1:
        return True

    def amounts(at: int) -> tuple[int, int, int]:
        buyer = market.repository.get(UUID(buyer_id), version=at)
        return buyer.deposited, buyer.held, buyer.spent

    return amounts(version) != amounts(version - 1)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(op, min_size=1, max_size=40),
    corruption=st.sampled_from(sorted(CORRUPTIONS)),
)
def test_any_history_reconciles_and_any_corruption_is_named(
    ops: list[tuple[Any, ...]], corruption: str
) -> None:
    with engine() as (market, views, commands):
        jobs = run(commands, ops)
        report = reconcile(market, views)
        assert report.ok, report.render()
        assert report.checked.get("holds_resolved_once", 0) == len(jobs)
        assert report.totals["deposits_usdc"] == (
            report.totals["available_usdc"]
            + report.totals["held_usdc"]
            + report.totals["spent_usdc"]
        )
        if corruption != "a buyer's seen version" and not jobs:
            return  # nothing of that kind to corrupt
        if corruption == "a buyer's seen version" and not moves_money(market, views):
            return  # the version before holds the same amounts: nothing there to find
        with views.datastore.transaction(commit=True) as c:
            c.execute(CORRUPTIONS[corruption])
            c.execute("SELECT changes()")
            if c.fetchone()[0] == 0:
                return  # nothing of that kind in this history
        assert not reconcile(market, views).ok, corruption


def test_every_entry_has_an_id_from_its_source_event_and_balances() -> None:
    with engine() as (market, views, commands):
        run(
            commands,
            [
                ("deposit", 0, 1_000_000),
                ("submit", 0, 100_000),
                ("dispatch", 0, 90),
                ("end", 0, "succeed"),
                ("submit", 0, 50_000),
                ("end", 1, "cancel"),
            ],
        )
        notifications = market.recorder.select_notifications(start=1, limit=1000)
        items = [(n.id, market.mapper.to_domain_event(n)) for n in notifications]
        first = LedgerBatch(lambda _: {})
        first.project(items)
        again = LedgerBatch(lambda _: {})
        again.project(items)
        assert [e.entry_id for e in first.entries] == [e.entry_id for e in again.entries]
        assert len({e.entry_id for e in first.entries}) == len(first.entries)
        kinds = [e.kind for e in first.entries]
        assert kinds == ["deposit", "hold", "capture", "release", "hold", "release"]
        for entry in first.entries:
            assert sum(p.debit for p in entry.postings) == sum(p.credit for p in entry.postings)
        capture = first.entries[2]
        held = first.entries[1].postings[1].credit
        assert capture.postings[0].debit == 99_000  # 90% of the 110_000 hold
        assert first.entries[3].postings[0].debit == held - 99_000
        assert {p.account for p in capture.postings} == {
            f"buyer:{capture.buyer_id}:held",
            capture.postings[1].account,
            "platform:fees",
        }

        # Replaying the same log into a second set of views writes the same rows.
        reconcile(market, views)
        position, live = views.row_hashes(market.name)
        with engine() as (_, fresh, _):
            result = verify(market, views, fresh)
        assert result.ok and result.position == position, result.render()
        assert result.tables[0].live_rows == len(live["mm_job_views"])
