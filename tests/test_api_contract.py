"""The HTTP contract of SPEC 4, end to end: a real ``mediamarket serve`` on each backend.

Each test starts one server and checks many things against it, since a start costs a second.
Shared helpers live here; the other ``test_api_*.py`` files import them.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from tests.harness import ADMIN_TOKEN, Client, Response, Server

RUNWAY = "venice-runway-gen4-5-text"
SEEDANCE = "venice-seedance-2-fast-t2v"
PIXVERSE = "venice-pixverse-c1-t2v"
WAN = "venice-wan-2-5-i2v"
IMAGE = "https://example.com/cat.png"
SUBMIT = "/v1/video/generations"
ANY = object()
JSON = {"Content-Type": "application/json"}


def assert_error(r: Response, status: int, code: str, param: Any = ANY) -> dict[str, Any]:
    """SPEC 4: ``{"error": {"message", "type", "code", "param"}}`` with the right status."""
    assert r.status == status, (status, code, r.status, r.body[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if status == 400:
        assert error["type"] == "invalid_request_error", error
    assert error["param"] is None or isinstance(error["param"], str), error
    if param is not ANY:
        assert error["param"] == param, error
    assert r.headers.get("x-request-id"), r.headers
    return dict(error)


def balance(c: Client, buyer_key: str) -> dict[str, str]:
    r = c.get("/v1/buyer/me", key=buyer_key)
    assert r.status == 200, r.body
    return dict(r.json()["balance"])


def job_ids(c: Client, buyer_key: str, query: str = "limit=100") -> list[str]:
    r = c.get(f"{SUBMIT}?{query}", key=buyer_key)
    assert r.status == 200, r.body
    return [j["id"] for j in r.json()["data"]]


def submit(
    c: Client, key: str | None, headers: dict[str, str] | None = None, prefix: str = "", **body: Any
) -> Response:
    """``Client.submit`` with request headers."""
    payload = {"model": "venice-video-gen", "prompt": "a lighthouse at dusk", **body}
    return c.post(f"{prefix}{SUBMIT}", key=key, json_body=payload, headers=headers)


def submitted(r: Response) -> dict[str, Any]:
    assert r.status == 202, r.body
    return dict(r.json())


# ------------------------------------------------------------------------ request validation


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": SEEDANCE, "prompt": "a lighthouse at dusk", **fields}


# (description, body as JSON value or raw bytes, status, code, param)
INVALID_SUBMITS: list[tuple[str, Any, int, str, Any]] = [
    ("not json", b"{not json", 400, "invalid_request", None),
    ("empty body", b"", 400, "invalid_request", None),
    ("array", b"[]", 400, "invalid_request", None),
    ("string", b'"make a video"', 400, "invalid_request", None),
    ("number", b"42", 400, "invalid_request", None),
    ("null", b"null", 400, "invalid_request", None),
    ("unknown field", _body(colour="red"), 400, "invalid_request", "colour"),
    ("missing prompt", {"model": SEEDANCE}, 400, "invalid_request", "prompt"),
    ("missing model", {"prompt": "x"}, 400, "invalid_request", "model"),
    ("model not a string", _body(model=5), 400, "invalid_request", "model"),
    ("prompt not a string", _body(prompt=["x"]), 400, "invalid_request", "prompt"),
    ("duration as string", _body(duration_seconds="4"), 400, "invalid_request", "duration_seconds"),
    ("duration as float", _body(duration_seconds=4.0), 400, "invalid_request", "duration_seconds"),
    ("duration as bool", _body(duration_seconds=True), 400, "invalid_request", "duration_seconds"),
    ("resolution as number", _body(resolution=720), 400, "invalid_request", "resolution"),
    ("audio as string", _body(audio="yes"), 400, "invalid_request", "audio"),
    ("metadata as list", _body(metadata=["a"]), 400, "invalid_request", "metadata"),
    (
        "metadata with 17 keys",
        _body(metadata={f"k{i}": i for i in range(17)}),
        400,
        "invalid_request",
        "metadata",
    ),
    ("empty prompt", _body(prompt=""), 400, "invalid_request", "prompt"),
    ("prompt of 2001 characters", _body(prompt="p" * 2001), 400, "prompt_too_long", "prompt"),
    (
        "duration not offered",
        _body(duration_seconds=7),
        400,
        "unsupported_parameter",
        "duration_seconds",
    ),
    (
        "4k on runway",
        _body(model=RUNWAY, resolution="4k"),
        400,
        "unsupported_parameter",
        "resolution",
    ),
    ("audio on runway", _body(model=RUNWAY, audio=True), 400, "unsupported_parameter", "audio"),
    (
        "image on a text model",
        _body(model=RUNWAY, image_url=IMAGE),
        400,
        "unsupported_parameter",
        "image_url",
    ),
    (
        "aspect ratio not offered",
        _body(aspect_ratio="2:1"),
        400,
        "unsupported_parameter",
        "aspect_ratio",
    ),
    ("image model without image", _body(model=WAN), 400, "invalid_request", "image_url"),
    (
        "image_url not a URL",
        _body(model=WAN, image_url="ftp://x/y.png"),
        400,
        "invalid_request",
        "image_url",
    ),
    (
        "http webhook",
        _body(webhook_url="http://example.com/hook"),
        400,
        "invalid_request",
        "webhook_url",
    ),
    (
        "private webhook",
        _body(webhook_url="https://127.0.0.1/hook"),
        400,
        "invalid_request",
        "webhook_url",
    ),
    ("unknown model", _body(model="venice-nope"), 404, "model_not_found", "model"),
]


def post_raw(
    c: Client, path: str, key: str | None, body: Any, headers: dict[str, str] | None = None
) -> Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return c.post(path, key=key, body=data, headers={**JSON, **(headers or {})})


def test_submit_validation_auth_and_request_ids(server: Server) -> None:
    c = server.client
    _, buyer_key = c.create_buyer(deposit_usdc=50_000_000)
    _, seller_key = c.create_seller()
    for model in (RUNWAY, SEEDANCE, WAN):
        c.create_offer(seller_key, model, "sim_ok", "0.80")

    # 400 and 404 with code and param, and none of them writes anything.
    for what, body, status, code, param in INVALID_SUBMITS:
        r = post_raw(c, SUBMIT, buyer_key, body)
        try:
            assert_error(r, status, code, param)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None
    assert job_ids(c, buyer_key) == []
    assert balance(c, buyer_key)["held_usdc"] == "0"

    # The limits themselves are fine: 2000 characters, 16 metadata keys, an image URL.
    ok = submitted(c.submit(buyer_key, prompt="p" * 2000, metadata={f"k{i}": i for i in range(16)}))
    assert ok["metadata"] == {f"k{i}": i for i in range(16)}
    submitted(c.submit(buyer_key, model=WAN, image_url=IMAGE))
    submitted(c.submit(buyer_key, model=RUNWAY, duration_seconds=10, resolution="1080p"))
    submitted(c.submit(buyer_key, audio=True, duration_seconds=12, aspect_ratio="9:16"))

    # /min{N} must be 0..100 without leading zeros, on every media path.
    for prefix in ("/min030", "/min-1", "/min30.5", "/min101", "/min", "/minx", "/min1000"):
        assert_error(c.submit(buyer_key, prefix=prefix), 400, "invalid_minimum_discount")
        assert_error(
            c.get(f"{prefix}{SUBMIT}/{ok['id']}", key=buyer_key), 400, "invalid_minimum_discount"
        )
        assert_error(
            c.delete(f"{prefix}{SUBMIT}/{ok['id']}", key=buyer_key), 400, "invalid_minimum_discount"
        )
        assert_error(c.get(f"{prefix}{SUBMIT}", key=buyer_key), 400, "invalid_minimum_discount")

    # 401: no key, a wrong key, another scheme, a seller key where a buyer's is needed, a
    # buyer key on the operator and seller routes. Authentication comes before the body.
    seller_as_buyer = c.submit(seller_key)
    assert_error(seller_as_buyer, 401, "invalid_api_key")
    for r in (
        submit(c, None),
        c.submit("mm_buyer_wrong"),
        post_raw(c, SUBMIT, None, b"{not json"),
        c.post(SUBMIT, json_body=_body(), headers={"Authorization": f"Basic {buyer_key}"}),
        c.post(SUBMIT, json_body=_body(), headers={"Authorization": "Bearer "}),
        c.get("/v1/buyer/me"),
        c.get("/v1/buyer/me", key=seller_key),
        c.get("/v1/buyer/me", key=ADMIN_TOKEN),
        c.get(SUBMIT, key=seller_key),
        c.get(f"{SUBMIT}/{ok['id']}"),
        c.get(f"{SUBMIT}/{ok['id']}", key=seller_key),
        c.delete(f"{SUBMIT}/{ok['id']}", key="mm_buyer_wrong"),
        c.post("/admin/buyers", key=buyer_key, json_body={"name": "x"}),
        c.post("/admin/sellers", key=buyer_key, json_body={"name": "x"}),
        c.post("/admin/buyers", json_body={"name": "x"}),
        c.post("/admin/buyers", key=ADMIN_TOKEN + "x", json_body={"name": "x"}),
        c.get("/v1/seller/offers", key=buyer_key),
    ):
        assert_error(r, 401, "invalid_api_key")
    assert balance(c, buyer_key)["held_usdc"] != "0"
    before = job_ids(c, buyer_key)

    # 404 for jobs that are not there or not yours; a job id that is not a uuid is not a job.
    _, other_key = c.create_buyer(deposit_usdc=1_000_000, name="other")
    for path in (
        f"{SUBMIT}/{ok['id']}",
        f"{SUBMIT}/{uuid.uuid4()}",
        f"{SUBMIT}/not-a-uuid",
        f"/v1/media/artifacts/{ok['id']}/0",
    ):
        assert_error(c.get(path, key=other_key), 404, "not_found")
    assert_error(c.delete(f"{SUBMIT}/{ok['id']}", key=other_key), 404, "not_found")
    assert_error(c.get(f"{SUBMIT}/{uuid.uuid4()}", key=buyer_key), 404, "not_found")
    assert_error(c.delete(f"{SUBMIT}/{uuid.uuid4()}", key=buyer_key), 404, "not_found")
    assert_error(c.get(f"{SUBMIT}/12345", key=buyer_key), 404, "not_found")
    assert_error(c.get("/v1/no-such-route", key=buyer_key), 404, "not_found")
    assert c.get(f"{SUBMIT}/{ok['id']}", key=buyer_key).json()["status"] != "canceled"
    assert job_ids(c, other_key) == []

    # 413 beyond 4 MiB, whatever the route, and nothing written.
    huge = b'{"model": "venice-video-gen", "prompt": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    assert_error(post_raw(c, SUBMIT, buyer_key, huge), 413, "request_too_large")
    assert_error(post_raw(c, "/admin/buyers", ADMIN_TOKEN, huge), 413, "request_too_large")
    assert job_ids(c, buyer_key) == before

    # X-Request-Id: echoed when sent, generated (and distinct) otherwise; success and error alike.
    for make in (
        lambda h: post_raw(c, SUBMIT, buyer_key, _body(), h),
        lambda h: post_raw(c, SUBMIT, buyer_key, b"[]", h),
        lambda h: c.get(f"{SUBMIT}/{uuid.uuid4()}", key=buyer_key, headers=h),
        lambda h: c.get("/v1/buyer/me", headers=h),
        lambda h: c.get("/healthz", headers=h),
        lambda h: c.get("/nowhere", headers=h),
        lambda h: post_raw(c, SUBMIT, buyer_key, huge, h),
    ):
        sent = f"client-{uuid.uuid4().hex[:12]}"
        assert make({"X-Request-Id": sent}).headers.get("x-request-id") == sent
        first, second = make({}).headers.get("x-request-id"), make({}).headers.get("x-request-id")
        assert first and second and first != second


# ------------------------------------------------------------------------ routing errors


def test_routing_balance_and_minimum_discount(server: Server) -> None:
    c = server.client
    _, buyer_key = c.create_buyer(deposit_usdc=20_000_000)
    _, seller_key = c.create_seller()

    # No offer at all for the model: 404 no_sellers_for_model (and through the alias too).
    for model in ("venice-video-gen", SEEDANCE):
        assert_error(c.submit(buyer_key, model=model), 404, "no_sellers_for_model")

    # One offer at 0.70: a discount of exactly 30% (pixverse 5 s 720p lists at 250000).
    c.create_offer(seller_key, PIXVERSE, "sim_ok", "0.70")
    at_boundary = submitted(c.submit(buyer_key, prefix="/min30", model=PIXVERSE))
    assert at_boundary["estimated_cost_usdc"] == "175000"
    for prefix in ("/min31", "/min100"):
        err = assert_error(
            c.submit(buyer_key, prefix=prefix, model=PIXVERSE), 503, "minimum_discount_not_met"
        )
        assert "30%" in err["message"], err
    for prefix in ("/min0", "/min7", ""):
        submitted(c.submit(buyer_key, prefix=prefix, model=PIXVERSE))

    # On poll, list and cancel the prefix is accepted and ignored, whatever N is.
    job_id = at_boundary["id"]
    for prefix in ("/min0", "/min7", "/min100"):
        r = c.get(f"{prefix}{SUBMIT}/{job_id}", key=buyer_key)
        assert r.status in (200, 202) and r.json()["id"] == job_id, r.body
        r = c.get(f"{prefix}{SUBMIT}", key=buyer_key)
        assert r.status == 200 and job_id in [j["id"] for j in r.json()["data"]]
    r = c.delete(f"/min100{SUBMIT}/{job_id}", key=buyer_key)
    assert r.status == 200 and r.json()["id"] == job_id, r.body
    # dispatched by now: canceled and billed, or already succeeded (SPEC 2)
    assert c.wait_terminal(job_id, buyer_key)["status"] in ("canceled", "succeeded")

    # 402: a hold beyond the available balance is refused and writes nothing.
    c.create_offer(seller_key, RUNWAY, "sim_ok", "0.80")
    poor_id, poor_key = c.create_buyer(deposit_usdc=659_999, name="poor")
    me_before = c.get("/v1/buyer/me", key=poor_key).json()
    # runway 5 s 1080p: 750000 list, 600000 at 0.80, held up to 660000
    big = {"model": RUNWAY, "duration_seconds": 5, "resolution": "1080p"}
    assert_error(c.submit(poor_key, **big), 402, "insufficient_balance")
    assert c.get("/v1/buyer/me", key=poor_key).json() == me_before
    assert job_ids(c, poor_key) == []
    _, broke_key = c.create_buyer(name="broke")
    assert_error(c.submit(broke_key, **big), 402, "insufficient_balance")
    assert job_ids(c, broke_key) == []
    # exactly enough is enough; then the next one is refused
    dep = c.post(
        f"/admin/buyers/{poor_id}/deposits", key=ADMIN_TOKEN, json_body={"amount_usdc": "1"}
    )
    assert dep.status == 201, dep.body
    first = submitted(c.submit(poor_key, **big))
    assert first["max_cost_usdc"] == "660000"
    assert_error(c.submit(poor_key, **big), 402, "insufficient_balance")
    assert job_ids(c, poor_key) == [first["id"]]

    # Offers exist but none is healthy: a provider refusal puts the only offer in backoff.
    c.create_offer(seller_key, WAN, "sim_429", "0.80")
    refused = submitted(c.submit(buyer_key, model=WAN, image_url=IMAGE))
    done = c.wait_terminal(refused["id"], buyer_key)
    assert done["status"] == "failed", done
    assert done["usage"]["settlement_status"] == "released"
    assert_error(c.submit(buyer_key, model=WAN, image_url=IMAGE), 503, "no_healthy_sellers")
