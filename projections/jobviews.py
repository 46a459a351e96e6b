"""The job views: one row per job with poll's document pre-rendered (``projections.jobdoc``), so
a poll is one primary-key read plus an authorisation check; and the worker's lists of jobs still
to drive and of stored artifacts to purge."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from domain.aggregates import Job, Settlement
from projections.ids import id_text
from projections.jobdoc import JOB_HANDLERS, SETTLEMENT_HANDLERS, JobDoc, new_doc
from projections.store import Batch, Projection, Reader, chunks, dumps, placeholders

NAME = "job views"
JobEvent: Any = Job  # generated event classes (see projections.jobdoc)
SettlementEvent: Any = Settlement

TABLES = {
    "mm_job_views": (
        "CREATE TABLE IF NOT EXISTS mm_job_views ("
        "job_id TEXT PRIMARY KEY, buyer_id TEXT NOT NULL, seq BIGINT NOT NULL, "
        "status TEXT NOT NULL, token_hash TEXT NOT NULL, artifact_stored_at BIGINT, "
        "version BIGINT NOT NULL, doc TEXT NOT NULL)"
    ),
}
INDEXES = [
    "CREATE INDEX IF NOT EXISTS mm_job_views_buyer ON mm_job_views (buyer_id, seq)",
    "CREATE INDEX IF NOT EXISTS mm_job_views_pending ON mm_job_views (status) "
    "WHERE status IN ('queued', 'submitted', 'running')",
    "CREATE INDEX IF NOT EXISTS mm_job_views_stored ON mm_job_views (artifact_stored_at) "
    "WHERE artifact_stored_at IS NOT NULL",
]
COLUMNS = (
    "job_id",
    "buyer_id",
    "seq",
    "status",
    "token_hash",
    "artifact_stored_at",
    "version",
    "doc",
)


@dataclass(frozen=True)
class JobRow:
    job_id: str
    buyer_id: str
    status: str
    token_hash: str
    doc: JobDoc
    # The log position of the last event that changed the document: the same in every process
    # and after a rebuild, so it is the id of a stream's events (``Last-Event-ID``).
    version: int = 0
    # ``doc`` as the views store it (compact JSON), when read from them: what a poll sends.
    text: str | None = field(default=None, compare=False, repr=False)


# --------------------------------------------------------------------------- the fold

Row = dict[str, Any]
Handler = Callable[["JobViewsFold", int, Any, str], None]


def _created(fold: JobViewsFold, seq: int, e: Any, job_id: str) -> None:
    fold.jobs[job_id] = {
        "job_id": job_id,
        "buyer_id": e.buyer_id,
        "seq": seq,
        "status": "queued",
        "token_hash": e.token_hash,
        "artifact_stored_at": None,
        "version": seq,
        "doc": new_doc(job_id, e),
    }


def _job_event(fold: JobViewsFold, seq: int, e: Any, job_id: str) -> None:
    row = fold.jobs.get(job_id)
    if row is not None:
        JOB_HANDLERS[type(e)](row["doc"], e)
        row["status"] = row["doc"]["status"]
        row["version"] = seq


def _artifact_stored(fold: JobViewsFold, seq: int, e: Any, job_id: str) -> None:
    row = fold.jobs.get(job_id)
    if row is not None:
        _job_event(fold, seq, e, job_id)
        row["artifact_stored_at"] = e.artifact["stored_at"]


def _artifact_purged(fold: JobViewsFold, seq: int, e: Any, job_id: str) -> None:
    row = fold.jobs.get(job_id)
    if row is not None:
        _job_event(fold, seq, e, job_id)
        row["artifact_stored_at"] = None


def _settlement_event(fold: JobViewsFold, seq: int, e: Any, job_id: str) -> None:
    row = fold.jobs.get(job_id)
    if row is not None:
        SETTLEMENT_HANDLERS[type(e)](row["doc"], e)
        row["version"] = seq


HANDLERS: dict[type, Handler] = {
    JobEvent.Created: _created,
    **{cls: _job_event for cls in JOB_HANDLERS},
    JobEvent.ArtifactStored: _artifact_stored,
    JobEvent.ArtifactPurged: _artifact_purged,
    **{cls: _settlement_event for cls in SETTLEMENT_HANDLERS},
}
# A settlement's events name their job by ``job_id``; a job's are its own.
BY_JOB_ID = frozenset(SETTLEMENT_HANDLERS)


def changed_jobs(items: Sequence[tuple[int, Any]]) -> set[str]:
    """The ids of the jobs whose views ``items`` change (as the fold keys them)."""
    handlers, by_job_id = HANDLERS, BY_JOB_ID
    return {
        e.job_id if type(e) in by_job_id else id_text(e.originator_id)
        for _, e in items
        if type(e) in handlers
    }


class JobViewsFold:
    def __init__(self, batch: Batch) -> None:
        self._batch = batch
        self.jobs: dict[str, Row] = {}

    def project(self, items: Sequence[tuple[int, Any]]) -> None:
        handlers, by_job_id = HANDLERS, BY_JOB_ID
        ours: list[tuple[int, Any, Handler, str]] = []
        for seq, e in items:
            cls = type(e)
            handler = handlers.get(cls)
            if handler is None:
                continue
            key = e.job_id if cls in by_job_id else id_text(e.originator_id)
            ours.append((seq, e, handler, key))
        self.jobs = self._load({key for _, _, _, key in ours})
        for seq, e, handler, key in ours:
            handler(self, seq, e, key)

    def _load(self, job_ids: set[str]) -> dict[str, Row]:
        found: dict[str, Row] = {}
        for chunk in chunks(sorted(job_ids)):
            statement = (
                f"SELECT {', '.join(COLUMNS)} FROM mm_job_views "
                f"WHERE job_id IN ({placeholders(chunk)})"
            )
            for r in self._batch.all(statement, chunk):
                row = {k: r[k] for k in COLUMNS}
                row["doc"] = json.loads(row["doc"])
                found[row["job_id"]] = row
        return found

    def write(self, c: Any, q: Callable[[str], Any]) -> None:
        self._batch.writer.upsert(
            c,
            "mm_job_views",
            COLUMNS,
            [
                (
                    r["job_id"],
                    r["buyer_id"],
                    r["seq"],
                    r["status"],
                    r["token_hash"],
                    r["artifact_stored_at"],
                    r["version"],
                    dumps(r["doc"]),
                )
                for r in self.jobs.values()
            ],
            key="job_id",
            keep=("buyer_id", "seq", "token_hash"),  # a job's own, from its creation
        )


PROJECTION = Projection(
    name=NAME,
    tables=TABLES,
    indexes=INDEXES,
    digest_order={"mm_job_views": "job_id"},
    handles=frozenset(HANDLERS),
    fold=JobViewsFold,
    # Their changes to a document are fixed (see projections.jobdoc).
    headers_only=frozenset(
        {JobEvent.Dispatched, JobEvent.Refused, JobEvent.Succeeded, JobEvent.Expired}
    ),
)

# --------------------------------------------------------------------------- queries


_JOB_ROW = "SELECT job_id, buyer_id, status, token_hash, version, doc FROM mm_job_views"


def get_job(r: Reader, job_id: str) -> JobRow | None:
    row = r.one(f"{_JOB_ROW} WHERE job_id = ?", (job_id,))
    return None if row is None else _job_row(row)


def get_jobs(r: Reader, job_ids: Sequence[str]) -> dict[str, JobRow]:
    """The views of those of ``job_ids`` that have one, by id."""
    found: dict[str, JobRow] = {}
    for chunk in chunks(sorted(set(job_ids))):
        for row in r.all(f"{_JOB_ROW} WHERE job_id IN ({placeholders(chunk)})", chunk):
            found[row["job_id"]] = _job_row(row)
    return found


def _job_row(row: Any) -> JobRow:
    return JobRow(
        row["job_id"],
        row["buyer_id"],
        row["status"],
        row["token_hash"],
        json.loads(row["doc"]),
        int(row["version"]),
        row["doc"],
    )


def job_versions(r: Reader, job_ids: Sequence[str]) -> dict[str, int]:
    """Each of ``job_ids`` that has a view: its document's version (what waiters compare)."""
    found: dict[str, int] = {}
    for chunk in chunks(sorted(set(job_ids))):
        for row in r.all(
            f"SELECT job_id, version FROM mm_job_views WHERE job_id IN ({placeholders(chunk)})",
            chunk,
        ):
            found[row["job_id"]] = int(row["version"])
    return found


