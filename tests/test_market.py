"""The marketplace through the API alone (issue 3): order book, market data, health, capacity,
seller earnings and buyer-owned provider keys, on both backends."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote
from uuid import UUID

from adapters.eventstore import open_market
from tests.harness import BIN, Client, Server, free_port
from tests.test_lifecycle import (
    PENDING,
    PIXVERSE,
    RUNWAY,
    SEEDANCE,
    SEEDANCE_LIST_PRICE,
    assert_money_invariants,
    billed,
    list_jobs,
    poll,
    submit_ok,
    wait_status,
    wait_until,
)

DEPOSIT = 10_000_000


def book(c: Client, model: str) -> dict[str, Any]:
    r = c.get(f"/api/markets/{quote(model, safe='')}")
    assert r.status == 200, r.body
    return dict(r.json())


def markets(c: Client) -> dict[str, dict[str, Any]]:
    r = c.get("/api/markets")
    assert r.status == 200, r.body
    return {m["model"]: m for m in r.json()["data"]}


def seller(c: Client, name: str) -> tuple[str, str]:
    return c.create_seller(name)


def test_done_when_three_sellers_compete(server: Server) -> None:
    """The issue's acceptance scenario, step by step, through the public API."""
    c = server.client
    _, buyer_key = c.create_buyer(DEPOSIT)
    sellers = {m: seller(c, f"seller {m}") for m in ("0.90", "0.70", "0.80")}
    offers = {m: c.create_offer(key, SEEDANCE, "sim_ok", m) for m, (_, key) in sellers.items()}

    # The book: every active offer, cheapest first, priced for the default parameters
    # (4 s at 480p: 0.16 USD list).
    ob = book(c, SEEDANCE)
    assert ob["object"] == "order_book" and ob["model"] == SEEDANCE
    assert [e["cost_multiplier"] for e in ob["offers"]] == ["0.70", "0.80", "0.90"]
    assert [e["estimated_cost_usdc"] for e in ob["offers"]] == ["112000", "128000", "144000"]
    assert [e["discount_percent"] for e in ob["offers"]] == ["30", "20", "10"]
    assert [e["seller_id"] for e in ob["offers"]] == [
        sellers[m][0] for m in ("0.70", "0.80", "0.90")
    ]
    assert all(e["list_price_usdc"] == str(SEEDANCE_LIST_PRICE) for e in ob["offers"])
    assert all(e["health"] == {"status": "healthy"} and e["available"] for e in ob["offers"])
    assert ob["estimated_cost_usdc"] == "112000" and ob["discount_percent"] == "30"
    assert ob["sellers"] == {"active": 3, "healthy": 3}
    # The alias reaches the same book.
    assert book(c, "venice-video-gen")["offers"] == ob["offers"]

    # /min25/ goes to the 0.70 seller.
    r = c.submit(buyer_key, prefix="/min25", model=SEEDANCE)
    assert r.status == 202, r.body
    first = c.wait_terminal(r.json()["id"], buyer_key)
    assert first["status"] == "succeeded"
    assert first["usage"]["seller_cost_usdc"] == "112000"

    # /min35/: nobody offers 35%; the error names the best there is.
    r = c.submit(buyer_key, prefix="/min35", model=SEEDANCE)
    assert r.status == 503, r.body
    error = r.json()["error"]
    assert error["code"] == "minimum_discount_not_met"
    assert "30%" in error["message"]

    # The 0.70 seller's key now refuses queue calls (402). The buyer, wanting room to fail
    # over, sends its own ceiling: the job fails over to 0.80 within it, and the book shows the
    # 0.70 offer backing off. (The plain hold, 123200, would not cover the 0.80 offer.)
    cheap_key = sellers["0.70"][1]
    r = c.patch(
        f"/v1/seller/offers/{offers['0.70']['id']}", key=cheap_key, json_body={"api_key": "sim_402"}
    )
    assert r.status == 200, r.body
    r = c.submit(buyer_key, model=SEEDANCE, max_cost_usdc="150000")
    assert r.status == 202, r.body
    assert (r.json()["estimated_cost_usdc"], r.json()["max_cost_usdc"]) == ("112000", "150000")
    second = c.wait_terminal(r.json()["id"], buyer_key)
    assert second["status"] == "succeeded"
    assert second["usage"]["seller_cost_usdc"] == "128000"

    ob = book(c, SEEDANCE)
    by_multiplier = {e["cost_multiplier"]: e for e in ob["offers"]}
    backing_off = by_multiplier["0.70"]
    assert backing_off["health"]["status"] == "backoff"
    assert backing_off["health"]["until"] > time.time()
    assert "402" in backing_off["health"]["reason"]
    assert backing_off["available"] is False
    assert by_multiplier["0.80"]["health"] == {"status": "healthy"}
    # The best estimate skips the offer in backoff; it still counts as active, not healthy.
    assert ob["estimated_cost_usdc"] == "128000" and ob["discount_percent"] == "20"
    assert ob["sellers"] == {"active": 3, "healthy": 2}

    # Market stats: two settled marketplace jobs, by buyer cost.
    summary = markets(c)[SEEDANCE]
    assert summary["last_24h"] == {"jobs": 2, "volume_usdc": "240000"}
    assert summary["all_time"] == {"jobs": 2, "volume_usdc": "240000"}
    assert summary["estimated_cost_usdc"] == "128000"
    assert summary["offer_counts"] == {"active": 3, "available": 2}
    assert markets(c)[RUNWAY]["estimated_cost_usdc"] is None
    models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert models[SEEDANCE]["estimated_cost_usdc"] == "128000"
    assert models[SEEDANCE]["discount_percent"] == "20"

    # Each seller sees what they earned, by model and day.
    today = dt.datetime.now(dt.UTC).date().isoformat()
    for multiplier, payout, jobs in (
        ("0.70", "112000", 1),
        ("0.80", "128000", 1),
        ("0.90", "0", 0),
    ):
        r = c.get("/v1/seller/earnings", key=sellers[multiplier][1])
        assert r.status == 200, r.body
        earned = r.json()
        assert earned["jobs"] == jobs and earned["payout_usdc"] == payout
        if jobs:
            assert earned["by_model"] == [{"model": SEEDANCE, "jobs": 1, "payout_usdc": payout}]
            assert earned["by_day"][0]["day"] == today
    assert_money_invariants(c, buyer_key, DEPOSIT)


