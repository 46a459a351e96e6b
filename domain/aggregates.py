"""Aggregates of SPEC section 6.

Rules for this module: event bodies are pure and deterministic (they run again on replay), every
event has an explicit topic so classes can move, and every value in an event is JSON-safe with
money as ``int`` microdollars. Commands validate first, then trigger the event.
"""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event
from eventsourcing.domain import Snapshot as LibrarySnapshot
from eventsourcing.utils import register_topic

from domain import money
from domain.rules import offer_unavailable_because

QUEUED = "queued"
SUBMITTED = "submitted"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELED = "canceled"
EXPIRED = "expired"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELED, EXPIRED})
PENDING = frozenset({QUEUED, SUBMITTED, RUNNING})


class IllegalTransition(Exception):
    """A command that the aggregate's current state does not allow."""


def settlement_id(job_id: UUID) -> UUID:
    return uuid5(NAMESPACE_URL, f"/mediamarket/settlement/{job_id}")


# --------------------------------------------------------------------------- buyers and sellers


class BuyerAccount(Aggregate):
    """Deposits and holds of one buyer, so that an overdraft check and the hold are one save."""

    TOPIC = "mediamarket.buyer"

    class Snapshot(LibrarySnapshot):
        TOPIC = "mediamarket.buyer.snapshot.v1"

    @event("Created", topic="mediamarket.buyer.created.v1")
    def __init__(self, id: UUID, name: str, api_key_hash: str) -> None:
        self.name = name
        self.api_key_hash = api_key_hash
        self.deposited = 0
        self.spent = 0
        self.held = 0
        self.holds: dict[str, int] = {}
        self.jobs = 0

    @property
    def available(self) -> int:
        return self.deposited - self.spent - self.held

    def deposit(self, amount: int, deposit_id: str) -> bool:
        """Credit a deposit once per ``deposit_id``: a retry of the same deposit is a no-op
        (returns False); the same id with another amount is refused."""
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            raise ValueError("a deposit must be a positive integer of microdollars")
        seen = self._deposit_ids().get(deposit_id)
        if seen is not None:
            if seen != amount:
                raise DepositConflict(deposit_id, seen)
            return False
        self._deposited(amount=amount, deposit_id=deposit_id)
        return True

    def _deposit_ids(self) -> dict[str, int]:
        # Snapshots taken before deposit ids were kept restore without them.
        if not hasattr(self, "deposit_ids"):
            self.deposit_ids: dict[str, int] = {}
        return self.deposit_ids

    @event("Deposited", topic="mediamarket.buyer.deposited.v1")
    def _deposited(self, amount: int, deposit_id: str) -> None:
        self.deposited += amount
        self._deposit_ids()[deposit_id] = amount

    def is_holding(self, job_id: UUID) -> bool:
        return str(job_id) in self.holds

    def can_hold(self, amount: int) -> bool:
        return 0 <= amount <= self.available

    def hold(self, job_id: UUID, amount: int) -> None:
        key = str(job_id)
        if key in self.holds:
            raise IllegalTransition(f"job {job_id} already holds funds")
        if not self.can_hold(amount):
            raise InsufficientBalance(self.available, amount)
        self._held(job_id=key, amount=amount)

    @event("Held", topic="mediamarket.buyer.held.v1")
    def _held(self, job_id: str, amount: int) -> None:
        self.holds[job_id] = amount
        self.held += amount
        self.jobs += 1

    def resolve_hold(self, job_id: UUID, charged: int) -> None:
        key = str(job_id)
        if key not in self.holds:
            raise IllegalTransition(f"job {job_id} holds no funds")
        if not 0 <= charged <= self.holds[key]:
            raise IllegalTransition("a charge can never exceed its hold")
        self._hold_resolved(job_id=key, charged=charged, released=self.holds[key] - charged)

    @event("HoldResolved", topic="mediamarket.buyer.hold-resolved.v1")
    def _hold_resolved(self, job_id: str, charged: int, released: int) -> None:
        self.held -= self.holds.pop(job_id)
        self.spent += charged


class DepositConflict(Exception):
    def __init__(self, deposit_id: str, amount: int) -> None:
        super().__init__(f"deposit {deposit_id!r} was already made, of {amount} microdollars")
        self.deposit_id = deposit_id
        self.amount = amount


# The library registers the topics of an aggregate's own events when the class is defined, but
# a snapshot class's only when a snapshot is taken: a process that only reads (a restarted
# server, the CLI) could not load a buyer with a snapshot.
register_topic(BuyerAccount.Snapshot.TOPIC, BuyerAccount.Snapshot)


