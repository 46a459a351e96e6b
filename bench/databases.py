"""The bench's databases: SQLite URLs, and scratch PostgreSQL databases made and dropped
through an admin URL (``--postgres-url``)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

POSTGRES_URL = os.environ.get("MM_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def sqlite_url(directory: Path) -> str:
    return f"sqlite:///{directory}"


def database_url(admin_url: str, name: str) -> str:
    """The URL of database ``name`` on the server of ``admin_url``."""
    return f"{admin_url.rsplit('/', 1)[0]}/{name}"


def pg_admin(admin_url: str, *statements: str) -> None:
    """Run statements outside a transaction (``CREATE``/``DROP DATABASE`` need that)."""
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
        for statement in statements:
            conn.execute(statement)


@contextlib.contextmanager
def postgres_database(admin_url: str, prefix: str = "mm_bench") -> Iterator[str]:
    """A fresh database of its own name (``prefix`` and a random part), dropped on the way
    out: its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    pg_admin(admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield database_url(admin_url, name)
    finally:
        pg_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_name(url: str) -> str:
    return url.rsplit("/", 1)[1]


def lock_key(name: str) -> int:
    """The advisory lock key of a database name (a signed 64-bit integer, as PostgreSQL's)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), signed=True)


@contextlib.contextmanager
def shared_database(
    admin_url: str,
    name: str,
    ready: Callable[[str], bool],
    fill: Callable[[str], None],
    say: Callable[[str], None] = lambda _: None,
) -> Iterator[str]:
    """Database ``name``, kept between runs and read by any number of them at once: its URL
    once ``ready(url)``, after dropping, creating and ``fill(url)``-ing it when not.

    Each run holds a shared advisory lock on the name from its check to its end; dropping
    takes the exclusive one. So a run that finds the database stale waits for the runs reading
    it to end instead of dropping it from under them (as ``WITH (FORCE)`` did), and of two runs
    that find it stale at once, the second finds it filled by the first. The locks live in the
    admin URL's database (advisory locks are per database: runs that share a server share
    them through the same ``--postgres-url``), on a connection held open for the run, so a
    run that dies releases them with its connection."""
    import psycopg

    key = lock_key(name)
    url = database_url(admin_url, name)
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
        conn.execute("SELECT pg_advisory_lock_shared(%s)", (key,))
        if not ready(url):
            conn.execute("SELECT pg_advisory_unlock_shared(%s)", (key,))
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            if not (row and row[0]):
                say(f"waiting for the runs reading database {name} to end")
                conn.execute("SELECT pg_advisory_lock(%s)", (key,))
            if not ready(url):
                # Without FORCE: under the exclusive lock no run reads it, so a connection
                # still there is someone else's, to be told about rather than cut.
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
                conn.execute(f'CREATE DATABASE "{name}"')
                fill(url)
            conn.execute("SELECT pg_advisory_lock_shared(%s)", (key,))
            conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        yield url


def postgres_version(admin_url: str) -> tuple[str | None, str | None]:
    """(server version, None) when PostgreSQL answers, else (None, why not)."""
    try:
        import psycopg

        with psycopg.connect(admin_url, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return (str(row[0]).split()[0] if row else "?"), None
    except Exception as e:
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