def job_models(r: Reader, job_ids: Sequence[str]) -> dict[str, str]:
    """Each of ``job_ids`` that has a view: the catalog model it asked for."""
    found: dict[str, str] = {}
    for chunk in chunks(sorted(set(job_ids))):
        for row in r.all(
            f"SELECT job_id, doc FROM mm_job_views WHERE job_id IN ({placeholders(chunk)})",
            chunk,
        ):
            found[row["job_id"]] = json.loads(row["doc"])["model"]
    return found


def list_jobs(
    r: Reader, buyer_id: str, limit: int, after: str | None, status: str | None
) -> list[JobDoc] | None:
    """A buyer's documents, newest first; None when ``after`` names no job of this buyer."""
    clauses, params = ["buyer_id = ?"], [buyer_id]
    if after is not None:
        row = r.one(
            "SELECT seq FROM mm_job_views WHERE job_id = ? AND buyer_id = ?", (after, buyer_id)
        )
        if row is None:
            return None
        clauses.append("seq < ?")
        params.append(row["seq"])
    if status is not None:
        clauses.append("status = ?")
        params.append(status)
    rows = r.all(
        f"SELECT doc FROM mm_job_views WHERE {' AND '.join(clauses)} ORDER BY seq DESC LIMIT ?",
        (*params, limit),
    )
    return [json.loads(row["doc"]) for row in rows]


def every_job(r: Reader) -> dict[str, dict[str, Any]]:
    """Every job's status, buyer and document (a reconciliation's view of what poll serves)."""
    return {
        row["job_id"]: {
            "status": row["status"],
            "buyer_id": row["buyer_id"],
            "doc": json.loads(row["doc"]),
        }
        for row in r.all("SELECT job_id, buyer_id, status, doc FROM mm_job_views")
    }


def statuses_and_estimates(r: Reader, job_ids: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Per job of ``job_ids`` that has a view: its status and the estimate poll shows."""
    found: dict[str, tuple[str, str]] = {}
    for chunk in chunks(sorted(set(job_ids))):
        for row in r.all(
            f"SELECT job_id, status, doc FROM mm_job_views WHERE job_id IN ({placeholders(chunk)})",
            chunk,
        ):
            found[row["job_id"]] = (row["status"], json.loads(row["doc"])["estimated_cost_usdc"])
    return found
