"""SPEC 9, end to end: malformed and hostile input gets a 4xx in SPEC 4's error shape, with an
``X-Request-Id``, and writes nothing. One regression test per defect found (issue 11), through a
real server; raw sockets where a client library would refuse to send the bytes.

Hostile input is handled before any storage is touched, so one backend (SQLite) is enough.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ADMIN_TOKEN, Response, Server, base_env, free_port
from tests.test_api_contract import RUNWAY, SUBMIT, assert_error, balance, job_ids, submitted

BODY = {"model": RUNWAY, "prompt": "a lighthouse at dusk"}


@dataclass
class World:
    server: Server
    buyer_key: str
    seller_key: str
    job: dict[str, Any]  # succeeded, with one artifact
    other_job: dict[str, Any]  # another buyer's

    def raw(self, head: bytes, body: bytes = b"") -> Response:
        """One request exactly as written, over its own connection."""
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=30) as s:
            s.sendall(head + b"Connection: close\r\n" + b"Content-Length: %d\r\n\r\n" % len(body))
            s.sendall(body)
            data = b""
            while chunk := s.recv(1 << 16):
                data += chunk
        header_block, _, payload = data.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return Response(int(lines[0].split()[1]), headers, payload)

    def post(self, path: str, body: bytes, extra: bytes = b"", key: str | None = None) -> Response:
        key = self.buyer_key if key is None else key
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + extra
        )
        return self.raw(head, body)

    def get(self, path: str, extra: bytes = b"", key: str | None = None) -> Response:
        auth = b"" if key is None else f"Authorization: Bearer {key}\r\n".encode()
        return self.raw(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + auth + extra)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp("hostile")
    port = free_port()
    server = Server(tmp, base_env(f"sqlite:///{tmp}/data", port, LOG_LEVEL="debug"), port, [])
    server.start()
    try:
        c = server.client
        _, buyer_key = c.create_buyer(deposit_usdc=10_000_000)
        _, seller_key = c.create_seller()
        c.create_offer(seller_key, RUNWAY)
        job = submitted(c.submit(buyer_key, model=RUNWAY))
        assert c.wait_terminal(job["id"], buyer_key)["status"] == "succeeded"
        _, other_key = c.create_buyer(deposit_usdc=10_000_000, name="other")
        other_job = submitted(c.submit(other_key, model=RUNWAY))
        yield World(server, buyer_key, seller_key, job, other_job)
    finally:
        server.kill()


@pytest.fixture
def unchanged(world: World) -> Iterator[None]:
    """The test writes nothing: the buyer's jobs and balance are as they were."""
    c = world.server.client
    before = (job_ids(world.server.client, world.buyer_key), balance(c, world.buyer_key))
    yield
    assert (job_ids(c, world.buyer_key), balance(c, world.buyer_key)) == before


def body(**fields: Any) -> bytes:
    return json.dumps({**BODY, **fields}).encode()


def test_json_nested_100000_deep_is_a_400(world: World, unchanged: None) -> None:
    deep = b'{"model": "x", "prompt": "p", "metadata": {"a": ' + b"[" * 100_000 + b"]" * 100_000
    error = assert_error(world.post(SUBMIT, deep + b"}}"), 400, "invalid_request")
    assert "nested deeper than 32" in error["message"]
    # The limit itself: 32 levels are read (and then refused by the model), 33 are not.
    at_limit = b"[" * 31 + b"1" + b"]" * 31
    error = assert_error(world.post(SUBMIT, b'{"m": ' + at_limit + b"}"), 400, "invalid_request")
    assert error["param"] == "m"
    error = assert_error(
        world.post(SUBMIT, b'{"m": [' + at_limit + b"]}"), 400, "invalid_request", None
    )
    assert "nested deeper" in error["message"]


@pytest.mark.parametrize(
    "payload",
    [
        b'{"model": "venice-runway-gen4-5-text", "prompt": "\\ud800"}',
        b'{"model": "venice-runway-gen4-5-text", "prompt": "x", "metadata": {"\\ud800": 1}}',
        b'{"model": "venice-runway-gen4-5-text", "prompt": "a \\udfff b"}',
    ],
    ids=["prompt", "metadata key", "low surrogate"],
)
def test_a_lone_surrogate_is_a_400(world: World, unchanged: None, payload: bytes) -> None:
    error = assert_error(world.post(SUBMIT, payload), 400, "invalid_request")
    assert "surrogate" in error["message"]


