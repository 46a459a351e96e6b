"""What a reconciliation reads and reports: the state of one snapshot of the views, the
figures of the buyers' account aggregates, the provider's bill, and the result (``Reconciliation``
with its breaks). The checks themselves are in ``services.reconcile``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from domain.money import to_json

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
