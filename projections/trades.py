"""Trades: one row per job settled with a charge on a marketplace offer (``mm_trades``), for
market volume over time and seller earnings by model and day.

A trade names its offer's model, which the settlement event doesn't carry: the fold reads it
from the order book's fold of the same batch (so the two are always folded together).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from domain.aggregates import Settlement
from projections import orderbook
from projections.store import Batch, Projection, Reader, apply_in_order

NAME = "trades"
SettlementEvent: Any = Settlement  # generated event classes (see projections.jobdoc)

TABLES = {
    "mm_trades": (
        "CREATE TABLE IF NOT EXISTS mm_trades ("
        "job_id TEXT PRIMARY KEY, model TEXT NOT NULL, offer_id TEXT NOT NULL, "
        "seller_id TEXT NOT NULL, settled_at BIGINT NOT NULL, day TEXT NOT NULL, "
        "buyer_cost BIGINT NOT NULL, seller_cost BIGINT NOT NULL)"
    ),
}
INDEXES = [
    "CREATE INDEX IF NOT EXISTS mm_trades_model ON mm_trades (model, settled_at)",
    "CREATE INDEX IF NOT EXISTS mm_trades_seller ON mm_trades (seller_id, day)",
]


COLUMNS = (
    "job_id",
    "model",
    "offer_id",
    "seller_id",
    "settled_at",
    "day",
    "buyer_cost",
    "seller_cost",
)


class TradesFold:
    def __init__(self, batch: Batch) -> None:
        book = batch.folds[orderbook.NAME]
        assert isinstance(book, orderbook.OrderBookFold)
        self._offers = book.offers
        self._writer = batch.writer
        self.trades: list[tuple[Any, ...]] = []

    def project(self, items: Sequence[tuple[int, Any]]) -> None:
        apply_in_order(self, HANDLERS, items)

    def write(self, c: Any, q: Callable[[str], Any]) -> None:
        # A job's first trade stands: later ones in this batch (or after an earlier batch's)
        # are left out, as a statement per row with ``DO NOTHING`` would leave them.
        first: dict[str, tuple[Any, ...]] = {}
        for trade in self.trades:
            first.setdefault(trade[0], trade)
        self._writer.upsert(c, "mm_trades", COLUMNS, list(first.values()), "job_id", COLUMNS[1:])


def _settled(fold: TradesFold, seq: int, e: Any) -> None:
    offer = fold._offers.get(e.offer_id) if e.offer_id and e.seller_id else None
    if offer is None:
        return
    settled_at = e.timestamp
    fold.trades.append(
        (
            e.job_id,
            offer["model"],
            e.offer_id,
            e.seller_id,
            int(settled_at.timestamp()),
            settled_at.strftime("%Y-%m-%d"),
            e.charged,
            e.seller_cost,
        )
    )


HANDLERS: dict[type, Callable[[TradesFold, int, Any], None]] = {
    SettlementEvent.Settled: _settled,
}

PROJECTION = Projection(
    name=NAME,
    tables=TABLES,
    indexes=INDEXES,
    digest_order={"mm_trades": "job_id"},
    handles=frozenset(HANDLERS),
    fold=TradesFold,
    requires=(orderbook.NAME,),
)

# --------------------------------------------------------------------------- queries


def activity_since(r: Reader, since: int) -> dict[str, tuple[int, int]]:
    """Per model: trades settled since ``since`` and their buyer cost."""
    return {
        row["model"]: (int(row["jobs"]), int(row["volume"]))
        for row in r.all(
            "SELECT model, COUNT(*) AS jobs, SUM(buyer_cost) AS volume FROM mm_trades "
            "WHERE settled_at >= ? GROUP BY model",
            (since,),
        )
    }


def seller_earnings(
    r: Reader, seller_id: str, first_day: str | None, last_day: str | None
) -> list[tuple[str, str, int, int]]:
    """``(day, model, jobs, payout)`` of a seller's settled jobs, oldest day first."""
    clauses, params = ["seller_id = ?"], [seller_id]
    if first_day is not None:
        clauses.append("day >= ?")
        params.append(first_day)
    if last_day is not None:
        clauses.append("day <= ?")
        params.append(last_day)
    rows = r.all(
        "SELECT day, model, COUNT(*) AS jobs, SUM(seller_cost) AS payout FROM mm_trades "
        f"WHERE {' AND '.join(clauses)} GROUP BY day, model ORDER BY day, model",
        params,
    )
    return [(row["day"], row["model"], int(row["jobs"]), int(row["payout"])) for row in rows]


def payout_by_seller(r: Reader) -> dict[str, int]:
    return {
        row["seller_id"]: int(row["payout"])
        for row in r.all(
            "SELECT seller_id, SUM(seller_cost) AS payout FROM mm_trades GROUP BY seller_id"
        )
    }
