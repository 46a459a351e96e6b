"""Job lifecycle end to end, through the real server: cancel, expiry of artifacts, invariants.

The helpers at the top are shared by the other end-to-end lifecycle files (magic keys,
recovery, concurrency): money invariants over a buyer's whole history, polling, price quotes
straight from the simulator.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import ROUND_CEILING, Decimal
from typing import Any

from adapters.crypto import sha256_hex
from tests.harness import Client, Server

ServerFactory = Callable[..., Server]

# The simulator's fixed catalog (SPEC 5.2): seedance's default request is 4 s at 480p.
SEEDANCE = "venice-seedance-2-fast-t2v"
RUNWAY = "venice-runway-gen4-5-text"
PIXVERSE = "venice-pixverse-c1-t2v"
SEEDANCE_LIST_PRICE = 160_000  # 0.04 USD/s * 4 s
PENDING = ("queued", "submitted", "running")
TERMINAL = ("succeeded", "failed", "canceled", "expired")


# --------------------------------------------------------------------------- helpers


def billed(client: Client, provider_key: str) -> int:
    """What the simulator billed one provider key, in microdollars (0 if never billed)."""
    entry = client.billing().get(sha256_hex(provider_key))
    return 0 if entry is None else int(entry["billed_micros"])


def billed_jobs(client: Client, provider_key: str) -> int:
    entry = client.billing().get(sha256_hex(provider_key))
    return 0 if entry is None else int(entry["jobs"])


def sim_quote(client: Client, provider_model: str, duration: int, **params: Any) -> int:
    """The provider's list price, asked of the simulator directly (micros, exact)."""
    r = client.post(
        "/sim/api/v1/video/quote",
        key="sim_ok",
        json_body={"model": provider_model, "duration": f"{duration}s", **params},
    )
    assert r.status == 200, r.body
    usd = r.json()["quote"]
    return int((Decimal(str(usd)) * 1_000_000).to_integral_value(ROUND_CEILING))


def poll(client: Client, job_id: str, buyer_key: str) -> dict[str, Any]:
    r = client.get(f"/v1/video/generations/{job_id}", key=buyer_key)
    assert r.status in (200, 202), r.body
    doc = dict(r.json())
    assert (r.status == 202) == (doc["status"] in PENDING), (r.status, doc)
    return doc


def wait_status(
    client: Client, job_id: str, buyer_key: str, statuses: tuple[str, ...], timeout: float = 20.0
) -> dict[str, Any]:
    """Poll until the job is in one of ``statuses``; fail fast if it ends elsewhere."""
    deadline = time.monotonic() + timeout
    while True:
        doc = poll(client, job_id, buyer_key)
        if doc["status"] in statuses:
            return doc
        assert doc["status"] not in TERMINAL, doc
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {doc['status']}, wanted {statuses}")
        time.sleep(0.05)


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def list_jobs(client: Client, buyer_key: str) -> list[dict[str, Any]]:
    """Every job of the buyer, following the cursor."""
    jobs: list[dict[str, Any]] = []
    after = ""
    while True:
        r = client.get(f"/v1/video/generations?limit=100{after}", key=buyer_key)
        assert r.status == 200, r.body
        page = r.json()
        jobs.extend(page["data"])
        if not page["has_more"]:
            return jobs
        after = f"&after={page['next_after']}"


def submit_ok(client: Client, buyer_key: str, **body: Any) -> dict[str, Any]:
    r = client.submit(buyer_key, **body)
    assert r.status == 202, r.body
    return dict(r.json())


def assert_money_invariants(client: Client, buyer_key: str, deposited: int) -> list[dict[str, Any]]:
    """SPEC 1 over a buyer's whole history, once every job is terminal; returns the jobs."""
    jobs = list_jobs(client, buyer_key)
    assert all(j["status"] in TERMINAL for j in jobs), [j["status"] for j in jobs]
    me = client.get("/v1/buyer/me", key=buyer_key).json()
    balance = me["balance"]
    spent = 0
    for j in jobs:
        usage = j["usage"]
        buyer_cost, seller_cost = int(usage["buyer_cost_usdc"]), int(usage["seller_cost_usdc"])
        assert 0 <= seller_cost <= buyer_cost <= int(j["max_cost_usdc"]), j
        if buyer_cost > 0:
            assert usage["settlement_status"] == "confirmed", j
            assert j["status"] in ("succeeded", "canceled"), j
        else:
            assert usage == {
                "seller_cost_usdc": "0",
                "buyer_cost_usdc": "0",
                "settlement_status": "released",
            }, j
        spent += buyer_cost
    assert balance["held_usdc"] == "0", balance
    assert int(balance["deposited_usdc"]) == deposited, balance
    assert int(balance["spent_usdc"]) == spent, (balance, spent)
    assert int(balance["available_usdc"]) == deposited - spent, balance
    assert me["usage"]["jobs"] == len(jobs)
    return jobs


