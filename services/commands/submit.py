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
        """Several submits (of different buyers) decided in turn and saved in one transaction,
        each with its own outcome: what ``submit`` would have returned or raised.

        A submit whose buyer is busy in another thread, or whose save conflicted, is then done
        on its own, as ``submit`` does it (waiting its turn, retrying conflicts): a batch never
        waits on a lock while holding others, and one buyer's conflict fails nobody else."""
        outcomes: list[Submitted | Exception | None] = [None] * len(requests)
        alone: list[int] = []
        with contextlib.ExitStack() as locks:
            ours: list[int] = []
            for n, r in enumerate(requests):
                release = self._try_serialised(f"buyer:{r.buyer_id}")
                if release is None:
                    alone.append(n)
                    continue
                locks.callback(release)
                ours.append(n)
            current = self._current_owned([requests[n].buyer_id for n in ours])
            built: list[tuple[int, Any, BuyerAccount, Job, Settlement, str]] = []
            for n in ours:
                r = requests[n]
                owned = self._owned(BuyerAccount, r.buyer_id, current=r.buyer_id in current)
                try:
                    buyer = owned.__enter__()
                except Exception as e:
                    outcomes[n] = e
                    continue
                try:
                    decided = self._decide(buyer, r)
                except Exception as e:
                    owned.__exit__(type(e), e, e.__traceback__)
                    outcomes[n] = e
                    continue
                if isinstance(decided, Submitted):
                    owned.__exit__(None, None, None)
                    outcomes[n] = decided
                else:
                    built.append((n, owned, buyer, *decided))
            groups = [[job, settlement, buyer] for _, _, buyer, job, settlement, _ in built]
            saved = self.app.save_together(groups) if groups else []
            for (n, owned, _, job, _, token), result in zip(built, saved, strict=True):
                if isinstance(result, Exception):
                    # The account changed in memory but not in the store: _owned drops it.
                    owned.__exit__(type(result), result, result.__traceback__)
                    if isinstance(result, IntegrityError):
                        alone.append(n)
                    else:
                        outcomes[n] = result
                else:
                    owned.__exit__(None, None, None)
                    outcomes[n] = Submitted(job.id, token, position_of(result), replayed=False)
        for n in alone:
            try:
                outcomes[n] = self._submit(requests[n])
            except Exception as e:
                outcomes[n] = e
        return [o if o is not None else RuntimeError("submit not decided") for o in outcomes]

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
