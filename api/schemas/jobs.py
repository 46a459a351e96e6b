"""Media jobs (SPEC 4.1 to 4.4): the job view, its list, its history, the list's query."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from api.schemas.common import Document, Micros, Query, Uuid
from api.validation import SubmitBody

__all__ = ["SubmitBody"]

JobStatus = Literal["queued", "submitted", "running", "succeeded", "failed", "canceled", "expired"]
MetadataValue = str | int | float | bool | None


def ascii_decimal(value: object) -> object:
    """Query integers as plain ASCII decimals (int() would take "+5", " 5", "5_0", "\u0665")."""
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit() and len(value) <= 9) or (
            value != "0" and value.startswith("0")
        ):
            raise ValueError("not a whole number written in ASCII decimal digits")
        return int(value)
    return value


def canonical_uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError("not a job id") from None


QueryInt = Annotated[int, BeforeValidator(ascii_decimal)]


class JobResult(Document):
    artifact_index: int = Field(ge=0)
    url: str | None = Field(
        description="A short-lived direct URL to the video; null once past retention"
    )
    download_url: str = Field(description="The engine's download route (buyer key or job token)")
    content_type: str = Field(examples=["video/mp4"])
    duration_seconds: int = Field(description="Read from the stored file")
    width: int
    height: int
    bytes: int


class JobUsage(Document):
    seller_cost_usdc: Micros
    buyer_cost_usdc: Micros
    settlement_status: Literal["pending", "confirmed", "released"]


class JobError(Document):
    code: str = Field(
        description="upstream_rejected, inference_failed, content_policy, upstream_unknown, "
        "price_changed, no_sellers_available, ..."
    )
    message: str
    retryable: bool


class JobView(Document):
    """A job as poll, cancel and list show it (SPEC 4.2)."""

    id: Uuid
    object: Literal["media.job"]
    kind: Literal["video"]
    status: JobStatus
    created: int = Field(description="Unix seconds")
    expires_at: int = Field(description="Unix seconds: a job not finished by then expires")
    model: str
    estimated_cost_usdc: Micros
    max_cost_usdc: Micros = Field(description="The hold: the most this job can cost")
    poll_url: str
    cancel_url: str
    metadata: dict[str, MetadataValue]
    progress: float = Field(
        ge=0, le=1, description="The provider's execution time so far over its average run"
    )
    eta_seconds: int | None = Field(
        ge=0,
        description="Seconds the provider expects the job still to run, as of its last report; "
        "null when unknown (before its first report, or after a failure, cancel or expiry)",
    )
    results: list[JobResult]
    usage: JobUsage
    error: JobError | None = Field(default=None, description="Present when the job failed")


class SubmittedJob(JobView):
    """The job just created (or, with a replayed Idempotency-Key, the one created before)."""

    job_token: str = Field(
        description="Authorises GET, DELETE and downloads of this one job as X-Job-Token; "
        "shown only here"
    )


class JobList(Document):
    object: Literal["list"]
    data: list[JobView]
    has_more: bool
    next_after: Uuid | None = Field(description="Pass as `after` for the next page")


class ListJobsQuery(Query):
    problems: ClassVar[dict[str, str]] = {
        "limit": "limit must be an integer from 1 to 100",
        "status": "status must be one of canceled, expired, failed, queued, running, submitted, "
        "succeeded",
        "after": "after must be a job id",
    }

    limit: QueryInt = Field(default=20, ge=1, le=100, description="Page size, 1 to 100")
    after: Annotated[str, AfterValidator(canonical_uuid)] | None = Field(
        default=None,
        description="The last job id of the previous page",
        json_schema_extra={"format": "uuid"},
    )
    status: JobStatus | None = Field(default=None, description="Only jobs in this status")


class JobEvent(Document):
    object: Literal["job.event"]
    aggregate: str
    name: str
    type: str
    version: int
    timestamp: str
    data: dict[str, Any]


class JobAmounts(Document):
    estimated_cost_usdc: Micros
    held_usdc: Micros
    charged_usdc: Micros
    seller_cost_usdc: Micros
    platform_fee_usdc: Micros
    released_usdc: Micros
    settlement_status: str


class JobSummary(Document):
    status: str
    error: JobError | None
    routing: dict[str, Any]
    attempts: list[dict[str, Any]]
    amounts: JobAmounts


class JobHistory(Document):
    """Every event of a job and its settlement, from the log (SPEC 6)."""

    object: Literal["list"]
    job_id: Uuid
    data: list[JobEvent]
    summary: JobSummary
