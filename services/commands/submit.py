"""A submit: the job, its settlement and the buyer's hold in one save, idempotently."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from adapters.crypto import sha256_hex
from domain.aggregates import (
    BuyerAccount,
    InsufficientBalance,
    Job,
    Settlement,
)
from domain.catalog import VideoRequest
from services.commands.base import (
    IDEMPOTENCY_WINDOW_SECONDS,
    CommandBase,
    IdempotencyMismatch,
    Submitted,
    idempotent_job_id,
    position_of,
)
from services.routing import request_data

# How many times a batch decides and saves again the groups of buyers whose accounts another
# process wrote meanwhile, before it submits them one by one (each with its own retries).
GROUP_ROUNDS = 3


@dataclass(frozen=True)
class SubmitRequest:
    """One submit, as the API decided it: the request, its route and the hold."""

    buyer_id: UUID
    request: VideoRequest
    route: list[dict[str, Any]]
    routing: dict[str, Any]
    estimated_cost: int
    hold: int
    ttl_seconds: int
    min_discount: int | None
    idempotency_key: str | None


class SubmitCommands(CommandBase):
    def submit(self, **fields: Any) -> Submitted:
        """Create the job, its settlement and the hold (its ``max_cost``) in one save (SPEC 1, 6).

        The hold is decided before this (``domain.routing.hold_for``); a buyer whose available
        balance does not cover it gets ``InsufficientBalance`` and nothing is written.
        """
        return self._submit(SubmitRequest(**fields))

    def submit_many(self, requests: Sequence[SubmitRequest]) -> list[Submitted | Exception]:
        """Several submits decided in turn and saved in one transaction, each with its own
        outcome: what ``submit`` would have returned or raised.

        A buyer's submits are decided one after another on its account, in the order given
        (so a later one meets the holds of the earlier ones), and saved as one group with it.
        A group that conflicts (another process wrote the account meanwhile) is decided again
        on the account as it now stands and saved with the other such groups, up to
        ``GROUP_ROUNDS`` times. The submits of a buyer that is busy in another thread, or
        whose group kept conflicting, are then done on their own, as ``submit`` does them
        (waiting their turn, retrying conflicts): a batch never waits on a lock while holding
        others, and one buyer's conflict fails nobody else. A second submit with an
        Idempotency-Key already in the batch is done after it, so it finds that job and
        replays it."""
        outcomes: list[Submitted | Exception | None] = [None] * len(requests)
        alone: list[int] = []
        by_buyer: dict[UUID, list[int]] = {}
        keys: set[tuple[UUID, str]] = set()
        for n, r in enumerate(requests):
            if r.idempotency_key is not None:
                if (r.buyer_id, r.idempotency_key) in keys:
                    alone.append(n)
                    continue
                keys.add((r.buyer_id, r.idempotency_key))
            by_buyer.setdefault(r.buyer_id, []).append(n)
        with contextlib.ExitStack() as locks:
            pending: dict[UUID, list[int]] = {}
            for buyer_id, numbers in by_buyer.items():
                release = self._try_serialised(f"buyer:{buyer_id}")
                if release is None:
                    alone += numbers
                    continue
                locks.callback(release)
                pending[buyer_id] = numbers
            for _ in range(GROUP_ROUNDS):
                if not pending:
                    break
                pending = self._decide_and_save(requests, pending, outcomes)
            for numbers in pending.values():
                alone += numbers
        for n in sorted(alone):  # in the order given, so a buyer's stay in theirs
            try:
                outcomes[n] = self._submit(requests[n])
            except Exception as e:
                outcomes[n] = e
        return [o if o is not None else RuntimeError("submit not decided") for o in outcomes]

    def _decide_and_save(
        self,
        requests: Sequence[SubmitRequest],
        buyers: dict[UUID, list[int]],
        outcomes: list[Submitted | Exception | None],
    ) -> dict[UUID, list[int]]:
        """One round of ``submit_many`` for ``buyers`` (each with the numbers of its requests,
        its lock held by the caller): their outcomes set, but for the buyers whose group
        conflicted, which are returned."""
        current = self._current_owned(list(buyers))
        built: list[tuple[UUID, Any, list[tuple[int, Job, str]], list[Any]]] = []
        for buyer_id, numbers in buyers.items():
            owned = self._owned(BuyerAccount, buyer_id, current=buyer_id in current)
            try:
                buyer = owned.__enter__()
            except Exception as e:
                for n in numbers:
                    outcomes[n] = e
                continue
            made: list[tuple[int, Job, str]] = []
            group: list[Any] = []
            for n in numbers:
                try:
                    # A refusal raises before the account changes: the others stand.
                    decided = self._decide(buyer, requests[n])
                except Exception as e:
                    outcomes[n] = e
                    continue
                if isinstance(decided, Submitted):
                    outcomes[n] = decided
                else:
                    job, settlement, token = decided
                    made.append((n, job, token))
                    group += [job, settlement]
            if made:
                built.append((buyer_id, owned, made, [*group, buyer]))
            else:
                owned.__exit__(None, None, None)
        saved = self.app.save_together([group for *_, group in built]) if built else []
        conflicted: dict[UUID, list[int]] = {}
        for (buyer_id, owned, made, _), result in zip(built, saved, strict=True):
            if isinstance(result, Exception):
                # The account changed in memory but not in the store: _owned drops it.
                owned.__exit__(type(result), result, result.__traceback__)
                if isinstance(result, IntegrityError):
                    # All of the buyer's are decided again: a refusal may have been for want
                    # of what an earlier one held.
                    conflicted[buyer_id] = buyers[buyer_id]
                else:
                    for n, _, _ in made:
                        outcomes[n] = result
            else:
                owned.__exit__(None, None, None)
                position = position_of(result)
                for n, job, token in made:
                    outcomes[n] = Submitted(job.id, token, position, replayed=False)
        return conflicted

    def _submit(self, r: SubmitRequest) -> Submitted:
        def attempt() -> Submitted:
            with self._account(r.buyer_id), self._owned(BuyerAccount, r.buyer_id) as buyer:
                decided = self._decide(buyer, r)
                if isinstance(decided, Submitted):
                    return decided
                job, settlement, token = decided
                # Joined with other threads' submits in one transaction when the process is busy.
                recordings = self._group_commit.save(job, settlement, buyer)
                return Submitted(job.id, token, position_of(recordings), replayed=False)

        return self._retrying(attempt)

    def _decide(
        self, buyer: BuyerAccount, r: SubmitRequest
    ) -> Submitted | tuple[Job, Settlement, str]:
        """The new job, its settlement and the buyer's hold on it (unsaved), or the job an
        Idempotency-Key already made; ``InsufficientBalance`` when the hold is not covered."""
        fingerprint = r.request.fingerprint()
        # The account first (the caller holds it): a duplicate that saved before this read is
        # then certainly visible to the replay check below, and one that saves after it makes
        # our save conflict on the account, so the retry finds it.
        if r.idempotency_key is None:
            job_id = uuid.uuid4()
        else:
            generation = 0
            while True:
                job_id = idempotent_job_id(str(r.buyer_id), r.idempotency_key, generation)
                replay = self._idempotent_replay(job_id, fingerprint)
                if replay != "expired":
                    break
                generation += 1
            if isinstance(replay, Submitted):
                return replay
        if not buyer.can_hold(r.hold):
            raise InsufficientBalance(buyer.available, r.hold)
        now = int(self.clock())
        token = self.secrets.job_token(str(job_id))
        job = Job(
            id=job_id,
            buyer_id=str(r.buyer_id),
            request=request_data(r.request),
            fingerprint=fingerprint,
            token_hash=sha256_hex(token),
            created=now,
            expires_at=now + r.ttl_seconds,
            estimated_cost=r.estimated_cost,
            max_cost=r.hold,
            route=r.route,
            min_discount=r.min_discount,
            routing=r.routing,
        )
        settlement = Settlement.for_job(job_id, str(r.buyer_id), r.hold)
        buyer.hold(job_id, r.hold)
        return job, settlement, token

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
