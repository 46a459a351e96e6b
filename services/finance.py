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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError

from domain.aggregates import BuyerAccount
from domain.money import to_json
from projections import accounts, jobviews, ledger_read, orderbook, trades
from projections.ledger import is_debit_normal
from projections.store import Snapshot
from projections.views import Views
from services.finance_report import (
    CHECKS,
    Billing,
    Break,
    BuyerFigures,
    LedgerState,
    Reconciliation,
)
from services.reconcile import reconcile

__all__ = [
    "CHECKS",
    "Billing",
    "Break",
    "BuyerFigures",
    "LedgerState",
    "Reconciliation",
    "TrialBalance",
    "TrialBalanceLine",
    "buyer_figures",
    "read_state",
    "reconcile",
    "trial_balance",
]

# --------------------------------------------------------------------------- reading


def read_state(views: Views, application_name: str) -> LedgerState:
    with views.snapshot(application_name) as s:
        return _read(s)


def _read(s: Snapshot) -> LedgerState:
    # Which keys speak to the configured provider (an offer may name a base URL of its own).
    base_urls = {**orderbook.base_urls(s), **accounts.provider_base_urls(s)}
    return LedgerState(
        position=s.position,
        entries=ledger_read.entries(s),
        orphan_postings=ledger_read.orphan_postings(s),
        settlements=ledger_read.settlements(s),
        jobs=jobviews.every_job(s),
        trades_by_seller=trades.payout_by_seller(s),
        offers_payout_by_seller=orderbook.payout_by_seller(s),
        buyer_versions=ledger_read.buyer_versions(s),
        buyers=accounts.buyer_ids(s),
        default_base_url_keys={key: url is None for key, url in base_urls.items()},
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
        lines = [
            TrialBalanceLine(account, debits, credits)
            for account, debits, credits in ledger_read.account_totals(s)
        ]
        return TrialBalance(s.position, lines)
