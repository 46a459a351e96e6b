"""The worker driving jobs in one process, against a scripted provider (tests/fakes.py).

Every outcome the worker acts on differently (SPEC 1, 2, 3), with the money checked after each:
what the buyer was charged, what the seller earns, the hold resolved exactly once, the offer's
health and capacity, what the provider was sent and whether its copy was deleted. The real-process
tests keep what needs processes: HTTP, the simulator itself, SIGKILL and restarts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any
from uuid import UUID

import pytest

from adapters.media import probe_mp4
from adapters.venice import (
    Finished,
    Processing,
    ProviderContentPolicy,
    ProviderInferenceFailed,
    ProviderLost,
    ProviderRefused,
    ProviderRejected,
    ProviderTransient,
    ProviderUnknown,
    Queued,
)
from domain.aggregates import IllegalTransition
from domain.money import max_cost
from services.routing import QUOTE_CACHE_SECONDS
from services.worker import LEASE_SECONDS, Worker
from tests.fakes import (
    DEFAULT,
    LIST_PRICE,
    TTL_SECONDS,
    Call,
    Gate,
    InProcessEngine,
    WorkerAsyncio,
    charged_for,
    in_process_engine,
    skip_worker_waits,
    video_bytes,
    write_video,
)

RELEASED = {"seller_cost_usdc": "0", "buyer_cost_usdc": "0", "settlement_status": "released"}


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> WorkerAsyncio:
    return skip_worker_waits(monkeypatch)


@pytest.fixture
async def engine(tmp_path: Any, waits: WorkerAsyncio) -> AsyncIterator[InProcessEngine]:
    async with in_process_engine(tmp_path) as e:
        yield e


def confirmed(buyer_cost: int, seller_cost: int) -> dict[str, str]:
    return {
        "seller_cost_usdc": str(seller_cost),
        "buyer_cost_usdc": str(buyer_cost),
        "settlement_status": "confirmed",
    }


def assert_failed(engine: InProcessEngine, job_id: UUID, code: str, retryable: bool) -> None:
    job = engine.job(job_id)
    assert job.status == "failed", (job.status, job.error)
    assert job.error is not None
    assert (job.error["code"], job.error["retryable"]) == (code, retryable), job.error
    assert job.error["message"]
    doc = engine.doc(job_id)
    assert doc["status"] == "failed" and doc["error"] == job.error
    assert doc["usage"] == RELEASED and doc["results"] == []
    assert not engine.store.exists(str(job_id), 0)


# --------------------------------------------------------------------------- success


async def test_success_charges_settles_stores_and_deletes_the_provider_copy(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    offer = engine.offer("key-a", "0.80")
    job_id = await engine.submit(buyer)
    cost, seller_cost = charged_for(LIST_PRICE, "0.80")
    assert engine.job(job_id).max_cost == max_cost(cost)

    await engine.drive(job_id)

    job = engine.job(job_id)
    assert job.status == "succeeded" and job.progress == 1.0
    [queued] = engine.provider.called("queue", "key-a")
    assert queued.args[1] == "a cat"
    assert engine.provider.billed("key-a") == 1
    # The video is in the store, probed from the file itself, and no half-file is left behind.
    info = probe_mp4(engine.store.path(str(job_id), 0))
    assert (info.width, info.height, info.duration_seconds) == (854, 480, 4)
    assert job.artifacts[0]["bytes"] == info.bytes
    assert not engine.store.scratch(str(job_id)).exists()
    # Once the video is safe here, the provider's copy is deleted and that is recorded.
    assert engine.provider.deleted == [job.dispatch["queue_id"]] and job.upstream_deleted
    # The outcome, the settlement, the hold and the offer's slot: one save.
    saved = engine.save_with(job_id, "Job.Succeeded")
    assert {"Job.ArtifactStored", "Settlement.Settled", "BuyerAccount.HoldResolved"} <= set(
        saved.names()
    )
    assert "Offer.SlotReleased" in saved.names(offer)
    settlement = engine.settlement(job_id)
    assert (settlement.charged, settlement.seller_cost) == (cost, seller_cost)
    assert settlement.platform_fee == cost - seller_cost > 0
    assert engine.doc(job_id)["usage"] == confirmed(cost, seller_cost)
    assert engine.offer_state(offer).failures == 0
    engine.assert_money_invariants(buyer)


async def test_progress_rises_from_the_providers_timings(engine: InProcessEngine) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    job_id = await engine.submit(buyer)
    seen: list[tuple[str, float]] = []

    def processing(elapsed_ms: int) -> Callable[[Call], Processing]:
        def answer(call: Call) -> Processing:
            job = engine.job(job_id)
            seen.append((job.status, job.progress))
            return Processing(average_execution_time_ms=10_000, execution_duration_ms=elapsed_ms)

        return answer

    engine.provider.script("retrieve", "key-a", processing(2_000), processing(6_000))

    await engine.drive(job_id)

    # What the buyer sees between polls: submitted, then running at the provider's own
    # elapsed / expected time, then done.
    assert seen == [("submitted", 0.0), ("running", 0.2)]
    assert engine.events(job_id).count("Job.Progressed") == 2
    job = engine.job(job_id)
    assert (job.status, job.progress) == ("succeeded", 1.0)
    assert len(engine.provider.called("retrieve")) == 3
    engine.assert_money_invariants(buyer)


async def test_a_video_behind_a_download_link_is_fetched_and_the_link_revoked(
    engine: InProcessEngine,
) -> None:
    link = "https://media.provider.invalid/share/secret-token"
    buyer = engine.buyer()
    engine.offer("key-a")
    engine.provider.script("queue", "key-a", Queued("q-link", download_url=link))
    engine.provider.script("retrieve", "key-a", Finished())
    job_id = await engine.submit(buyer)

    await engine.drive(job_id)

    assert engine.job(job_id).status == "succeeded"
    assert [c.key for c in engine.provider.called("download")] == [link]
    assert [c.key for c in engine.provider.called("revoke_download")] == [link]
    assert engine.provider.deleted == ["q-link"]
    # The link is a credential: no event holds it in plain text (SPEC 6).
    log = engine.market.recorder.select_notifications(1, 1000)
    assert not any(link.encode() in n.state for n in log)
    engine.assert_money_invariants(buyer)


# --------------------------------------------------------------------------- the queue call


@pytest.mark.parametrize("status", [402, 409, 429, 503, 0])
async def test_a_refused_queue_call_fails_over_to_the_next_offer(
    engine: InProcessEngine, status: int
) -> None:
    buyer = engine.buyer()
    first = engine.offer("key-a", "0.80")
    backup = engine.offer("key-b", "0.85")
    engine.provider.script("queue", "key-a", ProviderRefused(status, "refused"))
    job_id = await engine.submit(buyer)

    await engine.drive(job_id)

    job = engine.job(job_id)
    assert job.status == "succeeded"
    assert job.dispatch is not None and job.dispatch["offer_id"] == str(backup)
    assert job.attempts == [{"offer_id": str(first), "status": status, "message": "refused"}]
    assert engine.provider.billed("key-a") == 0 and engine.provider.billed("key-b") == 1
    # Priced on the first offer at submit, the backup's price fits in the hold and is charged.
    cost, seller_cost = charged_for(LIST_PRICE, "0.85")
    assert cost <= job.max_cost
    assert engine.doc(job_id)["usage"] == confirmed(cost, seller_cost)
    # The refusing offer backs off (still listed); the one that took the job stays healthy.
    refused = engine.offer_state(first)
    assert refused.failures == 1 and refused.backoff_until > engine.clock()
    assert refused.deactivated_reason is None
    assert engine.offer_state(backup).failures == 0
    engine.assert_money_invariants(buyer)


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_key_switches_the_offer_off(engine: InProcessEngine, status: int) -> None:
    buyer = engine.buyer()
    first = engine.offer("key-a", "0.80")
    engine.offer("key-b", "0.85")
    engine.provider.script("queue", "key-a", ProviderRefused(status, "bad key"))
    job_id = await engine.submit(buyer)

    await engine.drive(job_id)

    assert engine.job(job_id).status == "succeeded"
    offer = engine.offer_state(first)
    assert offer.deactivated_reason is not None and str(status) in offer.deactivated_reason
    assert engine.views.offer(str(first)).state == "deactivated"
    engine.assert_money_invariants(buyer)


async def test_a_refusal_with_nowhere_to_go_fails_no_sellers_available(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    engine.provider.script("queue", "key-a", ProviderRefused(429, "slow down"))
    job_id = await engine.submit(buyer)

    await engine.drive(job_id)

    assert_failed(engine, job_id, "no_sellers_available", True)
    assert engine.provider.billed("key-a") == 0
    engine.assert_money_invariants(buyer)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ProviderContentPolicy(422, "the prompt"), "content_policy"),
        (ProviderRejected(400, "invalid"), "upstream_rejected"),
    ],
    ids=["content_policy", "rejected"],
)
async def test_the_request_itself_refused_is_never_failed_over(
    engine: InProcessEngine, error: Exception, code: str
) -> None:
    buyer = engine.buyer()
    first = engine.offer("key-a", "0.80")
    engine.offer("key-b", "0.85")
    engine.provider.script("queue", "key-a", error)
    job_id = await engine.submit(buyer)

    await engine.drive(job_id)

    assert_failed(engine, job_id, code, False)
    # Another seller's account would be refused the same way: it is never sent the job.
    assert engine.provider.called("queue", "key-b") == []
    # Not the seller's fault either: its offer stays healthy.
    assert engine.offer_state(first).failures == 0
    engine.assert_money_invariants(buyer)


async def test_an_unknown_queue_outcome_fails_upstream_unknown_and_backs_the_offer_off(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    hanging = engine.offer("key-a", "0.80")
    other = engine.offer("key-b", "0.85")
    engine.provider.script("queue", "key-a", ProviderUnknown("the provider did not answer"))
    job_id = await engine.submit(buyer)

    await engine.drive(job_id)

    assert_failed(engine, job_id, "upstream_unknown", False)
    # Never failed over: the provider may have accepted (and billed) the first call.
    assert engine.provider.called("queue", "key-b") == []
    # Not knowing counts against the offer like a refusal (SPEC 3), in the job's final save.
    offer = engine.offer_state(hanging)
    assert offer.failures == 1 and offer.backoff_until > engine.clock()
    assert offer.deactivated_reason is None
    assert "Offer.BackedOff" in engine.save_with(job_id, "Job.Failed").names(hanging)
    assert engine.offer_state(other).failures == 0
    # So the next job goes to the seller whose provider answers.
    again = await engine.submit(buyer)
    await engine.drive(again)
    assert engine.job(again).dispatch["offer_id"] == str(other)
    assert engine.job(again).status == "succeeded"
    engine.assert_money_invariants(buyer)


# --------------------------------------------------------------------------- after acceptance


@pytest.mark.parametrize(
    ("error", "code", "retryable"),
    [
        (ProviderInferenceFailed(500, "it broke"), "inference_failed", True),
        (ProviderContentPolicy(422, "the output"), "content_policy", False),
        (ProviderLost(404, "no such job"), "inference_failed", True),
    ],
    ids=["inference_failed", "content_policy", "lost"],
)
async def test_a_job_failing_after_acceptance_charges_nothing(
    engine: InProcessEngine, error: Exception, code: str, retryable: bool
) -> None:
    buyer = engine.buyer()
    offer = engine.offer("key-a")
    engine.provider.script("retrieve", "key-a", error)
    job_id = await engine.submit(buyer)

    await engine.drive(job_id)

    assert_failed(engine, job_id, code, retryable)
    # The provider billed the seller at queue time; the buyer pays nothing (SPEC 1), and the
    # provider's copy is deleted all the same.
    assert engine.provider.billed("key-a") == 1
    assert engine.provider.deleted == [engine.job(job_id).dispatch["queue_id"]]
    assert engine.job(job_id).upstream_deleted
    assert engine.offer_state(offer).failures == 0
    engine.assert_money_invariants(buyer)


async def test_finished_without_a_link_or_a_video_fails_inference_failed(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    # "COMPLETED" with no download link from the queue answer; then a body that is no video.
    engine.provider.script("retrieve", "key-a", Finished(), write_video(b"not a video"))
    no_link = await engine.submit(buyer)
    no_video = await engine.submit(buyer, prompt="a dog")

    await engine.drive(no_link)
    await engine.drive(no_video)

    assert_failed(engine, no_link, "inference_failed", True)
    assert "no longer has" in engine.job(no_link).error["message"]
    assert_failed(engine, no_video, "inference_failed", True)
    assert "no video" in engine.job(no_video).error["message"]
    engine.assert_money_invariants(buyer)


async def no_video_job(engine: InProcessEngine) -> UUID:
    buyer = engine.buyer()
    engine.offer("key-a")
    engine.provider.script("retrieve", "key-a", write_video(b"not a video"))
    job_id = await engine.submit(buyer)
    await engine.drive(job_id)
    assert_failed(engine, job_id, "inference_failed", True)
    return job_id


async def test_a_body_that_is_no_video_leaves_no_scratch_file(engine: InProcessEngine) -> None:
    job_id = await no_video_job(engine)
    assert not engine.store.scratch(str(job_id)).exists()


async def test_a_failure_the_buyer_sees_names_no_server_path(engine: InProcessEngine) -> None:
    job_id = await no_video_job(engine)
    assert str(engine.store.root) not in engine.job(job_id).error["message"]


async def test_transient_retrieve_errors_are_retried_with_growing_waits(
    engine: InProcessEngine, waits: WorkerAsyncio
) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    engine.provider.script(
        "retrieve",
        "key-a",
        ProviderTransient(503, "busy"),
        ProviderTransient(0, "no answer"),
        ProviderTransient(401, "key revoked after billing"),
    )
    job_id = await engine.submit(buyer)

    await engine.drive(job_id)

    assert engine.job(job_id).status == "succeeded"
    assert len(engine.provider.called("retrieve")) == 4
    assert len(waits.delays) == 3 and waits.delays == sorted(set(waits.delays))
    assert engine.provider.billed("key-a") == 1
    engine.assert_money_invariants(buyer)


# --------------------------------------------------------------------------- cancel


async def test_cancel_before_dispatch_is_free(engine: InProcessEngine) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    job_id = await engine.submit(buyer)
    assert engine.account(buyer).held == engine.job(job_id).max_cost

    await engine.blocking(engine.commands.cancel, job_id)
    await engine.drive(job_id)

    assert engine.job(job_id).status == "canceled"
    assert engine.doc(job_id)["usage"] == RELEASED
    assert engine.provider.called("queue") == []
    engine.assert_money_invariants(buyer)


async def test_a_cancel_during_a_refused_queue_call_stops_there_free(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    engine.offer("key-a", "0.80")
    engine.offer("key-b", "0.85")
    job_id = await engine.submit(buyer)

    async def cancel_then_refuse(call: Call) -> Exception:
        await engine.blocking(engine.commands.cancel, job_id)
        return ProviderRefused(429, "slow down")

    engine.provider.script("queue", "key-a", cancel_then_refuse)

    await engine.drive(job_id)

    # Nothing was accepted, so this is a cancel before dispatch: free, and not tried elsewhere.
    assert engine.job(job_id).status == "canceled"
    assert engine.provider.called("queue", "key-b") == []
    assert engine.doc(job_id)["usage"] == RELEASED
    engine.assert_money_invariants(buyer)


async def test_a_cancel_during_the_queue_call_ends_the_job_with_the_answer(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    offer = engine.offer("key-a")
    job_id = await engine.submit(buyer)

    async def cancel_then_accept(call: Call) -> Any:
        written = await engine.blocking(engine.commands.cancel, job_id)
        # The cancel is recorded, but the job can't end before the provider's answer is known.
        assert engine.job(job_id).cancel_requested and not engine.job(job_id).is_terminal
        assert written.position > 0
        return DEFAULT

    engine.provider.script("queue", "key-a", cancel_then_accept)

    await engine.drive(job_id)

    job = engine.job(job_id)
    assert job.status == "canceled" and job.dispatch is not None
    # Accepted and canceled in the same save: no reader ever sees it "submitted" after its
    # cancel was answered. Billed as a cancel after dispatch (SPEC 1).
    saved = engine.save_with(job_id, "Job.Dispatched")
    assert "Job.Canceled" in saved.names(job_id)
    assert {"Settlement.Settled", "BuyerAccount.HoldResolved"} <= set(saved.names())
    assert "Offer.SlotReleased" in saved.names(offer)
    cost, seller_cost = charged_for(LIST_PRICE, "0.80")
    assert engine.doc(job_id)["usage"] == confirmed(cost, seller_cost)
    # Never polled; the provider's copy is deleted.
    assert engine.provider.called("retrieve") == []
    assert engine.provider.deleted == [job.dispatch["queue_id"]] and job.upstream_deleted
    engine.assert_money_invariants(buyer)


def cancel_while_processing(engine: InProcessEngine, job_id: UUID) -> None:
    """The buyer's cancel lands while the provider is answering a retrieve with PROCESSING."""

    async def answer(call: Call) -> Processing:
        await engine.blocking(engine.commands.cancel, job_id)
        return Processing(10_000, 1_000)

    engine.provider.script("retrieve", "key-a", answer)


