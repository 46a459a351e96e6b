"""The command side: every state change of the market, as load, decide, save atomically.

These run in the bounded eventsourcing thread pool, never on the event loop. Each command
retries optimistic-concurrency conflicts itself (reload, decide again, save), so a conflict is
never lost and never surfaces to a caller unless retries are exhausted. One class for callers,
made of one module per area: accounts, offers, submit, and a job's life after it.
"""

from __future__ import annotations

from domain.aggregates import DepositConflict, InsufficientBalance
from services.commands.accounts import AccountCommands
from services.commands.base import (
    IDEMPOTENCY_WINDOW_SECONDS,
    ConflictError,
    IdempotencyMismatch,
    NotFound,
    Stale,
    Submitted,
    Written,
    idempotent_job_id,
)
from services.commands.jobs import JobCommands
from services.commands.offers import OfferCommands
from services.commands.submit import SubmitCommands

__all__ = [
    "IDEMPOTENCY_WINDOW_SECONDS",
    "Commands",
    "ConflictError",
    "DepositConflict",
    "IdempotencyMismatch",
    "InsufficientBalance",
    "NotFound",
    "Stale",
    "Submitted",
    "Written",
    "idempotent_job_id",
]


class Commands(AccountCommands, OfferCommands, SubmitCommands, JobCommands):
    pass
