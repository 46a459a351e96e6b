"""Finance and audit routes: trial balance, reconciliation, CSV exports (SPEC 6)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from aiohttp import web
from pydantic import Field

from adapters.simulator import BillingUnavailable, read_billing
from api.body import parse_query
from api.bootstrap import Engine
from api.errors import invalid
from api.http import engine_of, reply, require, require_admin
from api.routes import CSV, Reply, Route
from api.schemas.accounts import QueryDay
from api.schemas.common import Query
from api.schemas.system import Reconciliation, TrialBalance
from services import exports, finance

READ_YOUR_WRITES_SECONDS = 30.0


async def caught_up_with_log(engine: Engine) -> None:
    """Bring the views up to everything written so far, so a report covers it."""
    end = await engine.blocking(engine.market.recorder.max_notification_id) or 0
    await engine.caught_up(end, READ_YOUR_WRITES_SECONDS)


async def reconcile(engine: Engine) -> finance.Reconciliation:
    """Check every invariant of SPEC 1 at the views' current position (see services.finance)."""
    await caught_up_with_log(engine)
    state = await engine.blocking(finance.read_state, engine.views, engine.market.name)
    try:
        billed = await read_billing(engine.outbound.session, engine.base_urls["venice"])
        billing = finance.Billing(billed)
        # The bill may include dispatches accepted after the first snapshot: bracket it.
        await caught_up_with_log(engine)
        later = await engine.blocking(finance.read_state, engine.views, engine.market.name)
    except BillingUnavailable as e:
        billing, later = finance.Billing(None, str(e)), state
    repository = engine.market.repository

    def load(buyer_id: Any, version: int) -> Any:
        return repository.get(buyer_id, version=version)

    buyers = await engine.blocking(finance.buyer_figures, load, state.buyer_versions)
    return finance.reconcile(state, buyers, billing, later)


def _csv_response(columns: list[str], rows: list[list[Any]], filename: str) -> web.Response:
    return web.Response(
        text=exports.to_csv(columns, rows),
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


class ExportRange(Query):
    problems: ClassVar[dict[str, str]] = {
        "format": "format must be csv",
        "from": "from must be a date as YYYY-MM-DD",
        "to": "to must be a date as YYYY-MM-DD",
    }

    format: Literal["csv"] = Field(default="csv", description="Only CSV")
    from_: QueryDay | None = Field(default=None, alias="from", description="First UTC day")
    to: QueryDay | None = Field(default=None, description="Last UTC day")


def _range(request: web.Request) -> tuple[str | None, str | None]:
    query = parse_query(request, ExportRange)
    first, last = query.from_, query.to
    if first is not None and last is not None and first > last:
        raise invalid("from must not be after to", "from")
    return first, last


def _filename(stem: str, first: str | None, last: str | None) -> str:
    return f"{stem}_{first or 'start'}_{last or 'now'}.csv"


async def trial_balance(request: web.Request) -> web.Response:
    require_admin(request)
    engine = engine_of(request)
    await caught_up_with_log(engine)
    balance = await engine.blocking(finance.trial_balance, engine.views, engine.market.name)
    return reply(TrialBalance, balance.as_json())


async def reconciliation(request: web.Request) -> web.Response:
    require_admin(request)
    report = await reconcile(engine_of(request))
    return reply(Reconciliation, report.as_json())


async def _ledger_export(
    request: web.Request, rows_of: Any, columns: list[str], stem: str
) -> web.Response:
    require_admin(request)
    first, last = _range(request)
    engine = engine_of(request)
    await caught_up_with_log(engine)
    rows = await engine.blocking(rows_of, engine.views, engine.market.name, first, last)
    return _csv_response(columns, rows, _filename(stem, first, last))


async def journal_export(request: web.Request) -> web.Response:
    return await _ledger_export(request, exports.journal_rows, exports.JOURNAL_COLUMNS, "journal")


async def settlements_export(request: web.Request) -> web.Response:
    return await _ledger_export(
        request, exports.settlement_rows, exports.SETTLEMENT_EXPORT_COLUMNS, "settlements"
    )


async def usage_export(request: web.Request) -> web.Response:
    """The buyer's jobs created between two UTC days, one CSV row each."""
    buyer_id = await require(request, "buyer")
    first, last = _range(request)
    engine = engine_of(request)
    rows = await engine.blocking(
        exports.usage_rows, engine.views, engine.market.name, buyer_id, first, last
    )
    return _csv_response(exports.USAGE_COLUMNS, rows, _filename("usage", first, last))


FINANCE_ROUTES: list[Route] = [
    Route(
        "GET",
        "/admin/ledger/trial-balance",
        trial_balance,
        name="get_trial_balance",
        summary="Trial balance of the ledger (admin)",
        tag="finance",
        auth=("admin",),
        replies={200: Reply("Every account's debits, credits and balance", TrialBalance)},
    ),
    Route(
        "GET",
        "/admin/ledger/reconciliation",
        reconciliation,
        name="get_reconciliation",
        summary="Check every money invariant (admin)",
        tag="finance",
        auth=("admin",),
        replies={200: Reply("Each check's outcome and every break found", Reconciliation)},
    ),
    Route(
        "GET",
        "/admin/ledger/journal",
        journal_export,
        name="export_journal",
        summary="Journal CSV, from/to by posting day (admin)",
        tag="finance",
        auth=("admin",),
        query=ExportRange,
        replies={200: CSV},
    ),
    Route(
        "GET",
        "/admin/ledger/settlements",
        settlements_export,
        name="export_settlements",
        summary="Per-job settlement CSV, from/to by creation day (admin)",
        tag="finance",
        auth=("admin",),
        query=ExportRange,
        replies={200: CSV},
    ),
    Route(
        "GET",
        "/v1/buyer/usage/export",
        usage_export,
        name="export_usage",
        summary="Your jobs as CSV, from/to by creation day",
        tag="buyers",
        auth=("buyer",),
        query=ExportRange,
        replies={200: CSV},
    ),
]
