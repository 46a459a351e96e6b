"""The store every read model lives in: SQLite or PostgreSQL, exactly-once batches, schema
versions, digests and scratch storage for replays.

Each read model is a module (``projections.jobviews``, ``accounts``, ``orderbook``, ``trades``,
``ledger``) that declares a ``Projection``: its tables, the event classes it reads, and a fold
that turns one batch of events into rows. The store knows nothing of any of them beyond that.

The two databases' differences, and scratch storage, are in ``projections.dialects``.
One set of SQL serves both databases: statements are written with ``?`` placeholders and
translated for psycopg. A batch of events is applied in one transaction together with the
library's single-row tracking upsert (through ``adapters.esinternals``, the one place that
touches the library's internals), after checking under a lock that the views are still where the
batch starts: two runners racing over the same log can never apply an event twice, and the loser
gets ``LostRace``, which is the one error a runner may retry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

from eventsourcing.persistence import IntegrityError, Tracking

from adapters.esinternals import TrackingTable
from adapters.logreader import LogBatch

# Bumped whenever a table changes shape or a fold changes: older views are rebuilt.
SCHEMA_VERSION = 7

# Built once: json.dumps with any option builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def dumps(value: Any) -> str:
    return _ENCODER.encode(value)


class LostRace(IntegrityError):
    """The views are no longer where the batch starts: another runner applied it first. The one
    error a runner retries (from the position the winner left); any other error is a failure."""


class Reader(Protocol):
    """What a query function reads with: the store itself, or one of its snapshots."""

    def one(self, statement: str, params: Sequence[Any] = ()) -> Any: ...

    def all(self, statement: str, params: Sequence[Any] = ()) -> list[Any]: ...


class Fold(Protocol):
    """One batch of events for one read model: ``project`` works in memory (bulk loads of the
    rows it changes, no query per event), ``write`` writes every changed row."""

    def project(self, items: Sequence[tuple[int, Any]]) -> None: ...

    def write(self, c: Any, q: Callable[[str], Any]) -> None: ...


def apply_in_order(
    fold: Any, handlers: dict[type, Callable[[Any, int, Any], None]], items: Sequence[Any]
) -> None:
    """Each event of ``items`` (position, event) to its handler by exact class, in log order:
    the fold of a read model whose handlers need no rows loaded first."""
    for seq, e in items:
        handler = handlers.get(type(e))
        if handler is not None:
            handler(fold, seq, e)


class Rows(Protocol):
    """How a fold writes many rows of one table in one go, in the database's fastest way
    (``projections.dialects``): ``insert`` for rows that are new (the insert-only journal),
    ``upsert`` for rows that are new or replace the row of the same ``key``, every column but
    the key and ``keep`` taking the new values (none: rows whose key exists are left)."""

    def insert(
        self, c: Any, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None: ...

    def upsert(
        self,
        c: Any,
        table: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        key: str,
        keep: Sequence[str] = (),
    ) -> None: ...


class ExecuteMany:
    """``Rows`` as one statement per row (``executemany``): SQLite runs them in-process."""

    def __init__(self, q: Callable[[str], Any]) -> None:
        self.q = q

    def insert(
        self, c: Any, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        if rows:
            names = ", ".join(columns)
            statement = f"INSERT INTO {table} ({names}) VALUES ({placeholders(columns)})"
            c.executemany(self.q(statement), rows)

    def upsert(
        self,
        c: Any,
        table: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        key: str,
        keep: Sequence[str] = (),
    ) -> None:
        if rows:
            c.executemany(
                self.q(
                    f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({placeholders(columns)}) "
                    f"{on_conflict_update(columns, key, keep)}"
                ),
                rows,
            )


def on_conflict_update(columns: Sequence[str], key: str, keep: Sequence[str] = ()) -> str:
    """``key``: the conflict's column, or columns separated by commas (a composite key)."""
    keys = {k.strip() for k in key.split(",")}
    updated = [k for k in columns if k not in keys and k not in keep]
    if not updated:  # every column kept: an insert of the rows that are new
        return f"ON CONFLICT ({key}) DO NOTHING"
    return f"ON CONFLICT ({key}) DO UPDATE SET {', '.join(f'{k} = excluded.{k}' for k in updated)}"