def test_bytes_that_are_no_text_are_a_400(world: World, unchanged: None) -> None:
    for payload in (
        b'{"model": "venice-runway-gen4-5-text", "prompt": "\xff\xfe"}',  # not UTF-8
        b'\xef\xbb\xbf{"model": "x", "prompt": "p"}',  # a byte order mark
        b'{"model": "x", "prompt": "p", "metadata": {"a": NaN}}',
        b'{"model": "x", "prompt": "p", "metadata": {"a": -Infinity}}',
        b'{"model": "x", "prompt": "p", "metadata": {"a": 1e400}}',
    ):
        assert_error(world.post(SUBMIT, payload), 400, "invalid_request")


def test_duplicate_json_keys_are_a_400(world: World, unchanged: None) -> None:
    payload = b'{"model": "venice-runway-gen4-5-text", "prompt": "a", "prompt": "b"}'
    error = assert_error(world.post(SUBMIT, payload), 400, "invalid_request")
    assert "duplicate key 'prompt'" in error["message"]
    nested = b'{"model": "x", "prompt": "a", "metadata": {"k": 1, "k": 2}}'
    assert_error(world.post(SUBMIT, nested), 400, "invalid_request")
    admin = b'{"name": "a", "name": "b"}'
    assert_error(world.post("/admin/buyers", admin, key=ADMIN_TOKEN), 400, "invalid_request")


def test_a_body_that_is_not_application_json_is_a_415(world: World) -> None:
    c = world.server.client
    before = job_ids(c, world.buyer_key)
    head = f"POST {SUBMIT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {world.buyer_key}\r\n"
    for content_type in (
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin-1",
        "application/jsonx",
    ):
        extra = f"Content-Type: {content_type}\r\n" if content_type else ""
        r = world.raw((head + extra).encode(), body())
        assert_error(r, 415, "unsupported_media_type")
    assert job_ids(c, world.buyer_key) == before
    for content_type in ("application/json; charset=utf-8", "Application/JSON"):
        r = world.raw(f"{head}Content-Type: {content_type}\r\n".encode(), body(prompt="ok"))
        assert r.status == 202, r.body
        c.delete(f"{SUBMIT}/{r.json()['id']}", key=world.buyer_key)
        # A cancel that lands during the queue call is finished (and billed) by the worker:
        # wait for it here, or a later test's "writes nothing" check sees the balance move.
        c.wait_terminal(r.json()["id"], world.buyer_key)


def test_header_bytes_that_are_no_text(world: World, unchanged: None) -> None:
    job = world.job
    # Authorization and X-Job-Token: no credential, a 401 (never a 500).
    auth = b"Authorization: Bearer \xff\xfe\x80\r\n"
    r = world.raw(b"POST " + SUBMIT.encode() + b" HTTP/1.1\r\nHost: x\r\n" + auth, body())
    assert_error(r, 401, "invalid_api_key")
    assert_error(world.get("/v1/buyer/me", auth), 401, "invalid_api_key")
    token = b"X-Job-Token: mjt_\xff\xfe\r\n"
    assert_error(world.get(f"{SUBMIT}/{job['id']}", token), 401, "invalid_api_key")
    # Idempotency-Key: a 400 naming the header.
    r = world.post(SUBMIT, body(), b"Idempotency-Key: k\xe9y\r\n")
    assert_error(r, 400, "invalid_request", "Idempotency-Key")
    # X-Request-Id: not echoed, one is generated.
    r = world.get("/healthz", b"X-Request-Id: id\xff\r\n")
    assert r.status == 200 and r.headers["x-request-id"].startswith("req_")


def test_a_signed_url_with_a_non_ascii_signature_is_a_401(world: World) -> None:
    path = f"/v1/media/artifacts/{world.job['id']}/0"
    for query in (
        "expires=99999999999&sig=%C3%A9",
        "expires=99999999999&sig=%FF",
        "expires=%D9%A1%D9%A2&sig=abc",  # Arabic-Indic digits
        "expires=-1&sig=abc",
        "expires=" + "9" * 5000 + "&sig=abc",
        "sig=abc",
    ):
        r = world.get(f"{path}?{query}")
        assert_error(r, 401, "invalid_api_key")
    # Raw bytes beyond ASCII in the request line never reach the app: aiohttp's HTTP parser
    # answers 400 itself (in its own plain-text shape).
    assert world.get(f"{path}?expires=99999999999&sig=\u00e9").status == 400
    # The real one still works.
    url = world.server.client.get(f"{SUBMIT}/{world.job['id']}", key=world.buyer_key).json()
    signed = url["results"][0]["url"]
    assert world.get(signed[signed.index("/v1/") :]).status == 200