class InsufficientBalance(Exception):
    def __init__(self, available: int, wanted: int) -> None:
        super().__init__(f"available balance {available} is below the hold of {wanted}")
        self.available = available
        self.wanted = wanted


class Seller(Aggregate):
    TOPIC = "mediamarket.seller"

    @event("Created", topic="mediamarket.seller.created.v1")
    def __init__(self, id: UUID, name: str, api_key_hash: str) -> None:
        self.name = name
        self.api_key_hash = api_key_hash


class Offer(Aggregate):
    """A seller's standing offer of provider capacity for one model."""

    TOPIC = "mediamarket.offer"

    class Snapshot(LibrarySnapshot):
        """The offer's state with its slots (a set) as a sorted list, which JSON can hold."""

        TOPIC = "mediamarket.offer.snapshot.v1"

        @classmethod
        def take(cls, aggregate: Any) -> Offer.Snapshot:
            snapshot = super().take(aggregate)
            # ``take`` copied the aggregate's attributes into a dict of its own.
            snapshot.state["in_flight"] = sorted(snapshot.state["in_flight"])
            return snapshot

        def mutate(self, _: None) -> Any:
            offer: Any = super().mutate(_)
            offer.in_flight = set(offer.in_flight)
            return offer

    @event("Created", topic="mediamarket.offer.created.v1")
    def __init__(
        self,
        id: UUID,
        seller_id: str,
        model: str,
        provider: str,
        base_url: str | None,
        sealed_key: dict[str, str],
        key_sha256: str,
        cost_multiplier: str,
        max_concurrent_jobs: int | None,
    ) -> None:
        self.seller_id = seller_id
        self.model = model
        self.provider = provider
        self.base_url = base_url
        self.sealed_key = sealed_key
        self.key_sha256 = key_sha256
        self.cost_multiplier = cost_multiplier
        self.max_concurrent_jobs = max_concurrent_jobs
        self.paused = False
        self.deleted = False
        self.deactivated_reason: str | None = None
        self.backoff_until = 0.0
        self.failures = 0
        # Jobs dispatched on this offer's key and not ended: what max_concurrent_jobs limits.
        self.in_flight: set[str] = set()

    def unavailable_because(self, now: float) -> str | None:
        """Why a new job may not start on this offer now, or None when it may."""
        return offer_unavailable_because(
            deleted=self.deleted,
            paused=self.paused,
            deactivated=self.deactivated_reason is not None,
            backoff_until=self.backoff_until,
            in_flight=len(self.in_flight),
            max_concurrent_jobs=self.max_concurrent_jobs,
            now=now,
        )

    def take_slot(self, job_id: UUID, now: float) -> str | None:
        """Reserve capacity for a dispatch; returns why not when the offer can't take it."""
        if str(job_id) in self.in_flight:
            return None
        reason = self.unavailable_because(now)
        if reason is None:
            self._slot_taken(job_id=str(job_id))
        return reason

    @event("SlotTaken", topic="mediamarket.offer.slot-taken.v1")
    def _slot_taken(self, job_id: str) -> None:
        self.in_flight.add(job_id)

    def release_slot(self, job_id: UUID) -> None:
        if str(job_id) in self.in_flight:
            self._slot_released(job_id=str(job_id))

    @event("SlotReleased", topic="mediamarket.offer.slot-released.v1")
    def _slot_released(self, job_id: str) -> None:
        self.in_flight.discard(job_id)

    def update(self, changes: dict[str, Any]) -> None:
        if self.deleted:
            raise IllegalTransition("the offer is deleted")
        allowed = {"cost_multiplier", "max_concurrent_jobs", "paused", "sealed_key", "key_sha256"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)}")
        if changes:
            self._updated(changes=changes)

    @event("Updated", topic="mediamarket.offer.updated.v1")
    def _updated(self, changes: dict[str, Any]) -> None:
        for name, value in changes.items():
            setattr(self, name, value)
        if "sealed_key" in changes:
            self.deactivated_reason = None
            self.failures = 0
            self.backoff_until = 0.0

    def delete(self) -> None:
        if not self.deleted:
            self._deleted()

    @event("Deleted", topic="mediamarket.offer.deleted.v1")
    def _deleted(self) -> None:
        self.deleted = True

    def refused(self, reason: str, now: float, deactivate: bool) -> None:
        """The provider refused a job before accepting it: back off exponentially."""
        failures = self.failures + 1
        delay = min(30.0 * 2 ** (failures - 1), 1800.0)
        self._backed_off(reason=reason, until=now + delay, failures=failures, deactivate=deactivate)

    @event("BackedOff", topic="mediamarket.offer.backed-off.v1")
    def _backed_off(self, reason: str, until: float, failures: int, deactivate: bool) -> None:
        self.failures = failures
        self.backoff_until = until
        if deactivate:
            self.deactivated_reason = reason

    def succeeded(self) -> None:
        if self.failures:
            self._recovered()

    @event("Recovered", topic="mediamarket.offer.recovered.v1")
    def _recovered(self) -> None:
        self.failures = 0
        self.backoff_until = 0.0


