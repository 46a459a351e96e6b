"""The replay bench's PostgreSQL databases, on a server several people bench on at once: the
cached copy of the log is shared, never dropped from under a run reading it, and each run's
scratch views database is its own."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest

from bench.databases import database_name, pg_admin, postgres_database, shared_database
from tests.conftest import _require_postgres
from tests.harness import POSTGRES_ADMIN_URL

pytestmark = pytest.mark.postgres


@pytest.fixture
def admin_url() -> str:
    _require_postgres()
    return POSTGRES_ADMIN_URL


@pytest.fixture
def name(admin_url: str) -> Iterator[str]:
    name = f"mm_test_shared_{uuid.uuid4().hex[:12]}"
    yield name
    pg_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def mark(url: str) -> str | None:
    """What ``fill_with`` put in the database, or None (no database, or not filled)."""
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            row = conn.execute("SELECT value FROM mark").fetchone()
            return None if row is None else str(row[0])
    except psycopg.Error:
        return None


def fill_with(value: str, fills: list[str]) -> Callable[[str], None]:
    def fill(url: str) -> None:
        fills.append(value)
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE mark (value TEXT NOT NULL)")
            conn.execute("INSERT INTO mark VALUES (%s)", (value,))

    return fill


def exists(admin_url: str, name: str) -> bool:
    with psycopg.connect(admin_url) as conn:
        row = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        return row is not None


def test_a_run_needing_another_copy_waits_for_the_runs_reading_this_one(
    admin_url: str, name: str
) -> None:
    fills: list[str] = []
    waiting = threading.Event()
    other: list[str] = []

    def second_run() -> None:
        ready = lambda url: mark(url) == "v2"  # noqa: E731
        with shared_database(admin_url, name, ready, fill_with("v2", fills), say) as url:
            other.append(str(mark(url)))

    def say(text: str) -> None:
        assert "waiting" in text
        waiting.set()

    ready = lambda url: mark(url) == "v1"  # noqa: E731
    thread = threading.Thread(target=second_run, name="second-run")
    try:
        with (
            shared_database(admin_url, name, ready, fill_with("v1", fills)) as url,
            psycopg.connect(url) as reading,
        ):
            assert fills == ["v1"]
            thread.start()
            assert waiting.wait(30), "the second run did not wait"
            # Still there, still this run's copy: the bench used to drop it WITH (FORCE).
            assert reading.execute("SELECT value FROM mark").fetchone() == ("v1",)
            assert fills == ["v1"] and other == []
        # This run's block ended, and with it its lock: the second run goes on.
    finally:
        if thread.ident is not None:
            thread.join(30)
    assert not thread.is_alive()
    assert fills == ["v1", "v2"] and other == ["v2"]
    # Kept for the next run, which then neither waits nor copies.
    with shared_database(admin_url, name, lambda url: mark(url) == "v2", fill_with("v3", fills)):
        assert fills == ["v1", "v2"]


def test_runs_that_find_it_stale_at_once_fill_it_once(admin_url: str, name: str) -> None:
    fills: list[str] = []
    both_looked = threading.Barrier(2, timeout=30)
    looked: set[str] = set()
    errors: list[BaseException] = []

    def ready(url: str) -> bool:
        me = threading.current_thread().name
        if me not in looked:
            looked.add(me)
            both_looked.wait()  # both found it stale while holding the shared lock
            return False
        return mark(url) == "v1"

    def run() -> None:
        try:
            with shared_database(admin_url, name, ready, fill_with("v1", fills)) as url:
                assert mark(url) == "v1"
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, name=f"run-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert fills == ["v1"]


def test_each_run_has_a_scratch_database_of_its_own_dropped_after(admin_url: str) -> None:
    with (
        postgres_database(admin_url, "mm_test_scratch") as one,
        postgres_database(admin_url, "mm_test_scratch") as two,
    ):
        names = [database_name(one), database_name(two)]
        assert names[0] != names[1]
        assert all(n.startswith("mm_test_scratch_") for n in names)
        assert all(exists(admin_url, n) for n in names)
    assert not any(exists(admin_url, n) for n in names)
