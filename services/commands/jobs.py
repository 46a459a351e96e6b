"""A job's life after submit: claims, dispatch, the provider's answers, cancel, expiry and the
save that ends it with its settlement, hold and offer capacity.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from domain.aggregates import (
    BuyerAccount,
    IllegalTransition,
    Job,
    Offer,
    Settlement,
    settlement_id,
)
from domain.rules import AT_CAPACITY
from domain.webhooks import WebhookDelivery
from services.commands.base import (
    CommandBase,
    Stale,
    Written,
    position_of,
)


class JobCommands(CommandBase):
    def job(self, job_id: UUID) -> Job:
        return self._get(Job, job_id)

    def cancel(self, job_id: UUID) -> Written:
        """Best effort (SPEC 2): clean before dispatch, billed after, no-op when terminal.

        A cancel that loses to the job's own end (the worker saved its outcome first) reports
        that outcome: it returns the log's position, so the caller answers from a view that
        includes it, never from the state the job had when the cancel began.
        """

        def attempt() -> Written:
            job = self._get(Job, job_id)
            if job.is_terminal:
                return Written(self.app.recorder.max_notification_id() or 0)
            if job.dispatching is not None:
                # The queue call's outcome is not known yet; the worker cancels once it is.
                job.request_cancel()
                return Written(position_of(self.app.save(job)))
            job.cancel(now=int(self.clock()))
            return Written(self._finish(job))

        return self._retrying(attempt)

    def _finish(
        self, job: Job, backoff: tuple[str, str] | None = None, *, recovered: bool = False
    ) -> int:
        """Save a job that just became terminal, with its settlement, the buyer's hold and the
        capacity it held on its offer, all in one save. ``backoff`` (offer id, reason) also
        puts that offer into backoff in the same save; ``recovered`` ends the backoff of the
        offer that just accepted the job."""
        buyer_cost, seller_cost = job.charge
        settlement = self._get(Settlement, settlement_id(job.id))
        if settlement.resolved:
            raise Stale(f"job {job.id} already ended")
        dispatch = job.dispatch or {}
        settlement.settle(
            buyer_cost=buyer_cost,
            seller_cost=seller_cost,
            seller_id=dispatch.get("seller_id"),
            offer_id=dispatch.get("offer_id"),
            outcome=job.status,
        )
        slot = job.slot_offer_id
        offer_ids = {o for o in (slot, backoff[0] if backoff else None) if o}
        locks = [f"buyer:{job.buyer_id}", *(f"offer:{o}" for o in offer_ids)]
        with self._serialised(*locks):
            buyer = self._get(BuyerAccount, UUID(job.buyer_id))
            if not buyer.is_holding(job.id):
                raise Stale(f"job {job.id} already ended")
            buyer.resolve_hold(job.id, buyer_cost)
            aggregates: list[Any] = [job, settlement, buyer]
            webhook_url = job.request.get("webhook_url")
            if webhook_url:
                # In the save that ends the job: no crash can lose the webhook (SPEC 7).
                aggregates.append(
                    WebhookDelivery.for_job(job.id, job.buyer_id, webhook_url, self.clock())
                )
            for offer_id in sorted(offer_ids):
                offer = self._get(Offer, UUID(offer_id))
                if offer_id == slot:
                    offer.release_slot(job.id)
                    if recovered:
                        offer.succeeded()
                if backoff is not None and offer_id == backoff[0]:
                    offer.refused(backoff[1], now=self.clock(), deactivate=False)
                aggregates.append(offer)
            return position_of(self.app.save(*aggregates))

    # ------------------------------------------------------------------ dispatch

    def start_dispatch(self, job_id: UUID, attempt: dict[str, Any]) -> str | None:
        """Record a dispatch before its queue call, taking a slot of the offer's capacity in
        the same save. Returns why the offer can't take the job (nothing started), else None.

        An offer at capacity is only deferred (the caller waits for a slot); any other reason
        is recorded on the job as a skip.
        """
        offer_id = attempt["offer_id"]
        if attempt["seller_id"] is None:  # the buyer's own key: no seller capacity to take

            def own_key() -> str | None:
                job = self._get(Job, job_id)
                job.start_dispatch(attempt)
                self.app.save(job)
                return None

            return self._retrying(own_key)

        def marketplace() -> str | None:
            with self._serialised(f"offer:{offer_id}"):
                job = self._get(Job, job_id)
                offer = self._get(Offer, UUID(offer_id))
                reason = offer.take_slot(job_id, now=self.clock())
                if reason == AT_CAPACITY:
                    return reason
                if reason is not None:
                    job.skipped(offer_id, reason)
                    self.app.save(job)
                    return reason
                job.start_dispatch(attempt)
                self.app.save(job, offer)
                return None

        return self._retrying(marketplace)

    def queue_refused(
        self, job_id: UUID, offer_id: str, status: int, message: str, *, deactivate: bool
    ) -> Job:
        """The provider refused before accepting: the job moves on, the offer backs off and
        gives back the slot, in one save."""

        def attempt() -> Job:
            job = self._get(Job, job_id)
            slot = job.slot_offer_id
            job.refused(offer_id, status, message)
            if slot is None:
                self.app.save(job)
                return job
            with self._serialised(f"offer:{slot}"):
                offer = self._get(Offer, UUID(slot))
                offer.release_slot(job_id)
                offer.refused(
                    f"provider refused a job ({status}): {message}",
                    now=self.clock(),
                    deactivate=deactivate,
                )
                self.app.save(job, offer)
            return job

        return self._retrying(attempt)

    def dispatched(self, job_id: UUID, queue_id: str, download_url: str | None = None) -> None:
        """The provider accepted the job; a successful dispatch also ends the offer's backoff."""
        sealed = None
        if download_url is not None:
            sealed = self.secrets.seal(download_url, context=f"download:{job_id}")

        def attempt() -> None:
            job = self._get(Job, job_id)
            job.dispatched(queue_id, sealed)
            if job.cancel_requested:
                # The cancel came during the queue call: end the job in this same save, so no
                # reader ever sees it "submitted" after its cancel was answered. The worker's
                # next look finds it terminal and deletes the provider's copy.
                job.cancel(now=int(self.clock()))
                self._finish(job, recovered=True)
                return
            slot = job.slot_offer_id
            if slot is None:
                self.app.save(job)
                return
            with self._serialised(f"offer:{slot}"):
                offer = self._get(Offer, UUID(slot))
                offer.succeeded()
                self.app.save(job, offer)

        self._retrying(attempt)

    def download_url(self, job: Job) -> str | None:
        """The provider's link to the job's finished video, if it gave one at queue time."""
        sealed = (job.dispatch or {}).get("download")
        return None if sealed is None else self.secrets.open(sealed, context=f"download:{job.id}")

    def unknown_outcome(self, job_id: UUID, message: str, *, now: int) -> Job:
        """A queue call whose answer never came: the job fails ``upstream_unknown`` with nothing
        charged (the provider may or may not have billed the seller), and the offer backs off
        as for a refusal (SPEC 3), so a provider that hangs stops winning jobs."""

        def attempt() -> Job:
            job = self._get(Job, job_id)
            if job.is_terminal:
                return job
            dispatching = job.dispatching or {}
            backoff = None
            if dispatching.get("seller_id") is not None:  # a buyer's own key has no offer
                backoff = (dispatching["offer_id"], f"no answer to a job ({message})")
            job.fail(code="upstream_unknown", message=message, retryable=False, now=now)
            self._finish(job, backoff)
            return job

        return self._retrying(attempt)

    def update_job(self, job_id: UUID, change: Callable[[Job], Any]) -> Job:
        """Apply a non-terminal change (claim, dispatch steps, progress) and save it."""

        def attempt() -> Job:
            job = self._get(Job, job_id)
            was_terminal = job.is_terminal
            change(job)
            if job.is_terminal and not was_terminal:
                self._finish(job)
            else:
                self.app.save(job)
            return job

        return self._retrying(attempt)

    def claim(
        self, job_id: UUID, worker_id: str, lease_seconds: float, takeover: bool = False
    ) -> Job | None:
        def attempt() -> Job | None:
            job = self._get(Job, job_id)
            if job.is_terminal:
                return None
            if not job.claim(
                worker_id, now=self.clock(), lease_seconds=lease_seconds, takeover=takeover
            ):
                return None
            self.app.save(job)
            return job

        return self._retrying(attempt)

    def terminate(self, job_id: UUID, decide: Callable[[Job], None]) -> Job:
        """Drive a job to a terminal state via ``decide`` and settle it in the same save."""

        def attempt() -> Job:
            job = self._get(Job, job_id)
            if job.is_terminal:
                return job
            decide(job)
            if not job.is_terminal:
                raise IllegalTransition("decide() must end the job")
            self._finish(job)
            return job

        return self._retrying(attempt)

    def expire_due(self, job_id: UUID) -> Job | None:
        def decide(job: Job) -> None:
            job.expire(now=int(self.clock()))

        job = self.job(job_id)
        if job.is_terminal or self.clock() < job.expires_at:
            return None
        return self.terminate(job_id, decide)