def test_ranges_are_served_or_refused_in_the_error_shape(world: World) -> None:
    path = f"/v1/media/artifacts/{world.job['id']}/0"
    whole = world.get(path, key=world.buyer_key)
    assert whole.status == 200 and whole.headers["content-type"] == "video/mp4"
    size = len(whole.body)
    assert int(whole.headers["content-length"]) == size and size > 100
    # A malformed Range is refused in SPEC's shape (SPEC 9), never an empty video body.
    for malformed in ("bytes=abc", "bytes=5-2", "bytes=\u0660-9", "items=0-9", "bytes=", "0-9"):
        r = world.get(path, f"Range: {malformed}\r\n".encode(), key=world.buyer_key)
        assert_error(r, 416, "range_not_satisfiable", "Range")
        assert r.headers["content-range"] == f"bytes */{size}"
    # Several well-formed ranges: the whole file (RFC 9110 14.2), not a multipart answer.
    r = world.get(path, b"Range: bytes=0-1,4-5\r\n", key=world.buyer_key)
    assert r.status == 200 and r.body == whole.body
    r = world.get(path, b"Range: bytes=0-9\r\n", key=world.buyer_key)
    assert r.status == 206 and r.body == whole.body[:10]
    assert r.headers["content-range"] == f"bytes 0-9/{size}"
    r = world.get(path, b"Range: bytes=-10\r\n", key=world.buyer_key)
    assert r.status == 206 and r.body == whole.body[-10:]
    # A range starting past the end: 416 in SPEC's shape, with the size.
    for past in (f"bytes={size}-", f"bytes={size + 5}-{size + 9}", "bytes=-0"):
        r = world.get(path, f"Range: {past}\r\n".encode(), key=world.buyer_key)
        assert_error(r, 416, "range_not_satisfiable", "Range")
        assert r.headers["content-range"] == f"bytes */{size}"


def test_the_minimum_discount_prefix_is_lower_case(world: World, unchanged: None) -> None:
    for prefix in ("/MIN30", "/Min30", "/mIN0"):
        r = world.post(f"{prefix}{SUBMIT}", body())
        error = assert_error(r, 400, "invalid_minimum_discount")
        assert "lower case" in error["message"]
        assert_error(
            world.get(f"{prefix}{SUBMIT}/{world.job['id']}", key=world.buyer_key),
            400,
            "invalid_minimum_discount",
        )
    assert world.get(f"/min30{SUBMIT}/{world.job['id']}", key=world.buyer_key).status == 200


def test_only_canonical_artifact_indexes(world: World) -> None:
    base = f"/v1/media/artifacts/{world.job['id']}"
    assert world.get(f"{base}/0", key=world.buyer_key).status == 200
    for index in ("-0", "%200", "%20%30", "%D9%A0", "00", "+0", "0%20", "%EF%BC%90", "0x0", "1"):
        assert_error(world.get(f"{base}/{index}", key=world.buyer_key), 404, "not_found")


def test_cost_multipliers_are_plain_decimals_of_four_places(world: World) -> None:
    c = world.server.client
    offers = "/v1/seller/offers"
    listed = c.get(offers, key=world.seller_key).json()["data"]
    for multiplier in (
        "0.500000000000000000001",
        "0.80001",
        "8e-1",
        " 0.8",
        "0.8 ",
        ".8",
        "0,8",
        "+0.8",
        "0.04",
        "1.0001",
        "\u0660.8",
    ):
        r = c.post(
            offers,
            key=world.seller_key,
            json_body={
                "model": RUNWAY,
                "provider": "venice",
                "api_key": "sim_ok",
                "cost_multiplier": multiplier,
            },
        )
        assert_error(r, 400, "invalid_request", "cost_multiplier")
    assert c.get(offers, key=world.seller_key).json()["data"] == listed
    for multiplier, stored in (("0.8", "0.80"), ("0.3333", "0.3333"), ("1", "1.00")):
        r = c.post(
            offers,
            key=world.seller_key,
            json_body={
                "model": RUNWAY,
                "provider": "venice",
                "api_key": "sim_ok",
                "cost_multiplier": multiplier,
            },
        )
        assert r.status == 201 and r.json()["cost_multiplier"] == stored, r.body
        assert c.delete(f"{offers}/{r.json()['id']}", key=world.seller_key).status == 200


