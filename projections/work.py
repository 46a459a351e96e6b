"""The work queue: what workers must do and when, fed from the log, claimed row by row.

One row per piece of work (``mm_work``), keyed by kind and subject:

- ``job``: a job to drive, from its request until it ends (due at once; a worker that hands it
  back, e.g. to wait for an offer's capacity, sets when it is due again; a cancel makes it due
  at once);
- ``expire``: a job's expiry, due at its ``expires_at`` (so a job nobody can drive, or one deep
  in a backlog, still expires on time);
- ``purge``: a stored video's retention, due ``MEDIA_ARTIFACT_TTL_SECONDS`` after it was stored
  (the TTL is the claimer's setting, so a changed TTL applies to videos already stored);
- ``webhook``: a delivery's next try, due at its ``next_attempt_at``.

The fold only writes ``due_at`` and deletes finished work; ``owner`` and ``lease_until`` are the
claimers' own: a worker claims due rows that no one holds (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, so M workers never pick the same row; SQLite's one write lock does the same), renews
its leases by heartbeat, and a dead worker's rows come free when their lease runs out.

It lives in a store of its own, with its own tracking position and runner: a failed or
rebuilding job view (the big read models) never stops dispatch, expiry or retries, and claims
never wait on the views' write lock (on SQLite it is a file of its own).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from domain.aggregates import Job
from domain.webhooks import WebhookDelivery
from projections.dialects import PostgresStore, SQLiteStore, open_store
from projections.ids import id_text
from projections.store import Batch, Projection, Reader, Store, apply_in_order, placeholders

NAME = "work"
JOB, EXPIRE, PURGE, WEBHOOK = "job", "expire", "purge", "webhook"
KINDS = (JOB, EXPIRE, PURGE, WEBHOOK)
JobEvent: Any = Job  # generated event classes (see projections.jobdoc)
DeliveryEvent: Any = WebhookDelivery

TABLES = {
    "mm_work": (
        "CREATE TABLE IF NOT EXISTS mm_work ("
        "kind TEXT NOT NULL, subject TEXT NOT NULL, due_at DOUBLE PRECISION NOT NULL, "
        "owner TEXT, lease_until DOUBLE PRECISION, PRIMARY KEY (kind, subject))"
    ),
}
INDEXES = ["CREATE INDEX IF NOT EXISTS mm_work_due ON mm_work (kind, due_at)"]

# What a batch does to a row, the last event's word winning: set when due (inserting the row
# if absent), make an existing row due (never inserting), or delete it.
UPSERT, RESCHEDULE, DELETE = "upsert", "reschedule", "delete"
WORK_COLUMNS = ("kind", "subject", "due_at")


class WorkFold:
    def __init__(self, batch: Batch) -> None:
        self._batch = batch
        self.ops: dict[tuple[str, str], tuple[str, float]] = {}

    def project(self, items: Sequence[tuple[int, Any]]) -> None:
        apply_in_order(self, HANDLERS, items)

    def _set(self, kind: str, subject: str, op: str, due: float = 0.0) -> None:
        key = (kind, subject)
        if op == RESCHEDULE and self.ops.get(key, (None,))[0] == UPSERT:
            op = UPSERT  # inserted earlier in the same batch
        self.ops[key] = (op, due)

    def write(self, c: Any, q: Callable[[str], Any]) -> None:
        deletes = [k for k, (op, _) in self.ops.items() if op == DELETE]
        upserts = [(*k, due) for k, (op, due) in self.ops.items() if op == UPSERT]
        moves = [(due, *k) for k, (op, due) in self.ops.items() if op == RESCHEDULE]
        if deletes:
            c.executemany(q("DELETE FROM mm_work WHERE kind = ? AND subject = ?"), deletes)
        if upserts:
            # A row a worker holds keeps its holder: only when it is due changes.
            self._batch.writer.upsert(c, "mm_work", WORK_COLUMNS, upserts, key="kind, subject")
        if moves:
            c.executemany(q("UPDATE mm_work SET due_at = ? WHERE kind = ? AND subject = ?"), moves)


def _job_requested(fold: WorkFold, seq: int, e: Any) -> None:
    job_id = id_text(e.originator_id)
    fold._set(JOB, job_id, UPSERT, float(e.created))
    fold._set(EXPIRE, job_id, UPSERT, float(e.expires_at))


def _cancel_requested(fold: WorkFold, seq: int, e: Any) -> None:
    fold._set(JOB, id_text(e.originator_id), RESCHEDULE, e.timestamp.timestamp())


def _job_ended(fold: WorkFold, seq: int, e: Any) -> None:
    job_id = id_text(e.originator_id)
    fold._set(JOB, job_id, DELETE)
    fold._set(EXPIRE, job_id, DELETE)


def _artifact_stored(fold: WorkFold, seq: int, e: Any) -> None:
    fold._set(PURGE, id_text(e.originator_id), UPSERT, float(e.artifact["stored_at"]))


def _artifact_purged(fold: WorkFold, seq: int, e: Any) -> None:
    fold._set(PURGE, id_text(e.originator_id), DELETE)


def _delivery_due(fold: WorkFold, seq: int, e: Any) -> None:
    fold._set(WEBHOOK, id_text(e.originator_id), UPSERT, float(e.due_at))


def _delivery_attempted(fold: WorkFold, seq: int, e: Any) -> None:
    delivery = id_text(e.originator_id)
    if e.next_attempt_at is None:
        fold._set(WEBHOOK, delivery, DELETE)
    else:
        fold._set(WEBHOOK, delivery, UPSERT, float(e.next_attempt_at))


def _delivery_ended(fold: WorkFold, seq: int, e: Any) -> None:
    fold._set(WEBHOOK, id_text(e.originator_id), DELETE)


def _redelivery(fold: WorkFold, seq: int, e: Any) -> None:
    fold._set(WEBHOOK, id_text(e.originator_id), UPSERT, float(e.at))


HANDLERS: dict[type, Callable[[WorkFold, int, Any], None]] = {
    JobEvent.Created: _job_requested,
    JobEvent.CancelRequested: _cancel_requested,
    JobEvent.Succeeded: _job_ended,
    JobEvent.Failed: _job_ended,
    JobEvent.Canceled: _job_ended,
    JobEvent.Expired: _job_ended,
    JobEvent.ArtifactStored: _artifact_stored,
    JobEvent.ArtifactPurged: _artifact_purged,
    DeliveryEvent.Created: _delivery_due,
    DeliveryEvent.Attempted: _delivery_attempted,
    DeliveryEvent.Delivered: _delivery_ended,
    DeliveryEvent.Exhausted: _delivery_ended,
    DeliveryEvent.RedeliveryRequested: _redelivery,
}

PROJECTION = Projection(
    name=NAME,
    tables=TABLES,
    indexes=INDEXES,
    digest_order={"mm_work": "kind, subject"},
    handles=frozenset(HANDLERS),
    fold=WorkFold,
)


# --------------------------------------------------------------------------- claiming


class Claims(Protocol):
    """What claiming needs of the store: one statement that changes rows and returns some, in
    a transaction of its own, and how a claim locks the rows it picks."""

    skip_locked: str

    def write(self, statement: str, params: Sequence[Any] = ()) -> list[Any]: ...


def claim(
    s: Claims, kind: str, owner: str, now: float, lease_seconds: float, limit: int, due_by: float
) -> list[str]:
    """Up to ``limit`` rows of ``kind`` due by ``due_by`` that no one holds (or whose holder's
    lease ran out), oldest due first, now held by ``owner`` until ``now + lease_seconds``."""
    if limit <= 0:
        return []
    rows = s.write(
        "UPDATE mm_work SET owner = ?, lease_until = ? WHERE (kind, subject) IN ("
        "SELECT kind, subject FROM mm_work WHERE kind = ? AND due_at <= ? "
        "AND (lease_until IS NULL OR lease_until < ?) "
        f"ORDER BY due_at LIMIT ?{s.skip_locked}) RETURNING subject",
        (owner, now + lease_seconds, kind, due_by, now, limit),
    )
    return [r["subject"] for r in rows]


def heartbeat(s: Claims, owner: str, now: float, lease_seconds: float) -> set[tuple[str, str]]:
    """Renew every live lease ``owner`` holds; returns what it still holds (a row whose lease
    ran out and that another worker took is not among them: its work must stop)."""
    rows = s.write(
        "UPDATE mm_work SET lease_until = ? WHERE owner = ? AND lease_until >= ? "
        "RETURNING kind, subject",
        (now + lease_seconds, owner, now),
    )
    return {(r["kind"], r["subject"]) for r in rows}


def release(s: Claims, kind: str, subject: str, owner: str, due_at: float | None = None) -> None:
    """Hand a row back (due again at ``due_at`` when given), if ``owner`` still holds it."""
    s.write(
        "UPDATE mm_work SET owner = NULL, lease_until = NULL, due_at = COALESCE(?, due_at) "
        "WHERE kind = ? AND subject = ? AND owner = ? RETURNING subject",
        (due_at, kind, subject, owner),
    )


def hurry(s: Claims, kind: str, now: float, within: float) -> None:
    """Make unheld rows of ``kind`` due within ``within`` seconds due now: jobs that were
    handed back to wait for an offer's capacity, when a job ends and frees a slot."""
    s.write(
        "UPDATE mm_work SET due_at = ? WHERE kind = ? AND owner IS NULL AND due_at > ? "
        "AND due_at <= ? RETURNING subject",
        (now, kind, now, now + within),
    )


