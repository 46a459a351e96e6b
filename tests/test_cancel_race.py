"""A cancel racing the job's own end (SPEC 2, 4.3), driven deterministically.

Both orders of every interleaving point: the other writer (another process's worker, or a
buyer's cancel on another API process) runs exactly after the k-th aggregate read of the
command under test, before that command saves. Whatever the order, nothing raises, the hold is
resolved exactly once, and a cancel that lost reports the job's real state at a log position
that includes it.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from uuid import UUID

import pytest

from adapters.crypto import Secrets
from adapters.eventstore import open_market
from api.validation import validate_video_request
from domain.aggregates import Job, Settlement, settlement_id
from services.commands import Commands
from tests.test_ledger import ARTIFACT, CATALOG

HOLD = 110_000
COST = 100_000


@pytest.fixture
def market() -> Iterator[tuple[Commands, Commands]]:
    """Two command services on one event store, as two processes would be."""
    with tempfile.TemporaryDirectory() as directory:
        app = open_market(f"sqlite:///{directory}/data")
        try:
            secrets = Secrets("k" * 32)
            yield Commands(app, secrets), Commands(app, secrets)
        finally:
            app.close()


def dispatched_job(commands: Commands) -> tuple[UUID, UUID]:
    job_id, buyer_id = dispatching_job(commands)
    commands.dispatched(job_id, "q-1")
    return job_id, buyer_id


def dispatching_job(commands: Commands) -> tuple[UUID, UUID]:
    """A job whose queue call is in flight: its dispatch is recorded, the answer is not."""
    buyer_id, _, _ = commands.create_buyer("b")
    commands.deposit(buyer_id, 10 * HOLD)
    seller_id, _, _ = commands.create_seller("s")
    offer_id, _ = commands.create_offer(
        seller_id=seller_id,
        model="venice-seedance-2-fast-t2v",
        provider="venice",
        base_url=None,
        api_key="sim_ok",
        cost_multiplier="0.80",
        max_concurrent_jobs=1,
    )
    request = validate_video_request(
        {"model": "venice-seedance-2-fast-t2v", "prompt": "p"},
        CATALOG,
        allow_http_webhooks=False,
        allow_private_webhooks=False,
    )
    submitted = commands.submit(
        buyer_id=buyer_id,
        request=request,
        route=[],
        routing={},
        estimated_cost=COST,
        hold=HOLD,
        ttl_seconds=60,
        min_discount=None,
        idempotency_key=None,
    )
    attempt = {
        "offer_id": str(offer_id),
        "seller_id": str(seller_id),
        "provider": "venice",
        "key_sha256": "k",
        "list_price": COST,
        "seller_cost": COST,
        "buyer_cost": COST,
    }
    assert commands.start_dispatch(submitted.job_id, attempt) is None
    return submitted.job_id, buyer_id


def succeed(job: Job) -> None:
    job.artifact_stored(ARTIFACT)
    job.succeed(now=2)


def interleave(commands: Commands, at_read: int, other: Callable[[], Any]) -> None:
    """Run ``other`` right after ``commands``'s ``at_read``-th aggregate read, once."""
    original = commands._get
    reads = 0

    def racing_get(cls: type[Any], aggregate_id: UUID) -> Any:
        nonlocal reads
        got = original(cls, aggregate_id)
        reads += 1
        if reads == at_read:
            other()
        return got

    commands._get = racing_get  # type: ignore[method-assign]


def check_resolved_once(commands: Commands, job_id: UUID, buyer_id: UUID, charged: int) -> None:
    settlement = commands.app.repository.get(settlement_id(job_id))
    assert isinstance(settlement, Settlement)
    assert settlement.resolved and settlement.charged == charged
    assert settlement.charged + settlement.released == HOLD
    buyer = commands.buyer(buyer_id)
    assert buyer.held == 0 and buyer.spent == charged