def market(client: Client, deposit: int = 10_000_000) -> tuple[str, str, str]:
    """A funded buyer and a seller: (buyer id, buyer key, seller key)."""
    buyer_id, buyer_key = client.create_buyer(deposit_usdc=deposit)
    _, seller_key = client.create_seller()
    return buyer_id, buyer_key, seller_key


def buyer_cost(list_price: int, multiplier_percent: int) -> int:
    """Seller cost = buyer cost with the default fees: ceil(list * multiplier)."""
    return -(-list_price * multiplier_percent // 100)


# --------------------------------------------------------------------------- tests


def test_success_settles_and_a_later_cancel_is_a_no_op(server: Server) -> None:
    c = server.client
    _, buyer_key, seller_key = market(c)
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    job = submit_ok(c, buyer_key)
    cost = buyer_cost(SEEDANCE_LIST_PRICE, 80)
    assert job["status"] == "queued"
    assert job["estimated_cost_usdc"] == str(cost)
    assert job["max_cost_usdc"] == str(-(-cost * 11 // 10))
    assert job["usage"]["settlement_status"] == "pending"
    assert job["expires_at"] - job["created"] == 1800

    pending = c.get(f"/v1/video/generations/{job['id']}", key=buyer_key)
    if pending.status == 202:
        assert pending.headers["retry-after"].isdigit()
    done = c.wait_terminal(job["id"], buyer_key)
    assert done["status"] == "succeeded" and done["progress"] == 1.0
    assert done["usage"] == {
        "seller_cost_usdc": str(cost),
        "buyer_cost_usdc": str(cost),
        "settlement_status": "confirmed",
    }
    assert "error" not in done
    [result] = done["results"]
    assert (result["width"], result["height"], result["duration_seconds"]) == (854, 480, 4)

    # Cancel on a finished job is a no-op that reports the state (SPEC 2).
    r = c.delete(f"/v1/video/generations/{job['id']}", key=buyer_key)
    assert r.status == 200 and r.json()["status"] == "succeeded"
    assert r.json()["usage"] == done["usage"]
    assert billed(c, "sim_ok") == SEEDANCE_LIST_PRICE
    # Venice bills audio unless told otherwise; the engine said no, and was billed for none.
    assert sim_quote(c, "seedance-2-fast-t2v", 4, audio=False) == SEEDANCE_LIST_PRICE
    assert_money_invariants(c, buyer_key, 10_000_000)


def test_cancel_after_dispatch_charges_buyer_cost(server: Server) -> None:
    c = server.client
    _, buyer_key, seller_key = market(c)
    c.create_offer(seller_key, SEEDANCE, "sim_never", "0.80")
    job = submit_ok(c, buyer_key)
    wait_status(c, job["id"], buyer_key, ("submitted", "running"))

    r = c.delete(f"/v1/video/generations/{job['id']}", key=buyer_key)
    assert r.status == 200, r.body
    canceled = r.json()
    cost = buyer_cost(SEEDANCE_LIST_PRICE, 80)
    assert canceled["status"] == "canceled"
    assert canceled["usage"] == {
        "seller_cost_usdc": str(cost),
        "buyer_cost_usdc": str(cost),
        "settlement_status": "confirmed",
    }
    # The provider has no cancel: it billed the seller's key at queue time.
    assert billed(c, "sim_never") == SEEDANCE_LIST_PRICE
    # Terminal means terminal: a second cancel and later polls report the same thing.
    again = c.delete(f"/v1/video/generations/{job['id']}", key=buyer_key)
    assert again.status == 200 and again.json()["status"] == "canceled"
    time.sleep(0.5)  # a worker still polling must not resurrect or re-settle the job
    assert poll(c, job["id"], buyer_key)["usage"] == canceled["usage"]
    assert_money_invariants(c, buyer_key, 10_000_000)


def test_cancel_before_dispatch_releases_everything(make_server: ServerFactory) -> None:
    # No worker anywhere: the job stays queued until the cancel.
    api = make_server("--no-worker")
    c = api.client
    _, buyer_key, seller_key = market(c)
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    job = submit_ok(c, buyer_key)
    me = c.get("/v1/buyer/me", key=buyer_key).json()["balance"]
    assert me["held_usdc"] == job["max_cost_usdc"]
    assert int(me["available_usdc"]) == 10_000_000 - int(job["max_cost_usdc"])

    r = c.delete(f"/v1/video/generations/{job['id']}", headers={"X-Job-Token": job["job_token"]})
    assert r.status == 200, r.body
    assert r.json()["status"] == "canceled"
    assert r.json()["usage"] == {
        "seller_cost_usdc": "0",
        "buyer_cost_usdc": "0",
        "settlement_status": "released",
    }
    assert billed(c, "sim_ok") == 0
    assert_money_invariants(c, buyer_key, 10_000_000)


def test_artifact_retention_purges_and_answers_410(make_server: ServerFactory) -> None:
    srv = make_server(MEDIA_ARTIFACT_TTL_SECONDS="1")
    c = srv.client
    _, buyer_key, seller_key = market(c)
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    job = submit_ok(c, buyer_key)
    done = c.wait_terminal(job["id"], buyer_key)
    assert done["status"] == "succeeded", done
    [result] = done["results"]
    video = c.get(result["download_url"], key=buyer_key)
    assert video.status == 200 and len(video.body) == result["bytes"]
    signed = result["url"].split("://", 1)[1].split("/", 1)[1]

    def purged() -> bool:
        return c.get(result["download_url"], key=buyer_key).status == 410

    wait_until(purged, timeout=12.0, what="the artifact purge", interval=0.25)
    gone = c.get(result["download_url"], key=buyer_key)
    assert gone.status == 410 and gone.json()["error"]["code"] == "artifact_expired"
    assert c.get(f"/{signed}").status == 410
    by_token = c.get(result["download_url"], headers={"X-Job-Token": job["job_token"]})
    assert by_token.status == 410

    # The job itself is unchanged: still succeeded and paid for, the result without a URL.
    # The purge deletes the files before it records the purge (a crash between the two is
    # then retried, not a file kept forever), so the poll follows the 410 by a moment.
    def url_gone() -> bool:
        return poll(c, job["id"], buyer_key)["results"][0]["url"] is None

    wait_until(url_gone, timeout=10.0, what="the poll's url to go", interval=0.05)
    after = poll(c, job["id"], buyer_key)
    assert after["status"] == "succeeded" and after["usage"] == done["usage"]
    assert after["results"][0]["url"] is None
    assert_money_invariants(c, buyer_key, 10_000_000)


def test_failover_never_exceeds_the_hold(server: Server) -> None:
    """SPEC 1: the hold is the estimate plus 10%, whatever the offers behind the chosen one
    cost. When the chosen offer refuses and the rest cost more than the hold, they are
    skipped and the job fails no_sellers_available, saying why; a buyer who sends its own
    max_cost_usdc has the room to fail over."""
    c = server.client
    _, buyer_key, seller_key = market(c)
    c.create_offer(seller_key, SEEDANCE, "sim_429", "0.50")
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.90")
    job = submit_ok(c, buyer_key)
    estimate = buyer_cost(SEEDANCE_LIST_PRICE, 50)
    assert job["estimated_cost_usdc"] == str(estimate)
    assert job["max_cost_usdc"] == str(-(-estimate * 11 // 10))
    assert int(job["max_cost_usdc"]) < buyer_cost(SEEDANCE_LIST_PRICE, 90)
    done = c.wait_terminal(job["id"], buyer_key)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "no_sellers_available", done
    assert "max_cost_usdc" in done["error"]["message"]
    assert done["usage"] == {
        "seller_cost_usdc": "0",
        "buyer_cost_usdc": "0",
        "settlement_status": "released",
    }
    assert billed(c, "sim_ok") == 0 and billed(c, "sim_429") == 0

    # Another refusing offer (the first one backs off now); this buyer allows for failover.
    c.create_offer(seller_key, SEEDANCE, "sim_402", "0.50")
    ceiling = buyer_cost(SEEDANCE_LIST_PRICE, 90)
    job = submit_ok(c, buyer_key, max_cost_usdc=str(ceiling))
    assert (job["estimated_cost_usdc"], job["max_cost_usdc"]) == (str(estimate), str(ceiling))
    done = c.wait_terminal(job["id"], buyer_key)
    assert done["status"] == "succeeded", done
    assert done["usage"]["buyer_cost_usdc"] == str(ceiling)
    # A ceiling below the estimate is refused before anything is written.
    r = c.submit(buyer_key, max_cost_usdc=str(estimate - 1))
    assert r.status == 400, r.body
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (
        "invalid_request",
        "max_cost_usdc",
    )
    assert_money_invariants(c, buyer_key, 10_000_000)


def test_a_price_rise_before_dispatch_fails_price_changed(make_server: ServerFactory) -> None:
    """The chosen offer's own price rose above the hold between submit and dispatch: the job
    fails price_changed, charging nothing (SPEC 1), even with a cheaper-than-hold offer gone."""
    api = make_server("--no-worker")
    c = api.client
    _, buyer_key, seller_key = market(c)
    offer = c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.50")
    job = submit_ok(c, buyer_key)
    assert job["max_cost_usdc"] == str(-(-buyer_cost(SEEDANCE_LIST_PRICE, 50) * 11 // 10))
    r = c.patch(
        f"/v1/seller/offers/{offer['id']}", key=seller_key, json_body={"cost_multiplier": "0.60"}
    )
    assert r.status == 200, r.body
    api.kill()
    worker = make_server()
    done = worker.client.wait_terminal(job["id"], buyer_key)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "price_changed", done
    assert done["usage"]["settlement_status"] == "released"
    assert billed(worker.client, "sim_ok") == 0
    assert_money_invariants(worker.client, buyer_key, 10_000_000)
