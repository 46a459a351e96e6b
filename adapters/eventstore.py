"""Event-store wiring: one eventsourcing application for every aggregate, SQLite or PostgreSQL.

Job, Settlement and BuyerAccount must be saved in one transaction, which eventsourcing gives
only within one application, so the whole market is one application with one log.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse
from uuid import UUID

import psycopg
from eventsourcing.application import Application, ProcessingEvent, project_aggregate
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import InfrastructureFactory, IntegrityError, Recording
from eventsourcing.utils import Environment

from adapters.esinternals import (
    APPLICATION_NAME_KEY,
    PREPARED_STATEMENTS_KEY,
    create_tables,
    name_connections,
    stored_versions,
)
from adapters.settings import sqlite_dir
from domain.aggregates import BuyerAccount, Offer

APP_NAME = "market"
# SPEC 8: ten processes at this size fit in PostgreSQL's default max_connections=100 (97 for
# ordinary users), with room for the CLI tools' two each.
DEFAULT_POOL_SIZE = 8
# A pool keeps this many connections open when idle; the rest are opened under load and closed
# again after psycopg_pool's idle time.
MIN_IDLE_CONNECTIONS = 1


class MarketApp(Application[UUID]):
    name = APP_NAME
    # Buyer accounts gather an event or two per job, offers two per dispatch (a slot taken and
    # given back): a snapshot bounds the replay of a busy one, which otherwise grows with the
    # log (a first load of an offer of a 200,000-job log replayed 133k events, 4.5 s).
    snapshotting_intervals = {BuyerAccount: 200, Offer: 200}

    def __init__(self, env: dict[str, Any]) -> None:
        super().__init__(env=env)
        self.on_saved: list[Callable[[], None]] = []
        # Called first, with what the save recorded (``LogReader.remember``).
        self.on_recorded: list[Callable[[list[Recording[UUID]]], None]] = []
        self._stored_versions = stored_versions(self)
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

    def caught_up(self, aggregate: Aggregate) -> Aggregate | None:
        """``aggregate`` with the events saved since its version applied (by anyone, in any
        process): the one query of the library's fast-forward, without its copy."""
        new_events = self.repository.event_store.get(
            originator_id=aggregate.id, gt=aggregate.version
        )
        return project_aggregate(aggregate, new_events)

    def stored_versions(self, aggregate_ids: Sequence[UUID]) -> dict[UUID, int]:
        """Each aggregate's latest stored version, in one query (absent: none stored, or a
        recorder without SQL of ours, for which nothing is known)."""
        if not aggregate_ids or self._stored_versions is None:
            return {}
        return self._stored_versions(aggregate_ids)

    def save(self, *objs: Any, **kwargs: Any) -> list[Recording[UUID]]:
        # Application.save, but collecting from our aggregates with a class check: the library
        # tells events from aggregates by isinstance against runtime-checkable Protocols,
        # which walks every protocol member on each call (2-5% of a submit's CPU).
        processing_event = _Collected()
        processing_event.collect_events(*objs, **kwargs)
        return self._save_collected(processing_event)

    def save_together(self, groups: Sequence[Sequence[Aggregate]]) -> list[_Saved]:
        """Several saves in one transaction (group commit), each with its own outcome: its
        recordings, or the exception that stopped it. When the joint save conflicts, the groups
        that wrote a version already stored fail, and the others are saved together again."""
        if len(groups) == 1:
            try:
                return [self.save(*groups[0])]
            except Exception as e:  # handed to the group's own caller
                return [e]
        collected = []
        for objs in groups:
            one = _Collected()
            one.collect_events(*objs)
            collected.append(one)
        return self._save_jointly(collected)

    def _save_jointly(self, collected: list[_Collected]) -> list[_Saved]:
        joint = _Collected()
        for one in collected:
            joint.events.extend(one.events)
            joint.aggregates.update(one.aggregates)
        try:
            recordings = self._save_collected(joint)
        except IntegrityError as e:
            conflict = e
        else:
            group_of = {id(e): n for n, one in enumerate(collected) for e in one.events}
            results: list[_Saved] = [[] for _ in collected]
            for recording in recordings:
                saved = results[group_of[id(recording.domain_event)]]
                assert isinstance(saved, list)
                saved.append(recording)
            return results
        # Which groups wrote versions someone else stored first: they fail, the rest are saved
        # together again. (Saving every group on its own instead made one busy buyer's
        # conflict cost a transaction per submit of the batch.)
        stale = self._stale_groups(collected)
        if stale and len(stale) < len(collected):
            fresh = [one for n, one in enumerate(collected) if n not in stale]
            saved_again = iter(self._save_jointly(fresh))
            return [conflict if n in stale else next(saved_again) for n in range(len(collected))]
        outcomes: list[_Saved] = []
        for one in collected:
            try:
                outcomes.append(self._save_collected(one))
            except Exception as e:  # handed to the group's own caller
                outcomes.append(e)
        return outcomes

    def _stale_groups(self, collected: list[_Collected]) -> set[int]:
        """The groups with an event at a version already stored for its aggregate (empty
        when that can't be told)."""
        first: dict[UUID, int] = {}
        for one in collected:
            for e in one.events:
                version = first.get(e.originator_id)
                if version is None or e.originator_version < version:
                    first[e.originator_id] = e.originator_version
        stored = self.stored_versions(list(first))
        return {
            n
            for n, one in enumerate(collected)
            if any(stored.get(e.originator_id, 0) >= e.originator_version for e in one.events)
        }

    def _take_snapshots(self, processing_event: ProcessingEvent[UUID]) -> None:
        """A snapshot of each aggregate whose events in this save passed a multiple of its
        interval: of the aggregate as it stands after the save, which is in memory. (Taken at
        the multiple itself, the library rebuilt the aggregate from the log, its last snapshot
        and up to 200 events, inside the save: whenever a batch saved several holds of one
        buyer, that multiple was rarely the newest event.) Snapshots need no fixed versions:
        they only bound how much of the log a load replays."""
        if self.snapshots is None:
            return
        saved: dict[UUID, tuple[int, int]] = {}  # aggregate id -> first and last version saved
        for event in processing_event.events:
            first, last = saved.get(event.originator_id, (event.originator_version, 0))
            saved[event.originator_id] = (
                min(first, event.originator_version),
                max(last, event.originator_version),
            )
        for aggregate_id, (first, last) in saved.items():
            aggregate = processing_event.aggregates.get(aggregate_id)
            if aggregate is None:
                continue
            interval = self.snapshotting_intervals.get(type(aggregate))
            if not interval or (first - 1) // interval == last // interval:
                continue
            snapshot_class = getattr(type(aggregate), "Snapshot", self.snapshot_class)
            if aggregate.version == last and snapshot_class is not None:
                self.snapshots.put([snapshot_class.take(aggregate)])
            else:
                self.take_snapshot(aggregate_id, version=last)

    def _save_collected(self, processing_event: ProcessingEvent[UUID]) -> list[Recording[UUID]]:
        recordings = self._record(processing_event)
        self._take_snapshots(processing_event)
        self._notify(recordings)
        self.notify(processing_event.events)
        for recorded in self.on_recorded:
            recorded(recordings)
        # Wakes this process's projection runner and worker at once, instead of on their timers.
        for callback in self.on_saved:
            callback()
        return recordings