# A cancel reads the job, then (when it ends it) the settlement, the account and the offer.
@pytest.mark.parametrize("at_read", [1, 2, 3, 4])
def test_a_cancel_that_loses_to_the_worker_reports_success(
    market: tuple[Commands, Commands], at_read: int
) -> None:
    api, worker = market
    job_id, buyer_id = dispatched_job(api)
    interleave(api, at_read, lambda: worker.terminate(job_id, succeed))

    written = api.cancel(job_id)

    job = api.job(job_id)
    assert job.status == "succeeded"
    # The answer waits for a position that includes the success, never for an older one.
    assert written.position >= (api.app.recorder.max_notification_id() or 0)
    check_resolved_once(api, job_id, buyer_id, charged=COST)


# The worker's ending reads the job, then the settlement, the account and the offer.
@pytest.mark.parametrize("at_read", [1, 2, 3, 4])
def test_a_worker_that_loses_to_a_cancel_finds_the_job_canceled(
    market: tuple[Commands, Commands], at_read: int
) -> None:
    api, worker = market
    job_id, buyer_id = dispatched_job(api)
    interleave(worker, at_read, lambda: api.cancel(job_id))

    ended = worker.terminate(job_id, succeed)

    assert ended.status == "canceled"
    assert api.job(job_id).status == "canceled"
    # Canceled after dispatch: the provider already billed, so the buyer pays (SPEC 1).
    check_resolved_once(api, job_id, buyer_id, charged=COST)


def test_cancelling_a_finished_job_answers_at_the_current_position(
    market: tuple[Commands, Commands],
) -> None:
    api, worker = market
    job_id, _ = dispatched_job(api)
    worker.terminate(job_id, succeed)
    api.create_buyer("someone else")  # the log moves on after the job ended
    assert api.cancel(job_id).position == api.app.recorder.max_notification_id()
    assert api.job(job_id).status == "succeeded"


# The queue call's answer reads the job, then the offer, before it saves; the cancel lands
# before it or after either read (then the save conflicts and the retry sees the cancel).
@pytest.mark.parametrize("at_read", [0, 1, 2])
def test_a_cancel_during_the_queue_call_ends_the_job_with_its_answer(
    market: tuple[Commands, Commands], at_read: int
) -> None:
    api, worker = market
    job_id, buyer_id = dispatching_job(api)
    if at_read == 0:
        api.cancel(job_id)
    else:
        interleave(worker, at_read, lambda: api.cancel(job_id))

    worker.dispatched(job_id, "q-1")

    # Never "submitted" once the cancel was answered: the acceptance and the cancel are one
    # save, billed as a cancel after dispatch (SPEC 1), with the offer's slot given back.
    job = api.job(job_id)
    assert job.status == "canceled" and job.dispatch is not None
    check_resolved_once(api, job_id, buyer_id, charged=COST)
    offer = api.app.repository.get(UUID(job.dispatch["offer_id"]))
    assert offer.in_flight == set()


def test_a_cancel_without_a_job_is_not_found(market: tuple[Commands, Commands]) -> None:
    from services.commands import NotFound

    api, _ = market
    with pytest.raises(NotFound):
        api.cancel(uuid.uuid4())


# Through the API, against a real worker: cancels fired as jobs finish, all at once.


def test_cancels_racing_completions_through_the_api(make_server: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_lifecycle import SEEDANCE, assert_money_invariants, market, submit_ok

    srv = make_server(SIM_RENDER_SECONDS="0")
    c = srv.client
    _, buyer_key, seller_key = market(c)
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")

    def submit_and_cancel(n: int) -> tuple[str, int, str]:
        job = submit_ok(c, buyer_key, prompt=f"race {n}")
        # No waiting: the cancel lands before, during or after the dispatch and the success.
        answer = c.delete(f"/v1/video/generations/{job['id']}", key=buyer_key)
        return job["id"], answer.status, answer.json().get("status", answer.body.decode())

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(submit_and_cancel, range(40)))
    for job_id, status, reported in outcomes:
        assert status == 200, (status, reported)
        final = c.wait_terminal(job_id, buyer_key)["status"]
        if reported in ("canceled", "succeeded"):
            # What the cancel answered is the job's state from then on, never an older one.
            assert final == reported, (reported, final)
        else:
            # A queue call was in flight: the cancel is recorded, the worker ends the job.
            assert (reported, final) == ("queued", "canceled")
    assert_money_invariants(c, buyer_key, 10_000_000)
