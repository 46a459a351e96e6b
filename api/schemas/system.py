"""Operations and finance documents: health, the trial balance, the reconciliation."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from api.schemas.common import Document, SignedMicros


class ProjectionFailure(Document):
    position: int = Field(description="Log position of the event the views could not apply")
    error: str
    failed_at: int = Field(description="Unix seconds")


class Health(Document):
    # Readiness details may grow (connections, ...): readers must not break.
    model_config = ConfigDict(extra="allow")

    status: Literal["ok", "degraded", "starting", "unavailable"] = Field(
        description="degraded: the views stopped following the log, or follow it more than 30 s"
        " behind; either way they serve what they hold. starting and unavailable (answered with"
        " 503): not ready, see detail (waiting for the database, rebuilding views; the database"
        " unreachable)"
    )
    degraded_reasons: list[
        Literal["projection_failed", "projection_lagging", "work_queue_failed"]
    ] = Field(
        default_factory=list,
        description="Why the status is degraded (empty when ok): projection_failed (see "
        "projection_failure), projection_lagging (see projection_lag_seconds), "
        "work_queue_failed (this process's work queue stopped following the log: see "
        "work_queue_failure)",
    )
    catalog: bool
    projection_position: int
    projection_lag_events: int | None = Field(
        default=None, ge=0, description="Log notifications the views have not applied yet"
    )
    projection_lag_seconds: float | None = Field(
        default=None,
        ge=0,
        description="Age of the oldest log event the views have not applied (0: caught up)",
    )
    projection_failure: ProjectionFailure | None = None
    work_queue_failure: ProjectionFailure | None = None
    detail: str | None = Field(
        default=None, description="What a starting engine waits for (the database, a rebuild)"
    )


class Totals(Document):
    debits_usdc: SignedMicros
    credits_usdc: SignedMicros


class AccountLine(Document):
    account: str
    normal_side: Literal["debit", "credit"]
    debits_usdc: SignedMicros
    credits_usdc: SignedMicros
    balance_usdc: SignedMicros


class TrialBalance(Document):
    object: Literal["ledger.trial_balance"]
    position: int
    balanced: bool
    accounts: list[AccountLine]
    totals: Totals


class Check(Document):
    name: str
    description: str
    status: Literal["ok", "failed", "skipped"]
    checked: int
    breaks: int
    reason: str | None = None


class Break(Document):
    check: str
    subject: str
    detail: str


class Reconciliation(Document):
    object: Literal["ledger.reconciliation"]
    ok: bool
    position: int
    checks: list[Check]
    breaks: list[Break]
    totals: dict[str, str | int]