_Saved = list[Recording[UUID]] | Exception


class GroupCommit:
    """Saves from many threads joined into few transactions: while one thread saves, the
    others queue; the next to go saves everything queued meanwhile, in one transaction
    (``MarketApp.save_together``), and hands each its own outcome. Nobody waits for a batch
    to fill: an idle process saves at once, a busy one in batches as big as its backlog.

    One transaction per batch instead of per save is most of the point: the write (and on
    PostgreSQL the round trips and the commit) is paid once for the batch, the projection
    runner then applies bigger batches too, and the store's connection pool sees one
    writer instead of a crowd."""

    def __init__(self, app: MarketApp, max_batch: int = 64) -> None:
        self.app = app
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[_Waiting] = []
        self._saving = False

    def save(self, *objs: Aggregate) -> list[Recording[UUID]]:
        mine = _Waiting(objs)
        with self._cond:
            self._queue.append(mine)
        while mine.outcome is None:
            with self._cond:
                while self._saving and mine.outcome is None:
                    self._cond.wait()
                if mine.outcome is not None:
                    break
                # Our turn to save: the queue, oldest first (ours with it, or in a later turn).
                self._saving = True
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
            self._save_batch(batch)
        saved = mine.outcome
        if isinstance(saved, Exception):
            raise saved
        return saved

    def _save_batch(self, batch: list[_Waiting]) -> None:
        outcomes: list[_Saved] = []
        try:
            outcomes = self.app.save_together([w.objs for w in batch])
        except Exception as e:  # the whole batch failed: each of its saves did
            outcomes = [e] * len(batch)
        finally:
            with self._cond:
                self._saving = False
                for n, waiting in enumerate(batch):
                    waiting.outcome = (
                        outcomes[n] if n < len(outcomes) else RuntimeError("save interrupted")
                    )
                self._cond.notify_all()


class _Waiting:
    __slots__ = ("objs", "outcome")

    def __init__(self, objs: Sequence[Aggregate]) -> None:
        self.objs = objs
        self.outcome: _Saved | None = None


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
