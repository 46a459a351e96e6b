"""The ledger projection: a double-entry journal of every microdollar (SPEC 1 and 6).

Entries come from the money events: a deposit (``BuyerAccount.Deposited``), the hold at submit
(``Settlement.Created``), the capture (``Settlement.Settled``) and the release of the remainder or
of the whole hold (``Settled`` or ``Released``). An entry's id is its source event's id plus its
kind, so a replay writes the same ids and can never post twice.

Postings are only ever inserted; no row holds a running balance. A balance is the sum of an
account's postings, so the busiest account (``platform:fees``, credited by every charged job)
costs one more inserted row per job and is never a row that every settlement has to update.

Beside the journal the projection keeps one row per job (``mm_settlements``: what was held,
charged and released, and the provider dispatch the charge rests on) and, per buyer, the version
of the account aggregate it has seen, so a reconciliation can compare the journal with the
aggregate at exactly the same point of the log.

The queries that read these tables are in ``projections.ledger_read`` (this module is the fold).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from domain.aggregates import BuyerAccount, Job, Settlement
from domain.rules import settlement_status
from projections.ids import id_text
from projections.store import Batch, ExecuteMany, Projection, Rows, chunks, placeholders

# Generated event classes (see projections.jobdoc).
JobEvent: Any = Job
SettlementEvent: Any = Settlement
BuyerEvent: Any = BuyerAccount

NAME = "ledger"
EXTERNAL_DEPOSITS = "external:deposits"
PLATFORM_FEES = "platform:fees"


def buyer_available(buyer_id: str) -> str:
    return f"buyer:{buyer_id}:available"


def buyer_held(buyer_id: str) -> str:
    return f"buyer:{buyer_id}:held"


def seller_payable(seller_id: str) -> str:
    return f"seller:{seller_id}:payable"


def payable_seller(account: str) -> str | None:
    """The seller whose payable account this is, or None for any other account."""
    kind, _, rest = account.partition(":")
    return rest.rsplit(":", 1)[0] if kind == "seller" else None


def is_debit_normal(account: str) -> bool:
    """Money received from outside is an asset (debit balance); every other account is what the
    platform owes someone, or has earned (credit balance)."""
    return account.startswith("external:")


# Entries and postings are keyed by ``entry_no``, a number derived from the source event's
# position in the log and the entry's kind, so a rebuild appends to the end of each B-tree
# instead of inserting at random (text ids start with a random UUID); that, and no index beyond
# those keys, made the ledger most of a replay's cost. ``entry_id`` stays the public id.
LEDGER_TABLES: dict[str, str] = {
    "mm_ledger_entries": (
        "CREATE TABLE IF NOT EXISTS mm_ledger_entries ("
        "entry_no BIGINT PRIMARY KEY, entry_id TEXT NOT NULL, seq BIGINT NOT NULL, "
        "posted_at TEXT NOT NULL, day TEXT NOT NULL, kind TEXT NOT NULL, "
        "buyer_id TEXT NOT NULL, job_id TEXT, reference TEXT)"
    ),
    "mm_ledger_postings": (
        "CREATE TABLE IF NOT EXISTS mm_ledger_postings ("
        "entry_no BIGINT NOT NULL, line BIGINT NOT NULL, account TEXT NOT NULL, "
        "debit BIGINT NOT NULL, credit BIGINT NOT NULL, PRIMARY KEY (entry_no, line))"
    ),
    "mm_settlements": (
        "CREATE TABLE IF NOT EXISTS mm_settlements ("
        "job_id TEXT PRIMARY KEY, seq BIGINT NOT NULL, buyer_id TEXT NOT NULL, model TEXT, "
        "seconds BIGINT, resolution TEXT, created_at TEXT, day TEXT, hold BIGINT NOT NULL, "
        "charged BIGINT NOT NULL, "
        "seller_cost BIGINT NOT NULL, platform_fee BIGINT NOT NULL, released BIGINT NOT NULL, "
        "status TEXT NOT NULL, outcome TEXT, resolved_at TEXT, resolutions BIGINT NOT NULL, "
        "seller_id TEXT, offer_id TEXT, dispatch_offer_id TEXT, dispatch_seller_id TEXT, "
        "key_sha256 TEXT, list_price BIGINT, dispatch_state TEXT NOT NULL)"
    ),
    "mm_ledger_buyers": (
        "CREATE TABLE IF NOT EXISTS mm_ledger_buyers ("
        "buyer_id TEXT PRIMARY KEY, version BIGINT NOT NULL)"
    ),
}
# SQLite stores postings in their key's B-tree (no separate rowid table and key index);
# PostgreSQL has no such option and needs none.
WITHOUT_ROWID = frozenset({"mm_ledger_postings"})
LEDGER_INDEXES = [
    "CREATE INDEX IF NOT EXISTS mm_ledger_entries_day ON mm_ledger_entries (day, seq)",
    "CREATE INDEX IF NOT EXISTS mm_settlements_day ON mm_settlements (day, seq)",
]
LEDGER_DIGEST_ORDER = {
    "mm_ledger_entries": "entry_no",
    "mm_ledger_postings": "entry_no, line",
    "mm_settlements": "job_id",
    "mm_ledger_buyers": "buyer_id",
}
# Entries per source event, at most one of each kind: the last digits of ``entry_no``.
KIND_NUMBERS = {"deposit": 0, "hold": 0, "capture": 1, "release": 2}
ENTRY_COLUMNS = (
    "entry_no",
    "entry_id",
    "seq",
    "posted_at",
    "day",
    "kind",
    "buyer_id",
    "job_id",
    "reference",
)
POSTING_COLUMNS = ("entry_no", "line", "account", "debit", "credit")
SETTLEMENT_COLUMNS = [
    "job_id",
    "seq",
    "buyer_id",
    "model",
    "seconds",
    "resolution",
    "created_at",
    "day",
    "hold",
    "charged",
    "seller_cost",
    "platform_fee",
    "released",
    "status",
    "outcome",
    "resolved_at",
    "resolutions",
    "seller_id",
    "offer_id",
    "dispatch_offer_id",
    "dispatch_seller_id",
    "key_sha256",
    "list_price",
    "dispatch_state",
]


# Named tuples, not frozen dataclasses: a replay makes millions and they cost a third as much.
class Posting(NamedTuple):
    account: str
    debit: int = 0
    credit: int = 0


class Entry(NamedTuple):
    entry_no: int
    entry_id: str
    seq: int
    posted_at: str
    kind: str
    buyer_id: str
    job_id: str | None
    reference: str | None
    postings: tuple[Posting, ...]

    @property
    def day(self) -> str:
        return self.posted_at[:10]


def timestamp(e: Any) -> str:
    """An event's time as sortable ISO-8601 UTC with microseconds (``isoformat`` gives the
    same digits as ``strftime("%Y-%m-%dT%H:%M:%S.%fZ")`` in a third less time)."""
    return f"{e.timestamp.isoformat(timespec='microseconds')[:26]}Z"


def _transfer(debit_account: str, credit_account: str, amount: int) -> tuple[Posting, ...]:
    return (Posting(debit_account, debit=amount), Posting(credit_account, credit=amount))


def _new_settlement(job_id: str, seq: int, buyer_id: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(SETTLEMENT_COLUMNS)
    row.update(
        job_id=job_id,
        seq=seq,
        buyer_id=buyer_id,
        hold=0,
        charged=0,
        seller_cost=0,
        platform_fee=0,
        released=0,
        status=settlement_status(False, 0),
        resolutions=0,
        dispatch_state="none",
    )
    return row


class LedgerBatch:
    """Folds one batch of events into journal entries and settlement rows, then writes them."""

    def __init__(
        self, load: Callable[[set[str]], dict[str, dict[str, Any]]], rows: Rows | None = None
    ) -> None:
        """``rows``: how ``write`` writes (by default, a statement per row)."""
        self._load = load
        self._rows = rows
        self.entries: list[Entry] = []
        self.settlements: dict[str, dict[str, Any]] = {}
        self.buyer_versions: dict[str, int] = {}

    def project(self, items: Sequence[tuple[int, Any]]) -> None:
        # Most of a log is job events the ledger has no use for: pick its own by exact type.
        handlers = HANDLERS
        ours = [(seq, e, h) for seq, e in items if (h := handlers.get(type(e))) is not None]
        settlement = LedgerBatch._settlement
        self.settlements = self._load(
            {
                e.job_id if handler is settlement else id_text(e.originator_id)
                for _, e, handler in ours
                if handler is not LedgerBatch._buyer
            }
        )
        for seq, e, handler in ours:
            handler(self, seq, e)

    def _buyer(self, seq: int, e: Any) -> None:
        self.buyer_versions[id_text(e.originator_id)] = e.originator_version
        if type(e) is BuyerEvent.Deposited:
            self._deposit(seq, e)

    def _post(
        self,
        seq: int,
        e: Any,
        at: str,
        kind: str,
        buyer_id: str,
        job_id: str | None,
        reference: str | None,
        postings: tuple[Posting, ...],
    ) -> None:
        entry_id = f"{id_text(e.originator_id)}/{e.originator_version}/{kind}"
        entry_no = seq * 4 + KIND_NUMBERS[kind]
        self.entries.append(
            Entry(entry_no, entry_id, seq, at, kind, buyer_id, job_id, reference, postings)
        )

    def _deposit(self, seq: int, e: Any) -> None:
        buyer_id = id_text(e.originator_id)
        postings = _transfer(EXTERNAL_DEPOSITS, buyer_available(buyer_id), e.amount)
        self._post(seq, e, timestamp(e), "deposit", buyer_id, None, e.deposit_id, postings)

    def _settlement(self, seq: int, e: Any) -> None:
        job_id = e.job_id
        at = timestamp(e)
        if isinstance(e, SettlementEvent.Created):
            row = self.settlements.get(job_id)
            if row is None:
                row = self.settlements[job_id] = _new_settlement(job_id, seq, e.buyer_id)
            buyer = row["buyer_id"] = e.buyer_id
            row["hold"] = e.hold
            postings = _transfer(buyer_available(buyer), buyer_held(buyer), e.hold)
            self._post(seq, e, at, "hold", buyer, job_id, None, postings)
            return
        row = self.settlements.get(job_id)
        if row is None:  # a resolution without its hold: reconciliation reports the job
            row = self.settlements[job_id] = _new_settlement(job_id, seq, "unknown")
        buyer = row["buyer_id"]
        row["resolutions"] += 1
        row.update(released=e.released, outcome=e.outcome, resolved_at=at)
        if isinstance(e, SettlementEvent.Settled):
            row.update(
                charged=e.charged,
                seller_cost=e.seller_cost,
                platform_fee=e.platform_fee,
                seller_id=e.seller_id,
                offer_id=e.offer_id,
                status=settlement_status(True, e.charged),
            )
            capture = [Posting(buyer_held(buyer), debit=e.charged)]
            if e.seller_id is not None or e.seller_cost:
                capture.append(Posting(seller_payable(e.seller_id), credit=e.seller_cost))
            capture.append(Posting(PLATFORM_FEES, credit=e.platform_fee))
            self._post(seq, e, at, "capture", buyer, job_id, None, tuple(capture))
            if not e.released:
                return
        else:
            row["status"] = settlement_status(True, 0)
        postings = _transfer(buyer_held(buyer), buyer_available(buyer), e.released)
        self._post(seq, e, at, "release", buyer, job_id, None, postings)

    def _job(self, seq: int, e: Any) -> None:
        job_id = id_text(e.originator_id)
        if isinstance(e, JobEvent.Created):
            row = self.settlements.get(job_id)
            if row is None:
                row = self.settlements[job_id] = _new_settlement(job_id, seq, e.buyer_id)
            created = timestamp(e)
            request = e.request
            row.update(
                model=request["model"],
                seconds=request.get("duration_seconds"),
                resolution=request.get("resolution"),
                created_at=created,
                day=created[:10],
            )
            return
        row = self.settlements.get(job_id)
        if row is None:
            return
        if isinstance(e, JobEvent.DispatchStarted):
            attempt = e.attempt
            row.update(
                dispatch_offer_id=attempt["offer_id"],
                dispatch_seller_id=attempt.get("seller_id"),
                key_sha256=attempt.get("key_sha256"),
                list_price=attempt.get("list_price"),
                dispatch_state="started",
            )
        elif isinstance(e, JobEvent.Refused):
            row["dispatch_state"] = "refused"
        elif isinstance(e, JobEvent.Dispatched):
            row["dispatch_state"] = "accepted"

    def write(self, c: Any, q: Callable[[str], Any]) -> None:
        rows = self._rows or ExecuteMany(q)
        rows.insert(
            c,
            "mm_ledger_entries",
            ENTRY_COLUMNS,
            [
                (
                    x.entry_no,
                    x.entry_id,
                    x.seq,
                    x.posted_at,
                    x.day,
                    x.kind,
                    x.buyer_id,
                    x.job_id,
                    x.reference,
                )
                for x in self.entries
            ],
        )
        rows.insert(
            c,
            "mm_ledger_postings",
            POSTING_COLUMNS,
            [
                (x.entry_no, line, p.account, p.debit, p.credit)
                for x in self.entries
                for line, p in enumerate(x.postings)
            ],
        )
        columns = SETTLEMENT_COLUMNS
        rows.upsert(
            c,
            "mm_settlements",
            columns,
            [tuple(r[k] for k in columns) for r in self.settlements.values()],
            key="job_id",
        )
        rows.upsert(
            c,
            "mm_ledger_buyers",
            ("buyer_id", "version"),
            list(self.buyer_versions.items()),
            key="buyer_id",
        )


# Every event the ledger reads, by exact class. Every account event counts (the version the
# ledger has seen of each buyer), the settlement's, and the four job events that say which
# provider dispatch a charge rests on.
HANDLERS: dict[type, Callable[[LedgerBatch, int, Any], None]] = {
    **{
        cls: LedgerBatch._buyer
        for cls in (
            BuyerEvent.Created,
            BuyerEvent.Deposited,
            BuyerEvent.Held,
            BuyerEvent.HoldResolved,
        )
    },
    **{
        cls: LedgerBatch._settlement
        for cls in (SettlementEvent.Created, SettlementEvent.Settled, SettlementEvent.Released)
    },
    **{
        cls: LedgerBatch._job
        for cls in (
            JobEvent.Created,
            JobEvent.DispatchStarted,
            JobEvent.Refused,
            JobEvent.Dispatched,
        )
    },
}


def _fold(batch: Batch) -> LedgerBatch:
    def load(job_ids: set[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for chunk in chunks(sorted(job_ids)):
            for r in batch.all(
                f"SELECT {', '.join(SETTLEMENT_COLUMNS)} FROM mm_settlements "
                f"WHERE job_id IN ({placeholders(chunk)})",
                chunk,
            ):
                found[r["job_id"]] = {k: r[k] for k in SETTLEMENT_COLUMNS}
        return found

    return LedgerBatch(load, batch.writer)


PROJECTION = Projection(
    name=NAME,
    tables=LEDGER_TABLES,
    indexes=LEDGER_INDEXES,
    digest_order=LEDGER_DIGEST_ORDER,
    handles=frozenset(HANDLERS),
    fold=_fold,
    without_rowid=WITHOUT_ROWID,
    # A buyer's version, a dispatch's state: nothing of these events' state.
    headers_only=frozenset(
        {BuyerEvent.Held, BuyerEvent.HoldResolved, JobEvent.Refused, JobEvent.Dispatched}
    ),
)
