"""SPEC 4.4 end to end: seller offers, the operator's routes, OpenAPI, health, metrics, config."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

from api import app as api_app
from tests.harness import ADMIN_TOKEN, Server, base_env, free_port
from tests.test_api_contract import (
    IMAGE,
    PIXVERSE,
    RUNWAY,
    WAN,
    assert_error,
    balance,
    submitted,
)

OFFERS = "/v1/seller/offers"


def _offer(model: str = RUNWAY, **fields: Any) -> dict[str, Any]:
    return {
        "model": model,
        "provider": "venice",
        "api_key": "sim_ok",
        "pricing_mode": "cost_multiplier",
        "cost_multiplier": "0.80",
        **fields,
    }


def test_seller_offers(server: Server) -> None:
    c = server.client
    seller_id, seller_key = c.create_seller()
    _, rival_key = c.create_seller(name="rival")
    _, buyer_key = c.create_buyer(deposit_usdc=10_000_000)

    r = c.post(OFFERS, key=seller_key, json_body=_offer(cost_multiplier="0.8"))
    assert r.status == 201, r.body
    offer = r.json()
    assert offer["model"] == RUNWAY and offer["seller_id"] == seller_id
    assert offer["cost_multiplier"] == "0.80" and offer["state"] == "active"
    assert "api_key" not in offer and b"sim_ok" not in r.body
    offer_id = offer["id"]

    # Invalid offers: 400 (or 404 for a model that does not exist), nothing listed.
    bad: list[tuple[dict[str, Any], int, str, str | None]] = [
        (_offer(cost_multiplier="0.04"), 400, "invalid_request", "cost_multiplier"),
        (_offer(cost_multiplier="1.01"), 400, "invalid_request", "cost_multiplier"),
        (_offer(cost_multiplier="abc"), 400, "invalid_request", "cost_multiplier"),
        (_offer(cost_multiplier=""), 400, "invalid_request", "cost_multiplier"),
        (_offer(cost_multiplier="NaN"), 400, "invalid_request", "cost_multiplier"),
        (_offer(cost_multiplier=0.5), 400, "invalid_request", "cost_multiplier"),
        (_offer(provider="openai"), 400, "invalid_request", "provider"),
        (_offer(pricing_mode="fixed"), 400, "invalid_request", "pricing_mode"),
        (_offer(max_concurrent_jobs=0), 400, "invalid_request", "max_concurrent_jobs"),
        (_offer(extra=True), 400, "invalid_request", "extra"),
        (
            {"model": RUNWAY, "provider": "venice", "cost_multiplier": "0.8"},
            400,
            "invalid_request",
            "api_key",
        ),
        (_offer(model="venice-nope"), 404, "model_not_found", "model"),
        (_offer(api_key="sk-live-not-a-sandbox-key"), 400, "invalid_provider_key", "api_key"),
    ]
    for body, status, code, param in bad:
        r = c.post(OFFERS, key=seller_key, json_body=body)
        try:
            assert_error(r, status, code, param)
        except AssertionError as e:
            raise AssertionError(f"{body}: {e}") from None
        assert b"sk-live-not-a-sandbox-key" not in r.body
    for mult in ("0.05", "1.00", "1"):
        r = c.post(OFFERS, key=seller_key, json_body=_offer(PIXVERSE, cost_multiplier=mult))
        assert r.status == 201, r.body
        assert c.delete(f"{OFFERS}/{r.json()['id']}", key=seller_key).status == 200
    listed = c.get(OFFERS, key=seller_key)
    assert listed.status == 200 and b"sim_ok" not in listed.body
    assert [o["id"] for o in listed.json()["data"]] == [offer_id]
    assert c.get(OFFERS, key=rival_key).json()["data"] == []
    assert_error(c.post(OFFERS, key=buyer_key, json_body=_offer()), 401, "invalid_api_key")

    # PATCH: the multiplier (validated like on create) and pausing.
    r = c.patch(f"{OFFERS}/{offer_id}", key=seller_key, json_body={"cost_multiplier": "0.6"})
    assert r.status == 200 and r.json()["cost_multiplier"] == "0.60", r.body
    for body, param in (
        ({"cost_multiplier": "2"}, "cost_multiplier"),
        ({"cost_multiplier": 0.5}, "cost_multiplier"),
        ({"paused": "yes"}, "paused"),
        ({"model": PIXVERSE}, "model"),
    ):
        assert_error(
            c.patch(f"{OFFERS}/{offer_id}", key=seller_key, json_body=body),
            400,
            "invalid_request",
            param,
        )
    job = submitted(c.submit(buyer_key, model=RUNWAY))
    assert job["estimated_cost_usdc"] == "300000"  # runway 5 s 720p: 500000 list at 0.60
    r = c.patch(f"{OFFERS}/{offer_id}", key=seller_key, json_body={"paused": True})
    assert r.status == 200 and r.json()["state"] == "paused", r.body
    # A market with only a paused offer has no offer to route to.
    assert_error(c.submit(buyer_key, model=RUNWAY), 404, "no_sellers_for_model")
    r = c.patch(f"{OFFERS}/{offer_id}", key=seller_key, json_body={"paused": False})
    assert r.status == 200 and r.json()["state"] == "active", r.body
    submitted(c.submit(buyer_key, model=RUNWAY))

    # Another seller can neither change nor withdraw it; ids that are not offers are 404.
    for r in (
        c.patch(f"{OFFERS}/{offer_id}", key=rival_key, json_body={"paused": True}),
        c.delete(f"{OFFERS}/{offer_id}", key=rival_key),
        c.patch(f"{OFFERS}/{uuid.uuid4()}", key=seller_key, json_body={"paused": True}),
        c.delete(f"{OFFERS}/{uuid.uuid4()}", key=seller_key),
        c.delete(f"{OFFERS}/not-an-id", key=seller_key),
    ):
        assert_error(r, 404, "not_found")
    assert c.get(OFFERS, key=seller_key).json()["data"][0]["state"] == "active"

    # DELETE: gone from the list and from routing; a second DELETE or a PATCH is 404.
    r = c.delete(f"{OFFERS}/{offer_id}", key=seller_key)
    assert r.status == 200 and r.json()["deleted"] is True, r.body
    assert c.get(OFFERS, key=seller_key).json()["data"] == []
    assert_error(c.delete(f"{OFFERS}/{offer_id}", key=seller_key), 404, "not_found")
    assert_error(
        c.patch(f"{OFFERS}/{offer_id}", key=seller_key, json_body={"paused": False}),
        404,
        "not_found",
    )
    assert_error(c.submit(buyer_key, model=RUNWAY), 404, "no_sellers_for_model")

    # The provider key is checked when replaced too, and never echoed.
    other = c.create_offer(seller_key, WAN, "sim_ok", "0.80")
    r = c.patch(f"{OFFERS}/{other['id']}", key=seller_key, json_body={"api_key": "live_nope"})
    assert_error(r, 400, "invalid_provider_key", "api_key")
    r = c.patch(f"{OFFERS}/{other['id']}", key=seller_key, json_body={"api_key": "sim_other"})
    assert r.status == 200 and b"sim_other" not in r.body, r.body
    submitted(c.submit(buyer_key, model=WAN, image_url=IMAGE))


def test_operator_routes_and_balances(server: Server) -> None:
    c = server.client
    r = c.post("/admin/buyers", key=ADMIN_TOKEN, json_body={"name": "acme"})
    assert r.status == 201, r.body
    buyer = r.json()
    buyer_id, buyer_key = buyer["buyer_id"], buyer["api_key"]
    assert buyer_key and buyer["name"] == "acme"
    deposits = f"/admin/buyers/{buyer_id}/deposits"

    for amount in ("0", "-5", "1.5", 1.5, "", "abc", "1e6", " 5", 0, -5, True, None, "١٢"):
        assert_error(
            c.post(deposits, key=ADMIN_TOKEN, json_body={"amount_usdc": amount}),
            400,
            "invalid_request",
            "amount_usdc",
        )
    assert_error(
        c.post(deposits, key=ADMIN_TOKEN, json_body={}), 400, "invalid_request", "amount_usdc"
    )
    for unknown in (str(uuid.uuid4()), "not-a-uuid"):
        assert_error(
            c.post(
                f"/admin/buyers/{unknown}/deposits", key=ADMIN_TOKEN, json_body={"amount_usdc": "5"}
            ),
            404,
            "not_found",
        )
    assert_error(
        c.post(deposits, key=buyer_key, json_body={"amount_usdc": "5"}), 401, "invalid_api_key"
    )
    assert_error(c.post(deposits, json_body={"amount_usdc": "5"}), 401, "invalid_api_key")
    for body in ({}, {"name": ""}, {"name": 5}, {"name": "x", "role": "admin"}):
        for path in ("/admin/buyers", "/admin/sellers"):
            assert_error(c.post(path, key=ADMIN_TOKEN, json_body=body), 400, "invalid_request")
    assert balance(c, buyer_key) == {
        "available_usdc": "0",
        "held_usdc": "0",
        "spent_usdc": "0",
        "deposited_usdc": "0",
    }

    for amount in ("2500000", "2500000"):
        r = c.post(deposits, key=ADMIN_TOKEN, json_body={"amount_usdc": amount})
        assert r.status == 201, r.body
        assert r.json()["amount_usdc"] == amount
    me = c.get("/v1/buyer/me", key=buyer_key)
    assert me.status == 200
    assert me.json()["id"] == buyer_id
    assert me.json()["balance"] == {
        "available_usdc": "5000000",
        "held_usdc": "0",
        "spent_usdc": "0",
        "deposited_usdc": "5000000",
    }

    # available = deposits - spent - held, through a whole job
    _, seller_key = c.create_seller()
    c.create_offer(seller_key, RUNWAY, "sim_ok", "0.80")
    job = submitted(c.submit(buyer_key, model=RUNWAY))
    held = balance(c, buyer_key)
    assert held["held_usdc"] in ("440000", "0")  # 400000 estimated, 440000 held, unless done
    assert c.wait_terminal(job["id"], buyer_key)["status"] == "succeeded"
    assert balance(c, buyer_key) == {
        "available_usdc": "4600000",
        "held_usdc": "0",
        "spent_usdc": "400000",
        "deposited_usdc": "5000000",
    }

    r = c.post("/admin/sellers", key=ADMIN_TOKEN, json_body={"name": "s"})
    assert r.status == 201 and r.json()["api_key"] and r.json()["seller_id"], r.body
    assert_error(
        c.post("/admin/sellers", key=seller_key, json_body={"name": "s"}), 401, "invalid_api_key"
    )


def _registered_routes() -> set[tuple[str, str]]:
    """Every (method, path) the aiohttp app registers, in OpenAPI's spelling."""
    app = api_app.create_app(None)  # type: ignore[arg-type]  # routes need no engine
    routes: set[tuple[str, str]] = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        path = route.resource.canonical if route.resource is not None else ""
        path = path.replace("/{min_prefix}/", "/min{min_discount}/")
        routes.add((route.method.lower(), path))
    return routes