def test_provider_keys_that_cannot_be_a_header_are_a_400(world: World) -> None:
    c = world.server.client
    for key in ("sim_ok\r\nX-Evil: 1", "sim ok", "sim_\u00e9", ""):
        r = c.post(
            "/v1/seller/offers",
            key=world.seller_key,
            json_body={
                "model": RUNWAY,
                "provider": "venice",
                "api_key": key,
                "cost_multiplier": "0.8",
            },
        )
        assert_error(r, 400, "invalid_request", "api_key")


def test_the_admin_token_never_reaches_the_log(world: World) -> None:
    c = world.server.client
    for path in (f"/v2/{ADMIN_TOKEN}", f"{SUBMIT}/{ADMIN_TOKEN}", f"/admin/{ADMIN_TOKEN}"):
        c.get(path, key=world.buyer_key)
    logs = world.server.logs()
    assert "/v2/[redacted]" in logs  # the requests were logged, the token masked
    assert ADMIN_TOKEN not in logs


def test_a_job_token_is_no_oracle_of_which_jobs_exist(world: World) -> None:
    """Another buyer's job and an id that names no job answer alike to a guessed token."""
    for token in ("mjt_guess", world.job["job_token"], "", "\u00e9"):
        header = {"X-Job-Token": token.encode("utf-8").decode("latin-1")}
        answers = [
            world.server.client.get(f"{SUBMIT}/{job_id}", headers=header)
            for job_id in (world.other_job["id"], "00000000-0000-4000-8000-000000000000")
        ]
        errors = [assert_error(r, 401, "invalid_api_key") for r in answers]
        assert errors[0] == errors[1]
    # The token opens its own job, and nothing of another buyer's with a key either.
    own = {"X-Job-Token": world.job["job_token"]}
    assert world.server.client.get(f"{SUBMIT}/{world.job['id']}", headers=own).status == 200
    r = world.server.client.get(f"{SUBMIT}/{world.other_job['id']}", key=world.buyer_key)
    assert_error(r, 404, "not_found")


def test_query_strings_are_read_strictly(world: World) -> None:
    c = world.server.client
    for query in (
        "limit=1&limit=2",
        "limit=%ff",
        "limit=+5",
        "limit=%D9%A5",
        "limit=05",
        "limit=5.0",
        "after=%ff",
        "nope=1",
    ):
        assert_error(c.get(f"{SUBMIT}?{query}", key=world.buyer_key), 400, "invalid_request")
    for query in ("from=2026-02-30", "from=2026-1-1", "to=%ff", "from=2026-01-02&to=2026-01-01"):
        r = c.get(f"/v1/seller/earnings?{query}", key=world.seller_key)
        if "to=2026-01-01" in query:
            assert r.status == 200, r.body  # a reversed range is simply empty
        else:
            assert_error(r, 400, "invalid_request")


UNPARSABLE = {
    "a control byte in a header name": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Bad\x01: y\r\n",
    "a header line over 8190 bytes": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Long: "
    + b"a" * 9000
    + b"\r\n",
    "no request line": b"GARBAGE\r\n",
    "HTTP/2's preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n",
    "a Content-Length that is no number": SUBMIT.encode().join(
        (b"POST ", b" HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n")
    ),
    "a chunk size that is no number": SUBMIT.encode().join(
        (b"POST ", b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    ),
    "two Content-Lengths": SUBMIT.encode().join(
        (b"POST ", b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n")
    ),
}


@pytest.mark.parametrize("what", UNPARSABLE)
def test_requests_the_http_parser_refuses_get_the_error_shape(
    world: World, unchanged: None, what: str
) -> None:
    """aiohttp answers these itself, before any middleware: plain text quoting the bytes back,
    and a traceback in the log per request, unless the engine answers them."""
    request = UNPARSABLE[what]
    before = world.server.logs()
    with socket.create_connection(("127.0.0.1", world.server.port), timeout=30) as s:
        s.sendall(request + b"\r\n")
        data = b""
        while chunk := s.recv(1 << 16):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    r = Response(int(lines[0].split()[1]), headers, payload)
    error = assert_error(r, 400, "invalid_request")
    assert r.headers["x-request-id"].startswith("req_")
    assert b"aaaa" not in payload and "GARBAGE" not in error["message"]
    logged = world.server.logs()[len(before) :]
    assert "malformed_request" in logged and "Traceback" not in logged, logged
