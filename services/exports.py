"""CSV exports for finance and for buyers: the journal, per-job settlements, a buyer's usage.

Each reads one snapshot of the views, so an export is consistent at one log position.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from datetime import date
from typing import Any

from projections.views import Views

JOURNAL_COLUMNS = [
    "posted_at",
    "entry_id",
    "kind",
    "job_id",
    "buyer_id",
    "reference",
    "line",
    "account",
    "debit_usdc",
    "credit_usdc",
]
SETTLEMENT_EXPORT_COLUMNS = [
    "job_id",
    "created_at",
    "buyer_id",
    "model",
    "seconds",
    "resolution",
    "settlement_status",
    "outcome",
    "resolved_at",
    "held_usdc",
    "charged_usdc",
    "seller_cost_usdc",
    "platform_fee_usdc",
    "released_usdc",
    "seller_id",
    "offer_id",
]
USAGE_COLUMNS = [
    "created",
    "job_id",
    "model",
    "seconds",
    "resolution",
    "status",
    "estimated_usdc",
    "charged_usdc",
    "settlement_status",
]


def parse_day(text: str) -> str:
    """A UTC day as ``YYYY-MM-DD`` exactly; ValueError otherwise."""
    if len(text) != 10:
        raise ValueError(f"{text!r} is not a date as YYYY-MM-DD")
    return date.fromisoformat(text).isoformat()


def _day_range(column: str, first: str | None, last: str | None) -> tuple[str, list[str]]:
    clauses, params = [], []
    if first is not None:
        clauses.append(f"{column} >= ?")
        params.append(first)
    if last is not None:
        clauses.append(f"{column} <= ?")
        params.append(last)
    return (" AND ".join(clauses) or "1 = 1"), params


def journal_rows(
    views: Views, application_name: str, first: str | None, last: str | None
) -> list[list[Any]]:
    """Every posting of the entries posted between two UTC days (inclusive), in log order."""
    where, params = _day_range("e.day", first, last)
    with views.snapshot(application_name) as s:
        rows = s.all(
            "SELECT e.posted_at, e.entry_id, e.kind, e.job_id, e.buyer_id, e.reference, p.line, "
            "p.account, p.debit, p.credit FROM mm_ledger_entries e JOIN mm_ledger_postings p "
            f"ON p.entry_no = e.entry_no WHERE {where} ORDER BY e.entry_no, p.line",
            params,
        )
    return [
        [
            r["posted_at"],
            r["entry_id"],
            r["kind"],
            r["job_id"] or "",
            r["buyer_id"],
            r["reference"] or "",
            r["line"],
            r["account"],
            r["debit"],
            r["credit"],
        ]
        for r in rows
    ]


def settlement_rows(
    views: Views, application_name: str, first: str | None, last: str | None
) -> list[list[Any]]:
    """One row per job created between two UTC days (inclusive), with its settlement."""
    where, params = _day_range("day", first, last)
    with views.snapshot(application_name) as s:
        rows = s.all(f"SELECT * FROM mm_settlements WHERE {where} ORDER BY seq", params)
    return [
        [
            r["job_id"],
            r["created_at"] or "",
            r["buyer_id"],
            r["model"] or "",
            r["seconds"] if r["seconds"] is not None else "",
            r["resolution"] or "",
            r["status"],
            r["outcome"] or "",
            r["resolved_at"] or "",
            r["hold"],
            r["charged"],
            r["seller_cost"],
            r["platform_fee"],
            r["released"],
            r["seller_id"] or "",
            r["offer_id"] or "",
        ]
        for r in rows
    ]


def usage_rows(
    views: Views, application_name: str, buyer_id: str, first: str | None, last: str | None
) -> list[list[Any]]:
    """A buyer's jobs created between two UTC days (inclusive), oldest first."""
    where, params = _day_range("s.day", first, last)
    with views.snapshot(application_name) as s:
        rows = s.all(
            "SELECT s.created_at, s.job_id, s.model, s.seconds, s.resolution, v.status, v.doc, "
            "s.charged, s.status AS settlement_status FROM mm_settlements s JOIN mm_job_views v "
            f"ON v.job_id = s.job_id WHERE s.buyer_id = ? AND {where} ORDER BY s.seq",
            [buyer_id, *params],
        )
    return [
        [
            r["created_at"],
            r["job_id"],
            r["model"],
            r["seconds"] if r["seconds"] is not None else "",
            r["resolution"] or "",
            r["status"],
            json.loads(r["doc"])["estimated_cost_usdc"],
            r["charged"],
            r["settlement_status"],
        ]
        for r in rows
    ]


def to_csv(columns: list[str], rows: Iterable[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()
