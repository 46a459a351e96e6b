"""Event-store wiring: one eventsourcing application for every aggregate, SQLite or PostgreSQL.

Job, Settlement and BuyerAccount must be saved in one transaction, which eventsourcing gives
only within one application, so the whole market is one application with one log.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse
from uuid import UUID

import psycopg
from eventsourcing.application import Application, ProcessingEvent
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import InfrastructureFactory, Recording
from eventsourcing.utils import Environment

from adapters.esinternals import (
    APPLICATION_NAME_KEY,
    PREPARED_STATEMENTS_KEY,
    create_tables,
    name_connections,
)
from adapters.settings import sqlite_dir
from domain.aggregates import BuyerAccount

APP_NAME = "market"
# SPEC 8: ten processes at this size fit in PostgreSQL's default max_connections=100 (97 for
# ordinary users), with room for the CLI tools' two each.
DEFAULT_POOL_SIZE = 8
# A pool keeps this many connections open when idle; the rest are opened under load and closed
# again after psycopg_pool's idle time.
MIN_IDLE_CONNECTIONS = 1


class MarketApp(Application[UUID]):
    name = APP_NAME
    # Buyer accounts gather an event or two per job; a snapshot bounds the replay of a busy one.
    snapshotting_intervals = {BuyerAccount: 200}

    def __init__(self, env: dict[str, Any]) -> None:
        super().__init__(env=env)
        self.on_saved: list[Callable[[], None]] = []
        try:
            create_tables(self.recorder)
            if self.snapshots is not None:
                create_tables(self.snapshots.recorder)
        except BaseException:
            self.close()  # a database that can't be reached now: leave no pool trying
            raise

    def construct_factory(self, env: Environment) -> InfrastructureFactory:
        # Tables are created by ``create_tables`` (safe against processes starting together),
        # connections named before the pool opens its first.
        factory = super().construct_factory(Environment(env.name, {**env, "CREATE_TABLE": "no"}))
        name_connections(factory, env)
        return factory

    @property
    def datastore(self) -> Any:
        """The process's one PostgreSQL connection pool (or the SQLite file's), which the
        views share on PostgreSQL."""
        return self.recorder.datastore  # type: ignore[attr-defined]

    def save(self, *objs: Any, **kwargs: Any) -> list[Recording[UUID]]:
        # Application.save, but collecting from our aggregates with a class check: the library
        # tells events from aggregates by isinstance against runtime-checkable Protocols,
        # which walks every protocol member on each call (2-5% of a submit's CPU).
        processing_event = _Collected()
        processing_event.collect_events(*objs, **kwargs)
        recordings = self._record(processing_event)
        self._take_snapshots(processing_event)
        self._notify(recordings)
        self.notify(processing_event.events)
        # Wakes this process's projection runner and worker at once, instead of on their timers.
        for callback in self.on_saved:
            callback()
        return recordings


class _Collected(ProcessingEvent[UUID]):
    def collect_events(self, *objs: Any, **kwargs: Any) -> None:
        for obj in objs:
            if isinstance(obj, Aggregate):
                self.events.extend(obj.collect_events())
                self.aggregates[obj.id] = obj
            else:
                super().collect_events(obj)  # an event, or None
        self.saved_kwargs.update(kwargs)


@dataclass(frozen=True)
class Connections:
    """How a process connects to PostgreSQL (SPEC 8): at most ``pool_size`` connections in its
    one pool, each named ``application_name`` in ``pg_stat_activity``, and whether statements
    may be prepared on the server (not behind PgBouncer in transaction mode)."""

    pool_size: int = DEFAULT_POOL_SIZE
    application_name: str = ""
    prepared_statements: bool = True


def store_env(
    database_url: str, *, role: str = "events", connections: Connections = Connections()
) -> dict[str, str]:
    """The eventsourcing environment for ``role`` ("events" or a projection's name)."""
    pool_size = connections.pool_size
    url = urlparse(database_url)
    if url.scheme == "sqlite":
        directory = sqlite_dir(database_url)
        directory.mkdir(parents=True, exist_ok=True)
        # SQLite table names are not prefixed, so every role needs its own file.
        db_file = directory / ("market.db" if role == "events" else f"{role}.db")
        return {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(db_file),
            "SQLITE_LOCK_TIMEOUT": "10",
        }
    if url.scheme in ("postgresql", "postgres"):
        return {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": unquote(url.path.lstrip("/")) or "postgres",
            "POSTGRES_HOST": url.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(url.port or 5432),
            "POSTGRES_USER": unquote(url.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(url.password or ""),
            # The library's pool_size is psycopg_pool's min_size; max = pool_size + overflow.
            "POSTGRES_POOL_SIZE": str(min(MIN_IDLE_CONNECTIONS, pool_size)),
            "POSTGRES_MAX_OVERFLOW": str(max(0, pool_size - MIN_IDLE_CONNECTIONS)),
            "POSTGRES_LOCK_TIMEOUT": "5",
            # Also how long a thread waits for a free connection of the pool.
            "POSTGRES_CONNECT_TIMEOUT": "10",
            APPLICATION_NAME_KEY: connections.application_name,
            PREPARED_STATEMENTS_KEY: "yes" if connections.prepared_statements else "no",
        }
    raise ValueError(f"unsupported DATABASE_URL scheme: {url.scheme!r}")


def probe(database_url: str, timeout: float = 5.0) -> None:
    """Raise at once when a PostgreSQL server can't be reached (refused, unknown host, down),
    instead of after a pool's wait for a connection that never comes; SQLite has nothing to
    probe."""
    env = store_env(database_url)
    if env["PERSISTENCE_MODULE"] != "eventsourcing.postgres":
        return
    connection = psycopg.connect(
        dbname=env["POSTGRES_DBNAME"],
        host=env["POSTGRES_HOST"],
        port=env["POSTGRES_PORT"],
        user=env["POSTGRES_USER"],
        password=env["POSTGRES_PASSWORD"] or None,
        connect_timeout=max(1, int(timeout)),
        application_name=f"mediamarket-probe-{os.getpid()}",
    )
    connection.close()


def open_market(database_url: str, connections: Connections = Connections()) -> MarketApp:
    env: dict[str, Any] = {
        **store_env(database_url, connections=connections),
        "AGGREGATE_CACHE_MAXSIZE": "20000",
        "AGGREGATE_CACHE_FASTFORWARD": "y",
    }
    return MarketApp(env=env)
