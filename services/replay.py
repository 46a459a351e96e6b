"""Replay that proves itself: rebuild every projection from the log into fresh storage and
compare it, row by row, with the live views at the same log position."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from adapters.eventstore import MarketApp
from projections.runner import ProjectionRunner
from projections.views import Views

# Which projection each table belongs to, for the report.
PROJECTIONS = {
    "mm_job_views": "job views",
    "mm_principals": "accounts",
    "mm_buyer_providers": "accounts",
    "mm_offers": "order book",
    "mm_trades": "order book",
    "mm_ledger_entries": "ledger",
    "mm_ledger_postings": "ledger",
    "mm_settlements": "ledger",
    "mm_ledger_buyers": "ledger",
}
MAX_NAMED_ROWS = 10


@dataclass
class TableResult:
    table: str
    live_rows: int
    replayed_rows: int
    differing: list[str] = field(default_factory=list)
    more: int = 0

    @property
    def identical(self) -> bool:
        return not self.differing


@dataclass
class Verification:
    position: int
    events: int
    seconds: float
    tables: list[TableResult]

    @property
    def ok(self) -> bool:
        return all(t.identical for t in self.tables)

    def render(self) -> str:
        rate = self.events / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"Replayed {self.events} events (log position {self.position}) into fresh storage"
            f" in {self.seconds:.2f} s ({rate:,.0f} events/s)",
            "",
            f"{'projection':<11} {'table':<20} {'live rows':>10} {'replayed':>10}  result",
        ]
        for t in self.tables:
            projection = PROJECTIONS.get(t.table, "")
            result = "identical" if t.identical else f"DIFFERENT ({len(t.differing) + t.more} rows)"
            out.append(
                f"{projection:<11} {t.table:<20} {t.live_rows:>10} {t.replayed_rows:>10}  {result}"
            )
        for t in self.tables:
            for line in t.differing:
                out.append(f"  {t.table}: {line}")
            if t.more:
                out.append(f"  {t.table}: ... and {t.more} more")
        out += ["", "OK: the replay equals the live views." if self.ok else "FAILED: see above."]
        return "\n".join(out)


def verify(app: MarketApp, live: Views, fresh: Views) -> Verification:
    """Replay the log into ``fresh`` (empty views) up to the live views' position; compare."""
    position, live_rows = live.row_hashes(app.name)
    started = time.perf_counter()
    events = ProjectionRunner(app, fresh).catch_up(until=position)
    seconds = time.perf_counter() - started
    replayed_position, replayed_rows = fresh.row_hashes(app.name)
    tables = []
    for table, rows in live_rows.items():
        ours = replayed_rows.get(table, {})
        differing = []
        for key in sorted(set(rows) | set(ours)):
            if key not in ours:
                differing.append(f"row {key} is live but not in the replay")
            elif key not in rows:
                differing.append(f"row {key} is in the replay but missing from the live view")
            elif rows[key] != ours[key]:
                differing.append(f"row {key} differs")
        tables.append(
            TableResult(
                table,
                len(rows),
                len(ours),
                differing[:MAX_NAMED_ROWS],
                max(len(differing) - MAX_NAMED_ROWS, 0),
            )
        )
    if replayed_position != position:
        tables.append(
            TableResult("tracking", position, replayed_position, ["the positions differ"])
        )
    return Verification(position, events, seconds, tables)
