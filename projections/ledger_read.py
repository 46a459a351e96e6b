"""The ledger's queries: what finance (reconciliation, trial balance) and the CSV exports read
from the tables ``projections.ledger`` folds. Entry ids are this projection's to make and to
take apart: readers get the source event of an entry as a field, never by parsing an id."""

from __future__ import annotations

from typing import Any

from projections.store import Reader


def _day_range(column: str, first: str | None, last: str | None) -> tuple[str, list[str]]:
    clauses, params = [], []
    if first is not None:
        clauses.append(f"{column} >= ?")
        params.append(first)
    if last is not None:
        clauses.append(f"{column} <= ?")
        params.append(last)
    return (" AND ".join(clauses) or "1 = 1"), params


def source_of(entry_id: str) -> str:
    """The event an entry was posted from (``originator id/version``): a capture and a release
    posted from one resolution share it."""
    return entry_id.rsplit("/", 1)[0]


def entries(r: Reader) -> list[dict[str, Any]]:
    """Every journal entry in log order, each with its postings as ``(account, debit, credit)``
    and ``source``, the event it was posted from."""
    found: dict[str, dict[str, Any]] = {}
    for row in r.all(
        "SELECT e.entry_id, e.seq, e.kind, e.buyer_id, e.job_id, p.line, p.account, p.debit, "
        "p.credit FROM mm_ledger_entries e LEFT JOIN mm_ledger_postings p "
        "ON p.entry_no = e.entry_no ORDER BY e.entry_no, p.line"
    ):
        entry = found.get(row["entry_id"])
        if entry is None:
            entry = found[row["entry_id"]] = {
                "entry_id": row["entry_id"],
                "source": source_of(row["entry_id"]),
                "seq": row["seq"],
                "kind": row["kind"],
                "buyer_id": row["buyer_id"],
                "job_id": row["job_id"],
                "postings": [],
            }
        if row["account"] is not None:
            entry["postings"].append((row["account"], int(row["debit"]), int(row["credit"])))
    return list(found.values())


def orphan_postings(r: Reader) -> list[dict[str, Any]]:
    """Postings whose entry is missing (only a corrupted journal has any)."""
    return [
        dict(row)
        for row in r.all(
            "SELECT p.entry_no, p.line, p.account, p.debit, p.credit FROM mm_ledger_postings p "
            "LEFT JOIN mm_ledger_entries e ON e.entry_no = p.entry_no WHERE e.entry_no IS NULL"
        )
    ]


def settlements(r: Reader) -> dict[str, dict[str, Any]]:
    """Every job's settlement row, by job id."""
    return {row["job_id"]: dict(row) for row in r.all("SELECT * FROM mm_settlements")}


def buyer_versions(r: Reader) -> dict[str, int]:
    """Per buyer: the version of the account aggregate the ledger has seen."""
    return {
        row["buyer_id"]: int(row["version"])
        for row in r.all("SELECT buyer_id, version FROM mm_ledger_buyers")
    }


def account_totals(r: Reader) -> list[tuple[str, int, int]]:
    """``(account, debits, credits)`` of every account, by account."""
    rows = r.all(
        "SELECT account, SUM(debit) AS debits, SUM(credit) AS credits "
        "FROM mm_ledger_postings GROUP BY account ORDER BY account"
    )
    return [(row["account"], int(row["debits"]), int(row["credits"])) for row in rows]


def journal(r: Reader, first: str | None, last: str | None) -> list[dict[str, Any]]:
    """Every posting of the entries posted between two UTC days (inclusive), in log order."""
    where, params = _day_range("e.day", first, last)
    return [
        dict(row)
        for row in r.all(
            "SELECT e.posted_at, e.entry_id, e.kind, e.job_id, e.buyer_id, e.reference, p.line, "
            "p.account, p.debit, p.credit FROM mm_ledger_entries e JOIN mm_ledger_postings p "
            f"ON p.entry_no = e.entry_no WHERE {where} ORDER BY e.entry_no, p.line",
            params,
        )
    ]


def settlements_created(
    r: Reader, first: str | None, last: str | None, buyer_id: str | None = None
) -> list[dict[str, Any]]:
    """The settlement rows of jobs created between two UTC days (inclusive), oldest first;
    of one buyer's jobs only, when given."""
    where, params = _day_range("day", first, last)
    if buyer_id is not None:
        where = f"buyer_id = ? AND {where}"
        params = [buyer_id, *params]
    return [
        dict(row)
        for row in r.all(f"SELECT * FROM mm_settlements WHERE {where} ORDER BY seq", params)
    ]