def test_order_book_reads_its_writes_and_errors(server: Server) -> None:
    c = server.client
    _, seller_key = c.create_seller()
    offer = c.create_offer(seller_key, PIXVERSE, "sim_ok", "0.60", max_concurrent_jobs=3)
    # Create, PATCH and DELETE show in the very next read.
    [entry] = book(c, PIXVERSE)["offers"]
    assert entry["offer_id"] == offer["id"]
    assert entry["capacity"] == {"max_concurrent_jobs": 3, "in_flight": 0, "left": 3}
    r = c.patch(f"/v1/seller/offers/{offer['id']}", key=seller_key, json_body={"paused": True})
    assert r.status == 200 and r.json()["state"] == "paused"
    assert book(c, PIXVERSE)["offers"] == []
    r = c.patch(
        f"/v1/seller/offers/{offer['id']}",
        key=seller_key,
        json_body={"paused": False, "cost_multiplier": "0.5"},
    )
    assert r.status == 200 and r.json()["state"] == "active"
    [entry] = book(c, PIXVERSE)["offers"]
    assert entry["cost_multiplier"] == "0.50"
    assert entry["capacity"]["max_concurrent_jobs"] == 3  # untouched by that PATCH
    r = c.patch(
        f"/v1/seller/offers/{offer['id']}", key=seller_key, json_body={"max_concurrent_jobs": None}
    )
    assert r.status == 200 and r.json()["capacity"]["max_concurrent_jobs"] is None
    assert c.delete(f"/v1/seller/offers/{offer['id']}", key=seller_key).status == 200
    assert book(c, PIXVERSE)["offers"] == []

    # Unknown models, URL-encoded ids with ':' and '/', public access.
    for name in ("nope", "venice:nope", "venice/nope"):
        r = c.get(f"/api/markets/{quote(name, safe='')}")
        assert r.status == 404, r.body
        assert r.json()["error"]["code"] == "model_not_found"
        assert name in r.json()["error"]["message"]
    assert set(markets(c)) == {m["id"] for m in c.get("/v1/models").json()["data"]}

    # Several offers per seller and model, each with its own key.
    a = c.create_offer(seller_key, RUNWAY, "sim_ok_a", "0.80")
    b = c.create_offer(seller_key, RUNWAY, "sim_ok_b", "0.85")
    assert [e["offer_id"] for e in book(c, RUNWAY)["offers"]] == [a["id"], b["id"]]
    assert book(c, RUNWAY)["sellers"] == {"active": 1, "healthy": 1}

    # Offer validation.
    for body, code in (
        ({"cost_multiplier": "0.04"}, "invalid_request"),
        ({"cost_multiplier": "1.01"}, "invalid_request"),
        ({"cost_multiplier": 0.5}, "invalid_request"),
        ({"model": "nope"}, "model_not_found"),
        ({"api_key": "not-a-sandbox-key"}, "invalid_provider_key"),
    ):
        payload = {
            "model": RUNWAY,
            "provider": "venice",
            "api_key": "sim_ok",
            "cost_multiplier": "0.80",
            **body,
        }
        r = c.post("/v1/seller/offers", key=seller_key, json_body=payload)
        assert r.status in (400, 404), (body, r.body)
        assert r.json()["error"]["code"] == code, (body, r.body)
    assert len(book(c, RUNWAY)["offers"]) == 2


