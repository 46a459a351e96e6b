"""Issue 4's done-when: a mixed run through the real server, then the ledger proves it.

Successes, refusals with failover, failures after acceptance, cancels before and after dispatch
and expiries, with a platform fee; then ``ledger reconcile`` passes and its figures are the API's;
the trial balance, the journal and the exports agree; and corrupting one projection row by hand
makes both ``replay --verify`` and ``reconcile`` fail and name it.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerFactory
from tests.harness import ADMIN_TOKEN, Client, Server, base_env, free_port
from tests.test_lifecycle import (
    PIXVERSE,
    RUNWAY,
    SEEDANCE,
    TERMINAL,
    list_jobs,
    poll,
    submit_ok,
    wait_until,
)

DEPOSIT = 50_000_000
# A few hundred jobs, as the issue asks, plus three that wait behind a full offer.
JOBS = 300
FEES = {"FEE_MULTIPLIER_BPS": "11000", "FLAT_FEE_USDC": "1000", "JOB_TTL_SECONDS": "10"}


def _csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def _all_terminal(c: Client, keys: list[str]) -> bool:
    return all(j["status"] in TERMINAL for key in keys for j in list_jobs(c, key))


def _mixed_run(make_server: ServerFactory, jobs: int) -> tuple[Server, dict[str, Any]]:
    """Two buyers and two sellers; every way a job can end. Returns the server and who is who."""
    # First an API-only engine: its jobs wait, queued, so one can be canceled before dispatch.
    api = make_server("--no-worker", **FEES)
    c = api.client
    buyers = [c.create_buyer(DEPOSIT, name=f"buyer {n}") for n in range(2)]
    sellers = [c.create_seller(f"seller {n}") for n in range(2)]
    (_, key_a), (_, key_b) = sellers
    c.create_offer(key_a, SEEDANCE, "sim_429", "0.70")  # refuses: the first job fails over
    c.create_offer(key_a, SEEDANCE, "sim_ok", "0.80")
    c.create_offer(key_b, SEEDANCE, "sim_flaky", "0.90")
    c.create_offer(key_b, RUNWAY, "sim_fail_inference", "0.80")
    # One slot that a job holds until it ends: the next one waits behind it.
    c.create_offer(key_b, PIXVERSE, "sim_never", "0.80", max_concurrent_jobs=1)
    stuck = [submit_ok(c, buyers[n % 2][1], model=PIXVERSE)["id"] for n in range(3)]
    assert c.delete(f"/v1/video/generations/{stuck[2]}", key=buyers[0][1]).status == 200
    api.kill()

    server = make_server(**FEES)
    c = server.client
    # Whichever waiting job gets the slot is canceled after dispatch (charged); the one behind
    # it then runs until it expires.
    owners = {stuck[0]: buyers[0][1], stuck[1]: buyers[1][1]}

    def dispatched() -> str | None:
        running = [j for j, key in owners.items() if poll(c, j, key)["status"] != "queued"]
        return running[0] if running else None

    first = wait_until(dispatched, timeout=20, what="a pixverse job to be dispatched")
    assert c.delete(f"/v1/video/generations/{first}", key=owners[first]).status == 200
    for n in range(jobs):
        _, key = buyers[n % 2]
        model = (SEEDANCE, SEEDANCE, SEEDANCE, RUNWAY)[n % 4]
        submit_ok(c, key, model=model, metadata={"n": str(n)})
    keys = [key for _, key in buyers]
    wait_until(lambda: _all_terminal(c, keys), timeout=60, what="every job to end")
    statuses = {j["status"] for key in keys for j in list_jobs(c, key)}
    assert statuses == {"succeeded", "failed", "canceled", "expired"}, statuses
    return server, {"buyers": buyers, "sellers": sellers}


@pytest.fixture(scope="module")
def mixed_run(module_make_server: ServerFactory) -> tuple[Server, dict[str, Any]]:
    """One mixed run per backend, shared: the first test only reads it, the second (after it,
    in file order) corrupts its views."""
    return _mixed_run(module_make_server, jobs=JOBS)


def _reconcile(server: Server, *, text: bool = True) -> tuple[int, dict[str, Any], str]:
    """The exit code (of the text form, or of ``--json`` without it), the JSON report and the
    text. Both forms exit alike; the text form is run where what it says is checked."""
    as_json = server.cli("ledger", "reconcile", "--json")
    assert as_json.stdout.startswith("{"), as_json.stderr[-3000:]
    report = json.loads(as_json.stdout)
    if not text:
        return as_json.returncode, report, as_json.stdout + as_json.stderr
    rendered = server.cli("ledger", "reconcile")
    assert rendered.returncode == as_json.returncode, rendered.stdout + as_json.stdout
    return rendered.returncode, report, rendered.stdout + rendered.stderr


def test_mixed_run_reconciles_and_matches_the_api(
    mixed_run: tuple[Server, dict[str, Any]],
) -> None:
    server, who = mixed_run
    c = server.client

    code, report, text = _reconcile(server)
    assert code == 0, text
    assert report["ok"] and not report["breaks"], text
    checks = {check["name"]: check for check in report["checks"]}
    assert all(check["status"] == "ok" for check in checks.values()), text
    assert checks["provider_billing"]["checked"] == 3, text  # ok, fail_inference, never
    assert checks["holds_resolved_once"]["checked"] == JOBS + 3

    # The reconciliation's totals are the buyers' and sellers' own API figures.
    me = [c.get("/v1/buyer/me", key=key).json()["balance"] for _, key in who["buyers"]]
    totals = report["totals"]
    for name in ("available", "held", "spent"):
        assert int(totals[f"{name}_usdc"]) == sum(int(b[f"{name}_usdc"]) for b in me), name
    assert int(totals["deposits_usdc"]) == 2 * DEPOSIT
    assert int(totals["held_usdc"]) == 0
    earnings = [c.get("/v1/seller/earnings", key=key).json() for _, key in who["sellers"]]
    assert int(totals["seller_payable_usdc"]) == sum(int(e["payout_usdc"]) for e in earnings)
    assert int(totals["platform_fees_usdc"]) > 0

    # The trial balance, per account, through the admin API.
    r = c.get("/admin/ledger/trial-balance", key=ADMIN_TOKEN)
    assert r.status == 200, r.body
    trial = r.json()
    assert trial["balanced"] and trial["totals"]["debits_usdc"] == trial["totals"]["credits_usdc"]
    balances = {a["account"]: int(a["balance_usdc"]) for a in trial["accounts"]}
    for (buyer_id, _), balance in zip(who["buyers"], me, strict=True):
        assert balances[f"buyer:{buyer_id}:available"] == int(balance["available_usdc"])
        assert balances[f"buyer:{buyer_id}:held"] == 0
    for (seller_id, _), earned in zip(who["sellers"], earnings, strict=True):
        assert balances[f"seller:{seller_id}:payable"] == int(earned["payout_usdc"])
    assert balances["external:deposits"] == 2 * DEPOSIT
    assert balances["platform:fees"] == int(totals["platform_fees_usdc"])
    assert c.get("/admin/ledger/trial-balance").status == 401
    cli_trial = server.cli("ledger", "trial-balance")
    assert cli_trial.returncode == 0 and "Balanced." in cli_trial.stdout, cli_trial.stdout

    # The journal: the CLI and the API export the same rows; every entry balances.
    r = c.get("/admin/ledger/journal?format=csv", key=ADMIN_TOKEN)
    assert r.status == 200 and r.headers["content-type"].startswith("text/csv"), r.body
    journal = _csv(r.body.decode())
    cli_journal = server.cli("ledger", "journal")
    assert cli_journal.returncode == 0, cli_journal.stderr
    assert _csv(cli_journal.stdout) == journal
    sums: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in journal:
        sums[row["entry_id"]][0] += int(row["debit_usdc"])
        sums[row["entry_id"]][1] += int(row["credit_usdc"])
    assert all(d == c_ for d, c_ in sums.values())
    kinds = {row["kind"] for row in journal}
    assert kinds == {"deposit", "hold", "capture", "release"}
    today = journal[0]["posted_at"][:10]
    ranged = c.get(f"/admin/ledger/journal?from={today}&to={today}", key=ADMIN_TOKEN)
    assert _csv(ranged.body.decode()) == journal
    empty = c.get("/admin/ledger/journal?from=2001-01-01&to=2001-01-31", key=ADMIN_TOKEN)
    assert _csv(empty.body.decode()) == []
    bad = c.get("/admin/ledger/journal?from=yesterday", key=ADMIN_TOKEN)
    assert bad.status == 400 and bad.json()["error"]["param"] == "from"

    # Per-job settlements: one row per job; held = charged + released on each.
    r = c.get("/admin/ledger/settlements?format=csv", key=ADMIN_TOKEN)
    settlements = _csv(r.body.decode())
    assert len(settlements) == JOBS + 3
    for row in settlements:
        assert int(row["held_usdc"]) == int(row["charged_usdc"]) + int(row["released_usdc"])
        assert int(row["charged_usdc"]) == int(row["seller_cost_usdc"]) + int(
            row["platform_fee_usdc"]
        )
    assert {row["settlement_status"] for row in settlements} == {"confirmed", "released"}

    # The buyer's usage export: their jobs only, with what poll says about each.
    buyer_key = who["buyers"][0][1]
    r = c.get(f"/v1/buyer/usage/export?format=csv&from={today}&to={today}", key=buyer_key)
    assert r.status == 200 and r.headers["content-type"].startswith("text/csv"), r.body
    usage = _csv(r.body.decode())
    newest_first = list_jobs(c, buyer_key)
    jobs = {j["id"]: j for j in newest_first}
    assert [row["job_id"] for row in usage] == [j["id"] for j in reversed(newest_first)]
    assert list(usage[0]) == [
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
    for row in usage:
        job = jobs[row["job_id"]]
        assert row["status"] == job["status"]
        assert row["model"] == job["model"]
        assert row["estimated_usdc"] == job["estimated_cost_usdc"]
        assert row["charged_usdc"] == job["usage"]["buyer_cost_usdc"]
        assert row["settlement_status"] == job["usage"]["settlement_status"]
        defaults = {SEEDANCE: ("4", "480p"), RUNWAY: ("5", "720p"), PIXVERSE: ("5", "720p")}
        assert (row["seconds"], row["resolution"]) == defaults[row["model"]]
    assert c.get("/v1/buyer/usage/export?format=xlsx", key=buyer_key).status == 400
    assert c.get("/v1/buyer/usage/export").status == 401


def _corrupt(server: Server, statement: str) -> None:
    """An operator's hand edit of one projection row, straight in the database."""
    url = server.env["DATABASE_URL"]
    if url.startswith("sqlite"):
        path = Path(url.removeprefix("sqlite:///")) / "views.db"
        with sqlite3.connect(path) as db:
            assert db.execute(statement).rowcount == 1
        return
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute(statement).rowcount == 1