def done(s: Claims, kind: str, subject: str, owner: str) -> None:
    """The work is done (the log will say so too; deleting now keeps others from claiming it
    in between)."""
    s.write(
        "DELETE FROM mm_work WHERE kind = ? AND subject = ? AND owner = ? RETURNING subject",
        (kind, subject, owner),
    )


def release_all(s: Claims, owner: str) -> None:
    """A restarted worker with the same id hands back what its previous life held at once,
    instead of waiting for those leases to run out."""
    s.write(
        "UPDATE mm_work SET owner = NULL, lease_until = NULL WHERE owner = ? RETURNING subject",
        (owner,),
    )


def counts(r: Reader, now: float) -> dict[str, tuple[int, int]]:
    """Per kind: (due and unclaimed, claimed)."""
    rows = r.all(
        "SELECT kind, SUM(CASE WHEN due_at <= ? AND (lease_until IS NULL OR lease_until < ?) "
        "THEN 1 ELSE 0 END) AS due, "
        "SUM(CASE WHEN lease_until >= ? THEN 1 ELSE 0 END) AS claimed FROM mm_work GROUP BY kind",
        (now, now, now),
    )
    found = {r["kind"]: (int(r["due"] or 0), int(r["claimed"] or 0)) for r in rows}
    return {kind: found.get(kind, (0, 0)) for kind in KINDS}


