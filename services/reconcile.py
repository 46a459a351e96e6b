"""The reconciliation of SPEC 1's invariants across one snapshot of the views and the buyers'
account aggregates (see ``services.finance`` for how the snapshot is read).

About 400 lines, and kept whole on purpose: it is ``CHECKS`` (``services.finance_report``) in
order, one short function per check, and a reader checking one invariant wants the others in
view; the types and the reading are elsewhere already.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from domain.aggregates import TERMINAL
from domain.rules import SETTLEMENT_PENDING, settlement_status
from projections.ledger import (
    PLATFORM_FEES,
    buyer_available,
    buyer_held,
    is_debit_normal,
    payable_seller,
)
from services.finance_report import (
    MAX_BREAKS_PER_CHECK,
    Billing,
    Break,
    BuyerFigures,
    LedgerState,
    Reconciliation,
)


class _Report:
    def __init__(self) -> None:
        self.breaks: list[Break] = []
        self.checked: dict[str, int] = defaultdict(int)
        self.truncated: dict[str, int] = defaultdict(int)

    def count(self, check: str, n: int = 1) -> None:
        self.checked[check] += n

    def fail(self, check: str, subject: str, detail: str) -> None:
        if sum(1 for b in self.breaks if b.check == check) >= MAX_BREAKS_PER_CHECK:
            self.truncated[check] += 1
            return
        self.breaks.append(Break(check, subject, detail))


def reconcile(
    state: LedgerState,
    buyers: dict[str, BuyerFigures],
    billing: Billing | None = None,
    later: LedgerState | None = None,
) -> Reconciliation:
    """Check SPEC 1's invariants across the views of ``state`` and the buyers' aggregates.

    ``later`` is a second snapshot taken after ``billing`` was read (see the module docstring).
    """
    report = _Report()
    balances = _check_entries(state, report)
    per_job = _journal_by_job(state)
    _check_holds(state, per_job, report)
    _check_job_amounts(state, per_job, report)
    totals = _check_buyers(state, balances, buyers, report)
    _check_sellers(state, balances, report)
    skipped: dict[str, str] = {}
    if billing is None or billing.billed is None:
        reason = "no provider bill given" if billing is None else billing.unavailable
        skipped["provider_billing"] = reason or "the provider's bill could not be read"
    else:
        _check_billing(state, later or state, billing.billed, report)
    totals["seller_payable_usdc"] = sum(
        v for a, v in balances.items() if payable_seller(a) is not None
    )
    totals["platform_fees_usdc"] = balances.get(PLATFORM_FEES, 0)
    totals["jobs"] = len(state.settlements)
    totals["jobs_pending"] = sum(
        1 for r in state.settlements.values() if r["status"] == SETTLEMENT_PENDING
    )
    return Reconciliation(
        position=state.position,
        breaks=report.breaks,
        checked=dict(report.checked),
        skipped=skipped,
        totals=totals,
        truncated=dict(report.truncated),
    )


def _entry_subject(entry: dict[str, Any]) -> str:
    job = f" of job {entry['job_id']}" if entry["job_id"] else ""
    return f"entry {entry['entry_id']} ({entry['kind']}{job})"


def _check_entries(state: LedgerState, report: _Report) -> dict[str, int]:
    """Entries balance, the totals balance, and no account ever dips below zero, walking the
    journal in log order. Returns every account's balance on its normal side."""
    balances: dict[str, int] = defaultdict(int)
    went_negative: set[str] = set()
    debits = credits = 0
    for entry in state.entries:
        report.count("entries_balance")
        d = sum(p[1] for p in entry["postings"])
        c = sum(p[2] for p in entry["postings"])
        debits += d
        credits += c
        if len(entry["postings"]) < 2:
            report.fail("entries_balance", _entry_subject(entry), "has fewer than two postings")
        if any(p[1] < 0 or p[2] < 0 for p in entry["postings"]):
            report.fail("entries_balance", _entry_subject(entry), "has a negative posting")
        if d != c:
            report.fail("entries_balance", _entry_subject(entry), f"debits {d} but credits {c}")
        for account, debit, credit in entry["postings"]:
            delta = debit - credit if is_debit_normal(account) else credit - debit
            balances[account] += delta
            if balances[account] < 0 and account not in went_negative:
                went_negative.add(account)
                report.fail(
                    "no_negative_balance",
                    f"account {account}",
                    f"went to {balances[account]} at {_entry_subject(entry)}",
                )
    report.count("no_negative_balance", len(balances))
    for orphan in state.orphan_postings:
        report.fail(
            "entries_balance",
            f"posting {orphan['line']} of entry number {orphan['entry_no']}",
            f"posts to {orphan['account']} but belongs to no entry",
        )
        debits += int(orphan["debit"])
        credits += int(orphan["credit"])
    report.count("trial_balance")
    if debits != credits:
        report.fail("trial_balance", "the journal", f"debits {debits} but credits {credits}")
    return dict(balances)


@dataclass
class _JobJournal:
    holds: list[int] = field(default_factory=list)
    resolutions: set[str] = field(default_factory=set)
    charged: int = 0
    seller_cost: int = 0
    platform_fee: int = 0
    released: int = 0
    seller_accounts: set[str] = field(default_factory=set)


