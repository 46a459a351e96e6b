"""The order book: one row per seller offer (``mm_offers``) with its state, health, capacity in
use and lifetime totals, as routing, the market pages and the seller's API read it."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from domain.aggregates import Offer, Settlement
from domain.rules import offer_unavailable_because
from projections.ids import id_text
from projections.store import Batch, Projection, Reader, dumps, placeholders

NAME = "order book"
OfferEvent: Any = Offer  # generated event classes (see projections.jobdoc)
SettlementEvent: Any = Settlement

TABLES = {
    "mm_offers": (
        "CREATE TABLE IF NOT EXISTS mm_offers ("
        "offer_id TEXT PRIMARY KEY, seq BIGINT NOT NULL, seller_id TEXT NOT NULL, "
        "model TEXT NOT NULL, provider TEXT NOT NULL, base_url TEXT, sealed_key TEXT NOT NULL, "
        "key_sha256 TEXT NOT NULL, cost_multiplier TEXT NOT NULL, max_concurrent_jobs BIGINT, "
        "state TEXT NOT NULL, deactivated_reason TEXT, backoff_until DOUBLE PRECISION NOT NULL, "
        "backoff_reason TEXT, failures BIGINT NOT NULL, in_flight BIGINT NOT NULL, "
        "jobs BIGINT NOT NULL, volume BIGINT NOT NULL, payout BIGINT NOT NULL)"
    ),
}
INDEXES = ["CREATE INDEX IF NOT EXISTS mm_offers_model ON mm_offers (model, state)"]


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
        """Why routing leaves this offer out now (the ``Offer`` aggregate decides for real, by
        the same rule)."""
        return offer_unavailable_because(
            deleted=self.state == "deleted",
            paused=self.state == "paused",
            deactivated=self.state == "deactivated",
            backoff_until=self.backoff_until,
            in_flight=self.in_flight,
            max_concurrent_jobs=self.max_concurrent_jobs,
            now=now,
        )

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


COLUMNS = list(OfferRow.__dataclass_fields__)
# The columns in OfferRow's order, so a row's values are read by position (by name, SQLite's
# rows compare every column name case-insensitively: most of reading a big order book).
SELECT_OFFERS = f"SELECT {', '.join(COLUMNS)} FROM mm_offers"

# --------------------------------------------------------------------------- the fold

Row = dict[str, Any]


class OrderBookFold:
    def __init__(self, batch: Batch) -> None:
        self._batch = batch
        # The offers this batch touches, as rows (``trades`` reads them after this fold).
        self.offers: dict[str, Row] = {}

    def project(self, items: Sequence[tuple[int, Any]]) -> None:
        handlers = HANDLERS
        ours = [(seq, e, h) for seq, e in items if (h := handlers.get(type(e))) is not None]
        self.offers = self._load({key for _, e, _ in ours if (key := _offer_key(e)) is not None})
        for seq, e, handler in ours:
            handler(self.offers, seq, e)

    def _load(self, offer_ids: set[str]) -> dict[str, Row]:
        if not offer_ids:
            return {}
        ids = sorted(offer_ids)
        found = {}
        for r in self._batch.all(
            f"SELECT * FROM mm_offers WHERE offer_id IN ({placeholders(ids)})", ids
        ):
            row = {k: r[k] for k in COLUMNS}
            row["sealed_key"] = json.loads(row["sealed_key"])
            found[row["offer_id"]] = row
        return found

    def write(self, c: Any, q: Callable[[str], Any]) -> None:
        if not self.offers:
            return
        c.executemany(
            q(
                f"INSERT INTO mm_offers ({', '.join(COLUMNS)}) "
                f"VALUES ({placeholders(COLUMNS)}) ON CONFLICT (offer_id) DO UPDATE "
                f"SET {', '.join(f'{k} = excluded.{k}' for k in COLUMNS[1:])}"
            ),
            [
                tuple(dumps(o[k]) if k == "sealed_key" else o[k] for k in COLUMNS)
                for o in self.offers.values()
            ],
        )


def _offer_key(e: Any) -> str | None:
    if type(e) is SettlementEvent.Settled:
        return e.offer_id if e.offer_id and e.seller_id else None
    return id_text(e.originator_id)


def _created(offers: dict[str, Row], seq: int, e: Any) -> None:
    offer_id = id_text(e.originator_id)
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


def _updated(o: Row, e: Any) -> None:
    for name, value in e.changes.items():
        if name == "paused":
            # Unpausing leaves a deactivated offer deactivated, as the aggregate does.
            resumed = "deactivated" if o["deactivated_reason"] else "active"
            o["state"] = "paused" if value else resumed
        else:
            o[name] = value
    if "sealed_key" in e.changes:
        o.update(deactivated_reason=None, backoff_until=0.0, backoff_reason=None, failures=0)
        if o["state"] == "deactivated":
            o["state"] = "active"


def _deleted(o: Row, e: Any) -> None:
    o["state"] = "deleted"


def _backed_off(o: Row, e: Any) -> None:
    o.update(backoff_until=e.until, backoff_reason=e.reason, failures=e.failures)
    if e.deactivate:
        o.update(state="deactivated", deactivated_reason=e.reason)


def _recovered(o: Row, e: Any) -> None:
    o.update(backoff_until=0.0, backoff_reason=None, failures=0)


def _slot_taken(o: Row, e: Any) -> None:
    o["in_flight"] += 1


def _slot_released(o: Row, e: Any) -> None:
    o["in_flight"] -= 1


def _on_offer(change: Callable[[Row, Any], None]) -> Callable[[dict[str, Row], int, Any], None]:
    """A change to an offer the book has (events of an offer it never saw created are left)."""

    def handler(offers: dict[str, Row], seq: int, e: Any) -> None:
        o = offers.get(id_text(e.originator_id))
        if o is not None:
            change(o, e)

    return handler


def _settled(offers: dict[str, Row], seq: int, e: Any) -> None:
    """A settlement that charged for a marketplace offer adds to its lifetime totals."""
    offer = offers.get(e.offer_id) if e.offer_id and e.seller_id else None
    if offer is not None:
        offer["jobs"] += 1
        offer["volume"] += e.charged
        offer["payout"] += e.seller_cost


HANDLERS: dict[type, Callable[[dict[str, Row], int, Any], None]] = {
    OfferEvent.Created: _created,
    OfferEvent.Updated: _on_offer(_updated),
    OfferEvent.Deleted: _on_offer(_deleted),
    OfferEvent.BackedOff: _on_offer(_backed_off),
    OfferEvent.Recovered: _on_offer(_recovered),
    OfferEvent.SlotTaken: _on_offer(_slot_taken),
    OfferEvent.SlotReleased: _on_offer(_slot_released),
    SettlementEvent.Settled: _settled,
}

PROJECTION = Projection(
    name=NAME,
    tables=TABLES,
    indexes=INDEXES,
    digest_order={"mm_offers": "offer_id"},
    handles=frozenset(HANDLERS),
    fold=OrderBookFold,
    # A slot's count, a recovery: nothing of these events' state.
    headers_only=frozenset({OfferEvent.SlotTaken, OfferEvent.SlotReleased, OfferEvent.Recovered}),
)

# --------------------------------------------------------------------------- queries


def offers(
    r: Reader,
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
    return [_offer_row(row) for row in r.all(f"{SELECT_OFFERS} {where} ORDER BY seq", params)]


def offer(r: Reader, offer_id: str) -> OfferRow | None:
    row = r.one(f"{SELECT_OFFERS} WHERE offer_id = ?", (offer_id,))
    return None if row is None else _offer_row(row)


def totals_by_model(r: Reader) -> dict[str, tuple[int, int]]:
    """Per model: settled marketplace jobs and their buyer cost, ever."""
    return {
        row["model"]: (int(row["jobs"]), int(row["volume"]))
        for row in r.all(
            "SELECT model, SUM(jobs) AS jobs, SUM(volume) AS volume FROM mm_offers GROUP BY model"
        )
    }


def payout_by_seller(r: Reader) -> dict[str, int]:
    return {
        row["seller_id"]: int(row["payout"])
        for row in r.all(
            "SELECT seller_id, SUM(payout) AS payout FROM mm_offers GROUP BY seller_id"
        )
    }


def base_urls(r: Reader) -> dict[str, str | None]:
    """Every offer's base URL (None: the configured provider's)."""
    return {
        row["offer_id"]: row["base_url"]
        for row in r.all("SELECT offer_id, base_url FROM mm_offers")
    }


# Every submit reads its model's whole order book: rows seen before (the same values) give back
# the OfferRow made then, instead of parsing its sealed key and building it again (that was a
# fifth of a submit's CPU in a 100-offer market). A changed row has other values, so it is never
# served stale; the memo forgets everything when it fills.
_ROWS_SEEN: dict[tuple[Any, ...], OfferRow] = {}
MAX_ROWS_SEEN = 10_000


def _offer_row(row: Any) -> OfferRow:
    raw = tuple(row.values()) if isinstance(row, dict) else tuple(row)
    seen = _ROWS_SEEN.get(raw)
    if seen is not None:
        return seen
    values = dict(zip(COLUMNS, raw, strict=True))
    values["sealed_key"] = json.loads(values["sealed_key"])
    values["backoff_until"] = float(values["backoff_until"])
    offer = OfferRow(**values)
    if len(_ROWS_SEEN) >= MAX_ROWS_SEEN:
        _ROWS_SEEN.clear()
    _ROWS_SEEN[raw] = offer
    return offer