@dataclass
class Batch:
    """What a fold gets: the batch's cursor for bulk loads, how to write many rows (``rows``),
    and the folds that ran before it in this batch (a read model may read another's fold
    state, never its tables)."""

    cursor: Any
    q: Callable[[str], Any]
    folds: dict[str, Fold] = field(default_factory=dict)
    rows: Rows | None = None

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = ExecuteMany(self.q)

    @property
    def writer(self) -> Rows:
        assert self.rows is not None
        return self.rows

    def all(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        self.cursor.execute(self.q(statement), params)
        return list(self.cursor.fetchall())


@dataclass(frozen=True)
class Projection:
    """A read model as the store sees it."""

    name: str
    tables: dict[str, str]  # name: CREATE TABLE statement
    indexes: list[str]
    digest_order: dict[str, str]  # table: its key columns, for digests
    handles: frozenset[type]  # the event classes its fold reads
    fold: Callable[[Batch], Fold]
    # Read models whose fold must run before this one's, in the same batch.
    requires: tuple[str, ...] = ()
    # SQLite keeps these tables in their key's B-tree (PostgreSQL has no such option).
    without_rowid: frozenset[str] = frozenset()
    # Event classes of ``handles`` whose fold reads nothing but the class, the originator's id
    # and version: a rebuild may give it those events without their state (see
    # ``adapters.logreader``), which saves parsing a third of the events it reads.
    headers_only: frozenset[type] = frozenset()


@dataclass
class Snapshot:
    """Every table as of one log position, read in one transaction."""

    cursor: Any
    q: Callable[[str], Any]
    position: int

    def one(self, statement: str, params: Sequence[Any] = ()) -> Any:
        self.cursor.execute(self.q(statement), params)
        return self.cursor.fetchone()

    def all(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        self.cursor.execute(self.q(statement), params)
        return list(self.cursor.fetchall())


def chunks(items: list[str], size: int = 500) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def placeholders(values: Sequence[Any]) -> str:
    return ", ".join("?" for _ in values)


class Store:
    """The read models' tables in one database, over the library's tracking recorder."""

    # Whether point reads are cheap enough to run on the calling (event-loop) thread.
    inline_reads = False
    # Whether ``copy_tables_from`` into empty tables that have the source's indexes already
    # copies those indexes too (else they are built after the copy).
    copies_indexes = False
    # Where the store's schema version is kept (stores sharing a database each have their own).
    schema_table = "mm_schema"
    schema_version = SCHEMA_VERSION

    def __init__(self, tracking: TrackingTable, projections: Sequence[Projection]) -> None:
        self.tracking = tracking
        self.datastore = tracking.datastore
        self.projections = {p.name: p for p in projections}
        self.tables = {t: s for p in projections for t, s in p.tables.items()}
        self.digest_order = {t: k for p in projections for t, k in p.digest_order.items()}
        # Per set of read models: which of them read each event class (see ``_route``).
        self._routes: dict[tuple[str, ...], dict[type, list[int]]] = {}

    # ---------------------------------------------------------------- dialect

    def q(self, statement: str) -> Any:
        return statement

    def rows_writer(self) -> Rows:
        """How folds write many rows at once in this database."""
        return ExecuteMany(self.q)

    @staticmethod
    def create_statements(projections: Sequence[Projection], indexes: bool = True) -> list[str]:
        return [
            s for p in projections for s in (*p.tables.values(), *(p.indexes if indexes else ()))
        ]

    def _batch_transaction(self) -> Any:
        return self.datastore.transaction(commit=True)

    def _lock_schema(self, c: Any) -> None:
        """Keep processes starting together from migrating the same views at once."""

    def _lock_batches(self, c: Any) -> None:
        raise NotImplementedError

    def _repeatable_read(self, c: Any) -> None:
        """SQLite's WAL readers see one snapshot per transaction already."""

    def copy_tables_from(self, env: dict[str, str], tables: Iterable[str]) -> None:
        """Add every row of ``tables`` in the store ``env`` opens (scratch storage on the same
        server or disk) to this store's tables of the same names."""
        raise NotImplementedError

    def bind_inline_reader(self) -> None:
        """Let the calling thread read without a thread-pool hop (where that is cheap)."""

    # ---------------------------------------------------------------- reading

    def one(self, statement: str, params: Sequence[Any] = ()) -> Any:
        with self.datastore.transaction(commit=False) as c:
            c.execute(self.q(statement), params)
            return c.fetchone()

    def all(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        with self.datastore.transaction(commit=False) as c:
            c.execute(self.q(statement), params)
            return list(c.fetchall())

    # The names these had before the read models were split out (bench.replay reads one).
    def _one(self, statement: str, params: Sequence[Any]) -> Any:
        return self.one(statement, params)

    def _all(self, statement: str, params: Sequence[Any]) -> list[Any]:
        return self.all(statement, params)

    def position(self, application_name: str) -> int:
        return self.tracking.position(application_name)

    @contextmanager
    def snapshot(self, application_name: str) -> Iterator[Snapshot]:
        """Every view as of one log position, read in one consistent transaction, so a check
        that compares views with each other (or with the log at that position) never sees a
        batch half applied."""
        with self.datastore.transaction(commit=False) as c:
            self._repeatable_read(c)
            yield Snapshot(c, self.q, self.tracking.position(application_name, c))

    # ---------------------------------------------------------------- projecting

    def folds_for(self, part: frozenset[str]) -> list[Projection]:
        """The read models of ``part``, each after those it requires."""
        chosen = [p for p in self.projections.values() if p.name in part]
        for p in chosen:
            missing = [r for r in p.requires if r not in part]
            if missing:
                raise ValueError(f"{p.name} needs {missing} folded in the same batch")
        return chosen

    def apply_batch(
        self,
        items: Sequence[tuple[int, Any]],
        tracking: Tracking,
        start: int,
        part: frozenset[str] | None = None,
    ) -> None:
        """Apply ``(notification id, domain event)`` pairs that follow position ``start`` and
        advance tracking to the last of them, atomically; to the read models named in ``part``
        only, when given.

        Raises ``LostRace`` when the views are no longer at ``start``: another runner applied a
        batch first. The library's tracking upsert alone would accept any higher position, so
        a runner that read the same start and fetched a longer batch would apply the overlap a
        second time (and ``SlotTaken`` counts are not idempotent). Any other error is the
        views' own (a constraint, a bug, a full disk), and the whole batch is rolled back.
        """
        projections = self.folds_for(frozenset(self.projections) if part is None else part)
        with self._batch_transaction() as c:
            # Serialise batches first, then read the position under that lock.
            self._lock_batches(c)
            position = self.tracking.position(tracking.application_name, c)
            if position != start:
                raise LostRace(f"the views are at {position}, not {start}")
            try:
                self.tracking.insert(c, tracking)
            except IntegrityError as e:
                raise LostRace(str(e)) from e
            self._fold(c, projections, items)

    def apply_next(
        self,
        application_name: str,
        read: Callable[[int], LogBatch],
        part: frozenset[str] | None = None,
    ) -> tuple[int, LogBatch]:
        """Read the log after the views' position and apply what ``read(position)`` gives,
        with the tracking row, atomically: the position the batch follows, and the batch.

        The batch is read under the batch lock, so when several runners share the views (one
        per API process), one reads and applies while the others wait for the lock, then read
        only what is new after it. Reading first and locking after, every runner read (and
        decoded) every range, and all but one threw theirs away at the lock: most of what a
        second process cost per job."""
        projections = self.folds_for(frozenset(self.projections) if part is None else part)
        with self._batch_transaction() as c:
            self._lock_batches(c)
            start = self.tracking.position(application_name, c)
            batch = read(start)
            if batch.last is None:
                return start, batch
            try:
                self.tracking.insert(c, Tracking(application_name, batch.last))
            except IntegrityError as e:
                raise LostRace(str(e)) from e
            self._fold(c, projections, batch.items)
        return start, batch

    def _fold(
        self, c: Any, projections: list[Projection], items: Sequence[tuple[int, Any]]
    ) -> None:
        batch = Batch(c, self.q, rows=self.rows_writer())
        for projection, ours in zip(projections, self._route(projections, items), strict=True):
            fold = projection.fold(batch)
            fold.project(ours)
            batch.folds[projection.name] = fold
        for fold in batch.folds.values():
            fold.write(c, self.q)

    def _route(
        self, projections: list[Projection], items: Sequence[tuple[int, Any]]
    ) -> list[list[tuple[int, Any]]]:
        """Each read model's events of the batch, in one pass over it (most events are read by
        one model; asking each model of each event was a tenth of a replay)."""
        key = tuple(p.name for p in projections)
        routes = self._routes.get(key)
        if routes is None:
            routes = self._routes[key] = {}
        ours: list[list[tuple[int, Any]]] = [[] for _ in projections]
        for item in items:
            cls = type(item[1])
            targets = routes.get(cls)
            if targets is None:
                targets = routes[cls] = [i for i, p in enumerate(projections) if cls in p.handles]
            for i in targets:
                ours[i].append(item)
        return ours

    # ---------------------------------------------------------------- schema and rebuild

    def reset(self, application_name: str) -> None:
        """Empty every view and move tracking back to the start of the log, atomically."""
        with self.datastore.transaction(commit=True) as c:
            for table in self.tables:
                c.execute(self.q(f"DELETE FROM {table}"), ())
            self.tracking.reset(c, application_name)

    def ensure_schema(self, application_name: str, indexes: bool = True) -> bool:
        """Views of another schema version are dropped and rebuilt from the log.

        They hold nothing the log doesn't, so a new column is a rebuild, not a migration.
        Returns whether the views were reset. ``indexes=False``: tables made here get no
        secondary indexes until ``create_indexes`` (scratch storage about to be folded into).
        """
        with self.datastore.transaction(commit=True) as c:
            self._lock_schema(c)
            if self._version(c) == self.schema_version:
                return False
            for table in self.tables:
                c.execute(self.q(f"DROP TABLE IF EXISTS {table}"), ())
            for statement in self.create_statements(list(self.projections.values()), indexes):
                c.execute(self.q(statement), ())
            self._set_version(c, application_name, 0)
            return True

    def without_durability(self, goes_live: bool = False) -> None:
        """For scratch storage only (a replay's, dropped afterwards or copied from once the
        fold is done): writes need not survive a crash, which the database may then skip.
        ``goes_live``: the storage is a rebuild's, switched in as the live views at the end."""

    def create_indexes(self, part: frozenset[str] | None = None) -> None:
        """Every read model's secondary indexes (those of ``part`` only, when given), where they
        are missing (see ``ensure_schema``): built once over the folded rows, a sort, where
        keeping them up to date row by row during a fold cost a third of its writes."""
        with self.datastore.transaction(commit=True) as c:
            for p in self.projections.values():
                if part is not None and p.name not in part:
                    continue
                for statement in p.indexes:
                    c.execute(self.q(statement), ())

    def _version(self, c: Any) -> int | None:
        table = self.schema_table
        c.execute(self.q(f"CREATE TABLE IF NOT EXISTS {table} (version BIGINT NOT NULL)"), ())
        c.execute(self.q(f"SELECT version FROM {table}"), ())
        row = c.fetchone()
        return None if row is None else int(row["version"])

    def _set_version(self, c: Any, application_name: str, position: int) -> None:
        """This code's schema version, with the tables at ``position`` of the log."""
        self.tracking.reset(c, application_name)
        if position > 0:
            self.tracking.insert(c, Tracking(application_name, position))
        c.execute(self.q(f"DELETE FROM {self.schema_table}"), ())
        c.execute(
            self.q(f"INSERT INTO {self.schema_table} (version) VALUES (?)"), (self.schema_version,)
        )

    def built_version(self) -> int | None:
        """The schema version the tables were built at (None: never built here)."""
        with self.datastore.transaction(commit=True) as c:
            return self._version(c)

    def replace_with(
        self,
        fresh_env: dict[str, str],
        application_name: str,
        catch_up: Callable[[int], int],
        only_if_outdated: bool = False,
    ) -> bool:
        """Switch the live tables for the ones built in ``fresh_env`` (scratch storage beside
        this store, see ``projections.dialects.scratch_env``) in one transaction: readers see
        the old tables until it commits and the new ones after, never a half-built view.

        Under the batch lock (runners of every process wait, none is mid-batch) the fresh
        tables are brought at least to the live position by ``catch_up(live position)``, which
        returns theirs; the live tracking takes that, so the switch neither loses nor repeats
        an event. ``only_if_outdated``: another process may
        have switched first (both started on a new schema): then nothing is done and False
        returned."""
        raise NotImplementedError

    def digest(self) -> dict[str, tuple[int, str]]:
        """Per table: row count and a SHA-256 over every row in key order."""
        with self.datastore.transaction(commit=False) as c:
            self._repeatable_read(c)
            hashes = _row_hashes(c, self.q, self.digest_order)
            return {t: (len(rows), _combined(rows)) for t, rows in hashes.items()}

    def row_hashes(self, application_name: str) -> tuple[int, dict[str, dict[str, str]]]:
        """The tracked position and, per table, each row's key and hash (to name a difference)."""
        with self.snapshot(application_name) as s:
            return s.position, _row_hashes(s.cursor, self.q, self.digest_order)


def _row_hashes(
    c: Any, q: Callable[[str], Any], digest_order: dict[str, str]
) -> dict[str, dict[str, str]]:
    result: dict[str, dict[str, str]] = {}
    for table, key in digest_order.items():
        c.execute(q(f"SELECT * FROM {table} ORDER BY {key}"), ())
        key_columns = [k.strip() for k in key.split(",")]
        hashes: dict[str, str] = {}
        for r in c.fetchall():
            row_key = "/".join(str(r[k]) for k in key_columns)
            encoded = dumps([_plain(r[k]) for k in r.keys()]).encode()  # noqa: SIM118
            hashes[row_key] = hashlib.sha256(encoded).hexdigest()
        result[table] = hashes
    return result


def _combined(row_hashes: dict[str, str]) -> str:
    """One digest of a table: the rows' hashes in key order (the dict keeps query order)."""
    h = hashlib.sha256()
    for row_hash in row_hashes.values():
        h.update(row_hash.encode())
    return h.hexdigest()


def _plain(value: Any) -> Any:
    return (
        float(value) if hasattr(value, "as_integer_ratio") and not isinstance(value, int) else value
    )
