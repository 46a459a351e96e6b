"""Every magic key of the simulator (SPEC 5.2) through the whole engine, one server per key.

On SQLite only: what a key does is the provider's protocol, not the store's. Every key also runs
end to end on PostgreSQL in ``tests/test_routing_table.py`` (one shared server per backend), and
the engine's reaction to each answer in-process in ``tests/test_worker_inprocess.py``. Each case
checks the job's outcome, what the buyer paid, what the simulator billed each seller key, the
offers' health, and the money invariants of SPEC 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Client, Server
from tests.test_lifecycle import (
    RUNWAY,
    SEEDANCE,
    SEEDANCE_LIST_PRICE,
    assert_money_invariants,
    billed,
    buyer_cost,
    list_jobs,
    market,
    poll,
    submit_ok,
    wait_until,
)

ServerFactory = Callable[..., Server]
DEPOSIT = 10_000_000


def offers_by_id(client: Client, seller_key: str) -> dict[str, dict[str, Any]]:
    r = client.get("/v1/seller/offers", key=seller_key)
    assert r.status == 200, r.body
    return {o["id"]: o for o in r.json()["data"]}


def check_succeeds(c: Client, buyer_key: str, seller_key: str, key: str) -> None:
    c.create_offer(seller_key, SEEDANCE, key, "0.80")
    job = submit_ok(c, buyer_key)
    done = c.wait_terminal(job["id"], buyer_key)
    cost = buyer_cost(SEEDANCE_LIST_PRICE, 80)
    assert done["status"] == "succeeded", done
    assert done["usage"] == {
        "seller_cost_usdc": str(cost),
        "buyer_cost_usdc": str(cost),
        "settlement_status": "confirmed",
    }
    assert len(done["results"]) == 1 and done["results"][0]["bytes"] > 0
    video = c.get(done["results"][0]["download_url"], key=buyer_key)
    assert video.status == 200 and video.body[4:8] == b"ftyp"
    assert billed(c, key) == SEEDANCE_LIST_PRICE


def check_refused(c: Client, buyer_key: str, seller_key: str, key: str) -> None:
    """Refused before acceptance: fail over when there is another offer, else fail cleanly."""
    # Runway: the refusing offer alone.
    alone = c.create_offer(seller_key, RUNWAY, key, "0.50")
    # Seedance: the refusing offer is the cheapest, a dearer sim_ok offer (within the 10%
    # margin of the hold) backs it up.
    first = c.create_offer(seller_key, SEEDANCE, key, "0.80")
    backup = c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.85")

    lonely = submit_ok(c, buyer_key, model=RUNWAY)
    failing_over = submit_ok(c, buyer_key)
    # Priced on the cheapest offer at submit; the hold covers the backup's price too.
    assert failing_over["estimated_cost_usdc"] == str(buyer_cost(SEEDANCE_LIST_PRICE, 80))

    failed = c.wait_terminal(lonely["id"], buyer_key)
    assert failed["status"] == "failed", failed
    assert failed["error"]["code"] == "no_sellers_available", failed
    assert failed["error"]["message"]
    assert failed["usage"] == {
        "seller_cost_usdc": "0",
        "buyer_cost_usdc": "0",
        "settlement_status": "released",
    }
    assert failed["results"] == []

    done = c.wait_terminal(failing_over["id"], buyer_key)
    backup_cost = buyer_cost(SEEDANCE_LIST_PRICE, 85)
    assert backup_cost <= int(failing_over["max_cost_usdc"])
    assert done["status"] == "succeeded", done
    assert "error" not in done
    assert done["usage"] == {
        "seller_cost_usdc": str(backup_cost),
        "buyer_cost_usdc": str(backup_cost),
        "settlement_status": "confirmed",
    }

    assert billed(c, key) == 0
    assert billed(c, "sim_ok") == SEEDANCE_LIST_PRICE

    offers = offers_by_id(c, seller_key)
    assert offers[backup["id"]]["state"] == "active"
    assert offers[backup["id"]]["health"] == {"status": "healthy"}
    for refused in (offers[alone["id"]], offers[first["id"]]):
        assert refused["health"]["status"] == "backoff", refused
        assert refused["health"]["reason"], refused
        if key == "sim_consent":
            # The seller learns why: its account must give the provider's consent first.
            assert "consent" in refused["health"]["reason"], refused
            assert "409" in refused["health"]["reason"], refused
        if key == "sim_401":
            # A bad key switches the offer off until the seller gives a new one.
            assert refused["state"] == "deactivated", refused
            assert refused["deactivated_reason"], refused
            assert "401" in refused["deactivated_reason"]
            # Pausing and resuming is not a new key: it stays switched off.
            path = f"/v1/seller/offers/{refused['id']}"
            for paused, state in ((True, "paused"), (False, "deactivated")):
                r = c.patch(path, key=seller_key, json_body={"paused": paused})
                assert r.status == 200 and r.json()["state"] == state, r.body
        else:
            assert refused["state"] == "active", refused
            assert refused["deactivated_reason"] is None
    # The lone offer is now unavailable: a new submit is turned away, writing nothing.
    again = c.submit(buyer_key, model=RUNWAY)
    assert again.status == 503, again.body
    assert again.json()["error"]["code"] == "no_healthy_sellers"


def check_queue_timeout(c: Client, buyer_key: str, seller_key: str, key: str) -> None:
    """Unknown whether the provider took it: fail, charge nothing, and never fail over."""
    c.create_offer(seller_key, SEEDANCE, key, "0.80")
    # Affordable within the hold, so only the rule (not the price) keeps the job off it.
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.85")
    job = submit_ok(c, buyer_key)
    done = c.wait_terminal(job["id"], buyer_key)
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "upstream_unknown", done
    assert done["error"]["retryable"] is False
    assert done["usage"] == {
        "seller_cost_usdc": "0",
        "buyer_cost_usdc": "0",
        "settlement_status": "released",
    }
    # The second offer was never sent the job.
    assert billed(c, "sim_ok") == 0
    assert billed(c, key) == 0
    # Not knowing counts against the hanging offer like a refusal (SPEC 3): it backs off, and
    # the next job goes to the seller whose provider answers.
    offers = {o["cost_multiplier"]: o for o in offers_by_id(c, seller_key).values()}
    assert offers["0.80"]["health"]["status"] == "backoff", offers["0.80"]
    assert offers["0.80"]["state"] == "active"
    assert offers["0.85"]["health"] == {"status": "healthy"}
    again = c.wait_terminal(submit_ok(c, buyer_key)["id"], buyer_key)
    assert again["status"] == "succeeded", again
    assert again["usage"]["buyer_cost_usdc"] == str(buyer_cost(SEEDANCE_LIST_PRICE, 85))


def failing_after_acceptance(code: str, retryable: bool) -> Callable[..., None]:
    def check(c: Client, buyer_key: str, seller_key: str, key: str) -> None:
        c.create_offer(seller_key, SEEDANCE, key, "0.80")
        job = submit_ok(c, buyer_key)
        done = c.wait_terminal(job["id"], buyer_key)
        assert done["status"] == "failed", done
        assert done["error"]["code"] == code, done
        assert done["error"]["retryable"] is retryable
        assert done["error"]["message"]
        assert done["usage"] == {
            "seller_cost_usdc": "0",
            "buyer_cost_usdc": "0",
            "settlement_status": "released",
        }
        assert done["results"] == []
        # Accepted, so the provider billed the seller; the buyer pays nothing (SPEC 1).
        assert billed(c, key) == SEEDANCE_LIST_PRICE

    return check


def check_download_url(c: Client, buyer_key: str, seller_key: str, key: str) -> None:
    """The video is at the queue answer's pre-signed link: fetched through the outbound policy
    (the embedded simulator is the operator's own), stored, and the link revoked after."""
    check_succeeds(c, buyer_key, seller_key, key)
    [job] = [j for j in list_jobs(c, buyer_key)]
    # The link is a credential: it is in no event in plain text.
    events = c.get(f"/v1/video/generations/{job['id']}/events", key=buyer_key)
    assert events.status == 200 and "/share/" not in events.body.decode()
    [dispatched] = [e for e in events.json()["data"] if e["name"] == "Dispatched"]
    assert set(dispatched["data"]) == {"queue_id"}, dispatched
    [offer] = offers_by_id(c, seller_key).values()
    assert offer["health"] == {"status": "healthy"}


def check_slow(c: Client, buyer_key: str, seller_key: str, key: str) -> None:
    """Progress rises from the provider's execution_duration / average_execution_time."""
    c.create_offer(seller_key, SEEDANCE, key, "0.80")
    job = submit_ok(c, buyer_key)
    seen: list[float] = []

    def running_with_progress() -> bool:
        doc = poll(c, job["id"], buyer_key)
        if doc["status"] == "running":
            seen.append(doc["progress"])
        return doc["status"] == "running" and 0 < doc["progress"] < 1

    wait_until(running_with_progress, timeout=20, what="the job to report progress")
    done = c.wait_terminal(job["id"], buyer_key)
    assert done["status"] == "succeeded" and done["progress"] == 1.0, done
    assert seen == sorted(seen) and 0 < seen[-1] < 1, seen
    cost = buyer_cost(SEEDANCE_LIST_PRICE, 80)
    assert done["usage"]["buyer_cost_usdc"] == str(cost)
    assert billed(c, key) == SEEDANCE_LIST_PRICE


def check_never(c: Client, buyer_key: str, seller_key: str, key: str) -> None:
    c.create_offer(seller_key, SEEDANCE, key, "0.80")
    job = submit_ok(c, buyer_key)
    assert job["expires_at"] - job["created"] == 3
    running = poll(c, job["id"], buyer_key)
    assert running["status"] in ("queued", "submitted", "running")
    done = c.wait_terminal(job["id"], buyer_key, timeout=20)
    assert done["status"] == "expired", done
    assert done["usage"] == {
        "seller_cost_usdc": "0",
        "buyer_cost_usdc": "0",
        "settlement_status": "released",
    }
    assert done["results"] == []
    assert billed(c, key) == SEEDANCE_LIST_PRICE


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/data"


CASES: list[Any] = [
    pytest.param("sim_ok", check_succeeds, {}, id="sim_ok"),
    pytest.param("sim_flaky", check_succeeds, {}, id="sim_flaky"),
    pytest.param("sim_401", check_refused, {}, id="sim_401"),
    pytest.param("sim_402", check_refused, {}, id="sim_402"),
    pytest.param("sim_429", check_refused, {}, id="sim_429"),
    pytest.param("sim_queue_timeout", check_queue_timeout, {}, id="sim_queue_timeout"),
    pytest.param(
        "sim_fail_inference",
        failing_after_acceptance("inference_failed", True),
        {},
        id="sim_fail_inference",
    ),
    pytest.param(
        "sim_content_policy",
        failing_after_acceptance("content_policy", False),
        {},
        id="sim_content_policy",
    ),
    pytest.param("sim_never", check_never, {"JOB_TTL_SECONDS": "3"}, id="sim_never"),
    pytest.param("sim_download_url", check_download_url, {}, id="sim_download_url"),
    pytest.param("sim_consent", check_refused, {}, id="sim_consent"),
    pytest.param("sim_slow", check_slow, {"SIM_RENDER_SECONDS": "0.5"}, id="sim_slow"),
]


@pytest.mark.parametrize(("key", "check", "env"), CASES)
def test_magic_key(
    make_server: ServerFactory, key: str, check: Callable[..., None], env: dict[str, str]
) -> None:
    srv = make_server(**env)
    c = srv.client
    _, buyer_key, seller_key = market(c, DEPOSIT)
    check(c, buyer_key, seller_key, key)
    assert_money_invariants(c, buyer_key, DEPOSIT)


def test_non_sandbox_key_is_refused_at_offer_creation(server: Server) -> None:
    c = server.client
    _, seller_key = c.create_seller()
    r = c.post(
        "/v1/seller/offers",
        key=seller_key,
        json_body={
            "model": SEEDANCE,
            "provider": "venice",
            "api_key": "live_not_a_sim_key",
            "pricing_mode": "cost_multiplier",
            "cost_multiplier": "0.80",
        },
    )
    assert r.status == 400, r.body
    error = r.json()["error"]
    assert error["code"] == "invalid_provider_key" and error["param"] == "api_key"
    assert "live_not_a_sim_key" not in r.body.decode()
    assert c.get("/v1/seller/offers", key=seller_key).json()["data"] == []
    # With no offer at all, a submit is turned away before anything is written.
    _, buyer_key = c.create_buyer(deposit_usdc=DEPOSIT)
    r = c.submit(buyer_key)
    assert r.status == 404 and r.json()["error"]["code"] == "no_sellers_for_model"
    assert c.get("/v1/buyer/me", key=buyer_key).json()["balance"]["held_usdc"] == "0"