def _journal_by_job(state: LedgerState) -> dict[str, _JobJournal]:
    jobs: dict[str, _JobJournal] = defaultdict(_JobJournal)
    for entry in state.entries:
        job_id = entry["job_id"]
        if job_id is None:
            continue
        j = jobs[job_id]
        kind = entry["kind"]
        source = entry["source"]
        if kind == "hold":
            j.holds.append(sum(p[2] for p in entry["postings"]))
        elif kind == "capture":
            j.resolutions.add(source)
            for account, debit, credit in entry["postings"]:
                j.charged += debit
                if account == PLATFORM_FEES:
                    j.platform_fee += credit
                elif payable_seller(account) is not None:
                    j.seller_cost += credit
                    j.seller_accounts.add(account)
        elif kind == "release":
            j.resolutions.add(source)
            j.released += sum(p[2] for p in entry["postings"])
    return jobs


def _check_holds(state: LedgerState, per_job: dict[str, _JobJournal], report: _Report) -> None:
    for job_id in sorted(set(per_job) | set(state.settlements) | set(state.jobs)):
        report.count("holds_resolved_once")
        subject = f"job {job_id}"
        j = per_job.get(job_id, _JobJournal())
        view = state.jobs.get(job_id)
        row = state.settlements.get(job_id)
        if len(j.holds) != 1:
            report.fail("holds_resolved_once", subject, f"has {len(j.holds)} hold entries")
        if len(j.resolutions) > 1:
            report.fail("holds_resolved_once", subject, f"is resolved {len(j.resolutions)} times")
        if row is not None and row["resolutions"] > 1:
            report.fail(
                "holds_resolved_once",
                subject,
                f"settled {row['resolutions']} times (mm_settlements)",
            )
        if view is None:
            report.fail("holds_resolved_once", subject, "has money entries but no job view")
            continue
        terminal = view["status"] in TERMINAL
        if terminal and not j.resolutions:
            report.fail("holds_resolved_once", subject, f"is {view['status']} but still holds")
        if not terminal and j.resolutions:
            report.fail(
                "holds_resolved_once", subject, f"is {view['status']} but its hold is resolved"
            )


def _money(doc: dict[str, Any], *path: str) -> int | None:
    value: Any = doc
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _check_job_amounts(
    state: LedgerState, per_job: dict[str, _JobJournal], report: _Report
) -> None:
    for job_id, j in sorted(per_job.items()):
        report.count("job_amounts")
        subject = f"job {job_id}"
        held = j.holds[0] if j.holds else 0
        resolved = bool(j.resolutions)
        if j.charged != j.seller_cost + j.platform_fee:
            report.fail(
                "job_amounts",
                subject,
                f"charged {j.charged} but seller cost {j.seller_cost}"
                f" + platform fee {j.platform_fee} = {j.seller_cost + j.platform_fee}",
            )
        if resolved and held != j.charged + j.released:
            report.fail(
                "job_amounts",
                subject,
                f"held {held} but charged {j.charged} + released {j.released}"
                f" = {j.charged + j.released}",
            )
        status = settlement_status(resolved, j.charged)
        journal = {
            "hold": held,
            "charged": j.charged,
            "seller_cost": j.seller_cost,
            "platform_fee": j.platform_fee,
            "released": j.released,
        }
        row = state.settlements.get(job_id)
        if row is not None:
            for name, value in journal.items():
                if int(row[name]) != value:
                    report.fail(
                        "job_amounts",
                        subject,
                        f"mm_settlements says {name} {row[name]}, the journal {value}",
                    )
            if row["status"] != status:
                report.fail(
                    "job_amounts",
                    subject,
                    f"mm_settlements says {row['status']}, the journal {status}",
                )
        view = state.jobs.get(job_id)
        if view is None:
            continue
        doc = view["doc"]
        served = {
            "max_cost_usdc": _money(doc, "max_cost_usdc"),
            "usage.settlement_status": doc.get("usage", {}).get("settlement_status"),
        }
        expected: dict[str, Any] = {"max_cost_usdc": held, "usage.settlement_status": status}
        if resolved:
            served["usage.buyer_cost_usdc"] = _money(doc, "usage", "buyer_cost_usdc")
            served["usage.seller_cost_usdc"] = _money(doc, "usage", "seller_cost_usdc")
            expected["usage.buyer_cost_usdc"] = j.charged
            expected["usage.seller_cost_usdc"] = j.seller_cost
        for name, value in expected.items():
            if served[name] != value:
                report.fail(
                    "job_amounts",
                    subject,
                    f"the job view (mm_job_views) serves {name} {served[name]}, "
                    f"the journal says {value}",
                )


