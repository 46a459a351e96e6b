"""The webhook deliveries read model: one row per job's delivery, with what the buyer reads
(``GET .../webhooks``: the tries, the next one, the outcome) pre-rendered. Senders find due
tries in the work queue (``projections.work``), not here."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from domain.webhooks import WebhookDelivery
from projections.ids import id_text
from projections.store import Batch, Projection, Reader, chunks, dumps, placeholders

NAME = "webhooks"
DeliveryEvent: Any = WebhookDelivery  # generated event classes

TABLES = {
    "mm_webhook_deliveries": (
        "CREATE TABLE IF NOT EXISTS mm_webhook_deliveries ("
        "delivery_id TEXT PRIMARY KEY, job_id TEXT NOT NULL, buyer_id TEXT NOT NULL, "
        "state TEXT NOT NULL, due_at DOUBLE PRECISION, lease_until DOUBLE PRECISION, "
        "lease_worker TEXT, doc TEXT NOT NULL)"
    ),
}
INDEXES = [
    "CREATE INDEX IF NOT EXISTS mm_webhook_deliveries_job ON mm_webhook_deliveries (job_id)",
    "CREATE INDEX IF NOT EXISTS mm_webhook_deliveries_due ON mm_webhook_deliveries (due_at) "
    "WHERE state = 'pending'",
]
COLUMNS = (
    "delivery_id",
    "job_id",
    "buyer_id",
    "state",
    "due_at",
    "lease_until",
    "lease_worker",
    "doc",
)

Row = dict[str, Any]
Handler = Callable[[Row, Any], None]


def _created(row: Row, e: Any) -> None:
    row.update(
        job_id=e.job_id,
        buyer_id=e.buyer_id,
        state="pending",
        due_at=e.due_at,
        lease_until=None,
        lease_worker=None,
        doc={
            "object": "webhook.delivery",
            "job_id": e.job_id,
            "webhook_id": e.webhook_id,
            "url": e.url,
            "status": "pending",
            "next_attempt_at": e.due_at,
            "attempts": [],
        },
    )


def _claimed(row: Row, e: Any) -> None:
    row["lease_until"] = e.until
    row["lease_worker"] = e.worker_id


def _attempted(row: Row, e: Any) -> None:
    row["doc"]["attempts"].append(
        {
            "at": e.at,
            "status_code": e.status_code,
            "latency_ms": e.latency_ms,
            "error": e.error,
        }
    )
    row["doc"]["next_attempt_at"] = e.next_attempt_at
    row["due_at"] = e.next_attempt_at
    row["lease_until"] = row["lease_worker"] = None


def _ended(state: str) -> Handler:
    def handle(row: Row, e: Any) -> None:
        row["state"] = row["doc"]["status"] = state
        row["due_at"] = row["doc"]["next_attempt_at"] = None

    return handle


def _redelivery(row: Row, e: Any) -> None:
    row["state"] = row["doc"]["status"] = "pending"
    row["due_at"] = row["doc"]["next_attempt_at"] = e.at


HANDLERS: dict[type, Handler] = {
    DeliveryEvent.Created: _created,
    DeliveryEvent.Claimed: _claimed,
    DeliveryEvent.Attempted: _attempted,
    DeliveryEvent.Delivered: _ended("delivered"),
    DeliveryEvent.Exhausted: _ended("failed"),
    DeliveryEvent.RedeliveryRequested: _redelivery,
}


class WebhooksFold:
    def __init__(self, batch: Batch) -> None:
        self._batch = batch
        self.rows: dict[str, Row] = {}

    def project(self, items: Sequence[tuple[int, Any]]) -> None:
        ours = [(e, id_text(e.originator_id)) for _, e in items if type(e) in HANDLERS]
        self.rows = self._load({key for _, key in ours})
        for e, key in ours:
            row = self.rows.setdefault(key, {"delivery_id": key})
            if "doc" in row or type(e) is DeliveryEvent.Created:
                HANDLERS[type(e)](row, e)
        self.rows = {k: r for k, r in self.rows.items() if "doc" in r}

    def _load(self, ids: set[str]) -> dict[str, Row]:
        found: dict[str, Row] = {}
        for chunk in chunks(sorted(ids)):
            statement = (
                f"SELECT {', '.join(COLUMNS)} FROM mm_webhook_deliveries "
                f"WHERE delivery_id IN ({placeholders(chunk)})"
            )
            for r in self._batch.all(statement, chunk):
                row = {k: r[k] for k in COLUMNS}
                row["doc"] = json.loads(row["doc"])
                found[row["delivery_id"]] = row
        return found

    def write(self, c: Any, q: Callable[[str], Any]) -> None:
        if not self.rows:
            return
        c.executemany(
            q(
                f"INSERT INTO mm_webhook_deliveries ({', '.join(COLUMNS)}) "
                f"VALUES ({placeholders(COLUMNS)}) "
                "ON CONFLICT (delivery_id) DO UPDATE SET state = excluded.state, "
                "due_at = excluded.due_at, lease_until = excluded.lease_until, "
                "lease_worker = excluded.lease_worker, doc = excluded.doc"
            ),
            [
                (
                    r["delivery_id"],
                    r["job_id"],
                    r["buyer_id"],
                    r["state"],
                    r["due_at"],
                    r["lease_until"],
                    r["lease_worker"],
                    dumps(r["doc"]),
                )
                for r in self.rows.values()
            ],
        )


PROJECTION = Projection(
    name=NAME,
    tables=TABLES,
    indexes=INDEXES,
    digest_order={"mm_webhook_deliveries": "delivery_id"},
    handles=frozenset(HANDLERS),
    fold=WebhooksFold,
)

# --------------------------------------------------------------------------- queries


def backlog(r: Reader) -> int:
    row = r.one("SELECT COUNT(*) AS n FROM mm_webhook_deliveries WHERE state = 'pending'", ())
    return int(row["n"]) if row is not None else 0


def job_deliveries(r: Reader, job_id: str) -> list[dict[str, Any]]:
    rows = r.all("SELECT doc FROM mm_webhook_deliveries WHERE job_id = ?", (job_id,))
    return [json.loads(row["doc"]) for row in rows]
