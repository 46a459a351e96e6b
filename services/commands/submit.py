"""A submit: the job, its settlement and the buyer's hold in one save, idempotently."""

from __future__ import annotations

import uuid
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

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


class SubmitCommands(CommandBase):
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
            with self._account(buyer_id), self._owned(BuyerAccount, buyer_id) as buyer:
                return create(buyer)

        def create(buyer: BuyerAccount) -> Submitted:
            # The account first: a duplicate that saved before this read is then certainly
            # visible to the replay check below, and one that saves after it makes our save
            # conflict on the account, so the retry finds it.
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
            # Joined with other buyers' submits in one transaction when the process is busy.
            recordings = self._group_commit.save(job, settlement, buyer)
            return Submitted(job_id, token, position_of(recordings), replayed=False)

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