register_topic(Offer.Snapshot.TOPIC, Offer.Snapshot)


class BuyerProvider(Aggregate):
    """A buyer's own provider key (SPEC 3): tried before the market for its model, or after it
    for every model when registered with ``model`` None. No seller is paid for its jobs."""

    TOPIC = "mediamarket.buyer-provider"

    @event("Created", topic="mediamarket.buyer-provider.created.v1")
    def __init__(
        self,
        id: UUID,
        buyer_id: str,
        provider: str,
        model: str | None,
        base_url: str | None,
        sealed_key: dict[str, str],
        key_sha256: str,
    ) -> None:
        self.buyer_id = buyer_id
        self.provider = provider
        self.model = model
        self.base_url = base_url
        self.sealed_key = sealed_key
        self.key_sha256 = key_sha256
        self.deleted = False

    def delete(self) -> None:
        if not self.deleted:
            self._deleted()

    @event("Deleted", topic="mediamarket.buyer-provider.deleted.v1")
    def _deleted(self) -> None:
        self.deleted = True


# --------------------------------------------------------------------------- jobs


class Job(Aggregate):
    """One buyer request, from pricing through dispatch to its outcome."""

    TOPIC = "mediamarket.job"

    @event("Created", topic="mediamarket.job.requested.v1")
    def __init__(
        self,
        id: UUID,
        buyer_id: str,
        request: dict[str, Any],
        fingerprint: str,
        token_hash: str,
        created: int,
        expires_at: int,
        estimated_cost: int,
        max_cost: int,
        route: list[dict[str, Any]],
        min_discount: int | None,
        routing: dict[str, Any] | None = None,
    ) -> None:
        self.buyer_id = buyer_id
        self.request = request
        self.fingerprint = fingerprint
        self.token_hash = token_hash
        self.created = created
        self.expires_at = expires_at
        self.estimated_cost = estimated_cost
        self.max_cost = max_cost
        self.route = route
        self.min_discount = min_discount
        # What routing saw at submit besides ``route``: how many offers it considered and
        # which it left out and why (SPEC 6: the routing decision is part of the job's history).
        self.routing = routing or {}
        self.status = QUEUED
        self.progress = 0.0
        self.dispatching: dict[str, Any] | None = None
        self.dispatch: dict[str, Any] | None = None
        self.attempts: list[dict[str, Any]] = []
        self.cancel_requested = False
        self.error: dict[str, Any] | None = None
        self.artifacts: list[dict[str, Any]] = []
        self.lease: dict[str, Any] | None = None
        self.upstream_deleted = False
        # The marketplace offer whose capacity this job holds, from dispatch until it ends.
        self.slot_offer_id: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    def _require_pending(self) -> None:
        if self.is_terminal:
            raise IllegalTransition(f"the job is {self.status}")

    # -- work leases: one worker drives a job at a time; a dead worker's lease runs out

    def claim(
        self, worker_id: str, now: float, lease_seconds: float, takeover: bool = False
    ) -> bool:
        """Take (or renew) the lease; False when another worker holds a live one, unless
        ``takeover``: the work queue's claim (whose short, heartbeat-renewed lease says the
        holder is dead) decided already. The log records every change of hands."""
        self._require_pending()
        lease = self.lease
        if lease and lease["worker_id"] != worker_id and lease["until"] > now and not takeover:
            return False
        if lease and lease["worker_id"] == worker_id and lease["until"] - now > lease_seconds / 2:
            # Still ours for a good while: a job that keeps being rescheduled (waiting for
            # capacity) must not write an event every time it is looked at.
            return True
        self._claimed(worker_id=worker_id, until=now + lease_seconds)
        return True

    @event("Claimed", topic="mediamarket.job.claimed.v1")
    def _claimed(self, worker_id: str, until: float) -> None:
        self.lease = {"worker_id": worker_id, "until": until}

    # -- dispatch

    def start_dispatch(self, attempt: dict[str, Any]) -> None:
        """Recorded before the queue call: if we die now, the outcome is unknowable."""
        self._require_pending()
        if self.status != QUEUED or self.dispatching is not None:
            raise IllegalTransition("the job is already being dispatched")
        if attempt["buyer_cost"] > self.max_cost:
            raise IllegalTransition("a dispatch may never cost more than the hold")
        self._dispatch_started(attempt=attempt)

    @event("DispatchStarted", topic="mediamarket.job.dispatch-started.v1")
    def _dispatch_started(self, attempt: dict[str, Any]) -> None:
        self.dispatching = attempt
        if attempt.get("seller_id") is not None:
            self.slot_offer_id = attempt["offer_id"]

    def refused(self, offer_id: str, status: int, message: str) -> None:
        """The provider answered and did not accept: safe to try the next offer."""
        if self.dispatching is None or self.dispatching["offer_id"] != offer_id:
            raise IllegalTransition("no dispatch to that offer is in flight")
        self._refused(offer_id=offer_id, status=status, message=message)

    @event("Refused", topic="mediamarket.job.refused.v1")
    def _refused(self, offer_id: str, status: int, message: str) -> None:
        self.attempts.append({"offer_id": offer_id, "status": status, "message": message})
        self.dispatching = None
        self.slot_offer_id = None

    def skipped(self, offer_id: str, reason: str) -> None:
        self._require_pending()
        self._skipped(offer_id=offer_id, reason=reason)

    @event("Skipped", topic="mediamarket.job.skipped.v1")
    def _skipped(self, offer_id: str, reason: str) -> None:
        self.attempts.append({"offer_id": offer_id, "skipped": reason})

    def dispatched(self, queue_id: str, download: dict[str, str] | None = None) -> None:
        """The provider accepted the job. ``download`` is the provider's pre-signed link to the
        finished video, sealed: the link is a credential, and no secret is in an event in plain
        text (SPEC 6)."""
        if self.dispatching is None:
            raise IllegalTransition("no dispatch is in flight")
        self._require_pending()
        self._dispatched(queue_id=queue_id, download=download)

    @event("Dispatched", topic="mediamarket.job.dispatched.v1")
    def _dispatched(self, queue_id: str, download: dict[str, str] | None = None) -> None:
        assert self.dispatching is not None
        self.dispatch = {**self.dispatching, "queue_id": queue_id}
        if download is not None:
            self.dispatch["download"] = download
        self.dispatching = None
        self.status = SUBMITTED

    @property
    def is_dispatched(self) -> bool:
        return self.dispatch is not None

    def progressed(self, progress: float, eta_seconds: int | None = None) -> None:
        self._require_pending()
        if not self.is_dispatched:
            raise IllegalTransition("the job has not been dispatched")
        progress = max(0.0, min(progress, 0.99))
        if self.status == RUNNING and progress <= self.progress:
            return
        if eta_seconds is not None:
            eta_seconds = max(0, int(eta_seconds))
        self._progressed(progress=round(progress, 2), eta_seconds=eta_seconds)

    # ``eta_seconds`` came later: it has a default, so events stored before it read as unknown.
    @event("Progressed", topic="mediamarket.job.progressed.v1")
    def _progressed(self, progress: float, eta_seconds: int | None = None) -> None:
        self.progress = progress
        self.status = RUNNING

    def request_cancel(self) -> None:
        self._require_pending()
        if not self.cancel_requested:
            self._cancel_requested()

    @event("CancelRequested", topic="mediamarket.job.cancel-requested.v1")
    def _cancel_requested(self) -> None:
        self.cancel_requested = True

    # -- outcomes; the caller settles money in the same save

    def artifact_stored(self, artifact: dict[str, Any]) -> None:
        self._require_pending()
        self._artifact_stored(artifact=artifact)

    @event("ArtifactStored", topic="mediamarket.job.artifact-stored.v1")
    def _artifact_stored(self, artifact: dict[str, Any]) -> None:
        self.artifacts.append(artifact)

    def succeed(self, now: int) -> None:
        self._require_pending()
        if not self.is_dispatched or not self.artifacts:
            raise IllegalTransition("a job succeeds only with a stored artifact")
        self._succeeded(finished=now)

    @event("Succeeded", topic="mediamarket.job.succeeded.v1")
    def _succeeded(self, finished: int) -> None:
        self.status = SUCCEEDED
        self.progress = 1.0
        self.finished = finished
        self.dispatching = None

    def fail(self, code: str, message: str, retryable: bool, now: int) -> None:
        self._require_pending()
        self._failed(code=code, message=message, retryable=retryable, finished=now)

    @event("Failed", topic="mediamarket.job.failed.v1")
    def _failed(self, code: str, message: str, retryable: bool, finished: int) -> None:
        self.status = FAILED
        self.error = {"code": code, "message": message, "retryable": retryable}
        self.finished = finished
        self.dispatching = None

    def cancel(self, now: int) -> None:
        self._require_pending()
        if self.dispatching is not None:
            raise IllegalTransition("a queue call is in flight; cancel once its outcome is known")
        self._canceled(after_dispatch=self.is_dispatched, finished=now)

    @event("Canceled", topic="mediamarket.job.canceled.v1")
    def _canceled(self, after_dispatch: bool, finished: int) -> None:
        self.status = CANCELED
        self.finished = finished

    def expire(self, now: int) -> None:
        self._require_pending()
        if now < self.expires_at:
            raise IllegalTransition("the job has not reached its expiry time")
        self._expired(finished=now)

    @event("Expired", topic="mediamarket.job.expired.v1")
    def _expired(self, finished: int) -> None:
        self.status = EXPIRED
        self.finished = finished
        self.dispatching = None

    def upstream_media_deleted(self) -> None:
        if not self.upstream_deleted:
            self._upstream_deleted()

    @event("UpstreamDeleted", topic="mediamarket.job.upstream-deleted.v1")
    def _upstream_deleted(self) -> None:
        self.upstream_deleted = True

    def purge_artifacts(self, now: int) -> None:
        if self.artifacts and not all(a.get("purged") for a in self.artifacts):
            self._artifacts_purged(purged_at=now)

    @event("ArtifactPurged", topic="mediamarket.job.artifact-purged.v1")
    def _artifacts_purged(self, purged_at: int) -> None:
        self.artifacts = [{**a, "purged": purged_at} for a in self.artifacts]

    @property
    def charge(self) -> tuple[int, int]:
        """(buyer cost, seller cost) this job owes now, by the settlement table of SPEC 1."""
        billed = self.dispatch is not None and (
            self.status == SUCCEEDED or (self.status == CANCELED)
        )
        if not billed:
            return 0, 0
        assert self.dispatch is not None
        return self.dispatch["buyer_cost"], self.dispatch["seller_cost"]