async def drive_as_scheduled(engine: InProcessEngine, worker: Worker, job_id: UUID) -> None:
    """``drive`` as the run loop calls it: a step that finds the job ended by someone else
    raises ``IllegalTransition``, which the loop takes as done when the job is terminal."""
    try:
        await engine.drive(job_id, worker)
    except IllegalTransition:
        assert engine.job(job_id).is_terminal


async def test_a_cancel_while_running_is_billed_and_not_written_over(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    job_id = await engine.submit(buyer)
    cancel_while_processing(engine, job_id)

    await drive_as_scheduled(engine, engine.worker(), job_id)

    assert engine.job(job_id).status == "canceled"
    # The worker did not write over the cancel (no progress, no artifact) and stopped polling.
    assert "Job.Progressed" not in engine.events(job_id)
    assert len(engine.provider.called("retrieve")) == 1
    assert not engine.store.exists(str(job_id), 0)
    cost, seller_cost = charged_for(LIST_PRICE, "0.80")
    assert engine.doc(job_id)["usage"] == confirmed(cost, seller_cost)
    engine.assert_money_invariants(buyer)


async def test_a_cancel_while_running_deletes_the_provider_copy(engine: InProcessEngine) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    job_id = await engine.submit(buyer)
    cancel_while_processing(engine, job_id)

    await drive_as_scheduled(engine, engine.worker(), job_id)

    job = engine.job(job_id)
    assert engine.provider.deleted == [job.dispatch["queue_id"]] and job.upstream_deleted


async def test_a_cancel_that_wins_over_the_stored_video_leaves_no_artifact(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    job_id = await engine.submit(buyer)

    async def cancel_then_deliver(call: Call) -> Any:
        await engine.blocking(engine.commands.cancel, job_id)
        return write_video(video_bytes())(call)

    engine.provider.script("retrieve", "key-a", cancel_then_deliver)

    await engine.drive(job_id)

    job = engine.job(job_id)
    assert job.status == "canceled" and job.artifacts == []
    # Nothing would ever purge an artifact of a job that has none: the store keeps none.
    assert not engine.store.exists(str(job_id), 0)
    # Billed as a cancel after dispatch, and the provider's copy is deleted.
    cost, seller_cost = charged_for(LIST_PRICE, "0.80")
    assert engine.doc(job_id)["usage"] == confirmed(cost, seller_cost)
    assert engine.provider.deleted == [job.dispatch["queue_id"]] and job.upstream_deleted
    engine.assert_money_invariants(buyer)


# --------------------------------------------------------------------------- expiry


async def test_a_job_expires_while_queued_without_being_sent(engine: InProcessEngine) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    job_id = await engine.submit(buyer)
    engine.clock.advance(TTL_SECONDS)

    await engine.drive(job_id)

    assert engine.job(job_id).status == "expired"
    assert engine.provider.called("queue") == []
    assert engine.doc(job_id)["usage"] == RELEASED
    engine.assert_money_invariants(buyer)


async def test_a_job_expires_while_running_charging_nothing(engine: InProcessEngine) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    job_id = await engine.submit(buyer)

    def never_done(call: Call) -> Processing:
        if len(engine.provider.called("retrieve")) == 3:
            engine.clock.advance(TTL_SECONDS)
        return Processing(None, None)

    engine.provider.script("retrieve", "key-a", *[never_done] * 3)

    await engine.drive(job_id)

    job = engine.job(job_id)
    assert job.status == "expired" and "Job.Progressed" in engine.events(job_id)
    assert len(engine.provider.called("retrieve")) == 3
    assert engine.doc(job_id)["usage"] == RELEASED
    # The provider billed the seller; the buyer pays nothing; the provider's copy is deleted.
    assert engine.provider.billed("key-a") == 1
    assert engine.provider.deleted == [job.dispatch["queue_id"]]
    engine.assert_money_invariants(buyer)


# --------------------------------------------------------------------------- the hold


@pytest.mark.parametrize("rise", ["multiplier", "list_price"])
async def test_a_price_rise_above_the_hold_fails_price_changed(
    engine: InProcessEngine, rise: str
) -> None:
    buyer = engine.buyer()
    seller = engine.seller()
    offer = engine.offer("key-a", "0.50", seller_id=seller)
    job_id = await engine.submit(buyer)
    if rise == "multiplier":
        engine.commands.update_offer(seller, offer, {"cost_multiplier": "0.60"})
    else:
        engine.provider.list_prices["key-a"] = LIST_PRICE * 12 // 10
        engine.clock.advance(QUOTE_CACHE_SECONDS + 1)

    await engine.drive(job_id)

    assert_failed(engine, job_id, "price_changed", True)
    assert "max_cost_usdc" in engine.job(job_id).error["message"]
    assert engine.job(job_id).attempts == [{"offer_id": str(offer), "skipped": "price_changed"}]
    assert engine.provider.called("queue") == []
    engine.assert_money_invariants(buyer)


async def test_failover_never_exceeds_the_hold(engine: InProcessEngine) -> None:
    """The chosen offer refuses and the one behind it costs more than the hold: skipped, and
    the job fails no_sellers_available saying why; a buyer's own ceiling makes room for it."""
    buyer = engine.buyer()
    engine.offer("key-a", "0.50")
    backup = engine.offer("key-b", "0.90")
    engine.provider.script("queue", "key-a", ProviderRefused(429, "slow down"))
    job_id = await engine.submit(buyer)
    dear, _ = charged_for(LIST_PRICE, "0.90")
    assert engine.job(job_id).max_cost < dear

    await engine.drive(job_id)

    assert_failed(engine, job_id, "no_sellers_available", True)
    assert "max_cost_usdc" in engine.job(job_id).error["message"]
    assert engine.job(job_id).attempts[-1] == {"offer_id": str(backup), "skipped": "price_changed"}
    assert engine.provider.called("queue", "key-b") == []

    # Another refusing offer, the cheapest (the first is in backoff now); this buyer allows for
    # failover with its own ceiling, and pays the dearer offer's price.
    engine.offer("key-c", "0.50")
    engine.provider.script("queue", "key-c", ProviderRefused(402, "no funds"))
    ceiling = await engine.submit(buyer, max_cost_usdc=str(dear))
    assert engine.job(ceiling).max_cost == dear

    await engine.drive(ceiling)

    assert engine.job(ceiling).status == "succeeded"
    assert engine.settlement(ceiling).charged == dear
    engine.assert_money_invariants(buyer)


@pytest.mark.parametrize("change", ["paused", "deleted", "backoff"])
async def test_an_offer_gone_since_submit_is_skipped_at_dispatch(
    engine: InProcessEngine, change: str
) -> None:
    buyer = engine.buyer()
    seller = engine.seller()
    first = engine.offer("key-a", "0.80", seller_id=seller)
    backup = engine.offer("key-b", "0.85")
    job_id = await engine.submit(buyer)
    if change == "paused":
        engine.commands.update_offer(seller, first, {"paused": True})
    elif change == "deleted":
        engine.commands.delete_offer(seller, first)
    else:
        engine.commands.offer_refused(first, "quote failed (503)", deactivate=False)

    await engine.drive(job_id)

    job = engine.job(job_id)
    assert job.status == "succeeded" and job.dispatch["offer_id"] == str(backup)
    assert job.attempts == [{"offer_id": str(first), "skipped": change}]
    assert engine.provider.called("queue", "key-a") == []
    engine.assert_money_invariants(buyer)


# --------------------------------------------------------------------------- buyer-owned keys


async def test_a_refused_buyer_key_fails_over_to_the_market(engine: InProcessEngine) -> None:
    buyer = engine.buyer()
    offer = engine.offer("key-a")
    own, _ = engine.commands.add_buyer_provider(
        buyer_id=buyer, provider="venice", model=None, base_url=None, api_key="own-key"
    )
    # A catch-all key comes after the market (SPEC 3); one for the model comes first.
    own_first, _ = engine.commands.add_buyer_provider(
        buyer_id=buyer,
        provider="venice",
        model="venice-seedance-2-fast-t2v",
        base_url=None,
        api_key="own-model-key",
    )
    engine.provider.script("queue", "own-model-key", ProviderRefused(402, "no funds"))
    job_id = await engine.submit(buyer)
    assert [r["offer_id"] for r in engine.job(job_id).route] == [
        str(own_first),
        str(offer),
        str(own),
    ]

    await engine.drive(job_id)

    job = engine.job(job_id)
    assert job.status == "succeeded" and job.dispatch["offer_id"] == str(offer)
    assert engine.settlement(job_id).charged == charged_for(LIST_PRICE, "0.80")[0]
    engine.assert_money_invariants(buyer)


async def test_a_buyer_key_runs_the_job_for_the_flat_fee_only(engine: InProcessEngine) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    engine.commands.add_buyer_provider(
        buyer_id=buyer,
        provider="venice",
        model="venice-seedance-2-fast-t2v",
        base_url=None,
        api_key="own-key",
    )
    job_id = await engine.submit(buyer)

    await engine.drive(job_id)

    job = engine.job(job_id)
    assert job.status == "succeeded" and job.dispatch["seller_id"] is None
    assert engine.provider.billed("own-key") == 1 and engine.provider.billed("key-a") == 0
    settlement = engine.settlement(job_id)
    assert (settlement.charged, settlement.seller_cost) == (engine.fees.flat_usdc, 0)
    engine.assert_money_invariants(buyer)


# --------------------------------------------------------------------------- several workers


async def test_a_dead_workers_queue_call_is_taken_over_as_upstream_unknown(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    engine.offer("key-a", "0.80")
    engine.offer("key-b", "0.85")
    hang = Gate()
    engine.provider.script("queue", "key-a", hang)
    job_id = await engine.submit(buyer)

    dead = asyncio.create_task(engine.worker("dead").drive(job_id))
    await hang.entered.wait()
    # It dies between sending the job and hearing back: only DispatchStarted is recorded.
    dead.cancel()
    with pytest.raises(asyncio.CancelledError):
        await dead
    assert engine.job(job_id).dispatching is not None
    engine.clock.advance(LEASE_SECONDS)

    await engine.drive(job_id, engine.worker("heir"))

    assert_failed(engine, job_id, "upstream_unknown", False)
    # Never failed over, and never sent again.
    assert engine.provider.called("queue", "key-b") == []
    assert len(engine.provider.called("queue")) == 1
    engine.assert_money_invariants(buyer)


async def test_a_dead_workers_dispatched_job_is_finished_by_another(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    hang = Gate()
    engine.provider.script("retrieve", "key-a", hang)
    job_id = await engine.submit(buyer)

    dead = asyncio.create_task(engine.worker("dead").drive(job_id))
    await hang.entered.wait()
    dead.cancel()
    with pytest.raises(asyncio.CancelledError):
        await dead
    heir = engine.worker("heir")
    # The dead worker's lease still holds the job off until it runs out.
    await engine.drive(job_id, heir)
    assert len(engine.provider.called("retrieve")) == 1
    engine.clock.advance(LEASE_SECONDS)

    await engine.drive(job_id, heir)

    assert engine.job(job_id).status == "succeeded"
    # The provider was sent the job exactly once: the heir polls, it never queues again.
    assert engine.provider.billed("key-a") == 1
    engine.assert_money_invariants(buyer)


async def test_the_run_loop_drives_every_job_within_an_offers_capacity(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    offer = engine.offer("key-a", max_concurrent_jobs=1)
    in_flight: list[int] = []

    def one_at_a_time(call: Call) -> Any:
        in_flight.append(len(engine.offer_state(offer).in_flight))
        return DEFAULT

    engine.provider.script("queue", "key-a", *[one_at_a_time] * 3)
    jobs = [await engine.submit(buyer, prompt=f"job {n}") for n in range(3)]

    worker = engine.worker(poll_interval=0.01)
    async with engine.running(worker):
        await engine.until(lambda: all(engine.job(j).is_terminal for j in jobs))

    assert worker.active_jobs == 0
    assert [engine.job(j).status for j in jobs] == ["succeeded"] * 3
    # Waiting for capacity is not a refusal: no job recorded a skip, the offer never backed off.
    assert all(engine.job(j).attempts == [] for j in jobs)
    assert in_flight == [1, 1, 1]
    assert engine.offer_state(offer).failures == 0
    engine.assert_money_invariants(buyer)
