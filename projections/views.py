"""The read models (job views, principals, offers) and their exactly-once tracking.

One set of SQL serves SQLite and PostgreSQL: statements are written with ``?`` placeholders and
translated for psycopg. Each batch of events is applied in one transaction together with the
library's single-row tracking upsert, which refuses a position it has already passed, so two
runners racing over the same log can never apply an event twice.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
from eventsourcing.persistence import (
    InfrastructureFactory,
    IntegrityError,
    Tracking,
    TrackingRecorder,
)
from eventsourcing.postgres import PostgresTrackingRecorder
from eventsourcing.sqlite import SQLiteTrackingRecorder
from eventsourcing.utils import Environment, resolve_topic
from psycopg.sql import SQL, Identifier

from domain.aggregates import BuyerAccount, BuyerProvider, Job, Offer, Seller
from projections import ledger
from projections.ids import id_text
from projections.jobdoc import (
    JobDoc,
    JobEvent,
    SettlementEvent,
    apply_job_event,
    apply_settlement_event,
    new_doc,
)

VIEWS_NAME = "views"
# Job events that change no view: lease renewals, skipped offers, a cancel still waiting for a
# queue call's answer, and the provider copy's deletion.
IGNORED_TOPICS = frozenset(
    {
        Job.Claimed.TOPIC,  # type: ignore[attr-defined]
        Job.Skipped.TOPIC,  # type: ignore[attr-defined]
        Job.CancelRequested.TOPIC,  # type: ignore[attr-defined]
        Job.UpstreamDeleted.TOPIC,  # type: ignore[attr-defined]
    }
)
# Generated event classes again (see projections.jobdoc).
OfferEvent: Any = Offer
BuyerEvent: Any = BuyerAccount
SellerEvent: Any = Seller
BuyerProviderEvent: Any = BuyerProvider

TABLES: dict[str, str] = {
    "mm_job_views": (
        "CREATE TABLE IF NOT EXISTS mm_job_views ("
        "job_id TEXT PRIMARY KEY, buyer_id TEXT NOT NULL, seq BIGINT NOT NULL, "
        "status TEXT NOT NULL, token_hash TEXT NOT NULL, artifact_stored_at BIGINT, "
        "doc TEXT NOT NULL)"
    ),
    "mm_principals": (
        "CREATE TABLE IF NOT EXISTS mm_principals ("
        "key_hash TEXT PRIMARY KEY, kind TEXT NOT NULL, principal_id TEXT NOT NULL, "
        "name TEXT NOT NULL)"
    ),
    "mm_offers": (
        "CREATE TABLE IF NOT EXISTS mm_offers ("
        "offer_id TEXT PRIMARY KEY, seq BIGINT NOT NULL, seller_id TEXT NOT NULL, "
        "model TEXT NOT NULL, provider TEXT NOT NULL, base_url TEXT, sealed_key TEXT NOT NULL, "
        "key_sha256 TEXT NOT NULL, cost_multiplier TEXT NOT NULL, max_concurrent_jobs BIGINT, "
        "state TEXT NOT NULL, deactivated_reason TEXT, backoff_until DOUBLE PRECISION NOT NULL, "
        "backoff_reason TEXT, failures BIGINT NOT NULL, in_flight BIGINT NOT NULL, "
        "jobs BIGINT NOT NULL, volume BIGINT NOT NULL, payout BIGINT NOT NULL)"
    ),
    # One row per job settled with a charge on a marketplace offer: market volume over time
    # and seller earnings by model and day.
    "mm_trades": (
        "CREATE TABLE IF NOT EXISTS mm_trades ("
        "job_id TEXT PRIMARY KEY, model TEXT NOT NULL, offer_id TEXT NOT NULL, "
        "seller_id TEXT NOT NULL, settled_at BIGINT NOT NULL, day TEXT NOT NULL, "
        "buyer_cost BIGINT NOT NULL, seller_cost BIGINT NOT NULL)"
    ),
    "mm_buyer_providers": (
        "CREATE TABLE IF NOT EXISTS mm_buyer_providers ("
        "provider_id TEXT PRIMARY KEY, seq BIGINT NOT NULL, buyer_id TEXT NOT NULL, "
        "provider TEXT NOT NULL, model TEXT, base_url TEXT, sealed_key TEXT NOT NULL, "
        "key_sha256 TEXT NOT NULL, created BIGINT NOT NULL, deleted BIGINT NOT NULL)"
    ),
    **ledger.LEDGER_TABLES,
}
INDEXES = [
    "CREATE INDEX IF NOT EXISTS mm_job_views_buyer ON mm_job_views (buyer_id, seq)",
    "CREATE INDEX IF NOT EXISTS mm_job_views_pending ON mm_job_views (status) "
    "WHERE status IN ('queued', 'submitted', 'running')",
    "CREATE INDEX IF NOT EXISTS mm_job_views_stored ON mm_job_views (artifact_stored_at) "
    "WHERE artifact_stored_at IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS mm_offers_model ON mm_offers (model, state)",
    "CREATE INDEX IF NOT EXISTS mm_trades_model ON mm_trades (model, settled_at)",
    "CREATE INDEX IF NOT EXISTS mm_trades_seller ON mm_trades (seller_id, day)",
    "CREATE INDEX IF NOT EXISTS mm_buyer_providers_buyer ON mm_buyer_providers (buyer_id, seq)",
    *ledger.LEDGER_INDEXES,
]
# Bumped whenever a table above changes shape or a fold changes: older views are rebuilt.
SCHEMA_VERSION = 5
# Every column of every table, in a fixed order, for digests.
DIGEST_ORDER = {
    "mm_job_views": "job_id",
    "mm_principals": "key_hash",
    "mm_offers": "offer_id",
    "mm_trades": "job_id",
    "mm_buyer_providers": "provider_id",
    **ledger.LEDGER_DIGEST_ORDER,
}


# Built once: json.dumps with any option builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def dumps(value: Any) -> str:
    return _ENCODER.encode(value)


@dataclass(frozen=True)
class JobRow:
    job_id: str
    buyer_id: str
    status: str
    token_hash: str
    doc: JobDoc


@dataclass(frozen=True)
class OfferRow:
    offer_id: str
    seq: int
    seller_id: str
    model: str
    provider: str
    base_url: str | None
    sealed_key: dict[str, str]
    key_sha256: str
    cost_multiplier: str
    max_concurrent_jobs: int | None
    state: str
    deactivated_reason: str | None
    backoff_until: float
    backoff_reason: str | None
    failures: int
    in_flight: int
    jobs: int
    volume: int
    payout: int

    @property
    def key_id(self) -> str:
        return self.offer_id

    @property
    def key_context(self) -> str:
        return f"offer:{self.offer_id}"

    def unavailable_because(self, now: float) -> str | None:
        """Why routing leaves this offer out now (the ``Offer`` aggregate decides for real)."""
        if self.state != "active":
            return self.state
        if self.backoff_until > now:
            return "backoff"
        if self.max_concurrent_jobs is not None and self.in_flight >= self.max_concurrent_jobs:
            return "at_capacity"
        return None

    def health(self, now: float) -> dict[str, Any]:
        if self.backoff_until > now:
            return {
                "status": "backoff",
                "until": int(self.backoff_until),
                "reason": self.backoff_reason,
                "failures": self.failures,
            }
        return {"status": "healthy"}

    def capacity(self) -> dict[str, int | None]:
        limit = self.max_concurrent_jobs
        return {
            "max_concurrent_jobs": limit,
            "in_flight": self.in_flight,
            "left": None if limit is None else max(limit - self.in_flight, 0),
        }

    def public(self, now: float) -> dict[str, Any]:
        return {
            "id": self.offer_id,
            "object": "offer",
            "seller_id": self.seller_id,
            "model": self.model,
            "provider": self.provider,
            "base_url": self.base_url,
            "pricing_mode": "cost_multiplier",
            "cost_multiplier": self.cost_multiplier,
            "max_concurrent_jobs": self.max_concurrent_jobs,
            "state": self.state,
            "deactivated_reason": self.deactivated_reason,
            "health": self.health(now),
            "capacity": self.capacity(),
            "jobs": self.jobs,
            "volume_usdc": str(self.volume),
            "payout_usdc": str(self.payout),
        }


@dataclass(frozen=True)
class BuyerProviderRow:
    provider_id: str
    seq: int
    buyer_id: str
    provider: str
    model: str | None
    base_url: str | None
    sealed_key: dict[str, str]
    key_sha256: str
    created: int
    deleted: int

    @property
    def key_id(self) -> str:
        return self.provider_id

    @property
    def key_context(self) -> str:
        return f"buyer-provider:{self.provider_id}"

    def public(self) -> dict[str, Any]:
        return {
            "id": self.provider_id,
            "object": "buyer.provider",
            "provider": self.provider,
            "model": self.model,
            "base_url": self.base_url,
            "created": self.created,
        }


# The views fall into three groups of tables that no fold crosses. Live views fold every group
# in one transaction per batch; a rebuild into scratch storage can fold them in two processes,
# each a part of the groups (then merged), so a CPU-bound Python fold gets a second core.
JOB_VIEWS, ORDER_BOOK, LEDGER = "job views", "order book", "ledger"
GROUP_TABLES: dict[str, tuple[str, ...]] = {
    # Poll's documents and the accounts' lookups.
    JOB_VIEWS: ("mm_job_views", "mm_principals", "mm_buyer_providers"),
    ORDER_BOOK: ("mm_offers", "mm_trades"),
    LEDGER: tuple(ledger.LEDGER_TABLES),
}
Part = frozenset[str]
ALL: Part = frozenset(GROUP_TABLES)
# A two-process rebuild: parts that take about as long as each other on a busy market's log.
REBUILD_PARTS: tuple[Part, Part] = (frozenset({JOB_VIEWS, ORDER_BOOK}), frozenset({LEDGER}))


def part_tables(part: Part) -> list[str]:
    return [table for group in sorted(part) for table in GROUP_TABLES[group]]


# How ``Views._project`` treats an event, decided once per class: a chain of isinstance
# checks per event was a tenth of a replay. The order matters (``<=`` tests below).
(
    _JOB_CREATED,
    _JOB_EVENT,
    _SETTLED,
    _RELEASED,
    _OFFER,
    _BUYER_CREATED,
    _SELLER_CREATED,
    _PROVIDER_CREATED,
    _PROVIDER_DELETED,
    _OTHER,
) = range(10)
_VIEW_KINDS: dict[type, int] = {}


def _view_kind(cls: type) -> int:
    for base, kind in (
        (JobEvent.Created, _JOB_CREATED),
        (JobEvent.Event, _JOB_EVENT),
        (SettlementEvent.Settled, _SETTLED),
        (SettlementEvent.Released, _RELEASED),
        (OfferEvent.Event, _OFFER),
        (BuyerEvent.Created, _BUYER_CREATED),
        (SellerEvent.Created, _SELLER_CREATED),
        (BuyerProviderEvent.Created, _PROVIDER_CREATED),
        (BuyerProviderEvent.Deleted, _PROVIDER_DELETED),
    ):
        if issubclass(cls, base):
            return kind
    return _OTHER


def skips(part: Part) -> Callable[[str], bool]:
    """Whether a part's reader may leave an event of this topic undecoded."""

    def skip(topic: str) -> bool:
        if topic in IGNORED_TOPICS:
            return True
        if part == ALL:
            return False
        try:
            cls = resolve_topic(topic)
        except Exception:  # the decoder reports it as the library would
            return False
        kind = _view_kind(cls)
        read = (
            (JOB_VIEWS in part and kind not in (_OFFER, _OTHER))
            or (ORDER_BOOK in part and kind in (_OFFER, _SETTLED))
            or (LEDGER in part and cls in ledger.HANDLERS)
        )
        return not read

    return skip


