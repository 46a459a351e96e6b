"""CSV exports for finance and for buyers: the journal, per-job settlements, a buyer's usage.

Each reads one snapshot of the views, so an export is consistent at one log position.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from datetime import date
from typing import Any

from projections import jobviews, ledger_read
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


def journal_rows(
    views: Views, application_name: str, first: str | None, last: str | None
) -> list[list[Any]]:
    """Every posting of the entries posted between two UTC days (inclusive), in log order."""
    with views.snapshot(application_name) as s:
        rows = ledger_read.journal(s, first, last)
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
    with views.snapshot(application_name) as s:
        rows = ledger_read.settlements_created(s, first, last)
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
    with views.snapshot(application_name) as s:
        rows = ledger_read.settlements_created(s, first, last, buyer_id=buyer_id)
        jobs = jobviews.statuses_and_estimates(s, [r["job_id"] for r in rows])
    return [
        [
            r["created_at"],
            r["job_id"],
            r["model"],
            r["seconds"] if r["seconds"] is not None else "",
            r["resolution"] or "",
            jobs[r["job_id"]][0],
            jobs[r["job_id"]][1],
            r["charged"],
            r["status"],
        ]
        for r in rows
        if r["job_id"] in jobs  # a job's settlement row without its view is not the buyer's usage
    ]


def to_csv(columns: list[str], rows: Iterable[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()
