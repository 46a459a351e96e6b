"""Finance: the trial balance and the reconciliation of SPEC 1's invariants.

A reconciliation reads every view in one snapshot (one log position), loads each buyer's account
aggregate at exactly the version that snapshot has seen, and checks them against each other:
the journal, the per-job settlement rows, the job views that poll serves, the order book's
payouts, the seller earnings, and the buyer balances that ``/v1/buyer/me`` serves. Anything
corrupted in one place disagrees with the others and is named.

The provider's bill is the one outside witness. The simulator bills a key the list price when it
accepts a job, before the engine can record the acceptance, so the bill is bracketed: at least
what the first snapshot shows as accepted, at most what a second snapshot (taken after the bill
was read) shows as accepted or still in doubt.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from domain.aggregates import TERMINAL, BuyerAccount
from domain.money import to_json
from projections.ledger import PLATFORM_FEES, is_debit_normal
from projections.views import Snapshot, Views

# The order checks are reported in, with what each one proves.
CHECKS = {
    "entries_balance": "every journal entry's debits equal its credits",
    "trial_balance": "total debits equal total credits",
    "no_negative_balance": "no buyer, seller or fee account ever goes below zero",
    "holds_resolved_once": "every job holds once and is resolved exactly once when it ends",
    "job_amounts": "per job held = charged + released and charged = seller cost + platform fee,"
    " in the journal, the settlement rows and the job views alike",
    "buyer_balances": "per buyer deposits = available + held + spent, and the journal matches"
    " the account aggregate (what /v1/buyer/me serves)",
    "seller_payouts": "per seller the payable balance matches the earnings and the order book",
    "platform_fees": "the fee account matches the settled platform fees",
    "provider_billing": "what the provider billed each key matches the dispatches it accepted",
}
MAX_BREAKS_PER_CHECK = 50


@dataclass(frozen=True)
class Break:
    check: str
    subject: str
    detail: str


@dataclass
class LedgerState:
    """What a reconciliation reads from one snapshot of the views."""

    position: int
    entries: list[dict[str, Any]]
    orphan_postings: list[dict[str, Any]]
    settlements: dict[str, dict[str, Any]]
    jobs: dict[str, dict[str, Any]]
    trades_by_seller: dict[str, int]
    offers_payout_by_seller: dict[str, int]
    buyer_versions: dict[str, int]
    buyers: set[str]
    default_base_url_keys: dict[str, bool]


@dataclass
class BuyerFigures:
    deposited: int
    available: int
    held: int
    spent: int
    jobs: int


@dataclass
class Billing:
    """A provider's bill per key hash, or why it could not be read."""

    billed: dict[str, int] | None
    unavailable: str | None = None


@dataclass
class Reconciliation:
    position: int
    breaks: list[Break]
    checked: dict[str, int]
    skipped: dict[str, str]
    totals: dict[str, int]
    truncated: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.breaks

    def as_json(self) -> dict[str, Any]:
        return {
            "object": "ledger.reconciliation",
            "ok": self.ok,
            "position": self.position,
            "checks": [
                {
                    "name": name,
                    "description": description,
                    "status": self._status(name),
                    "checked": self.checked.get(name, 0),
                    "breaks": sum(1 for b in self.breaks if b.check == name)
                    + self.truncated.get(name, 0),
                    **({"reason": self.skipped[name]} if name in self.skipped else {}),
                }
                for name, description in CHECKS.items()
            ],
            "breaks": [
                {"check": b.check, "subject": b.subject, "detail": b.detail} for b in self.breaks
            ],
            "totals": {k: to_json(v) if k.endswith("usdc") else v for k, v in self.totals.items()},
        }

    def _status(self, name: str) -> str:
        if name in self.skipped:
            return "skipped"
        failed = any(b.check == name for b in self.breaks)
        return "failed" if failed else "ok"

    def render(self) -> str:
        lines = [f"Reconciliation of the ledger at log position {self.position}", ""]
        width = max(len(n) for n in CHECKS)
        for name, description in CHECKS.items():
            status = self._status(name).upper()
            extra = f" ({self.skipped[name]})" if name in self.skipped else ""
            count = self.checked.get(name, 0)
            lines.append(f"  {status:<7} {name:<{width}}  {count:>7} checked  {description}{extra}")
        lines += ["", "Totals (microdollars):"]
        for key, value in self.totals.items():
            lines.append(f"  {key:<24} {value:>16}")
        if self.breaks:
            lines += ["", f"{len(self.breaks)} break(s):"]
            lines += [f"  [{b.check}] {b.subject}: {b.detail}" for b in self.breaks]
            for name, more in self.truncated.items():
                lines.append(f"  [{name}] ... and {more} more")
        lines += ["", "OK: every invariant holds." if self.ok else "FAILED: see the breaks above."]
        return "\n".join(lines)


