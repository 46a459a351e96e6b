"""Webhooks (SPEC 7) through real processes: signed deliveries verified with the
``standardwebhooks`` package (not the engine's own signing code) on a loopback receiver,
retries with one webhook-id, a SIGKILL between tries, secret rotation, and the outbound policy
at send time."""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from tests.conftest import ServerFactory
from tests.harness import Client, Server
from tests.receiver import Receiver

MODEL = "venice-runway-gen4-5-text"
# Loopback receivers need private addresses allowed; http:// needs WEBHOOK_ALLOW_HTTP.
LOOPBACK = {"OUTBOUND_ALLOW_PRIVATE": "true", "WEBHOOK_ALLOW_HTTP": "true"}
FAST_RETRIES = {"WEBHOOK_RETRY_SCHEDULE": "0.2,0.2,0.2,0.2"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _market(c: Client) -> tuple[str, str]:
    _, buyer_key = c.create_buyer(deposit_usdc=50_000_000)
    _, seller_key = c.create_seller()
    return buyer_key, seller_key


@dataclass
class Shared:
    """The module's engine (one per backend), for the tests whose settings agree; each test
    has its own buyer, seller and receiver on it."""

    server: Server
    seller_keys: list[str] = field(default_factory=list)

    def market(self) -> tuple[str, str]:
        buyer_key, seller_key = _market(self.server.client)
        self.seller_keys.append(seller_key)
        return buyer_key, seller_key


@pytest.fixture(scope="module")
def shared_server(module_make_server: ServerFactory) -> Server:
    # JOB_TTL_SECONDS for the expiry case; the fast retries are only used where a receiver
    # fails, and the other tests' receivers answer 200 at once.
    return module_make_server(JOB_TTL_SECONDS="3", **LOOPBACK, **FAST_RETRIES)


@pytest.fixture
def shared(shared_server: Server) -> Iterator[Shared]:
    """The shared engine; afterwards this test's offers are gone, so the next test's jobs
    route only to its own (every test here uses one model)."""
    if shared_server.proc is None or shared_server.proc.poll() is not None:
        shared_server.start()  # an earlier test's failure may have left it down
    it = Shared(shared_server)
    yield it
    c = shared_server.client
    for seller_key in it.seller_keys:
        offers = c.get("/v1/seller/offers", key=seller_key).json()["data"]
        for offer in offers:
            c.delete(f"/v1/seller/offers/{offer['id']}", key=seller_key)


def _secret(c: Client, buyer_key: str) -> str:
    r = c.post("/v1/buyer/webhook-secret", key=buyer_key)
    assert r.status == 201, r.body
    secret = r.json()["secret"]
    assert secret.startswith("whsec_")
    return str(secret)


def _submit(c: Client, buyer_key: str, url: str) -> dict[str, Any]:
    r = c.submit(buyer_key, model=MODEL, duration_seconds=5, webhook_url=url)
    assert r.status == 202, r.body
    return dict(r.json())


def _delivery(
    c: Client, job_id: str, key: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The job's delivery once ``done`` holds for it (polled, as a buyer would)."""
    deadline = time.monotonic() + 30
    while True:
        r = c.get(f"/v1/video/generations/{job_id}/webhooks", key=key)
        assert r.status == 200, r.body
        data = r.json()["data"]
        if data and done(data[0]):
            return dict(data[0])
        assert time.monotonic() < deadline, f"delivery never got there: {data}"
        time.sleep(0.05)


def _delivered(d: dict[str, Any]) -> bool:
    return bool(d["status"] == "delivered")


def test_signed_delivery_for_every_terminal_state(shared: Shared, receiver: Receiver) -> None:
    srv = shared.server
    c = srv.client
    buyer_key, seller_key = shared.market()
    secret = _secret(c, buyer_key)
    cases = [
        ("sim_ok", "succeeded"),
        ("sim_content_policy", "failed"),
        ("sim_never", "canceled"),
        ("sim_never", "expired"),
    ]
    for n, (provider_key, status) in enumerate(cases, start=1):
        offer = c.create_offer(seller_key, MODEL, provider_key, "0.80")
        job = _submit(c, buyer_key, receiver.url(f"/{status}"))
        if status == "canceled":
            assert c.delete(f"/v1/video/generations/{job['id']}", key=buyer_key).status == 200
        polled = c.wait_terminal(job["id"], buyer_key)
        assert polled["status"] == status

        got = receiver.wait_for(n)[-1]
        Webhook(secret).verify(got.body, got.headers)
        sent = json.loads(got.body)
        assert sent["id"] == job["id"] and sent["status"] == status
        assert sent["usage"] == polled["usage"]
        if status == "failed":
            assert sent["error"]["code"] == "content_policy"
        delivery = _delivery(c, job["id"], buyer_key, _delivered)
        assert delivery["webhook_id"] == got.headers["webhook-id"]
        [attempt] = delivery["attempts"]
        assert attempt["status_code"] == 200 and attempt["error"] is None
        assert delivery["next_attempt_at"] is None
        assert c.delete(f"/v1/seller/offers/{offer['id']}", key=seller_key).status == 200

    # The deliveries are in the job's audit.
    audit = srv.cli("audit", "job", job["id"])
    assert audit.returncode == 0, audit.stderr
    assert "Delivered" in audit.stdout


def test_failing_receiver_gets_retries_with_one_webhook_id(
    shared: Shared, receiver: Receiver
) -> None:
    receiver.statuses = [500, 503]
    c = shared.server.client
    buyer_key, seller_key = shared.market()
    secret = _secret(c, buyer_key)
    c.create_offer(seller_key, MODEL, "sim_ok", "0.80")
    job = _submit(c, buyer_key, receiver.url())

    tries = receiver.wait_for(3)
    assert len({t.headers["webhook-id"] for t in tries}) == 1
    assert len({t.body for t in tries}) == 1
    for t in tries:
        Webhook(secret).verify(t.body, t.headers)
    delivery = _delivery(c, job["id"], buyer_key, _delivered)
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 503, 200]
    assert [a["error"] for a in delivery["attempts"]] == ["HTTP 500", "HTTP 503", None]
    # The receiver's body is never echoed to the buyer.
    assert "receiver says no" not in json.dumps(delivery)

    # A redelivery: the same payload and webhook-id, once more.
    r = c.post(f"/v1/video/generations/{job['id']}/webhooks/redeliver", key=buyer_key)
    assert r.status == 202, r.body
    again = receiver.wait_for(4)[-1]
    assert again.headers["webhook-id"] == tries[0].headers["webhook-id"]
    assert again.body == tries[0].body
    Webhook(secret).verify(again.body, again.headers)
    redelivered = _delivery(c, job["id"], buyer_key, lambda d: len(d["attempts"]) == 4)
    assert redelivered["status"] == "delivered"


def test_delivery_survives_sigkill_between_tries(
    make_server: ServerFactory, receiver: Receiver
) -> None:
    # The second try is due long after the kill: only the restarted process can make it.
    receiver.statuses = [500]
    srv = make_server(**LOOPBACK, WEBHOOK_RETRY_SCHEDULE="3")
    c = srv.client
    buyer_key, seller_key = _market(c)
    secret = _secret(c, buyer_key)
    c.create_offer(seller_key, MODEL, "sim_ok", "0.80")
    job = _submit(c, buyer_key, receiver.url())
    receiver.wait_for(1)
    _delivery(c, job["id"], buyer_key, lambda d: len(d["attempts"]) == 1)
    srv.kill()

    srv.start()
    second = receiver.wait_for(2)[-1]
    Webhook(secret).verify(second.body, second.headers)
    delivery = _delivery(srv.client, job["id"], buyer_key, _delivered)
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 200]