def test_corrupting_one_row_is_named_by_replay_and_reconcile(
    mixed_run: tuple[Server, dict[str, Any]],
) -> None:
    server, who = mixed_run
    c = server.client
    buyer_key = who["buyers"][0][1]
    verified = server.cli("replay", "--verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "DIFFERENT" not in verified.stdout and "mm_ledger_postings" in verified.stdout
    assert _reconcile(server, text=False)[0] == 0

    # Jobs that ran and were charged: each has a capture and a confirmed settlement.
    jobs = [j["id"] for j in list_jobs(c, buyer_key) if j["status"] == "succeeded"]
    assert len(jobs) >= 2

    # One capture's seller posting inflated by a microdollar.
    victim = jobs[0]
    _corrupt(
        server,
        "UPDATE mm_ledger_postings SET credit = credit + 1 WHERE line = 1 AND entry_no = "
        f"(SELECT entry_no FROM mm_ledger_entries WHERE job_id = '{victim}' AND kind = 'capture')",
    )
    replayed = server.cli("replay", "--verify")
    assert replayed.returncode == 1, replayed.stdout
    assert "mm_ledger_postings" in replayed.stdout and "differs" in replayed.stdout
    code, report, text = _reconcile(server)
    assert code == 1, text
    named = [b for b in report["breaks"] if victim in b["subject"]]
    assert {b["check"] for b in named} >= {"entries_balance", "job_amounts"}, text
    assert f"job {victim}" in text

    # A job view serving the wrong charge is named too, by table and by job.
    other = jobs[1]
    _corrupt(
        server,
        'UPDATE mm_job_views SET doc = REPLACE(doc, \'"settlement_status":"confirmed"\', '
        f"'\"settlement_status\":\"released\"') WHERE job_id = '{other}'",
    )
    replayed = server.cli("replay", "--verify")
    assert replayed.returncode == 1
    assert f"mm_job_views: row {other} differs" in replayed.stdout, replayed.stdout
    code, report, text = _reconcile(server, text=False)
    assert code == 1
    assert any(
        b["subject"] == f"job {other}" and "mm_job_views" in b["detail"] for b in report["breaks"]
    ), text


@pytest.mark.parametrize("args", [("ledger", "journal", "--from", "2026-13-01"), ("replay",)])
def test_cli_rejects_bad_arguments(tmp_path: Path, args: tuple[str, ...]) -> None:
    # Refused by the argument parser, before any database is opened: no engine, one backend.
    port = free_port()
    result = Server(tmp_path, base_env(f"sqlite:///{tmp_path}/data", port), port, []).cli(*args)
    assert result.returncode == 2, result.stdout + result.stderr