def next_due(r: Reader, kind: str) -> float | None:
    row = r.one("SELECT MIN(due_at) AS due FROM mm_work WHERE kind = ?", (kind,))
    return None if row is None or row["due"] is None else float(row["due"])


def held(r: Reader, kinds: Sequence[str]) -> list[tuple[str, str, str | None]]:
    """Every row of ``kinds`` with its holder (for tests and the operator)."""
    rows = r.all(
        f"SELECT kind, subject, owner FROM mm_work WHERE kind IN ({placeholders(kinds)})",
        tuple(kinds),
    )
    return [(r["kind"], r["subject"], r["owner"]) for r in rows]


# --------------------------------------------------------------------------- the store


class WorkStore(Store):
    schema_table = "mm_work_schema"
    schema_version = 1
    # How a claim's inner SELECT locks its rows (PostgreSQL); SQLite's claim takes the file's
    # one write lock, which serialises claimers by itself.
    skip_locked = ""

    def write(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        """One statement that changes rows and returns some (``RETURNING``), committed."""
        with self.datastore.transaction(commit=True) as c:
            c.execute(self.q(statement), params)
            return list(c.fetchall())

    def claim(
        self, kind: str, owner: str, now: float, lease_seconds: float, limit: int, due_by: float
    ) -> list[str]:
        return claim(self, kind, owner, now, lease_seconds, limit, due_by)

    def heartbeat(self, owner: str, now: float, lease_seconds: float) -> set[tuple[str, str]]:
        return heartbeat(self, owner, now, lease_seconds)

    def release(self, kind: str, subject: str, owner: str, due_at: float | None = None) -> None:
        release(self, kind, subject, owner, due_at)

    def done(self, kind: str, subject: str, owner: str) -> None:
        done(self, kind, subject, owner)

    def hurry(self, kind: str, now: float, within: float) -> None:
        hurry(self, kind, now, within)

    def release_all(self, owner: str) -> None:
        release_all(self, owner)

    def counts(self, now: float) -> dict[str, tuple[int, int]]:
        return counts(self, now)

    def next_due(self, kind: str) -> float | None:
        return next_due(self, kind)


class SQLiteWork(WorkStore, SQLiteStore):
    pass


class PostgresWork(WorkStore, PostgresStore):
    skip_locked = " FOR UPDATE SKIP LOCKED"
    batch_lock_suffix = ":work"

    def write(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        # Autocommit: one round trip, where BEGIN and COMMIT would make three.
        with self.datastore.get_connection() as conn:
            return list(conn.execute(self.q(statement), params).fetchall())


def open_work(env: dict[str, str], datastore: Any = None) -> WorkStore:
    """The work queue's store ``env`` opens; on PostgreSQL in ``datastore``'s pool when given."""
    store = open_store(NAME, env, [PROJECTION], SQLiteWork, PostgresWork, datastore)
    assert isinstance(store, WorkStore)
    return store