def test_openapi_health_and_metrics(server: Server) -> None:
    c = server.client
    r = c.get("/openapi.json")
    assert r.status == 200 and r.headers["content-type"].startswith("application/json")
    doc = r.json()
    assert doc["openapi"].startswith("3.1")
    assert doc["info"]["title"] and doc["info"]["version"]
    documented = {
        (m, p)
        for p, ops in doc["paths"].items()
        for m in ops
        if m in ("get", "post", "put", "patch", "delete")
    }
    registered = _registered_routes()
    declared = {(route.method.lower(), route.path) for route in api_app.ROUTES}
    assert declared <= registered
    assert registered - documented == set()
    assert documented - registered == set()
    for path, ops in doc["paths"].items():
        for op in ops.values():
            names = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert names == set(re.findall(r"{(\w+)}", path)), (path, op)

    r = c.get("/healthz")
    assert r.status == 200 and r.json()["status"] == "ok", r.body

    c.get("/v1/buyer/me")  # a 401 to count
    r = c.get("/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    assert "# TYPE mediamarket_http_requests_total counter" in text
    sample = re.compile(
        r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
        r'(,[a-zA-Z_][a-zA-Z0-9_]*="[^"]*")*\})? -?[0-9.e+-]+$'
    )
    for line in text.splitlines():
        assert line.startswith("# ") or sample.match(line), line
    assert re.search(
        r'^mediamarket_http_requests_total\{[^}]*status="401"[^}]*\} [1-9]', text, re.M
    ), text
    assert re.search(
        r'^mediamarket_http_requests_total\{[^}]*status="200"[^}]*\} [1-9]', text, re.M
    ), text

    # Unknown routes and methods are errors in the usual shape too.
    assert_error(c.get("/v2/nothing"), 404, "not_found")
    r = c.request("PUT", "/v1/video/generations")
    assert r.status == 405 and set(r.json()["error"]) == {"message", "type", "code", "param"}


def test_configuration_error_is_one_line_and_exit_2(tmp_path: Path) -> None:
    port = free_port()
    for env in ({"DATABASE_URL": "mysql://x"}, {"PORT": "not-a-port"}):
        server = Server(
            tmp_path, base_env("sqlite:///" + str(tmp_path / "data"), port, **env), port, []
        )
        done = server.cli("serve", timeout=30)
        assert done.returncode == 2, (env, done.returncode, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mediamarket:"), (env, done.stderr)
        assert "Traceback" not in done.stderr and "Traceback" not in done.stdout


def test_a_deposit_retried_with_its_id_is_credited_once(server: Server) -> None:
    c = server.client
    buyer_id, buyer_key = c.create_buyer()
    deposits = f"/admin/buyers/{buyer_id}/deposits"
    once = {"amount_usdc": "1000000", "deposit_id": "wire-2026-11-24-001"}
    first = c.post(deposits, key=ADMIN_TOKEN, json_body=once)
    again = c.post(deposits, key=ADMIN_TOKEN, json_body=once)
    assert first.status == again.status == 201, again.body
    assert again.json() == first.json()
    assert first.json()["balance"]["deposited_usdc"] == "1000000"
    # The same id with another amount is refused and changes nothing.
    assert_error(
        c.post(deposits, key=ADMIN_TOKEN, json_body={**once, "amount_usdc": "999"}),
        422,
        "idempotency_key_reused",
        "deposit_id",
    )
    other = c.post(deposits, key=ADMIN_TOKEN, json_body={**once, "deposit_id": "wire-002"})
    assert other.status == 201 and other.json()["balance"]["deposited_usdc"] == "2000000"
    assert balance(c, buyer_key)["available_usdc"] == "2000000"