def _check_buyers(
    state: LedgerState,
    balances: dict[str, int],
    buyers: dict[str, BuyerFigures],
    report: _Report,
) -> dict[str, int]:
    deposits: dict[str, int] = defaultdict(int)
    spent: dict[str, int] = defaultdict(int)
    holds: dict[str, int] = defaultdict(int)
    for entry in state.entries:
        if entry["kind"] == "hold":
            holds[entry["buyer_id"]] += 1
        elif entry["kind"] == "deposit":
            deposits[entry["buyer_id"]] += sum(p[2] for p in entry["postings"])
        elif entry["kind"] == "capture":
            spent[entry["buyer_id"]] += sum(p[1] for p in entry["postings"])
    totals = {
        "deposits_usdc": 0,
        "available_usdc": 0,
        "held_usdc": 0,
        "spent_usdc": 0,
        "buyers": 0,
    }
    ids = set(state.buyers) | set(deposits) | set(state.buyer_versions)
    ids |= {e["buyer_id"] for e in state.entries}
    for buyer_id in sorted(ids):
        report.count("buyer_balances")
        subject = f"buyer {buyer_id}"
        journal = BuyerFigures(
            deposited=deposits[buyer_id],
            available=balances.get(buyer_available(buyer_id), 0),
            held=balances.get(buyer_held(buyer_id), 0),
            spent=spent[buyer_id],
            jobs=holds[buyer_id],
        )
        totals["buyers"] += 1
        totals["deposits_usdc"] += journal.deposited
        totals["available_usdc"] += journal.available
        totals["held_usdc"] += journal.held
        totals["spent_usdc"] += journal.spent
        if journal.deposited != journal.available + journal.held + journal.spent:
            report.fail(
                "buyer_balances",
                subject,
                f"deposits {journal.deposited} but available {journal.available} + held"
                f" {journal.held} + spent {journal.spent}"
                f" = {journal.available + journal.held + journal.spent}",
            )
        account = buyers.get(buyer_id)
        if account is None:
            seen = state.buyer_versions.get(buyer_id)
            report.fail(
                "buyer_balances",
                subject,
                f"has no account aggregate at version {seen} (mm_ledger_buyers)",
            )
            continue
        for name in ("deposited", "available", "held", "spent", "jobs"):
            ours, theirs = getattr(journal, name), getattr(account, name)
            if ours != theirs:
                report.fail(
                    "buyer_balances",
                    subject,
                    f"the journal says {name} {ours}, the account (/v1/buyer/me) {theirs}",
                )
    return totals


def _check_sellers(state: LedgerState, balances: dict[str, int], report: _Report) -> None:
    payable = {
        seller: balance
        for account, balance in balances.items()
        if (seller := payable_seller(account)) is not None
    }
    settled: dict[str, int] = defaultdict(int)
    fees = 0
    for row in state.settlements.values():
        fees += int(row["platform_fee"])
        if row["seller_id"] is not None:
            settled[row["seller_id"]] += int(row["seller_cost"])
    sellers = set(payable) | set(state.trades_by_seller) | set(state.offers_payout_by_seller)
    for seller_id in sorted(sellers | set(settled)):
        report.count("seller_payouts")
        ours = payable.get(seller_id, 0)
        for source, theirs in (
            ("the earnings (mm_trades)", state.trades_by_seller.get(seller_id, 0)),
            ("the order book (mm_offers)", state.offers_payout_by_seller.get(seller_id, 0)),
            ("the settlement rows (mm_settlements)", settled.get(seller_id, 0)),
        ):
            if ours != theirs:
                report.fail(
                    "seller_payouts",
                    f"seller {seller_id}",
                    f"payable balance {ours} but {source} say {theirs}",
                )
    report.count("platform_fees")
    if balances.get(PLATFORM_FEES, 0) != fees:
        report.fail(
            "platform_fees",
            f"account {PLATFORM_FEES}",
            f"balance {balances.get(PLATFORM_FEES, 0)} but the settlements' fees sum to {fees}",
        )


def _dispatches(state: LedgerState) -> tuple[dict[str, int], dict[str, int]]:
    """Per key hash: list prices of accepted dispatches, and of dispatches in doubt (started,
    never known to be accepted or refused)."""
    accepted: dict[str, int] = defaultdict(int)
    in_doubt: dict[str, int] = defaultdict(int)
    for row in state.settlements.values():
        key = row["key_sha256"]
        if key is None or not state.default_base_url_keys.get(row["dispatch_offer_id"], True):
            continue
        if row["dispatch_state"] == "accepted":
            accepted[key] += int(row["list_price"] or 0)
        elif row["dispatch_state"] == "started":
            in_doubt[key] += int(row["list_price"] or 0)
    return accepted, in_doubt


def _check_billing(
    state: LedgerState, later: LedgerState, billed: dict[str, int], report: _Report
) -> None:
    accepted_before, _ = _dispatches(state)
    accepted_after, in_doubt_after = _dispatches(later)
    keys = set(accepted_before) | set(accepted_after) | set(in_doubt_after)
    for key in sorted(keys):
        report.count("provider_billing")
        low = accepted_before.get(key, 0)
        high = accepted_after.get(key, 0) + in_doubt_after.get(key, 0)
        bill = billed.get(key, 0)
        if not low <= bill <= high:
            expected = str(low) if low == high else f"between {low} and {high}"
            report.fail(
                "provider_billing",
                f"provider key sha256:{key[:12]}",
                f"billed {bill} but the accepted dispatches' list prices come to {expected}",
            )