class Views:
    """Queries and the batch projector, over whichever datastore the subclass brings."""

    datastore: Any

    def q(self, statement: str) -> Any:
        return statement

    if TYPE_CHECKING:  # provided by the library's tracking recorder this is mixed into

        def _insert_tracking(self, c: Any, tracking: Tracking) -> None: ...

        def max_tracking_id(self, application_name: str) -> int | None: ...

        def _max_tracking_id(self, application_name: str, c: Any) -> int | None: ...

    # ---------------------------------------------------------------- projecting

    def apply_batch(
        self, items: Sequence[tuple[int, Any]], tracking: Tracking, start: int, part: Part = ALL
    ) -> None:
        """Apply ``(notification id, domain event)`` pairs that follow position ``start`` and
        advance tracking to the last of them, atomically; to the tables of ``part``'s groups
        only, when it names some (see ``GROUP_TABLES``).

        Raises ``IntegrityError`` when the views are no longer at ``start``: another runner
        applied a batch first. The library's tracking upsert alone would accept any higher
        position, so a runner that read the same start and fetched a longer batch would apply
        the overlap a second time (and ``SlotTaken`` counts are not idempotent).
        """
        with self._batch_transaction() as c:
            # Serialise batches first, then read the position under that lock.
            self._lock_batches(c)
            position = self._max_tracking_id(tracking.application_name, c) or 0
            if position != start:
                raise IntegrityError(f"the views are at {position}, not {start}")
            self._insert_tracking(c, tracking)
            self._project(c, items, part)
            if LEDGER in part:
                journal = ledger.LedgerBatch(lambda job_ids: self._load_settlements(c, job_ids))
                journal.project(items)
                journal.write(c, self.q)

    def _project(self, c: Any, items: Sequence[tuple[int, Any]], part: Part = ALL) -> None:
        kinds = _VIEW_KINDS
        jobs_part, book_part = JOB_VIEWS in part, ORDER_BOOK in part
        if not (jobs_part or book_part):
            return
        ours: list[tuple[int, Any, int, str]] = []
        job_ids: set[str] = set()
        offer_ids: set[str] = set()
        for seq, e in items:
            try:
                kind = kinds[type(e)]
            except KeyError:
                kind = kinds[type(e)] = _view_kind(type(e))
            if kind <= _JOB_EVENT:
                if not jobs_part:
                    continue
                key = id_text(e.originator_id)
                job_ids.add(key)
            elif kind <= _RELEASED:
                key = e.job_id
                if jobs_part:
                    job_ids.add(key)
                if book_part and kind == _SETTLED and e.offer_id and e.seller_id:
                    offer_ids.add(e.offer_id)
            elif kind == _OTHER:
                continue
            elif not (book_part if kind == _OFFER else jobs_part):
                # Offer events belong to the order book; the other kinds left, to job views.
                continue
            else:
                key = id_text(e.originator_id)
                if kind == _OFFER:
                    offer_ids.add(key)
            ours.append((seq, e, kind, key))
        jobs: dict[str, dict[str, Any]] = self._load_jobs(c, job_ids)
        offers = self._load_offers(c, offer_ids)
        principals: list[tuple[str, str, str, str]] = []
        trades: list[tuple[Any, ...]] = []
        buyer_providers: dict[str, dict[str, Any]] = {}
        for seq, e, kind, key in ours:
            if kind == _JOB_EVENT:
                row = jobs.get(key)
                if row is not None:
                    apply_job_event(row["doc"], e)
                    row["status"] = row["doc"]["status"]
                    if isinstance(e, JobEvent.ArtifactStored):
                        row["artifact_stored_at"] = e.artifact["stored_at"]
                    elif isinstance(e, JobEvent.ArtifactPurged):
                        row["artifact_stored_at"] = None
            elif kind == _JOB_CREATED:
                jobs[key] = {
                    "job_id": key,
                    "buyer_id": e.buyer_id,
                    "seq": seq,
                    "status": "queued",
                    "token_hash": e.token_hash,
                    "artifact_stored_at": None,
                    "doc": new_doc(key, e),
                }
            elif kind <= _RELEASED:
                row = jobs.get(key)
                if row is not None:
                    apply_settlement_event(row["doc"], e)
                if kind == _SETTLED:
                    trade = self._apply_trade(offers, e)
                    if trade is not None:
                        trades.append(trade)
            elif kind == _OFFER:
                self._apply_offer(offers, seq, e)
            elif kind == _BUYER_CREATED:
                principals.append((e.api_key_hash, "buyer", key, e.name))
            elif kind == _SELLER_CREATED:
                principals.append((e.api_key_hash, "seller", key, e.name))
            elif kind == _PROVIDER_CREATED:
                buyer_providers[key] = {
                    "provider_id": key,
                    "seq": seq,
                    "buyer_id": e.buyer_id,
                    "provider": e.provider,
                    "model": e.model,
                    "base_url": e.base_url,
                    "sealed_key": e.sealed_key,
                    "key_sha256": e.key_sha256,
                    "created": int(e.timestamp.timestamp()),
                    "deleted": 0,
                }
            elif kind == _PROVIDER_DELETED:
                deleted = buyer_providers.get(key)
                if deleted is not None:
                    deleted["deleted"] = 1
                else:
                    c.execute(
                        self.q("UPDATE mm_buyer_providers SET deleted = 1 WHERE provider_id = ?"),
                        (key,),
                    )
        if jobs:
            c.executemany(
                self.q(
                    "INSERT INTO mm_job_views (job_id, buyer_id, seq, status, token_hash, "
                    "artifact_stored_at, doc) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (job_id) DO UPDATE SET status = excluded.status, "
                    "artifact_stored_at = excluded.artifact_stored_at, doc = excluded.doc"
                ),
                [
                    (
                        r["job_id"],
                        r["buyer_id"],
                        r["seq"],
                        r["status"],
                        r["token_hash"],
                        r["artifact_stored_at"],
                        dumps(r["doc"]),
                    )
                    for r in jobs.values()
                ],
            )
        if principals:
            c.executemany(
                self.q(
                    "INSERT INTO mm_principals (key_hash, kind, principal_id, name) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (key_hash) DO NOTHING"
                ),
                principals,
            )
        if offers:
            columns = list(OfferRow.__dataclass_fields__)
            c.executemany(
                self.q(
                    f"INSERT INTO mm_offers ({', '.join(columns)}) "
                    f"VALUES ({', '.join('?' for _ in columns)}) ON CONFLICT (offer_id) DO UPDATE "
                    f"SET {', '.join(f'{k} = excluded.{k}' for k in columns[1:])}"
                ),
                [
                    tuple(dumps(o[k]) if k == "sealed_key" else o[k] for k in columns)
                    for o in offers.values()
                ],
            )

        if trades:
            c.executemany(
                self.q(
                    "INSERT INTO mm_trades (job_id, model, offer_id, seller_id, settled_at, day, "
                    "buyer_cost, seller_cost) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (job_id) DO NOTHING"
                ),
                trades,
            )
        if buyer_providers:
            columns = list(BuyerProviderRow.__dataclass_fields__)
            c.executemany(
                self.q(
                    f"INSERT INTO mm_buyer_providers ({', '.join(columns)}) "
                    f"VALUES ({', '.join('?' for _ in columns)}) ON CONFLICT (provider_id) "
                    "DO UPDATE SET deleted = excluded.deleted"
                ),
                [
                    tuple(dumps(p[k]) if k == "sealed_key" else p[k] for k in columns)
                    for p in buyer_providers.values()
                ],
            )

    @staticmethod
    def _apply_trade(offers: dict[str, dict[str, Any]], e: Any) -> tuple[Any, ...] | None:
        """Market volume and seller earnings from a settlement that charged for an offer."""
        offer = offers.get(e.offer_id) if e.offer_id and e.seller_id else None
        if offer is None:
            return None
        offer["jobs"] += 1
        offer["volume"] += e.charged
        offer["payout"] += e.seller_cost
        settled_at = e.timestamp
        return (
            e.job_id,
            offer["model"],
            e.offer_id,
            e.seller_id,
            int(settled_at.timestamp()),
            settled_at.strftime("%Y-%m-%d"),
            e.charged,
            e.seller_cost,
        )

    @staticmethod
    def _apply_offer(offers: dict[str, dict[str, Any]], seq: int, e: Any) -> None:
        offer_id = id_text(e.originator_id)
        if isinstance(e, OfferEvent.Created):
            offers[offer_id] = {
                "offer_id": offer_id,
                "seq": seq,
                "seller_id": e.seller_id,
                "model": e.model,
                "provider": e.provider,
                "base_url": e.base_url,
                "sealed_key": e.sealed_key,
                "key_sha256": e.key_sha256,
                "cost_multiplier": e.cost_multiplier,
                "max_concurrent_jobs": e.max_concurrent_jobs,
                "state": "active",
                "deactivated_reason": None,
                "backoff_until": 0.0,
                "backoff_reason": None,
                "failures": 0,
                "in_flight": 0,
                "jobs": 0,
                "volume": 0,
                "payout": 0,
            }
            return
        o = offers.get(offer_id)
        if o is None:
            return
        if isinstance(e, OfferEvent.Updated):
            for name, value in e.changes.items():
                if name == "paused":
                    # Unpausing leaves a deactivated offer deactivated, as the aggregate does.
                    resumed = "deactivated" if o["deactivated_reason"] else "active"
                    o["state"] = "paused" if value else resumed
                else:
                    o[name] = value
            if "sealed_key" in e.changes:
                o.update(
                    deactivated_reason=None, backoff_until=0.0, backoff_reason=None, failures=0
                )
                if o["state"] == "deactivated":
                    o["state"] = "active"
        elif isinstance(e, OfferEvent.Deleted):
            o["state"] = "deleted"
        elif isinstance(e, OfferEvent.BackedOff):
            o.update(backoff_until=e.until, backoff_reason=e.reason, failures=e.failures)
            if e.deactivate:
                o.update(state="deactivated", deactivated_reason=e.reason)
        elif isinstance(e, OfferEvent.Recovered):
            o.update(backoff_until=0.0, backoff_reason=None, failures=0)
        elif isinstance(e, OfferEvent.SlotTaken):
            o["in_flight"] += 1
        elif isinstance(e, OfferEvent.SlotReleased):
            o["in_flight"] -= 1

    def _load_jobs(self, c: Any, job_ids: set[str]) -> dict[str, dict[str, Any]]:
        if not job_ids:
            return {}
        found: dict[str, dict[str, Any]] = {}
        ids = sorted(job_ids)
        for chunk in _chunks(ids, 500):
            c.execute(
                self.q(
                    "SELECT job_id, buyer_id, seq, status, token_hash, artifact_stored_at, doc "
                    f"FROM mm_job_views WHERE job_id IN ({', '.join('?' for _ in chunk)})"
                ),
                chunk,
            )
            for r in c.fetchall():
                found[r["job_id"]] = {
                    "job_id": r["job_id"],
                    "buyer_id": r["buyer_id"],
                    "seq": r["seq"],
                    "status": r["status"],
                    "token_hash": r["token_hash"],
                    "artifact_stored_at": r["artifact_stored_at"],
                    "doc": json.loads(r["doc"]),
                }
        return found

    def _load_settlements(self, c: Any, job_ids: set[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for chunk in _chunks(sorted(job_ids), 500):
            c.execute(
                self.q(
                    f"SELECT {', '.join(ledger.SETTLEMENT_COLUMNS)} FROM mm_settlements "
                    f"WHERE job_id IN ({', '.join('?' for _ in chunk)})"
                ),
                chunk,
            )
            for r in c.fetchall():
                found[r["job_id"]] = {k: r[k] for k in ledger.SETTLEMENT_COLUMNS}
        return found

    def _load_offers(self, c: Any, offer_ids: set[str]) -> dict[str, dict[str, Any]]:
        if not offer_ids:
            return {}
        ids = sorted(offer_ids)
        c.execute(
            self.q(f"SELECT * FROM mm_offers WHERE offer_id IN ({', '.join('?' for _ in ids)})"),
            ids,
        )
        found = {}
        for r in c.fetchall():
            row = {k: r[k] for k in OfferRow.__dataclass_fields__}
            row["sealed_key"] = json.loads(row["sealed_key"])
            found[row["offer_id"]] = row
        return found

    # ---------------------------------------------------------------- queries

    # Whether point reads are cheap enough to run on the calling (event-loop) thread.
    inline_reads = False

    def bind_inline_reader(self) -> None:
        """Let the calling thread read without a thread-pool hop (where that is cheap)."""

    def _one(self, statement: str, params: Sequence[Any]) -> Any:
        with self.datastore.transaction(commit=False) as c:
            c.execute(self.q(statement), params)
            return c.fetchone()

    def _all(self, statement: str, params: Sequence[Any]) -> list[Any]:
        with self.datastore.transaction(commit=False) as c:
            c.execute(self.q(statement), params)
            return list(c.fetchall())

    def get_job(self, job_id: str) -> JobRow | None:
        r = self._one(
            "SELECT job_id, buyer_id, status, token_hash, doc FROM mm_job_views WHERE job_id = ?",
            (job_id,),
        )
        if r is None:
            return None
        return JobRow(
            r["job_id"], r["buyer_id"], r["status"], r["token_hash"], json.loads(r["doc"])
        )

    def list_jobs(
        self, buyer_id: str, limit: int, after: str | None, status: str | None
    ) -> list[JobDoc] | None:
        """Newest first; None when ``after`` names no job of this buyer."""
        clauses, params = ["buyer_id = ?"], [buyer_id]
        if after is not None:
            r = self._one(
                "SELECT seq FROM mm_job_views WHERE job_id = ? AND buyer_id = ?", (after, buyer_id)
            )
            if r is None:
                return None
            clauses.append("seq < ?")
            params.append(r["seq"])
        if status is not None:
            clauses.append("status = ?")
            params.append(status)
        rows = self._all(
            f"SELECT doc FROM mm_job_views WHERE {' AND '.join(clauses)} ORDER BY seq DESC LIMIT ?",
            (*params, limit),
        )
        return [json.loads(r["doc"]) for r in rows]

    def pending_job_ids(self, limit: int) -> list[str]:
        rows = self._all(
            "SELECT job_id FROM mm_job_views WHERE status IN ('queued', 'submitted', 'running') "
            "ORDER BY seq LIMIT ?",
            (limit,),
        )
        return [r["job_id"] for r in rows]

    def artifacts_stored_before(self, cutoff: int, limit: int) -> list[str]:
        rows = self._all(
            "SELECT job_id FROM mm_job_views WHERE artifact_stored_at IS NOT NULL "
            "AND artifact_stored_at < ? ORDER BY artifact_stored_at LIMIT ?",
            (cutoff, limit),
        )
        return [r["job_id"] for r in rows]

    def principal(self, key_hash: str) -> tuple[str, str, str] | None:
        r = self._one(
            "SELECT kind, principal_id, name FROM mm_principals WHERE key_hash = ?", (key_hash,)
        )
        return None if r is None else (r["kind"], r["principal_id"], r["name"])

    def offers(
        self,
        *,
        model: str | None = None,
        seller_id: str | None = None,
        include_deleted: bool = False,
    ) -> list[OfferRow]:
        clauses, params = [], []
        if model is not None:
            clauses.append("model = ?")
            params.append(model)
        if seller_id is not None:
            clauses.append("seller_id = ?")
            params.append(seller_id)
        if not include_deleted:
            clauses.append("state <> 'deleted'")
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._all(f"SELECT * FROM mm_offers {where} ORDER BY seq", params)
        return [_offer_row(r) for r in rows]

    def offer(self, offer_id: str) -> OfferRow | None:
        r = self._one("SELECT * FROM mm_offers WHERE offer_id = ?", (offer_id,))
        return None if r is None else _offer_row(r)

    def market_activity(self, since: int) -> dict[str, dict[str, int]]:
        """Per model: settled marketplace jobs and their buyer cost, since ``since`` and ever."""
        activity: dict[str, dict[str, int]] = {}
        for r in self._all(
            "SELECT model, SUM(jobs) AS jobs, SUM(volume) AS volume FROM mm_offers GROUP BY model",
            (),
        ):
            activity[r["model"]] = {
                "jobs": int(r["jobs"]),
                "volume": int(r["volume"]),
                "jobs_24h": 0,
                "volume_24h": 0,
            }
        for r in self._all(
            "SELECT model, COUNT(*) AS jobs, SUM(buyer_cost) AS volume FROM mm_trades "
            "WHERE settled_at >= ? GROUP BY model",
            (since,),
        ):
            entry = activity.setdefault(
                r["model"], {"jobs": 0, "volume": 0, "jobs_24h": 0, "volume_24h": 0}
            )
            entry.update(jobs_24h=int(r["jobs"]), volume_24h=int(r["volume"]))
        return activity

    def seller_earnings(
        self, seller_id: str, first_day: str | None, last_day: str | None
    ) -> list[tuple[str, str, int, int]]:
        """``(day, model, jobs, payout)`` of a seller's settled jobs, oldest day first."""
        clauses, params = ["seller_id = ?"], [seller_id]
        if first_day is not None:
            clauses.append("day >= ?")
            params.append(first_day)
        if last_day is not None:
            clauses.append("day <= ?")
            params.append(last_day)
        rows = self._all(
            "SELECT day, model, COUNT(*) AS jobs, SUM(seller_cost) AS payout FROM mm_trades "
            f"WHERE {' AND '.join(clauses)} GROUP BY day, model ORDER BY day, model",
            params,
        )
        return [(r["day"], r["model"], int(r["jobs"]), int(r["payout"])) for r in rows]

    def buyer_providers(self, buyer_id: str, model: str | None = None) -> list[BuyerProviderRow]:
        """A buyer's live provider keys; with ``model``, those that may serve it (its own
        keys and the catch-alls)."""
        clauses, params = ["buyer_id = ?", "deleted = 0"], [buyer_id]
        if model is not None:
            clauses.append("(model = ? OR model IS NULL)")
            params.append(model)
        rows = self._all(
            f"SELECT * FROM mm_buyer_providers WHERE {' AND '.join(clauses)} ORDER BY seq", params
        )
        return [_buyer_provider_row(r) for r in rows]

    def buyer_provider(self, provider_id: str) -> BuyerProviderRow | None:
        r = self._one("SELECT * FROM mm_buyer_providers WHERE provider_id = ?", (provider_id,))
        return None if r is None else _buyer_provider_row(r)

    def position(self, application_name: str) -> int:
        return self.max_tracking_id(application_name) or 0

    # ---------------------------------------------------------------- rebuild and digest

    def reset(self, application_name: str) -> None:
        """Empty every view and move tracking back to the start of the log, atomically."""
        with self.datastore.transaction(commit=True) as c:
            for table in TABLES:
                c.execute(self.q(f"DELETE FROM {table}"), ())
            self._reset_tracking(c, application_name)

    def _reset_tracking(self, c: Any, application_name: str) -> None:
        raise NotImplementedError

    def create_statements(self) -> list[str]:
        return [*TABLES.values(), *INDEXES]

    def _lock_schema(self, c: Any) -> None:
        """Keep processes starting together from migrating the same views at once."""

    def _lock_batches(self, c: Any) -> None:
        raise NotImplementedError

    def _batch_transaction(self) -> Any:
        return self.datastore.transaction(commit=True)

    def copy_tables_from(self, env: dict[str, str], tables: Iterable[str]) -> None:
        """Add every row of ``tables`` in the views that ``env`` opens (scratch storage on the
        same server or disk) to these views' tables of the same names."""
        raise NotImplementedError

    def ensure_schema(self, application_name: str) -> bool:
        """Views of another schema version are dropped and rebuilt from the log.

        They hold nothing the log doesn't, so a new column is a rebuild, not a migration.
        Returns whether the views were reset.
        """
        with self.datastore.transaction(commit=True) as c:
            self._lock_schema(c)
            c.execute(self.q("CREATE TABLE IF NOT EXISTS mm_schema (version BIGINT NOT NULL)"), ())
            c.execute(self.q("SELECT version FROM mm_schema"), ())
            row = c.fetchone()
            if row is not None and int(row["version"]) == SCHEMA_VERSION:
                return False
            for table in TABLES:
                c.execute(self.q(f"DROP TABLE IF EXISTS {table}"), ())
            for statement in self.create_statements():
                c.execute(self.q(statement), ())
            self._reset_tracking(c, application_name)
            c.execute(self.q("DELETE FROM mm_schema"), ())
            c.execute(self.q("INSERT INTO mm_schema (version) VALUES (?)"), (SCHEMA_VERSION,))
            return True

    @contextmanager
    def snapshot(self, application_name: str) -> Iterator[Snapshot]:
        """Every view as of one log position, read in one consistent transaction, so a check
        that compares views with each other (or with the log at that position) never sees a
        batch half applied."""
        with self.datastore.transaction(commit=False) as c:
            self._repeatable_read(c)
            position = self._max_tracking_id(application_name, c) or 0
            yield Snapshot(c, self.q, position)

    def _repeatable_read(self, c: Any) -> None:
        """SQLite's WAL readers see one snapshot per transaction already."""

    def digest(self) -> dict[str, tuple[int, str]]:
        """Per table: row count and a SHA-256 over every row in key order."""
        with self.datastore.transaction(commit=False) as c:
            self._repeatable_read(c)
            return {t: (len(rows), _combined(rows)) for t, rows in _row_hashes(c, self.q).items()}

    def row_hashes(self, application_name: str) -> tuple[int, dict[str, dict[str, str]]]:
        """The tracked position and, per table, each row's key and hash (to name a difference)."""
        with self.snapshot(application_name) as s:
            return s.position, _row_hashes(s.cursor, self.q)


@dataclass
class Snapshot:
    cursor: Any
    q: Callable[[str], Any]
    position: int

    def all(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        self.cursor.execute(self.q(statement), params)
        return list(self.cursor.fetchall())


def _row_hashes(c: Any, q: Callable[[str], Any]) -> dict[str, dict[str, str]]:
    result: dict[str, dict[str, str]] = {}
    for table, key in DIGEST_ORDER.items():
        c.execute(q(f"SELECT * FROM {table} ORDER BY {key}"), ())
        key_columns = [k.strip() for k in key.split(",")]
        hashes: dict[str, str] = {}
        for r in c.fetchall():
            row_key = "/".join(str(r[k]) for k in key_columns)
            encoded = dumps([_plain(r[k]) for k in r.keys()]).encode()  # noqa: SIM118
            hashes[row_key] = hashlib.sha256(encoded).hexdigest()
        result[table] = hashes
    return result


def _combined(row_hashes: dict[str, str]) -> str:
    """One digest of a table: the rows' hashes in key order (the dict keeps query order)."""
    h = hashlib.sha256()
    for row_hash in row_hashes.values():
        h.update(row_hash.encode())
    return h.hexdigest()


def _plain(value: Any) -> Any:
    return (
        float(value) if hasattr(value, "as_integer_ratio") and not isinstance(value, int) else value
    )


def _offer_row(r: Any) -> OfferRow:
    values = {k: r[k] for k in OfferRow.__dataclass_fields__}
    values["sealed_key"] = json.loads(values["sealed_key"])
    values["backoff_until"] = float(values["backoff_until"])
    return OfferRow(**values)


def _buyer_provider_row(r: Any) -> BuyerProviderRow:
    values = {k: r[k] for k in BuyerProviderRow.__dataclass_fields__}
    values["sealed_key"] = json.loads(values["sealed_key"])
    return BuyerProviderRow(**values)


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class SQLiteViews(Views, SQLiteTrackingRecorder):
    # A primary-key read of a local WAL file takes microseconds, far less than a hand-off to
    # the thread pool and back; the event loop gets its own autocommit connection for them.
    inline_reads = True
    _inline: tuple[int, sqlite3.Connection] | None = None
    # Views are rebuilt from the log, so a commit need not wait for the disk: in WAL mode NORMAL
    # can lose the last batches on a power cut, never consistency, and the runner re-applies
    # them from the tracked position. Scratch views of a replay need no durability at all.
    synchronous = "NORMAL"

    @contextmanager
    def _batch_transaction(self) -> Iterator[Any]:
        with self.datastore.get_connection(commit=True) as conn:
            # Per connection, and only outside a transaction.
            conn.cursor().execute(f"PRAGMA synchronous={self.synchronous}")
            with conn.transaction(commit=True) as c:
                yield c

    def bind_inline_reader(self) -> None:
        conn = sqlite3.connect(
            self.datastore.pool.db_name, uri=True, check_same_thread=False, isolation_level=None
        )
        conn.row_factory = sqlite3.Row
        self._inline = (threading.get_ident(), conn)

    def _one(self, statement: str, params: Sequence[Any]) -> Any:
        inline = self._inline
        if inline is not None and inline[0] == threading.get_ident():
            return inline[1].execute(statement, params).fetchone()
        return super()._one(statement, params)

    def _all(self, statement: str, params: Sequence[Any]) -> list[Any]:
        inline = self._inline
        if inline is not None and inline[0] == threading.get_ident():
            return inline[1].execute(statement, params).fetchall()
        return super()._all(statement, params)

    def construct_create_table_statements(self) -> list[str]:
        return [*super().construct_create_table_statements(), *self.create_statements()]

    def create_statements(self) -> list[str]:
        return [
            f"{statement} WITHOUT ROWID" if table in ledger.WITHOUT_ROWID else statement
            for table, statement in TABLES.items()
        ] + INDEXES

    def _reset_tracking(self, c: Any, application_name: str) -> None:
        c.execute("DELETE FROM tracking WHERE application_name = ?", (application_name,))

    def copy_tables_from(self, env: dict[str, str], tables: Iterable[str]) -> None:
        with self.datastore.get_connection(commit=True) as conn:
            # Per connection, and only outside a transaction.
            conn.cursor().execute("ATTACH DATABASE ? AS part", (env["SQLITE_DBNAME"],))
            try:
                with conn.transaction(commit=True) as c:
                    for table in tables:
                        c.execute(f"INSERT INTO main.{table} SELECT * FROM part.{table}")
            finally:
                conn.cursor().execute("DETACH DATABASE part")

    def _lock_batches(self, c: Any) -> None:
        # A write takes SQLite's one write lock now (a read first would pin a snapshot that a
        # committing runner could make stale); it matches no row and changes nothing.
        c.execute("DELETE FROM tracking WHERE 0")


class PostgresViews(Views, PostgresTrackingRecorder):
    def __init__(self, datastore: Any, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        statements: list[Any] = [SQL(s) for s in self.create_statements()]
        self.sql_create_statements.extend(statements)

    def q(self, statement: str) -> Any:
        return statement.replace("?", "%s")

    # Reads run on autocommit connections: one round trip, not BEGIN, SELECT and ROLLBACK.
    def _one(self, statement: str, params: Sequence[Any]) -> Any:
        with self.datastore.get_connection() as conn:
            return conn.execute(self.q(statement), params).fetchone()

    def _all(self, statement: str, params: Sequence[Any]) -> list[Any]:
        with self.datastore.get_connection() as conn:
            return list(conn.execute(self.q(statement), params).fetchall())

    def _reset_tracking(self, c: Any, application_name: str) -> None:
        c.execute(
            SQL("DELETE FROM {} WHERE application_name = %s").format(
                Identifier(self.tracking_table_name)
            ),
            (application_name,),
        )

    def _lock_schema(self, c: Any) -> None:
        c.execute("SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))", (SCHEMA_LOCK_ID,))

    def _repeatable_read(self, c: Any) -> None:
        c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")

    def _lock_batches(self, c: Any) -> None:
        # Per schema: views in another schema (a rebuild's scratch parts) have their own.
        c.execute("SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))", (BATCH_LOCK_ID,))

    def copy_tables_from(self, env: dict[str, str], tables: Iterable[str]) -> None:
        schema = Identifier(env["POSTGRES_SCHEMA"])
        with self.datastore.transaction(commit=True) as c:
            for table in tables:
                c.execute(
                    SQL("INSERT INTO {} SELECT * FROM {}.{}").format(
                        Identifier(table), schema, Identifier(table)
                    )
                )


# Arbitrary constants, each with the views' schema the key of an advisory lock: the one that
# serialises view schema changes on PostgreSQL.
SCHEMA_LOCK_ID = 7_305_117
# And the one that serialises projection batches, so each reads the position it builds on.
BATCH_LOCK_ID = 7_305_118


def open_views(env: dict[str, str]) -> Views:
    factory = InfrastructureFactory.construct(Environment(VIEWS_NAME, env))
    schema = env.get("POSTGRES_SCHEMA")
    if schema:
        # The library qualifies its own tables with the schema; ours are unqualified, so every
        # connection of this store must look in that schema first.
        factory.datastore.pool.kwargs["options"] = f"-c search_path={schema}"  # type: ignore[attr-defined]
    if env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite":
        recorder: TrackingRecorder = factory.tracking_recorder(SQLiteViews)
    else:
        recorder = factory.tracking_recorder(PostgresViews)
    assert isinstance(recorder, Views)
    return recorder


@contextmanager
def scratch_env(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """Fresh storage for views beside the live ones (a temporary SQLite file, or a temporary
    PostgreSQL schema), removed afterwards; yields the environment that opens it."""
    if env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite":
        with tempfile.TemporaryDirectory(prefix="mediamarket-replay-") as directory:
            yield {**env, "SQLITE_DBNAME": f"{directory}/views.db"}
        return
    schema = f"mm_replay_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(**_pg_connect_args(env), autocommit=True)
    try:
        admin.execute(SQL("CREATE SCHEMA {}").format(Identifier(schema)))
        yield {**env, "POSTGRES_SCHEMA": schema}
    finally:
        admin.execute(SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(Identifier(schema)))
        admin.close()


def open_scratch_views(env: dict[str, str], application_name: str) -> Views:
    """Views in storage from ``scratch_env``: a replay's, which needs no durability at all."""
    views = open_views(env)
    if isinstance(views, SQLiteViews):
        views.synchronous = "OFF"
    views.ensure_schema(application_name)
    return views


@contextmanager
def scratch_views(env: dict[str, str], application_name: str) -> Iterator[Views]:
    """Empty views in fresh storage beside the live ones, removed afterwards: where a replay
    can be proven."""
    with scratch_env(env) as scratch:
        views = open_scratch_views(scratch, application_name)
        try:
            yield views
        finally:
            views.datastore.close()


def _pg_connect_args(env: dict[str, str]) -> dict[str, Any]:
    return {
        "dbname": env["POSTGRES_DBNAME"],
        "host": env["POSTGRES_HOST"],
        "port": env["POSTGRES_PORT"],
        "user": env["POSTGRES_USER"],
        "password": env.get("POSTGRES_PASSWORD") or None,
    }


__all__ = [
    "BuyerProviderRow",
    "JobRow",
    "OfferRow",
    "Views",
    "open_scratch_views",
    "open_views",
    "scratch_env",
    "scratch_views",
]