def test_try_in_flight_when_killed_is_made_again_after_restart(
    make_server: ServerFactory, receiver: Receiver
) -> None:
    # The process dies while its first try waits for the receiver: the try was never recorded,
    # so the restarted process (same worker id, so its lease is its own) makes it again.
    receiver.hold_first = threading.Event()
    srv = make_server(**LOOPBACK)
    c = srv.client
    buyer_key, seller_key = _market(c)
    secret = _secret(c, buyer_key)
    c.create_offer(seller_key, MODEL, "sim_ok", "0.80")
    job = _submit(c, buyer_key, receiver.url())
    receiver.wait_for(1)
    srv.kill()
    receiver.hold_first.set()

    srv.start()
    first, second = receiver.wait_for(2)
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    Webhook(secret).verify(second.body, second.headers)
    delivery = _delivery(srv.client, job["id"], buyer_key, _delivered)
    assert [a["status_code"] for a in delivery["attempts"]] == [200]


def test_rotation_signs_with_both_secrets(shared: Shared, receiver: Receiver) -> None:
    c = shared.server.client
    buyer_key, seller_key = shared.market()
    first = c.post("/v1/buyer/webhook-secret", key=buyer_key).json()
    assert first["previous_valid_until"] is None  # it replaces no secret
    old = first["secret"]
    second = c.post("/v1/buyer/webhook-secret", key=buyer_key).json()
    new = second["secret"]
    assert old != new
    assert second["previous_valid_until"] == second["created"] + 24 * 3600
    c.create_offer(seller_key, MODEL, "sim_ok", "0.80")
    _submit(c, buyer_key, receiver.url())
    got = receiver.wait_for(1)[0]
    assert len(got.headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(got.body, got.headers)
    Webhook(new).verify(got.body, got.headers)
    with pytest.raises(WebhookVerificationError):
        Webhook(_secret(c, buyer_key)).verify(got.body, got.headers)


def test_private_target_refused_at_send_time(
    make_server: ServerFactory, receiver: Receiver
) -> None:
    # A name, not an address: it passes the submit's check and is refused once resolved. This
    # machine's own name resolves (through /etc/hosts, no DNS needed) to a non-public address.
    host = socket.gethostname()
    if ipaddress.ip_address(socket.getaddrinfo(host, None)[0][4][0]).is_global:
        pytest.skip(f"{host} resolves to a public address here")
    srv = make_server(WEBHOOK_ALLOW_HTTP="true", WEBHOOK_RETRY_SCHEDULE="0.2")
    c = srv.client
    buyer_key, seller_key = _market(c)
    c.create_offer(seller_key, MODEL, "sim_ok", "0.80")
    job = _submit(c, buyer_key, f"http://{host}:{receiver.port}/hook")
    delivery = _delivery(c, job["id"], buyer_key, lambda d: d["status"] == "failed")
    assert len(delivery["attempts"]) == 2
    for attempt in delivery["attempts"]:
        assert attempt["status_code"] is None
        assert attempt["error"].startswith("refused by the outbound policy")
    assert receiver.received == []


def test_two_worker_processes_send_each_webhook_once(
    shared: Shared, module_make_server: ServerFactory, receiver: Receiver
) -> None:
    first = shared.server
    # A second engine with its own worker (and webhook sender), on the same database.
    sim = f"http://127.0.0.1:{first.port}/sim/api/v1"
    second = module_make_server(PROVIDER_BASE_URL_VENICE=sim, **LOOPBACK)
    try:
        _send_each_webhook_once(shared, second, receiver)
    finally:
        second.kill()  # not left to send the next tests' webhooks


def _send_each_webhook_once(shared: Shared, second: Server, receiver: Receiver) -> None:
    c = shared.server.client
    buyer_key, seller_key = shared.market()
    secret = _secret(c, buyer_key)
    c.create_offer(seller_key, MODEL, "sim_ok", "0.80")
    jobs = [_submit(c, buyer_key, receiver.url(f"/{n}")) for n in range(8)]
    for job in jobs:
        _delivery(second.client, job["id"], buyer_key, _delivered)
    got = receiver.wait_for(len(jobs))
    assert len({g.headers["webhook-id"] for g in got}) == len(jobs)
    for g in got:
        Webhook(secret).verify(g.body, g.headers)
    # Every delivery is recorded as delivered on its first try, so no second one is due.
    for job in jobs:
        [attempt] = _delivery(c, job["id"], buyer_key, _delivered)["attempts"]
        assert attempt["status_code"] == 200
    assert len(receiver.received) == len(jobs)