# --------------------------------------------------------------------------- reading


def read_state(views: Views, application_name: str) -> LedgerState:
    with views.snapshot(application_name) as s:
        return _read(s)


def _read(s: Snapshot) -> LedgerState:
    entries: dict[str, dict[str, Any]] = {}
    for r in s.all(
        "SELECT e.entry_id, e.seq, e.kind, e.buyer_id, e.job_id, p.line, p.account, p.debit, "
        "p.credit FROM mm_ledger_entries e LEFT JOIN mm_ledger_postings p "
        "ON p.entry_no = e.entry_no ORDER BY e.entry_no, p.line"
    ):
        entry = entries.setdefault(
            r["entry_id"],
            {
                "entry_id": r["entry_id"],
                "seq": r["seq"],
                "kind": r["kind"],
                "buyer_id": r["buyer_id"],
                "job_id": r["job_id"],
                "postings": [],
            },
        )
        if r["account"] is not None:
            entry["postings"].append((r["account"], int(r["debit"]), int(r["credit"])))
    orphans = [
        dict(r)
        for r in s.all(
            "SELECT p.entry_no, p.line, p.account, p.debit, p.credit FROM mm_ledger_postings p "
            "LEFT JOIN mm_ledger_entries e ON e.entry_no = p.entry_no WHERE e.entry_no IS NULL"
        )
    ]
    settlements = {r["job_id"]: dict(r) for r in s.all("SELECT * FROM mm_settlements")}
    jobs = {
        r["job_id"]: {"status": r["status"], "buyer_id": r["buyer_id"], "doc": json.loads(r["doc"])}
        for r in s.all("SELECT job_id, buyer_id, status, doc FROM mm_job_views")
    }
    trades = {
        r["seller_id"]: int(r["payout"])
        for r in s.all(
            "SELECT seller_id, SUM(seller_cost) AS payout FROM mm_trades GROUP BY seller_id"
        )
    }
    offer_payouts = {
        r["seller_id"]: int(r["payout"])
        for r in s.all("SELECT seller_id, SUM(payout) AS payout FROM mm_offers GROUP BY seller_id")
    }
    versions = {
        r["buyer_id"]: int(r["version"])
        for r in s.all("SELECT buyer_id, version FROM mm_ledger_buyers")
    }
    buyers = {
        r["principal_id"]
        for r in s.all("SELECT principal_id FROM mm_principals WHERE kind = 'buyer'")
    }
    # Which keys speak to the configured provider (an offer may name a base URL of its own).
    default_keys: dict[str, bool] = {}
    for r in s.all(
        "SELECT offer_id AS key_id, base_url FROM mm_offers UNION ALL "
        "SELECT provider_id AS key_id, base_url FROM mm_buyer_providers"
    ):
        default_keys[r["key_id"]] = r["base_url"] is None
    return LedgerState(
        position=s.position,
        entries=list(entries.values()),
        orphan_postings=orphans,
        settlements=settlements,
        jobs=jobs,
        trades_by_seller=trades,
        offers_payout_by_seller=offer_payouts,
        buyer_versions=versions,
        buyers=buyers,
        default_base_url_keys=default_keys,
    )


