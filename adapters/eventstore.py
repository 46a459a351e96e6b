"""Event-store wiring: one eventsourcing application for every aggregate, SQLite or PostgreSQL.

Job, Settlement and BuyerAccount must be saved in one transaction, which eventsourcing gives
only within one application, so the whole market is one application with one log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlparse
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import Recording

from adapters.settings import sqlite_dir
from domain.aggregates import BuyerAccount

APP_NAME = "market"


class MarketApp(Application[UUID]):
    name = APP_NAME
    # Buyer accounts gather an event or two per job; a snapshot bounds the replay of a busy one.
    snapshotting_intervals = {BuyerAccount: 200}

    def __init__(self, env: dict[str, Any]) -> None:
        super().__init__(env=env)
        self.on_saved: list[Callable[[], None]] = []

    def save(self, *objs: Any, **kwargs: Any) -> list[Recording[UUID]]:
        recordings = super().save(*objs, **kwargs)
        # Wakes this process's projection runner and worker at once, instead of on their timers.
        for callback in self.on_saved:
            callback()
        return recordings


def store_env(database_url: str, *, role: str = "events") -> dict[str, str]:
    """The eventsourcing environment for ``role`` ("events" or a projection's name)."""
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
            "POSTGRES_POOL_SIZE": "8",
            "POSTGRES_MAX_OVERFLOW": "16",
            "POSTGRES_LOCK_TIMEOUT": "5",
            "POSTGRES_CONNECT_TIMEOUT": "10",
        }
    raise ValueError(f"unsupported DATABASE_URL scheme: {url.scheme!r}")


def open_market(database_url: str) -> MarketApp:
    env: dict[str, Any] = {
        **store_env(database_url),
        "AGGREGATE_CACHE_MAXSIZE": "20000",
        "AGGREGATE_CACHE_FASTFORWARD": "y",
    }
    return MarketApp(env=env)
