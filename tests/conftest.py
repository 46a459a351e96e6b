"""Fixtures for end-to-end tests: engines as real processes, on SQLite and on PostgreSQL.

PostgreSQL tests run against ``MM_TEST_POSTGRES_URL`` (default: the local server). Where it is
absent they are skipped with the reason shown, except under ``CI=true``, where that is a failure.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.harness import (
    DATABASES,
    Server,
    base_env,
    free_port,
    postgres_available,
    postgres_database,
)
from tests.listener import Listener
from tests.s3server import S3Server, S3Unavailable, start_s3_server

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]

# Every process a test starts (``mediamarket serve``, workers, CLI commands) runs this
# checkout's code: a venv shared by several worktrees maps the packages, through its editable
# install, to wherever it was last installed from.
ROOT = Path(__file__).resolve().parent.parent
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

# Hypothesis fails an example that takes over 200 ms by default: a timed assertion, which
# failed test_hold's examples on a machine busy with other work (they take 1 ms alone).
settings.register_profile("mediamarket", deadline=None)
settings.load_profile("mediamarket")

# Threads that outlive a test on purpose, by name prefix: the background creator and dropper
# of test databases (tests/harness.py, ended at the session's end) and tqdm's monitor, one
# per process, started by the first progress bar (tests/test_progress.py).
LONG_LIVED_THREADS = ("test-databases", "tqdm_monitor")
# How long threads left at a test's end get to finish: a pool closed by the garbage
# collector stops its threads without waiting for them.
THREAD_EXIT_GRACE_SECONDS = 5.0

# The slowest files, slowest first (from `pytest --durations`). `make test` runs with xdist's
# loadfile, which hands out whole files in collection order: a slow file collected last (and
# several are, alphabetically) runs alone at the end while the other core idles.
SLOW_FILES_FIRST = [
    "test_finance.py",
    "test_webhooks.py",
    "test_vopr.py",
    "test_recovery.py",
    "test_routing_table.py",
    "test_market.py",
    "test_schemathesis.py",
    "test_audit.py",
    "test_rebuild_live.py",
    "test_concurrency.py",
    "test_waiting.py",
    "test_api_accounts.py",
    "test_api_jobs.py",
    "test_magic_keys.py",
    "test_lifecycle.py",
    "test_projection_failure.py",
    "test_artifacts_s3.py",
    "test_metrics.py",
]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    # A stable sort: each file's tests stay together and in their own order.
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


_CALL_PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_CALL_PASSED] = report.passed
    return report


@pytest.fixture(autouse=True)
def no_thread_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail a test that leaves a thread running: a projection runner or a pool left behind
    goes on writing, reading and holding connections while the next tests of this worker
    run, and their failures then name the wrong test. Autouse fixtures are set up before the
    test's other function-scoped ones and torn down after them, so whatever those fixtures
    start and stop is stopped by now; threads of module- or session-scoped fixtures were
    running already when this one started."""
    before = set(threading.enumerate())
    yield
    if not request.node.stash.get(_CALL_PASSED, False):
        return  # failed or skipped: that comes first; what it left running follows from it
    deadline = time.monotonic() + THREAD_EXIT_GRACE_SECONDS
    left = []
    for thread in threading.enumerate():
        if thread in before or thread.name.startswith(LONG_LIVED_THREADS):
            continue
        if isinstance(thread, threading._DummyThread):
            continue  # a thread Python did not start (cannot be joined)
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            left.append(thread)
    if left:
        names = ", ".join(f"{t.name} (target {getattr(t, '_target', None)!r})" for t in left)
        pytest.fail(f"the test left {len(left)} thread(s) running: {names}", pytrace=False)


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Every test database's drop was left to a background thread: wait for them here.
    for error in DATABASES.close():
        print(f"a test database was not dropped: {error}", file=sys.stderr)


_pg_problem: str | None = None
_pg_checked = False


def _require_postgres() -> None:
    global _pg_checked, _pg_problem
    if not _pg_checked:
        _pg_problem = postgres_available()
        _pg_checked = True
    if _pg_problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires PostgreSQL: {_pg_problem}")
        pytest.skip(_pg_problem)


def _database(backend: str, data_dir: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{data_dir}/data"
        return
    _require_postgres()
    with postgres_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    yield from _database(request.param, tmp_path)


ServerFactory = Callable[..., Server]


def _servers(database_url: str, data_dir: Path) -> Iterator[ServerFactory]:
    servers: list[Server] = []

    def make(*args: str, start: bool = True, **env: str) -> Server:
        port = free_port()
        server = Server(data_dir, base_env(database_url, port, **env), port, list(args))
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        server.kill()


@pytest.fixture
def make_server(database_url: str, tmp_path: Path) -> Iterator[ServerFactory]:
    """Start engines on the test's database; all are killed at the end of the test."""
    yield from _servers(database_url, tmp_path)


@pytest.fixture(scope="module", params=BACKENDS)
def module_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One database per backend for a whole module, for tests that build on one market."""
    yield from _database(request.param, tmp_path_factory.mktemp(f"module-{request.param}"))


@pytest.fixture(scope="module")
def module_make_server(
    module_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerFactory]:
    """``make_server`` on the module's database; its engines are killed at the module's end."""
    yield from _servers(module_database_url, tmp_path_factory.mktemp("module-servers"))


@pytest.fixture
def server(make_server: ServerFactory) -> Server:
    return make_server()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS (tests/s3server.py), started once per test session (per xdist worker) and
    stopped at its end. Where it cannot run the S3 tests are skipped with the reason, except
    under ``CI=true``, where that is a failure."""
    try:
        server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    except S3Unavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true requires the S3 test server: {e}")
        pytest.skip(f"no S3 test server: {e}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_server: S3Server) -> str:
    """The tests' bucket, created once; each test keeps to its own ``s3_prefix`` in it."""
    name = f"mm-test-{uuid.uuid4().hex[:16]}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}/videos"


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    """A loopback listener that counts the connections it accepts (tests/listener.py)."""
    server = Listener()
    await server.start()
    yield server
    await server.close()
