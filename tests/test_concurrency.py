"""Contention and several processes on one database: holds never overdraw, reads see writes."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tests.harness import Response, Server
from tests.test_lifecycle import (
    PENDING,
    SEEDANCE,
    SEEDANCE_LIST_PRICE,
    assert_money_invariants,
    billed,
    buyer_cost,
    list_jobs,
    market,
    poll,
    submit_ok,
    wait_status,
)

ServerFactory = Callable[..., Server]


def test_concurrent_submits_never_overdraw(server: Server) -> None:
    c = server.client
    # sim_never keeps every accepted job pending, so no settlement frees funds mid-burst.
    _, probe_key, seller_key = market(c)
    c.create_offer(seller_key, SEEDANCE, "sim_never", "0.80")
    probe = submit_ok(c, probe_key)
    max_cost = int(probe["max_cost_usdc"])
    assert max_cost == -(-buyer_cost(SEEDANCE_LIST_PRICE, 80) * 11 // 10)

    deposit = 10 * max_cost + max_cost - 1
    _, buyer_key = c.create_buyer(deposit_usdc=deposit, name="contended")
    start = threading.Barrier(50)

    def one(n: int) -> Response:
        start.wait()
        return c.submit(buyer_key, prompt=f"concurrent submit {n}")

    with ThreadPoolExecutor(50) as pool:
        responses = list(pool.map(one, range(50)))

    statuses = Counter(r.status for r in responses)
    assert statuses == {202: 10, 402: 40}, [(r.status, r.body[:200]) for r in responses]
    for r in responses:
        if r.status == 402:
            assert r.json()["error"]["code"] == "insufficient_balance"
    accepted = {r.json()["id"] for r in responses if r.status == 202}
    jobs = list_jobs(c, buyer_key)
    assert {j["id"] for j in jobs} == accepted and len(jobs) == 10
    balance = c.get("/v1/buyer/me", key=buyer_key).json()["balance"]
    assert balance == {
        "available_usdc": str(max_cost - 1),
        "held_usdc": str(10 * max_cost),
        "spent_usdc": "0",
        "deposited_usdc": str(deposit),
    }

    # Cancel them all (after dispatch each is billed) and the books still balance.
    for job_id in accepted:
        wait_status(c, job_id, buyer_key, ("submitted", "running"))
        r = c.delete(f"/v1/video/generations/{job_id}", key=buyer_key)
        assert r.status == 200 and r.json()["status"] == "canceled", r.body
    jobs = assert_money_invariants(c, buyer_key, deposit)
    assert sum(int(j["usage"]["buyer_cost_usdc"]) for j in jobs) == 10 * buyer_cost(
        SEEDANCE_LIST_PRICE, 80
    )
    # The probe job and the ten canceled ones: eleven jobs billed on the seller's key.
    assert billed(c, "sim_never") == 11 * SEEDANCE_LIST_PRICE


def test_read_your_writes_across_processes(server: Server, make_server: ServerFactory) -> None:
    a = server
    b = make_server("--no-worker")
    ca, cb = a.client, b.client
    _, buyer_key, seller_key = market(ca)
    ca.create_offer(seller_key, SEEDANCE, "sim_never", "0.80")

    for n in range(20):
        # Mostly as the brief goes (write on A, read on B, cancel on B, read on A); every
        # fourth round the other way around.
        writer, reader = (ca, cb) if n % 4 else (cb, ca)
        job = submit_ok(writer, buyer_key, prompt=f"read your writes {n}")
        seen = reader.get(f"/v1/video/generations/{job['id']}", key=buyer_key)
        assert seen.status in (200, 202), (n, seen.status, seen.body)
        assert seen.json()["id"] == job["id"] and seen.json()["status"] in PENDING

        # Cancel once dispatched, so the cancel finishes the job in the request itself.
        wait_status(reader, job["id"], buyer_key, ("submitted", "running"))
        r = reader.delete(f"/v1/video/generations/{job['id']}", key=buyer_key)
        assert r.status == 200 and r.json()["status"] == "canceled", r.body
        after = writer.get(f"/v1/video/generations/{job['id']}", key=buyer_key)
        assert after.status == 200, (n, after.status, after.body)
        assert after.json()["status"] == "canceled"
        assert after.json()["usage"] == r.json()["usage"]
        assert after.json()["usage"]["settlement_status"] == "confirmed"

    jobs = assert_money_invariants(ca, buyer_key, 10_000_000)
    assert len(jobs) == 20 and all(j["status"] == "canceled" for j in jobs)
    assert poll(cb, jobs[0]["id"], buyer_key) == poll(ca, jobs[0]["id"], buyer_key)
