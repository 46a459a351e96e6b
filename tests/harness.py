"""Real processes on loopback for the end-to-end tests: ``mediamarket serve`` and a client.

Each engine is a subprocess with its own data directory (and, on PostgreSQL, its own database),
talking real HTTP to its own simulator, exactly as a user would run it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3

ADMIN_TOKEN = "test-admin-token"
SECRET_KEY = "test-secret-key-0123456789abcdef"
BIN = Path(sys.executable).parent / "mediamarket"
POSTGRES_ADMIN_URL = os.environ.get(
    "MM_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


PORT_ATTEMPTS = 5
# What the server prints once it listens (the demo banner says it too).
RUNNING_LINE = "mediamarket is running on"


class PortTaken(Exception):
    """The server could not listen on its port."""


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Client:
    base: str
    http: urllib3.PoolManager = field(
        default_factory=lambda: urllib3.PoolManager(maxsize=64, retries=False, timeout=30)
    )

    def request(
        self,
        method: str,
        path: str,
        *,
        key: str | None = None,
        json_body: Any = None,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> Response:
        h = dict(headers or {})
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        if json_body is not None:
            body = json.dumps(json_body).encode()
            h["Content-Type"] = "application/json"
        r = self.http.request(
            method, self.base + path, body=body, headers=h, preload_content=True, redirect=False
        )
        return Response(r.status, {k.lower(): v for k, v in r.headers.items()}, r.data)

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Response:
        return self.request("POST", path, **kw)

    def delete(self, path: str, **kw: Any) -> Response:
        return self.request("DELETE", path, **kw)

    def patch(self, path: str, **kw: Any) -> Response:
        return self.request("PATCH", path, **kw)

    # -------------------------------------------------------------- operator shortcuts

    def create_buyer(self, deposit_usdc: int = 0, name: str = "buyer") -> tuple[str, str]:
        r = self.post("/admin/buyers", key=ADMIN_TOKEN, json_body={"name": name})
        assert r.status == 201, r.body
        buyer = r.json()
        if deposit_usdc:
            d = self.post(
                f"/admin/buyers/{buyer['buyer_id']}/deposits",
                key=ADMIN_TOKEN,
                json_body={"amount_usdc": str(deposit_usdc)},
            )
            assert d.status == 201, d.body
        return buyer["buyer_id"], buyer["api_key"]

    def create_seller(self, name: str = "seller") -> tuple[str, str]:
        r = self.post("/admin/sellers", key=ADMIN_TOKEN, json_body={"name": name})
        assert r.status == 201, r.body
        return r.json()["seller_id"], r.json()["api_key"]

    def create_offer(
        self,
        seller_key: str,
        model: str,
        provider_key: str = "sim_ok",
        multiplier: str = "0.80",
        **extra: Any,
    ) -> dict[str, Any]:
        r = self.post(
            "/v1/seller/offers",
            key=seller_key,
            json_body={
                "model": model,
                "provider": "venice",
                "api_key": provider_key,
                "pricing_mode": "cost_multiplier",
                "cost_multiplier": multiplier,
                **extra,
            },
        )
        assert r.status == 201, r.body
        return dict(r.json())

    def submit(self, buyer_key: str, prefix: str = "", **body: Any) -> Response:
        payload = {"model": "venice-video-gen", "prompt": "a lighthouse at dusk", **body}
        return self.post(f"{prefix}/v1/video/generations", key=buyer_key, json_body=payload)

    def wait_terminal(self, job_id: str, buyer_key: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            r = self.get(f"/v1/video/generations/{job_id}", key=buyer_key)
            assert r.status in (200, 202), r.body
            if r.status == 200:
                return dict(r.json())
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} still {r.json()['status']} after {timeout}s")
            # One cheap GET a look; most tests wait for several jobs to end.
            time.sleep(0.05)

    def billing(self) -> dict[str, Any]:
        return dict(self.get("/sim/api/v1/sim/billing").json()["keys"])


@dataclass
class Server:
    data_dir: Path
    env: dict[str, str]
    port: int
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None
    _started_lines: int = 0

    @property
    def client(self) -> Client:
        return Client(f"http://127.0.0.1:{self.port}")

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"server-{self.port}.log"

    def start(self, wait: bool = True) -> Server:
        for _ in range(PORT_ATTEMPTS):
            self._started_lines = self._running_lines()
            log = open(self.log_path, "ab")  # noqa: SIM115
            self.proc = subprocess.Popen(
                [str(BIN), "serve", *self.args],
                cwd=self.data_dir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            if not wait:
                return self
            try:
                self.wait_ready()
                return self
            except PortTaken:
                # Between free_port() and the server's bind, another process (often a client
                # socket of a parallel test) took the port: try another one.
                self.port = free_port()
                self.env["PORT"] = str(self.port)
        raise AssertionError(f"no free port after {PORT_ATTEMPTS} attempts")

    def _running_lines(self) -> int:
        if not self.log_path.exists():
            return 0
        return self.log_path.read_text(errors="replace").count(RUNNING_LINE)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        client = self.client
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                text = self.log_path.read_text(errors="replace")
                if "cannot listen on" in text[-3000:]:
                    raise PortTaken(text[-3000:])
                raise AssertionError(f"server exited: {text[-3000:]}")
            try:
                r = client.get("/healthz")
                # Only once this process says it listens: a healthz answered by another
                # test's server on a reused port must not count.
                if (
                    r.status == 200
                    and r.json()["catalog"]
                    and self._running_lines() > self._started_lines
                ):
                    # the worker starts right after the catalog; give it a beat
                    time.sleep(0.05)
                    return
            except urllib3.exceptions.HTTPError:
                pass
            # Each look is a refused connect or a 503 answered at once; every test waits for
            # engines to start, several times over, so look often.
            time.sleep(0.02)
        raise AssertionError("server did not become ready")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN), *args],
            cwd=self.data_dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def base_env(database_url: str, port: int, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIAMARKET_", "PROVIDER_"))}
    env.update(
        {
            "DATABASE_URL": database_url,
            "PORT": str(port),
            "MEDIAMARKET_ADMIN_TOKEN": ADMIN_TOKEN,
            "MEDIAMARKET_SECRET_KEY": SECRET_KEY,
            "MEDIAMARKET_DEMO": "false",
            "SIM_RENDER_SECONDS": "0.3",
            "PROVIDER_QUEUE_TIMEOUT_SECONDS": "1",
            "PROVIDER_QUOTE_TIMEOUT_SECONDS": "2",
            "LOG_LEVEL": "info",
        }
    )
    env.update(overrides)
    return env


def _create_database() -> str:
    import psycopg

    name = f"mm_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def _drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class _Databases:
    """Test databases made and dropped off the tests' path, on one background thread.

    CREATE and DROP DATABASE take most of a second each on a busy machine, and a test waited
    for both. Now the next test's database is created while this test runs, and a finished
    test's is dropped while the next one runs; ``close`` (at the session's end) waits for
    every drop, so none is left behind.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._spare: Future[str] | None = None
        self._drops: list[Future[None]] = []

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-databases")
        return self._pool

    def take(self) -> str:
        with self._lock:
            spare, self._spare = self._spare, None
        name: str | None = None
        if spare is not None:
            try:
                name = spare.result()
            except Exception:
                name = None  # made again below, where its error is the test's
        if name is None:
            name = _create_database()
        with self._lock:
            self._spare = self._executor().submit(_create_database)
        return name

    def give_back(self, name: str) -> None:
        with self._lock:
            self._drops.append(self._executor().submit(_drop_database, name))

    def close(self) -> list[BaseException]:
        """Drop the spare, wait for every drop; the errors, if any."""
        with self._lock:
            spare, self._spare = self._spare, None
            drops, self._drops = self._drops, []
            pool, self._pool = self._pool, None
        errors = [e for e in (drop.exception() for drop in drops) if e is not None]
        if spare is not None:
            try:
                _drop_database(spare.result())
            except Exception as e:
                errors.append(e)
        if pool is not None:
            pool.shutdown(wait=True)
        return errors


DATABASES = _Databases()


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards (in the background:
    ``DATABASES.close()`` waits for the drops)."""
    name = DATABASES.take()
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        DATABASES.give_back(name)


def postgres_available() -> str | None:
    """None when PostgreSQL answers; otherwise why not."""
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            return None
    except Exception as e:
        return f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {e}"
