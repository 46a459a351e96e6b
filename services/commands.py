"""The command side: every state change of the market, as load, decide, save atomically.

These run in the bounded eventsourcing thread pool, never on the event loop. Each command
retries optimistic-concurrency conflicts itself (reload, decide again, save), so a conflict is
never lost and never surfaces to a caller unless retries are exhausted.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from adapters.crypto import Secrets, new_api_key, sha256_hex
from adapters.eventstore import MarketApp
from domain.aggregates import (
    BuyerAccount,
    BuyerProvider,
    DepositConflict,
    IllegalTransition,
    InsufficientBalance,
    Job,
    Offer,
    Seller,
    Settlement,
    settlement_id,
)
from domain.catalog import VideoRequest
from services.routing import request_data

T = TypeVar("T")
IDEMPOTENCY_WINDOW_SECONDS = 24 * 3600
MAX_ATTEMPTS = 200


class ConflictError(Exception):
    """Optimistic-concurrency retries exhausted (practically unreachable)."""


class Stale(Exception):
    """What a command loaded was overtaken before it could save: another writer ended the job
    (its settlement is resolved, its hold gone). The save would conflict anyway; this says so
    before a rule refuses the stale decision, and the command retries on fresh state."""


class IdempotencyMismatch(Exception):
    """The Idempotency-Key was used before with a different request body."""


class NotFound(Exception):
    pass


@dataclass(frozen=True)
class Written:
    """What a command wrote: the log position to wait for before answering the caller."""

    position: int


@dataclass(frozen=True)
class Submitted:
    job_id: UUID
    job_token: str
    position: int
    replayed: bool


def _position(recordings: list[Any]) -> int:
    return max((r.notification.id for r in recordings), default=0)


def idempotent_job_id(buyer_id: str, key: str, generation: int) -> UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"/mediamarket/idempotency/{buyer_id}/{generation}/{key}")


class Commands:
    def __init__(self, app: MarketApp, secrets: Secrets, clock: Callable[[], float] = time.time):
        self.app = app
        self.secrets = secrets
        self.clock = clock
        self._open_keys: dict[tuple[str, str], str] = {}
        self._locks: weakref.WeakValueDictionary[str, threading.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._locks_guard = threading.Lock()

    @contextmanager
    def _serialised(self, *names: str) -> Iterator[None]:
        """Serialise this process's writes to hot aggregates (a buyer's account, an offer).

        Concurrent writers would otherwise load the same version and all but one would redo
        their work after a conflict; other processes still conflict and retry, which stays
        correct, just slower. Locks are taken in sorted order, so two commands that need the
        same pair can never deadlock.
        """
        with self._locks_guard:
            locks = []
            for name in sorted(set(names)):
                lock = self._locks.get(name)
                if lock is None:
                    lock = threading.Lock()
                    self._locks[name] = lock
                locks.append(lock)
        with contextlib.ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            yield

    def _account(self, buyer_id: UUID | str) -> contextlib.AbstractContextManager[None]:
        return self._serialised(f"buyer:{buyer_id}")

    def _retrying(self, attempt: Callable[[], T]) -> T:
        for n in range(MAX_ATTEMPTS):
            try:
                return attempt()
            except (IntegrityError, Stale):
                # Contention on a hot aggregate (a busy buyer's account): back off a little,
                # with jitter so the losers don't collide again in lockstep.
                time.sleep(random.uniform(0, min(0.001 * (n + 1), 0.02)))
        raise ConflictError("too much contention; try again")

    def _get(self, cls: type[T], aggregate_id: UUID) -> T:
        try:
            aggregate: Any = self.app.repository.get(aggregate_id)
        except AggregateNotFoundError:
            raise NotFound(str(aggregate_id)) from None
        if not isinstance(aggregate, cls):
            raise NotFound(str(aggregate_id))
        return aggregate

    # ------------------------------------------------------------------ principals and money

    def create_buyer(self, name: str) -> tuple[UUID, str, Written]:
        api_key = new_api_key("mm_buyer")
        buyer = BuyerAccount(id=uuid.uuid4(), name=name, api_key_hash=sha256_hex(api_key))
        return buyer.id, api_key, Written(_position(self.app.save(buyer)))

    def create_seller(self, name: str) -> tuple[UUID, str, Written]:
        api_key = new_api_key("mm_seller")
        seller = Seller(id=uuid.uuid4(), name=name, api_key_hash=sha256_hex(api_key))
        return seller.id, api_key, Written(_position(self.app.save(seller)))

    def deposit(self, buyer_id: UUID, amount: int, deposit_id: str | None = None) -> Written:
        deposit_ref = deposit_id or str(uuid.uuid4())

        def attempt() -> Written:
            with self._account(buyer_id):
                buyer = self._get(BuyerAccount, buyer_id)
                if not buyer.deposit(amount, deposit_ref):
                    return Written(0)  # made before: nothing new to wait for
                return Written(_position(self.app.save(buyer)))

        return self._retrying(attempt)

    def buyer(self, buyer_id: UUID) -> BuyerAccount:
        return self._get(BuyerAccount, buyer_id)

    # ------------------------------------------------------------------ offers

    def create_offer(
        self,
        *,
        seller_id: UUID,
        model: str,
        provider: str,
        base_url: str | None,
        api_key: str,
        cost_multiplier: str,
        max_concurrent_jobs: int | None,
    ) -> tuple[UUID, Written]:
        self._get(Seller, seller_id)
        offer_id = uuid.uuid4()
        offer = Offer(
            id=offer_id,
            seller_id=str(seller_id),
            model=model,
            provider=provider,
            base_url=base_url,
            sealed_key=self.secrets.seal(api_key, context=f"offer:{offer_id}"),
            key_sha256=sha256_hex(api_key),
            cost_multiplier=cost_multiplier,
            max_concurrent_jobs=max_concurrent_jobs,
        )
        return offer_id, Written(_position(self.app.save(offer)))

    def update_offer(self, seller_id: UUID, offer_id: UUID, changes: dict[str, Any]) -> Written:
        if "api_key" in changes:
            key = changes.pop("api_key")
            changes["sealed_key"] = self.secrets.seal(key, context=f"offer:{offer_id}")
            changes["key_sha256"] = sha256_hex(key)

        def attempt() -> Written:
            offer = self._seller_offer(seller_id, offer_id)
            offer.update(changes)
            return Written(_position(self.app.save(offer)))

        return self._retrying(attempt)

    def delete_offer(self, seller_id: UUID, offer_id: UUID) -> Written:
        def attempt() -> Written:
            offer = self._seller_offer(seller_id, offer_id)
            offer.delete()
            return Written(_position(self.app.save(offer)))

        return self._retrying(attempt)

    def _seller_offer(self, seller_id: UUID, offer_id: UUID) -> Offer:
        offer = self._get(Offer, offer_id)
        if offer.seller_id != str(seller_id) or offer.deleted:
            raise NotFound(str(offer_id))
        return offer

    def offer_refused(self, offer_id: UUID, reason: str, deactivate: bool) -> None:
        """Passive health: the offer's key failed (a quote here); back off exponentially."""

        def attempt() -> None:
            with self._serialised(f"offer:{offer_id}"):
                offer = self._get(Offer, offer_id)
                offer.refused(reason, now=self.clock(), deactivate=deactivate)
                self.app.save(offer)

        self._retrying(attempt)

    def open_key(self, context: str, sealed_key: dict[str, str]) -> str:
        # Routing opens every candidate's key on every submit; the plaintext is needed in
        # memory for the call anyway, so keep it rather than pay AES-GCM each time.
        cache_key = (context, sealed_key["ct"])
        key = self._open_keys.get(cache_key)
        if key is None:
            key = self.secrets.open(sealed_key, context=context)
            if len(self._open_keys) > 10_000:
                self._open_keys.clear()
            self._open_keys[cache_key] = key
        return key

    # ------------------------------------------------------------------ buyer-owned providers

    def add_buyer_provider(
        self,
        *,
        buyer_id: UUID,
        provider: str,
        model: str | None,
        base_url: str | None,
        api_key: str,
    ) -> tuple[UUID, Written]:
        self._get(BuyerAccount, buyer_id)
        provider_id = uuid.uuid4()
        key = BuyerProvider(
            id=provider_id,
            buyer_id=str(buyer_id),
            provider=provider,
            model=model,
            base_url=base_url,
            sealed_key=self.secrets.seal(api_key, context=f"buyer-provider:{provider_id}"),
            key_sha256=sha256_hex(api_key),
        )
        return provider_id, Written(_position(self.app.save(key)))

    def delete_buyer_provider(self, buyer_id: UUID, provider_id: UUID) -> Written:
        def attempt() -> Written:
            key = self._get(BuyerProvider, provider_id)
            if key.buyer_id != str(buyer_id) or key.deleted:
                raise NotFound(str(provider_id))
            key.delete()
            return Written(_position(self.app.save(key)))

        return self._retrying(attempt)

    # ------------------------------------------------------------------ submit

    def submit(
        self,
        *,
        buyer_id: UUID,
        request: VideoRequest,
        route: list[dict[str, Any]],
        routing: dict[str, Any],
        estimated_cost: int,
        hold: int,
        ttl_seconds: int,
        min_discount: int | None,
        idempotency_key: str | None,
    ) -> Submitted:
        """Create the job, its settlement and the hold (its ``max_cost``) in one save (SPEC 1, 6).

        The hold is decided before this (``domain.routing.hold_for``); a buyer whose available
        balance does not cover it gets ``InsufficientBalance`` and nothing is written.
        """
        fingerprint = request.fingerprint()

        def attempt() -> Submitted:
            with self._account(buyer_id):
                return create()

        def create() -> Submitted:
            # The account first: a duplicate that saved before this read is then certainly
            # visible to the replay check below, and one that saves after it makes our save
            # conflict on the account, so the retry finds it.
            buyer = self._get(BuyerAccount, buyer_id)
            if idempotency_key is None:
                job_id = uuid.uuid4()
            else:
                generation = 0
                while True:
                    job_id = idempotent_job_id(str(buyer_id), idempotency_key, generation)
                    replay = self._idempotent_replay(job_id, fingerprint)
                    if replay != "expired":
                        break
                    generation += 1
                if isinstance(replay, Submitted):
                    return replay
            if not buyer.can_hold(hold):
                raise InsufficientBalance(buyer.available, hold)
            now = int(self.clock())
            token = self.secrets.job_token(str(job_id))
            job = Job(
                id=job_id,
                buyer_id=str(buyer_id),
                request=request_data(request),
                fingerprint=fingerprint,
                token_hash=sha256_hex(token),
                created=now,
                expires_at=now + ttl_seconds,
                estimated_cost=estimated_cost,
                max_cost=hold,
                route=route,
                min_discount=min_discount,
                routing=routing,
            )
            settlement = Settlement.for_job(job_id, str(buyer_id), hold)
            buyer.hold(job_id, hold)
            recordings = self.app.save(job, settlement, buyer)
            return Submitted(job_id, token, _position(recordings), replayed=False)

        return self._retrying(attempt)

    def find_idempotent(self, buyer_id: UUID, key: str, fingerprint: str) -> Submitted | None:
        """The job an Idempotency-Key already created within its window, if any."""
        generation = 0
        while True:
            found = self._idempotent_replay(
                idempotent_job_id(str(buyer_id), key, generation), fingerprint
            )
            if found != "expired":
                return found if isinstance(found, Submitted) else None
            generation += 1

    def _idempotent_replay(self, job_id: UUID, fingerprint: str) -> Submitted | str | None:
        try:
            job: Any = self.app.repository.get(job_id)
        except AggregateNotFoundError:
            return None
        assert isinstance(job, Job)
        if job.created + IDEMPOTENCY_WINDOW_SECONDS <= self.clock():
            return "expired"
        if job.fingerprint != fingerprint:
            raise IdempotencyMismatch()
        position = self.app.recorder.max_notification_id() or 0
        return Submitted(job_id, self.secrets.job_token(str(job_id)), position, replayed=True)

    # ------------------------------------------------------------------ job lifecycle

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
                return Written(_position(self.app.save(job)))
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
            for offer_id in sorted(offer_ids):
                offer = self._get(Offer, UUID(offer_id))
                if offer_id == slot:
                    offer.release_slot(job.id)
                    if recovered:
                        offer.succeeded()
                if backoff is not None and offer_id == backoff[0]:
                    offer.refused(backoff[1], now=self.clock(), deactivate=False)
                aggregates.append(offer)
            return _position(self.app.save(*aggregates))

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
                if reason == "at_capacity":
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

    def claim(self, job_id: UUID, worker_id: str, lease_seconds: float) -> Job | None:
        def attempt() -> Job | None:
            job = self._get(Job, job_id)
            if job.is_terminal:
                return None
            if not job.claim(worker_id, now=self.clock(), lease_seconds=lease_seconds):
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


__all__ = [
    "Commands",
    "ConflictError",
    "DepositConflict",
    "IdempotencyMismatch",
    "InsufficientBalance",
    "NotFound",
    "Submitted",
    "Written",
]
