"""A database that is unreachable at start, or goes away under a running engine (SPEC 8): the
process waits and retries with backoff instead of exiting, says it is not ready on /healthz,
answers 503 (never 500) meanwhile, and carries on by itself once the database is back.

The outage is real: the engine reaches PostgreSQL through a TCP forwarder (tests/tcpproxy.py)
that the test takes down (connections refused, open ones cut) and brings back.
"""

from __future__ import annotations

import re
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from adapters.eventstore import open_market
from tests.conftest import _require_postgres
from tests.harness import BIN, Server, base_env, free_port, postgres_database
from tests.tcpproxy import TcpProxy
from tests.test_lifecycle import SEEDANCE, market, submit_ok, wait_until


@pytest.fixture
def proxied() -> Iterator[tuple[str, TcpProxy]]:
    """A fresh database, and its URL through a forwarder that starts down."""
    _require_postgres()
    with postgres_database() as url:
        parsed = urlparse(url)
        proxy = TcpProxy(parsed.hostname or "127.0.0.1", parsed.port or 5432)
        try:
            netloc = parsed.netloc.replace(f":{parsed.port or 5432}", f":{proxy.port}")
            if f":{proxy.port}" not in netloc:
                netloc = f"{netloc}:{proxy.port}"
            yield parsed._replace(netloc=netloc).geturl(), proxy
        finally:
            proxy.close()


def health(server: Server) -> tuple[int, dict[str, object]]:
    r = server.client.get("/healthz")
    return r.status, r.json()


@pytest.fixture
def server(proxied: tuple[str, TcpProxy], tmp_path: Path) -> Iterator[Server]:
    port = free_port()
    started = Server(tmp_path, base_env(proxied[0], port), port, [])
    try:
        yield started
    finally:
        started.kill()


@pytest.mark.postgres
def test_a_server_waits_for_the_database_and_survives_an_outage(
    server: Server, proxied: tuple[str, TcpProxy]
) -> None:
    proxy = proxied[1]
    server.start(wait=False)

    # Listening, not ready, retrying: and not exiting.
    def waiting() -> bool:
        tries = re.findall(r'"event": "database_unreachable"', server.logs())
        return len(tries) >= 2

    wait_until(waiting, timeout=30, what="two logged tries")
    status, body = health(server)
    assert status == 503 and body["status"] == "starting", body
    assert "waiting for the database" in str(body["detail"]), body
    r = server.client.get(f"/v1/video/generations/{uuid.uuid4()}", key="k")
    assert r.status == 503 and r.json()["error"]["code"] == "engine_starting", r.body
    assert server.proc is not None and server.proc.poll() is None

    proxy.up()
    server.wait_ready(60)
    assert '"event": "database_reached"' in server.logs()

    c = server.client
    _, buyer_key, seller_key = market(c)
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    done = submit_ok(c, buyer_key)
    c.wait_terminal(done["id"], buyer_key)

    # The database goes away under the running engine. A read it needs answers 503 (a poll of
    # a job this process holds no view of).
    proxy.down()
    r = c.get(f"/v1/video/generations/{uuid.uuid4()}", key=buyer_key)
    assert r.status == 503 and r.json()["error"]["code"] == "database_unavailable", r.body
    assert r.headers.get("retry-after") == "2"
    # The finished job's view is kept in the process (api/jobcache.py), but served only while
    # the projection runner still reaches the views: soon its poll needs the database too.
    wait_until(
        lambda: c.get(f"/v1/video/generations/{done['id']}", key=buyer_key).status == 503,
        timeout=10,
        what="the finished job's poll to need the database",
    )
    status, body = health(server)
    assert status == 503 and body["status"] == "unavailable", body

    proxy.up()
    wait_until(lambda: health(server)[0] == 200, timeout=30, what="health again")
    assert c.get(f"/v1/video/generations/{done['id']}", key=buyer_key).status == 200
    after = submit_ok(c, buyer_key, prompt="after the outage")
    assert c.wait_terminal(after["id"], buyer_key)["status"] == "succeeded"
    assert server.proc is not None and server.proc.poll() is None


@pytest.mark.postgres
def test_event_stores_opened_together_on_a_fresh_database_all_open() -> None:
    """The tables' creation raced in step, as processes started together race: the library's
    ``CREATE OR REPLACE FUNCTION`` failed "tuple concurrently updated" against another's (in
    about four of ten openings here), and the process exited instead of coming up."""
    _require_postgres()

    def open_one(url: str, together: threading.Barrier, failures: list[BaseException]) -> None:
        together.wait()
        try:
            open_market(url).close()
        except BaseException as e:
            failures.append(e)

    for _ in range(3):
        with postgres_database() as url:
            together, failures = threading.Barrier(4), []
            threads = [
                threading.Thread(target=open_one, args=(url, together, failures)) for _ in range(4)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert failures == []


@pytest.mark.postgres
def test_processes_started_together_on_a_fresh_database_all_come_up(tmp_path: Path) -> None:
    """Four at once (two API processes, two workers) race to create the same tables: each must
    come up, none crash (the race once crashed a worker on a duplicate key)."""
    _require_postgres()
    with postgres_database() as url:
        servers = []
        workers = []
        try:
            for n in range(2):
                port = free_port()
                directory = tmp_path / f"api{n}"
                directory.mkdir()
                servers.append(Server(directory, base_env(url, port), port, ["--no-worker"]))
            for server in servers:
                server.start(wait=False)
            for n in range(2):
                log = open(tmp_path / f"worker{n}.log", "wb")  # noqa: SIM115
                workers.append(
                    (
                        subprocess.Popen(
                            [str(BIN), "worker"],
                            cwd=tmp_path,
                            env=base_env(
                                url,
                                free_port(),
                                # The first API process serves the simulator (embedded there).
                                PROVIDER_BASE_URL_VENICE=(
                                    f"http://127.0.0.1:{servers[0].port}/sim/api/v1"
                                ),
                            ),
                            stdout=log,
                            stderr=subprocess.STDOUT,
                        ),
                        tmp_path / f"worker{n}.log",
                    )
                )
            for server in servers:
                server.wait_ready(60)

            def workers_running() -> bool:
                return all("worker_started" in path.read_text() for _, path in workers)

            wait_until(workers_running, timeout=60, what="both workers to start")
            for proc, path in workers:
                assert proc.poll() is None, path.read_text()[-2000:]
                assert "Traceback" not in path.read_text(), path.read_text()[-3000:]
            for server in servers:
                assert "Traceback" not in server.logs(), server.logs()[-3000:]
            # And they work together: a job submitted on one API is driven by a worker.
            c = servers[0].client
            _, buyer_key, seller_key = market(c)
            c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
            job = submit_ok(c, buyer_key)
            assert servers[1].client.wait_terminal(job["id"], buyer_key)["status"] == "succeeded"
        finally:
            for server in servers:
                server.kill()
            for proc, _ in workers:
                proc.kill()
                proc.wait(10)
