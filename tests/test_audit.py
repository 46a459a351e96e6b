"""A job's audit history (SPEC 6): the buyer's events endpoint and ``mediamarket audit job``."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

from tests.harness import Client, Server
from tests.test_lifecycle import SEEDANCE, SEEDANCE_LIST_PRICE, market, submit_ok

ServerFactory = Callable[..., Server]

# A fee schedule with both parts, so that platform fee, seller cost and charge all differ.
FEES = {"FEE_MULTIPLIER_BPS": "12000", "FLAT_FEE_USDC": "1000"}
SELLER_COST = SEEDANCE_LIST_PRICE * 80 // 100  # 128000
BUYER_COST = -(-SELLER_COST * 12000 // 10000) + 1000  # 154600
HELD = -(-BUYER_COST * 11 // 10)  # 170060


def events_of(client: Client, job_id: str, key: str) -> dict[str, Any]:
    r = client.get(f"/v1/video/generations/{job_id}/events", key=key)
    assert r.status == 200, r.body
    assert b"key_sha256" not in r.body and b"worker_id" not in r.body, r.body
    body = dict(r.json())
    assert body["object"] == "list" and body["job_id"] == job_id
    return body


def names(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e["aggregate"], e["name"]) for e in body["data"]]


def assert_well_formed(body: dict[str, Any]) -> None:
    """Versions go up per aggregate from 1 (a buyer's view skips the claims), times are
    ISO-8601 UTC and never go back."""
    versions: dict[str, int] = {}
    times = []
    for e in body["data"]:
        if e["aggregate"] not in versions:
            assert e["version"] == 1, e
        else:
            assert e["version"] > versions[e["aggregate"]], e
        versions[e["aggregate"]] = e["version"]
        assert e["timestamp"].endswith("Z"), e
        times.append(datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")))
        assert e["type"].startswith(f"mediamarket.{e['aggregate']}.") and e["type"].endswith(
            ".v1"
        ), e
    assert times == sorted(times)
    assert body["data"][0]["name"] == "Created" and body["data"][0]["aggregate"] == "job"


def test_succeeded_job_history(make_server: ServerFactory) -> None:
    srv = make_server(**FEES)
    c = srv.client
    _, buyer_key, seller_key = market(c)
    offer = c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    job = submit_ok(c, buyer_key)
    assert job["max_cost_usdc"] == str(HELD)
    done = c.wait_terminal(job["id"], buyer_key)
    assert done["status"] == "succeeded", done

    body = events_of(c, job["id"], buyer_key)
    assert_well_formed(body)
    seen = names(body)
    job_events = [n for a, n in seen if a == "job"]
    assert job_events[0] == "Created" and "Claimed" not in job_events
    order = ["Created", "DispatchStarted", "Dispatched", "ArtifactStored", "Succeeded"]
    assert [n for n in job_events if n in order] == order, seen
    assert [n for a, n in seen if a == "settlement"] == ["Created", "Settled"], seen
    # The hold is taken with the job, and settled with its success.
    assert seen.index(("settlement", "Created")) == 1
    assert seen.index(("settlement", "Settled")) == seen.index(("job", "Succeeded")) + 1

    by_name = {(e["aggregate"], e["name"]): e for e in body["data"]}
    created = by_name[("job", "Created")]
    assert created["type"] == "mediamarket.job.requested.v1"
    assert created["data"]["max_cost"] == str(HELD)
    assert created["data"]["estimated_cost"] == str(BUYER_COST)
    assert "token_hash" not in created["data"]
    started = by_name[("job", "DispatchStarted")]
    assert started["type"] == "mediamarket.job.dispatch-started.v1"
    assert started["data"]["attempt"]["buyer_cost"] == str(BUYER_COST)
    assert started["data"]["attempt"]["seller_cost"] == str(SELLER_COST)
    assert started["data"]["attempt"]["list_price"] == str(SEEDANCE_LIST_PRICE)
    reserved = by_name[("settlement", "Created")]
    assert reserved["type"] == "mediamarket.settlement.reserved.v1"
    assert reserved["data"]["hold"] == str(HELD)
    settled = by_name[("settlement", "Settled")]
    assert settled["type"] == "mediamarket.settlement.settled.v1"
    assert settled["data"]["charged"] == str(BUYER_COST)
    assert settled["data"]["seller_cost"] == str(SELLER_COST)
    assert settled["data"]["platform_fee"] == str(BUYER_COST - SELLER_COST)
    assert settled["data"]["released"] == str(HELD - BUYER_COST)
    assert settled["data"]["outcome"] == "succeeded"

    summary = body["summary"]
    assert summary["status"] == "succeeded" and summary["error"] is None
    assert summary["amounts"] == {
        "estimated_cost_usdc": str(BUYER_COST),
        "held_usdc": str(HELD),
        "charged_usdc": str(BUYER_COST),
        "seller_cost_usdc": str(SELLER_COST),
        "platform_fee_usdc": str(BUYER_COST - SELLER_COST),
        "released_usdc": str(HELD - BUYER_COST),
        "settlement_status": "confirmed",
    }
    assert done["usage"]["buyer_cost_usdc"] == summary["amounts"]["charged_usdc"]
    routing = summary["routing"]
    assert [r["offer_id"] for r in routing["route"]] == [offer["id"]]
    assert routing["route"][0]["buyer_cost"] == str(BUYER_COST)
    # The multiplier as the seller wrote it, not as a fraction.
    assert routing["route"][0]["cost_multiplier"] == offer["cost_multiplier"]
    assert routing["considered"] == 1 and routing["skipped"] == []
    [attempt] = summary["attempts"]
    assert attempt["offer_id"] == offer["id"] and attempt["outcome"] == "accepted"
    assert attempt["queue_id"] and attempt["buyer_cost"] == str(BUYER_COST)

    # The /min{N} prefix is accepted (and ignored) here as on poll.
    assert c.get(f"/min10/v1/video/generations/{job['id']}/events", key=buyer_key).status == 200

    # The operator's view has everything, the worker's claims and key hashes included.
    out = srv.cli("audit", "job", job["id"])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for name in ("Created", "Claimed", "DispatchStarted", "Dispatched", "Succeeded", "Settled"):
        assert name in text, text
    assert "key_sha256=" in text and "worker_id=" in text, text
    lines = text.split("amounts:")[1].strip().splitlines()
    amounts = dict(line.strip().rsplit(None, 1) for line in lines)
    assert amounts == {
        "estimated": str(BUYER_COST),
        "held": str(HELD),
        "charged": str(BUYER_COST),
        "seller cost": str(SELLER_COST),
        "platform fee": str(BUYER_COST - SELLER_COST),
        "released": str(HELD - BUYER_COST),
        "settlement": "confirmed",
    }, text
    assert f"offer_id={offer['id']}" in text.split("routing:")[1], text


def test_canceled_before_dispatch_releases_the_whole_hold(make_server: ServerFactory) -> None:
    # No worker: the job stays queued until the cancel.
    srv = make_server("--no-worker")
    c = srv.client
    _, buyer_key, seller_key = market(c)
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    job = submit_ok(c, buyer_key)
    held = job["max_cost_usdc"]

    pending = events_of(c, job["id"], buyer_key)
    assert names(pending) == [("job", "Created"), ("settlement", "Created")]
    assert pending["summary"]["amounts"]["settlement_status"] == "pending"
    assert pending["summary"]["amounts"]["held_usdc"] == held
    assert pending["summary"]["status"] == "queued"

    r = c.delete(f"/v1/video/generations/{job['id']}", key=buyer_key)
    assert r.status == 200 and r.json()["status"] == "canceled", r.body

    body = events_of(c, job["id"], buyer_key)
    assert_well_formed(body)
    assert names(body) == [
        ("job", "Created"),
        ("settlement", "Created"),
        ("job", "Canceled"),
        ("settlement", "Released"),
    ]
    canceled, released = body["data"][2], body["data"][3]
    assert canceled["data"]["after_dispatch"] is False
    assert released["type"] == "mediamarket.settlement.released.v1"
    assert released["data"] == {"job_id": job["id"], "released": held, "outcome": "canceled"}
    summary = body["summary"]
    assert summary["status"] == "canceled" and summary["attempts"] == []
    assert summary["amounts"] == {
        "estimated_cost_usdc": job["estimated_cost_usdc"],
        "held_usdc": held,
        "charged_usdc": "0",
        "seller_cost_usdc": "0",
        "platform_fee_usdc": "0",
        "released_usdc": held,
        "settlement_status": "released",
    }

    out = srv.cli("audit", "job", job["id"])
    assert out.returncode == 0, out.stderr
    assert "Canceled" in out.stdout and "Released" in out.stdout, out.stdout
    assert f"released={held}" in out.stdout, out.stdout
    assert "dispatch attempts: none" in out.stdout, out.stdout


def test_only_the_owner_sees_the_history(server: Server) -> None:
    c = server.client
    _, buyer_key, seller_key = market(c)
    _, other_key = c.create_buyer(deposit_usdc=1_000_000, name="other")
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    job = submit_ok(c, buyer_key)
    path = f"/v1/video/generations/{job['id']}"

    theirs = c.get(f"{path}/events", key=other_key)
    assert theirs.status == 404, theirs.body
    # Exactly what poll answers for someone else's job: nothing tells it exists.
    assert theirs.json() == c.get(path, key=other_key).json()
    assert theirs.json()["error"]["code"] == "not_found"
    for unknown in (str(uuid.uuid4()), "not-a-job"):
        r = c.get(f"/v1/video/generations/{unknown}/events", key=buyer_key)
        assert r.status == 404 and r.json()["error"]["code"] == "not_found", r.body
    # A buyer id is an aggregate id too, but not a job's.
    buyer_id, _ = c.create_buyer(name="third")
    r = c.get(f"/v1/video/generations/{buyer_id}/events", key=buyer_key)
    assert r.status == 404, r.body
    # A buyer key is required: the job token opens poll, cancel and download only.
    assert c.get(f"{path}/events").status == 401
    token = c.get(f"{path}/events", headers={"X-Job-Token": job["job_token"]})
    assert token.status == 401, token.body
    assert c.get(f"{path}/events", key=buyer_key).status == 200

    for unknown in (str(uuid.uuid4()), buyer_id, "not-a-job"):
        out = server.cli("audit", "job", unknown)
        assert out.returncode == 1, (unknown, out.stdout, out.stderr)
        assert out.stdout == "" and unknown in out.stderr, out.stderr
