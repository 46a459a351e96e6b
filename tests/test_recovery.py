"""Crashes and rebuilds: a SIGKILLed engine picks its jobs up again, and the views are
exactly what the event log says they are."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from projections.views import DIGEST_ORDER
from tests.harness import Client, Server
from tests.test_lifecycle import (
    PIXVERSE,
    RUNWAY,
    SEEDANCE,
    TERMINAL,
    assert_money_invariants,
    billed,
    billed_jobs,
    list_jobs,
    market,
    poll,
    sim_quote,
    submit_ok,
    wait_status,
    wait_until,
)

ServerFactory = Callable[..., Server]
DEPOSIT = 10_000_000


def all_terminal(client: Client, buyer_key: str, job_ids: list[str]) -> bool:
    return all(poll(client, j, buyer_key)["status"] in TERMINAL for j in job_ids)


def test_sigkill_with_jobs_in_flight_recovers(make_server: ServerFactory) -> None:
    # Two kills: the first round is a single kill's whole case (every job in flight); the
    # second kills the restarted engine while the first round's jobs finish and new ones go
    # out, so one more kill would add nothing a separate killed-once run would show.
    kills = 2
    # Slow renders, so every job is accepted by the provider but unfinished at the kill.
    srv = make_server(SIM_RENDER_SECONDS="1.5")
    c = srv.client
    _, buyer_key, seller_key = market(c, DEPOSIT)
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    job_ids: list[str] = []
    for round_ in range(kills):
        if round_:
            srv.start()  # the jobs of the last round finish while this round's go out
        batch = [
            submit_ok(c, buyer_key, prompt=f"in flight {round_}.{n}")["id"]
            for n in range(10 if round_ == 0 else 5)
        ]
        # Kill once every queue call has been answered and recorded: a kill in the middle of
        # one is the unknowable case (upstream_unknown), which is not what this test is about.
        for job_id in batch:
            wait_status(c, job_id, buyer_key, ("submitted", "running"))
        job_ids += batch
        srv.kill()

    # While the engine is down, an API-only process keeps taking jobs; they wait, queued.
    api = make_server("--no-worker", SIM_RENDER_SECONDS="1.5")
    queued = [submit_ok(api.client, buyer_key, prompt=f"queued {n}")["id"] for n in range(3)]
    assert all(poll(api.client, j, buyer_key)["status"] == "queued" for j in queued)
    api.kill()

    srv.start()
    job_ids += queued
    wait_until(lambda: all_terminal(c, buyer_key, job_ids), timeout=60, what="every job to end")
    jobs = assert_money_invariants(c, buyer_key, DEPOSIT)
    expected = 18
    assert len(jobs) == len(job_ids) == expected
    assert all(j["status"] == "succeeded" for j in jobs), [
        (j["status"], j.get("error")) for j in jobs
    ]
    assert all(len(j["results"]) == 1 for j in jobs)
    for j in jobs[:2]:
        assert c.get(j["results"][0]["download_url"], key=buyer_key).status == 200
    # The provider was sent each job exactly once: never queued again after the restart.
    list_price = sim_quote(c, "seedance-2-fast-t2v", 4, audio=False)
    assert billed_jobs(c, "sim_ok") == expected
    assert billed(c, "sim_ok") == expected * list_price


def test_sigkill_during_a_queue_call_ends_upstream_unknown(make_server: ServerFactory) -> None:
    """Killed between "sending the job" and "hearing back": the one unknowable step (SPEC 3)."""
    srv = make_server(PROVIDER_QUEUE_TIMEOUT_SECONDS="30")
    c = srv.client
    _, buyer_key, seller_key = market(c, DEPOSIT)
    c.create_offer(seller_key, SEEDANCE, "sim_queue_timeout", "0.80")
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.85")
    job = submit_ok(c, buyer_key)

    def in_flight() -> bool:
        # The dispatch attempt is recorded (its price shows, still pending) before the call.
        doc = poll(c, job["id"], buyer_key)
        return doc["status"] == "queued" and doc["usage"]["buyer_cost_usdc"] != "0"

    wait_until(in_flight, timeout=10, what="the queue call to be under way", interval=0.05)
    srv.kill()
    srv.start()
    done = c.wait_terminal(job["id"], buyer_key)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "upstream_unknown" and done["error"]["retryable"] is False
    assert done["usage"] == {
        "seller_cost_usdc": "0",
        "buyer_cost_usdc": "0",
        "settlement_status": "released",
    }
    # Never failed over: the other seller was not sent the job after the restart either.
    assert billed(c, "sim_ok") == 0
    assert_money_invariants(c, buyer_key, DEPOSIT)


def _served(client: Client, buyer_key: str, seller_key: str) -> dict[str, Any]:
    """What the API serves from the views, minus the per-request signed URLs."""

    def strip(doc: dict[str, Any]) -> dict[str, Any]:
        return {
            **doc,
            "results": [{k: v for k, v in r.items() if k != "url"} for r in doc["results"]],
        }

    jobs = [strip(j) for j in list_jobs(client, buyer_key)]
    polled = [strip(poll(client, j["id"], buyer_key)) for j in jobs]
    offers = client.get("/v1/seller/offers", key=seller_key).json()
    # An offer's health is its stored backoff seen from now: a backoff that ran out between the
    # two looks (a slow machine) changes it; the stored time is in the digests compared above.
    for offer in offers["data"]:
        offer.pop("health")
    me = client.get("/v1/buyer/me", key=buyer_key).json()
    return {"jobs": jobs, "polled": polled, "offers": offers, "me": me}


def _digest(srv: Server) -> str:
    result = srv.cli("projections", "digest")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    # A header and one line per view table.
    assert len(lines) == 1 + len(DIGEST_ORDER) and lines[0].split()[0] == "view", result.stdout
    return result.stdout


def test_projection_rebuild_is_byte_identical(server: Server) -> None:
    c = server.client
    _, buyer_key, seller_key = market(c, DEPOSIT)
    # Seedance: a rate-limited cheapest offer, then a good one (a failover, a backoff).
    c.create_offer(seller_key, SEEDANCE, "sim_429", "0.80")
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.85")
    c.create_offer(seller_key, RUNWAY, "sim_fail_inference", "0.80")
    c.create_offer(seller_key, PIXVERSE, "sim_never", "0.80")

    ok = [submit_ok(c, buyer_key, prompt=f"ok {n}", metadata={"n": str(n)}) for n in range(3)]
    failing = submit_ok(c, buyer_key, model=RUNWAY)
    never = submit_ok(c, buyer_key, model=PIXVERSE)
    wait_status(c, never["id"], buyer_key, ("submitted", "running"))
    canceled = c.delete(f"/v1/video/generations/{never['id']}", key=buyer_key)
    assert canceled.json()["status"] == "canceled"
    job_ids = [j["id"] for j in [*ok, failing, never]]
    wait_until(lambda: all_terminal(c, buyer_key, job_ids), timeout=30, what="every job to end")
    statuses = sorted(poll(c, j, buyer_key)["status"] for j in job_ids)
    assert statuses == ["canceled", "failed", "succeeded", "succeeded", "succeeded"]
    assert_money_invariants(c, buyer_key, DEPOSIT)

    # The tail of a job (the provider copy's deletion) is written just after it ends: wait for
    # the views to stop changing before taking the live digest. The views change only by
    # applying the log, so their position standing still for a second is that, and polling it
    # over HTTP costs nothing like a digest process per look.
    positions: list[int] = []

    def settled() -> bool:
        positions.append(c.get("/healthz").json()["projection_position"])
        return len(positions) >= 4 and len(set(positions[-4:])) == 1

    wait_until(settled, timeout=15, what="the views to settle", interval=0.3)
    before = _digest(server)
    served_before = _served(c, buyer_key, seller_key)

    server.stop()
    stopped = _digest(server)
    assert stopped == before, (before, stopped)
    rebuilt = server.cli("projections", "rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "CHANGED" not in rebuilt.stdout, rebuilt.stdout
    assert rebuilt.stdout.count("identical") == len(DIGEST_ORDER), rebuilt.stdout
    rebuilt_digest = _digest(server)
    assert rebuilt_digest == before, (before, rebuilt_digest)

    server.start()
    assert _served(c, buyer_key, seller_key) == served_before
