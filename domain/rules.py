"""Rules that both the aggregates and the read models answer, each written once.

The ``Offer`` aggregate decides availability for real (``Offer.take_slot``); the order book's
rows answer the same question for routing and the market pages without loading the aggregate.
A settlement's status is what poll's ``usage.settlement_status``, the ledger's settlement rows,
the audit summary and the reconciliation all report. Pure functions of plain values: no I/O.
"""

from __future__ import annotations

# Why an offer can't take a new job now, in the order they are checked.
DELETED = "deleted"
PAUSED = "paused"
DEACTIVATED = "deactivated"
BACKOFF = "backoff"
AT_CAPACITY = "at_capacity"

SETTLEMENT_PENDING = "pending"
SETTLEMENT_CONFIRMED = "confirmed"
SETTLEMENT_RELEASED = "released"


def offer_unavailable_because(
    *,
    deleted: bool,
    paused: bool,
    deactivated: bool,
    backoff_until: float,
    in_flight: int,
    max_concurrent_jobs: int | None,
    now: float,
) -> str | None:
    """Why a new job may not start on an offer now, or None when it may."""
    if deleted:
        return DELETED
    if paused:
        return PAUSED
    if deactivated:
        return DEACTIVATED
    if backoff_until > now:
        return BACKOFF
    if max_concurrent_jobs is not None and in_flight >= max_concurrent_jobs:
        return AT_CAPACITY
    return None


def settlement_status(resolved: bool, charged: int) -> str:
    """A job's hold: pending until resolved; then confirmed when it charged, else released."""
    if not resolved:
        return SETTLEMENT_PENDING
    return SETTLEMENT_CONFIRMED if charged else SETTLEMENT_RELEASED


# SPEC 4.5: why a job failed, in its ``error.code``; nothing else may appear there.
JOB_FAILURE_CODES = frozenset(
    {
        "upstream_rejected",
        "inference_failed",
        "content_policy",
        "upstream_unknown",
        "price_changed",
        "no_sellers_available",
    }
)