def buyer_figures(
    load: Callable[[UUID, int], BuyerAccount], versions: dict[str, int]
) -> dict[str, BuyerFigures]:
    """Each buyer's account aggregate at the version the snapshot has seen."""
    figures = {}
    for buyer_id, version in versions.items():
        try:
            account = load(UUID(buyer_id), version)
        except AggregateNotFoundError:
            continue  # reported: the journal names a buyer the log doesn't have
        if account.version != version:
            continue
        figures[buyer_id] = BuyerFigures(
            account.deposited, account.available, account.held, account.spent, account.jobs
        )
    return figures


# --------------------------------------------------------------------------- checking


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
    totals["seller_payable_usdc"] = sum(v for a, v in balances.items() if a.startswith("seller:"))
    totals["platform_fees_usdc"] = balances.get(PLATFORM_FEES, 0)
    totals["jobs"] = len(state.settlements)
    totals["jobs_pending"] = sum(1 for r in state.settlements.values() if r["status"] == "pending")
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
        source = entry["entry_id"].rsplit("/", 1)[0]
        if kind == "hold":
            j.holds.append(sum(p[2] for p in entry["postings"]))
        elif kind == "capture":
            j.resolutions.add(source)
            for account, debit, credit in entry["postings"]:
                j.charged += debit
                if account == PLATFORM_FEES:
                    j.platform_fee += credit
                elif account.startswith("seller:"):
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
        status = "pending" if not resolved else "confirmed" if j.charged else "released"
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
            available=balances.get(f"buyer:{buyer_id}:available", 0),
            held=balances.get(f"buyer:{buyer_id}:held", 0),
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
        account.split(":")[1]: balance
        for account, balance in balances.items()
        if account.startswith("seller:")
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


# --------------------------------------------------------------------------- trial balance


@dataclass(frozen=True)
class TrialBalanceLine:
    account: str
    debits: int
    credits: int

    @property
    def balance(self) -> int:
        """On the account's normal side: what is owed to (or earned by) its holder."""
        if is_debit_normal(self.account):
            return self.debits - self.credits
        return self.credits - self.debits


@dataclass
class TrialBalance:
    position: int
    lines: list[TrialBalanceLine]

    @property
    def debits(self) -> int:
        return sum(line.debits for line in self.lines)

    @property
    def credits(self) -> int:
        return sum(line.credits for line in self.lines)

    @property
    def balanced(self) -> bool:
        return self.debits == self.credits

    def as_json(self) -> dict[str, Any]:
        return {
            "object": "ledger.trial_balance",
            "position": self.position,
            "balanced": self.balanced,
            "accounts": [
                {
                    "account": line.account,
                    "normal_side": "debit" if is_debit_normal(line.account) else "credit",
                    "debits_usdc": to_json(line.debits),
                    "credits_usdc": to_json(line.credits),
                    "balance_usdc": to_json(line.balance),
                }
                for line in self.lines
            ],
            "totals": {"debits_usdc": to_json(self.debits), "credits_usdc": to_json(self.credits)},
        }

    def render(self) -> str:
        width = max([len("account"), *(len(line.account) for line in self.lines)])
        out = [
            f"Trial balance at log position {self.position} (microdollars)",
            "",
            f"{'account':<{width}} {'debits':>16} {'credits':>16} {'balance':>16}",
        ]
        for line in self.lines:
            out.append(
                f"{line.account:<{width}} {line.debits:>16} {line.credits:>16} {line.balance:>16}"
            )
        out.append(f"{'total':<{width}} {self.debits:>16} {self.credits:>16}")
        out += ["", "Balanced." if self.balanced else "NOT BALANCED: debits differ from credits."]
        return "\n".join(out)


def trial_balance(views: Views, application_name: str) -> TrialBalance:
    with views.snapshot(application_name) as s:
        rows = s.all(
            "SELECT account, SUM(debit) AS debits, SUM(credit) AS credits "
            "FROM mm_ledger_postings GROUP BY account ORDER BY account"
        )
        return TrialBalance(
            s.position,
            [TrialBalanceLine(r["account"], int(r["debits"]), int(r["credits"])) for r in rows],
        )
