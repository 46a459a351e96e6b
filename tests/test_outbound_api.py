"""SPEC 9 through the API: a seller's or buyer's ``base_url`` is held to the outbound policy,
and nothing a provider says in an error body reaches the user.

Real engines, and real listeners on 127.0.0.1 that count every connection they accept, so
"the engine never contacted it" is observed, not assumed.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.harness import Client, Server
from tests.test_lifecycle import SEEDANCE, market

ServerFactory = Callable[..., Server]
MARKER = "UPSTREAM-SAYS-7f3a"


class Upstream:
    """A provider on loopback: answers per path with the given (status, JSON body); counts
    the connections and requests it gets."""

    def __init__(self, answers: dict[str, tuple[int, Any]]) -> None:
        self.answers = answers
        self.requests: list[str] = []
        self.connections = 0
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                upstream.connections += 1
                super().setup()

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self._answer()

            def do_GET(self) -> None:
                self._answer()

            def _answer(self) -> None:
                path = self.path.split("?")[0].removeprefix("/api/v1")
                upstream.requests.append(path)
                status, body = upstream.answers.get(path, (404, {"error": MARKER}))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/api/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstreams() -> Iterator[Callable[..., Upstream]]:
    made: list[Upstream] = []

    def make(answers: dict[str, tuple[int, Any]] | None = None) -> Upstream:
        upstream = Upstream(answers or {})
        made.append(upstream)
        return upstream

    yield make
    for upstream in made:
        upstream.close()


def offer_body(base_url: str, key: str = "live_key") -> dict[str, Any]:
    return {
        "model": SEEDANCE,
        "provider": "venice",
        "api_key": key,
        "base_url": base_url,
        "pricing_mode": "cost_multiplier",
        "cost_multiplier": "0.80",
    }


def create_offer(c: Client, seller_key: str, base_url: str) -> Any:
    return c.post("/v1/seller/offers", key=seller_key, json_body=offer_body(base_url))


def test_a_private_base_url_is_refused_without_a_connection(
    make_server: ServerFactory, upstreams: Callable[..., Upstream]
) -> None:
    target = upstreams()
    # The operator allows this host, yet it resolves to loopback: the policy still says no.
    srv = make_server(PROVIDER_ALLOWED_HOSTS_VENICE="api.venice.ai,localhost")
    c = srv.client
    _, seller_key = c.create_seller()
    _, buyer_key = c.create_buyer(deposit_usdc=1_000_000)
    for base_url in (
        target.url(),  # not an allowed host, and loopback
        target.url("localhost"),  # allowed host, resolves to loopback
        target.url("[::ffff:127.0.0.1]"),  # IPv4 wrapped in IPv6
        f"http://user:pass@localhost:{target.port}/api/v1",  # credentials in the URL
        f"ftp://localhost:{target.port}/api/v1",
    ):
        for path, body in (
            ("/v1/seller/offers", offer_body(base_url)),
            (
                "/v1/buyer/providers",
                {"provider": "venice", "model": SEEDANCE, "api_key": "k", "base_url": base_url},
            ),
        ):
            key = seller_key if "seller" in path else buyer_key
            r = c.post(path, key=key, json_body=body)
            assert r.status == 400, (base_url, r.body)
            error = r.json()["error"]
            assert error["code"] in ("invalid_request", "invalid_provider_key"), error
            assert MARKER not in r.body.decode()
    assert target.connections == 0 and target.requests == []
    assert c.get("/v1/seller/offers", key=seller_key).json()["data"] == []
    assert c.get("/v1/buyer/providers", key=buyer_key).json()["data"] == []


def test_an_allowed_host_is_called_but_its_error_bodies_are_never_echoed(
    make_server: ServerFactory, upstreams: Callable[..., Upstream]
) -> None:
    refusing = upstreams(
        {
            "/video/quote": (400, {"error": MARKER, "details": {"_errors": [MARKER]}}),
            "/video/retrieve": (401, {"error": MARKER}),
        }
    )
    # Quotes and takes the key, then refuses every job with a body the seller must not see.
    taking = upstreams(
        {
            "/video/quote": (200, {"quote": 0.16}),
            "/video/retrieve": (404, {"error": MARKER}),
            "/video/queue": (402, {"error": f"{MARKER} balance"}),
        }
    )
    srv = make_server(PROVIDER_ALLOWED_HOSTS_VENICE="127.0.0.1", OUTBOUND_ALLOW_PRIVATE="true")
    c = srv.client
    _, buyer_key, seller_key = market(c)

    r = create_offer(c, seller_key, refusing.url())
    assert r.status == 400 and r.json()["error"]["code"] == "invalid_provider_key", r.body
    assert MARKER not in r.body.decode()
    assert "HTTP 400" in r.json()["error"]["message"]
    assert refusing.requests == ["/video/quote"]

    r = create_offer(c, seller_key, taking.url())
    assert r.status == 201, r.body
    offer_id = r.json()["id"]
    assert taking.requests == ["/video/quote", "/video/retrieve"]
    job = c.submit(buyer_key, model=SEEDANCE)
    assert job.status == 202, job.body
    done = c.wait_terminal(job.json()["id"], buyer_key)
    assert done["status"] == "failed" and done["error"]["code"] == "no_sellers_available", done
    assert "/video/queue" in taking.requests
    offers = c.get("/v1/seller/offers", key=seller_key)
    [offer] = [o for o in offers.json()["data"] if o["id"] == offer_id]
    assert offer["health"]["status"] == "backoff"
    assert "402" in offer["health"]["reason"]
    for body in (offers.body, json.dumps(done).encode()):
        assert MARKER not in body.decode()
    # The operator's log has what the provider said, for diagnosis.
    assert MARKER in srv.logs()