# --------------------------------------------------------------------------- settlements


class Settlement(Aggregate):
    """One per job: the hold at submit, then exactly one resolution."""

    TOPIC = "mediamarket.settlement"

    @event("Created", topic="mediamarket.settlement.reserved.v1")
    def __init__(self, id: UUID, job_id: str, buyer_id: str, hold: int) -> None:
        self.job_id = job_id
        self.buyer_id = buyer_id
        self.hold = hold
        self.resolved = False
        self.charged = 0
        self.released = 0
        self.seller_cost = 0
        self.platform_fee = 0

    @classmethod
    def for_job(cls, job_id: UUID, buyer_id: str, hold: int) -> Settlement:
        return cls(id=settlement_id(job_id), job_id=str(job_id), buyer_id=buyer_id, hold=hold)

    def settle(
        self,
        buyer_cost: int,
        seller_cost: int,
        seller_id: str | None,
        offer_id: str | None,
        outcome: str,
    ) -> None:
        if self.resolved:
            raise IllegalTransition("the hold is already resolved")
        try:
            amounts = money.settle(self.hold, buyer_cost or None, seller_cost)
        except money.MoneyError as e:
            raise IllegalTransition(str(e)) from None
        if amounts.charged == 0:
            self._released(job_id=self.job_id, released=amounts.released, outcome=outcome)
            return
        self._settled(
            job_id=self.job_id,
            charged=amounts.charged,
            seller_cost=amounts.seller_paid,
            platform_fee=amounts.platform_fee,
            released=amounts.released,
            seller_id=seller_id,
            offer_id=offer_id,
            outcome=outcome,
        )

    @event("Settled", topic="mediamarket.settlement.settled.v1")
    def _settled(
        self,
        job_id: str,
        charged: int,
        seller_cost: int,
        platform_fee: int,
        released: int,
        seller_id: str | None,
        offer_id: str | None,
        outcome: str,
    ) -> None:
        self.resolved = True
        self.charged = charged
        self.seller_cost = seller_cost
        self.platform_fee = platform_fee
        self.released = released

    @event("Released", topic="mediamarket.settlement.released.v1")
    def _released(self, job_id: str, released: int, outcome: str) -> None:
        self.resolved = True
        self.released = released