def _submit_many(c: Client, buyer_key: str, n: int, **body: Any) -> list[dict[str, Any]]:
    results: list[Any] = [None] * n

    def one(i: int) -> None:
        results[i] = c.submit(buyer_key, prompt=f"job {i}", **body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        assert r.status == 202, r.body
    return [r.json() for r in results]


def test_capacity_is_never_exceeded_under_concurrent_submits(server: Server) -> None:
    c = server.client
    _, buyer_key = c.create_buyer(DEPOSIT)
    _, seller_key = c.create_seller()
    # sim_never: accepted, then PROCESSING forever, so every dispatched job holds its slot.
    offer = c.create_offer(seller_key, PIXVERSE, "sim_never", "0.80", max_concurrent_jobs=2)

    jobs = _submit_many(c, buyer_key, 8, model=PIXVERSE)
    ids = {j["id"] for j in jobs}
    worst = 0
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        dispatched = [
            j for j in list_jobs(c, buyer_key) if j["id"] in ids and j["status"] != "queued"
        ]
        worst = max(worst, len(dispatched))
        assert len(dispatched) <= 2, dispatched
        time.sleep(0.05)
    assert worst == 2
    [entry] = book(c, PIXVERSE)["offers"]
    assert entry["capacity"] == {"max_concurrent_jobs": 2, "in_flight": 2, "left": 0}
    assert entry["available"] is False
    # With its only offer full, a new submit is told to come back later.
    r = c.submit(buyer_key, model=PIXVERSE)
    assert r.status == 503 and r.json()["error"]["code"] == "no_healthy_sellers", r.body

    # A job that ends gives its slot to the next queued job, never more than two at once.
    running = [j for j in list_jobs(c, buyer_key) if j["id"] in ids and j["status"] != "queued"]
    assert c.delete(f"/v1/video/generations/{running[0]['id']}", key=buyer_key).status == 200

    def refilled() -> bool:
        states = [j["status"] for j in list_jobs(c, buyer_key) if j["id"] in ids]
        assert sum(s in ("submitted", "running") for s in states) <= 2
        return (
            states.count("canceled") == 1
            and sum(s in ("submitted", "running") for s in states) == 2
        )

    wait_until(refilled, timeout=15, what="a queued job to take the freed slot")
    for job in list_jobs(c, buyer_key):
        c.delete(f"/v1/video/generations/{job['id']}", key=buyer_key)
    wait_until(
        lambda: book(c, PIXVERSE)["offers"][0]["capacity"]["in_flight"] == 0,
        timeout=15,
        what="every slot to be given back",
    )
    assert_money_invariants(c, buyer_key, DEPOSIT)
    assert offer["max_concurrent_jobs"] == 2


def test_a_full_offer_sends_jobs_to_the_next_one(server: Server) -> None:
    c = server.client
    _, buyer_key = c.create_buyer(DEPOSIT)
    _, seller_key = c.create_seller()
    c.create_offer(seller_key, PIXVERSE, "sim_never", "0.80", max_concurrent_jobs=1)
    c.create_offer(seller_key, PIXVERSE, "sim_never", "0.85")
    jobs = _submit_many(c, buyer_key, 4, model=PIXVERSE)
    for job in jobs:
        wait_status(c, job["id"], buyer_key, ("submitted", "running"))
    costs = sorted(poll(c, j["id"], buyer_key)["usage"]["seller_cost_usdc"] for j in jobs)
    # Pixverse 5 s at 720p lists at 0.25 USD: one job at 0.80, the rest at 0.85.
    assert costs == ["200000", "212500", "212500", "212500"], costs
    for job in jobs:
        c.delete(f"/v1/video/generations/{job['id']}", key=buyer_key)
    assert_money_invariants(c, buyer_key, DEPOSIT)


def _add_key(c: Client, buyer_key: str, model: str | None, api_key: str) -> dict[str, Any]:
    r = c.post(
        "/v1/buyer/providers",
        key=buyer_key,
        json_body={"provider": "venice", "api_key": api_key, "model": model},
    )
    assert r.status == 201, r.body
    return dict(r.json())


def test_buyer_owned_provider_keys(server: Server) -> None:
    c = server.client
    _, buyer_key = c.create_buyer(DEPOSIT)
    _, other_key = c.create_buyer(DEPOSIT)
    _, seller_key = c.create_seller()
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")

    # A priority key for the model: tried first, nothing charged, the buyer's key billed.
    own = _add_key(c, buyer_key, "venice-video-gen", "sim_ok_buyer")
    assert own["model"] == SEEDANCE and "api_key" not in own and own["object"] == "buyer.provider"
    job = c.wait_terminal(submit_ok(c, buyer_key, model=SEEDANCE)["id"], buyer_key)
    assert job["status"] == "succeeded"
    assert job["usage"] == {
        "seller_cost_usdc": "0",
        "buyer_cost_usdc": "0",
        "settlement_status": "released",
    }
    assert billed(c, "sim_ok_buyer") == SEEDANCE_LIST_PRICE
    assert billed(c, "sim_ok") == 0
    # min{N} does not apply to it.
    r = c.submit(buyer_key, prefix="/min100", model=SEEDANCE)
    assert r.status == 202, r.body
    c.wait_terminal(r.json()["id"], buyer_key)

    # Listed without the key; another buyer can neither see nor delete it.
    r = c.get("/v1/buyer/providers", key=buyer_key)
    assert [p["id"] for p in r.json()["data"]] == [own["id"]]
    assert c.get("/v1/buyer/providers", key=other_key).json()["data"] == []
    assert c.delete(f"/v1/buyer/providers/{own['id']}", key=other_key).status == 404
    assert c.delete(f"/v1/buyer/providers/{own['id']}", key=buyer_key).status == 200
    assert c.delete(f"/v1/buyer/providers/{own['id']}", key=buyer_key).status == 404
    job = c.wait_terminal(submit_ok(c, buyer_key, model=SEEDANCE)["id"], buyer_key)
    assert job["usage"]["seller_cost_usdc"] == "128000"

    # A priority key that refuses fails over to the market, within the hold.
    _add_key(c, buyer_key, SEEDANCE, "sim_402")
    submitted = submit_ok(c, buyer_key, model=SEEDANCE)
    assert submitted["estimated_cost_usdc"] == "0"
    # The hold covers the market price the job may fall back to.
    assert submitted["max_cost_usdc"] == "140800"
    job = c.wait_terminal(submitted["id"], buyer_key)
    assert job["status"] == "succeeded" and job["usage"]["buyer_cost_usdc"] == "128000"

    # A catch-all key serves a model no seller offers, after the market and outside min{N}.
    r = c.submit(buyer_key, model=RUNWAY)
    assert r.status == 404 and r.json()["error"]["code"] == "no_sellers_for_model"
    _add_key(c, buyer_key, None, "sim_ok_catch_all")
    job = c.wait_terminal(submit_ok(c, buyer_key, model=RUNWAY)["id"], buyer_key)
    assert job["status"] == "succeeded" and job["usage"]["buyer_cost_usdc"] == "0"
    assert billed(c, "sim_ok_catch_all") > 0

    # Validation: unknown model, a key the provider refuses, unknown fields.
    for body, status, code in (
        ({"model": "nope"}, 404, "model_not_found"),
        ({"api_key": "not-a-sandbox-key"}, 400, "invalid_provider_key"),
        ({"extra": 1}, 400, "invalid_request"),
        ({"provider": "other"}, 400, "invalid_request"),
    ):
        payload = {"provider": "venice", "api_key": "sim_ok", "model": SEEDANCE, **body}
        r = c.post("/v1/buyer/providers", key=buyer_key, json_body=payload)
        assert (r.status, r.json()["error"]["code"]) == (status, code), (body, r.body)
    assert c.get("/v1/buyer/providers", key=seller_key).status == 401
    assert_money_invariants(c, buyer_key, DEPOSIT)


def test_an_unfunded_buyer_runs_on_their_own_key(server: Server) -> None:
    c = server.client
    _, buyer_key = c.create_buyer(0)
    _, seller_key = c.create_seller()
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    _add_key(c, buyer_key, SEEDANCE, "sim_ok_mine")
    # SPEC 1: a job on the buyer's own key holds 10% over the market behind it, whatever the
    # balance, so an unfunded buyer is turned away, writing nothing...
    r = c.submit(buyer_key, model=SEEDANCE)
    assert r.status == 402 and r.json()["error"]["code"] == "insufficient_balance", r.body
    assert list_jobs(c, buyer_key) == []
    # ...unless it gives up the market fallback with a ceiling of 0: the key alone runs it.
    submitted = submit_ok(c, buyer_key, model=SEEDANCE, max_cost_usdc="0")
    assert (submitted["estimated_cost_usdc"], submitted["max_cost_usdc"]) == ("0", "0")
    assert c.wait_terminal(submitted["id"], buyer_key)["status"] == "succeeded"
    assert billed(c, "sim_ok_mine") == SEEDANCE_LIST_PRICE
    assert [j["status"] for j in list_jobs(c, buyer_key) if j["status"] in PENDING] == []


def test_routing_decisions_are_in_the_job_events(server: Server, database_url: str) -> None:
    c = server.client
    _, buyer_key = c.create_buyer(DEPOSIT)
    _, seller_key = c.create_seller()
    refusing = c.create_offer(seller_key, SEEDANCE, "sim_429", "0.60")
    good = c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.65")
    dear = c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.95")
    r = c.submit(buyer_key, prefix="/min20", model=SEEDANCE)
    assert r.status == 202, r.body
    first = c.wait_terminal(r.json()["id"], buyer_key)
    second = c.wait_terminal(submit_ok(c, buyer_key, model=SEEDANCE)["id"], buyer_key)

    market_app = open_market(database_url)
    try:
        events = list(market_app.events.get(UUID(first["id"])))
        created = events[0]
        assert [e["offer_id"] for e in created.route] == [refusing["id"], good["id"]]
        assert created.routing == {
            "considered": 3,
            "skipped": [{"offer_id": dear["id"], "reason": "below_minimum_discount"}],
        }
        names = [type(e).__name__ for e in events]
        assert names.index("Refused") < names.index("Dispatched")
        refused = next(e for e in events if type(e).__name__ == "Refused")
        assert (refused.offer_id, refused.status) == (refusing["id"], 429)
        started = [e.attempt["offer_id"] for e in events if type(e).__name__ == "DispatchStarted"]
        assert started == [refusing["id"], good["id"]]
        # The refusal put the cheap offer into backoff: the next job's routing says so.
        created = next(iter(market_app.events.get(UUID(second["id"]))))
        assert {"offer_id": refusing["id"], "reason": "backoff"} in created.routing["skipped"]
        assert created.route[0]["offer_id"] == good["id"]
    finally:
        market_app.close()


def test_failed_quotes_count_against_the_offer_not_the_buyer(
    make_server: Any, tmp_path: Path
) -> None:
    """The provider goes away: its offers back off, the submit is a clean 503 and the buyer's
    balance is untouched."""
    sim_port = free_port()
    sim = subprocess.Popen(
        [str(BIN), "sim", "--port", str(sim_port)],
        cwd=tmp_path,
        env={**os.environ, "SIM_RENDER_SECONDS": "0.3"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        server = make_server(PROVIDER_BASE_URL_VENICE=f"http://127.0.0.1:{sim_port}/api/v1")
        c = server.client
        _, buyer_key = c.create_buyer(DEPOSIT)
        _, seller_key = c.create_seller()
        c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
        c.create_offer(seller_key, SEEDANCE, "sim_ok_2", "0.85")
        sim.kill()
        sim.wait()
        r = c.submit(buyer_key, model=SEEDANCE)
        assert r.status == 503, r.body
        assert r.json()["error"]["code"] == "no_healthy_sellers"

        def backed_off() -> bool:
            offers = c.get("/v1/seller/offers", key=seller_key).json()["data"]
            return all(o["health"]["status"] == "backoff" for o in offers)

        wait_until(backed_off, timeout=10, what="both offers to back off")
        for o in c.get("/v1/seller/offers", key=seller_key).json()["data"]:
            assert o["health"]["reason"].startswith("quote failed"), o
            assert o["state"] == "active"  # a provider outage is not a bad key
        assert book(c, SEEDANCE)["sellers"] == {"active": 1, "healthy": 0}
        me = c.get("/v1/buyer/me", key=buyer_key).json()
        assert me["balance"]["available_usdc"] == str(DEPOSIT)
        assert list_jobs(c, buyer_key) == []
    finally:
        sim.kill()
        sim.wait()
