"""Every use of an eventsourcing internal, in one place (the library is pinned: 9.5.6).

Nothing else in the project may touch a private name or an undocumented attribute of the
library: it goes through here, and ``tests/test_eventsourcing_contract.py`` checks each use
against the installed library (names, signatures, behaviour), so an upgrade that changes one
fails there, loudly, before it fails anywhere else. What is used, and why:

- **Tracking inside our own transactions.** A projection batch writes its rows and the
  library's single-row tracking upsert in one transaction: ``_insert_tracking(cursor, tracking)``
  and ``_max_tracking_id(name, cursor)`` are the cursor-level halves of the public
  ``insert_tracking``/``max_tracking_id``, which open a transaction of their own.
- **The views' tables created with the tracking table**: the SQLite recorder's
  ``construct_create_table_statements`` and the PostgreSQL recorder's ``sql_create_statements``.
- **A PostgreSQL schema per store, and a name per connection**: the connection pool's
  ``kwargs`` (a scratch replay's views live in a schema of their own, and our table names are
  unqualified; ``application_name`` shows in ``pg_stat_activity`` which process holds what).
- **One pool per process**: the views' tracking recorder is built on the market's datastore
  (the recorder's constructor is public; the factory that would build a second pool is not
  used for it).
- **The SQLite file's name** (``pool.db_name``), for the event loop's own read connection.
- **The log read without the library's per-row objects**: the events table's name and the
  datastore's schema, and a decoder that repeats the mapper's work for the common case
  (``JSONTranscoder``'s object hook, its registered ``names``, ``DatetimeAsISO``); anything else
  goes through ``Mapper.to_domain_event`` itself.
"""

from __future__ import annotations

import importlib
import json
import random
import time
from collections.abc import Callable, Collection
from datetime import datetime
from json.scanner import make_scanner
from typing import Any, ClassVar
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import (
    DatetimeAsISO,
    InfrastructureFactory,
    IntegrityError,
    InternalError,
    JSONTranscoder,
    ProgrammingError,
    StoredEvent,
    Tracking,
    TrackingRecorder,
)
from eventsourcing.postgres import PostgresApplicationRecorder, PostgresTrackingRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteTrackingRecorder
from eventsourcing.utils import Environment, resolve_topic
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

# --------------------------------------------------------------------------- tracking


class _SQLiteTracking(SQLiteTrackingRecorder):
    extra_statements: ClassVar[list[str]] = []

    def construct_create_table_statements(self) -> list[str]:
        return [*super().construct_create_table_statements(), *self.extra_statements]


class _PostgresTracking(PostgresTrackingRecorder):
    extra_statements: ClassVar[list[str]] = []

    def __init__(self, datastore: Any, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        self.sql_create_statements.extend(SQL(s) for s in self.extra_statements)  # type: ignore[misc]


class TrackingTable:
    """The library's tracking recorder of one views store, used from inside the store's own
    transactions; its datastore is the store's connection pool."""

    def __init__(self, recorder: TrackingRecorder) -> None:
        self._recorder: Any = recorder
        self.datastore: Any = recorder.datastore  # type: ignore[attr-defined]
        self.is_sqlite = isinstance(recorder, SQLiteTrackingRecorder)

    def insert(self, cursor: Any, tracking: Tracking) -> None:
        """The single-row upsert; IntegrityError when the row is at ``tracking``'s id or past."""
        self._recorder._insert_tracking(cursor, tracking)

    def position(self, application_name: str, cursor: Any = None) -> int:
        if cursor is None:
            return self._recorder.max_tracking_id(application_name) or 0
        return self._recorder._max_tracking_id(application_name, cursor) or 0

    def reset(self, cursor: Any, application_name: str) -> None:
        """Back to the start of the log (no row: position 0)."""
        if self.is_sqlite:
            cursor.execute("DELETE FROM tracking WHERE application_name = ?", (application_name,))
        else:
            cursor.execute(
                SQL("DELETE FROM {} WHERE application_name = %s").format(
                    Identifier(self._recorder.tracking_table_name)
                ),
                (application_name,),
            )

    def lock_statement(self) -> str:
        """SQLite: a write that takes the file's one write lock and changes nothing."""
        return "DELETE FROM tracking WHERE 0"

    @property
    def sqlite_file(self) -> str:
        return str(self.datastore.pool.db_name)


# Our own key in an eventsourcing environment: the PostgreSQL ``application_name`` of every
# connection the environment's pool opens.
APPLICATION_NAME_KEY = "MM_APPLICATION_NAME"
# ...and "no" to keep psycopg from preparing any statement (the library prepares its own with
# ``prepare=True``; a ``prepare_threshold`` of None overrides that): behind PgBouncer in
# transaction mode (before 1.21) a prepared statement is gone on the next server connection.
PREPARED_STATEMENTS_KEY = "MM_PREPARED_STATEMENTS"


def name_connections(factory: InfrastructureFactory, env: Any) -> None:
    """Give a PostgreSQL factory's pool its connections' ``application_name`` (and schema),
    before the pool opens its first connection; SQLite has neither."""
    datastore = getattr(factory, "datastore", None)
    pool = getattr(datastore, "pool", None)
    kwargs = getattr(pool, "kwargs", None)
    if not isinstance(kwargs, dict) or "dbname" not in kwargs:
        return
    application_name = env.get(APPLICATION_NAME_KEY)
    if application_name:
        kwargs["application_name"] = application_name
    if env.get(PREPARED_STATEMENTS_KEY) == "no":
        kwargs["prepare_threshold"] = None
    schema = env.get("POSTGRES_SCHEMA")
    if schema:
        kwargs["options"] = f"-c search_path={schema}"


def open_tracking(
    name: str, env: dict[str, str], create_statements: list[str], datastore: Any = None
) -> TrackingTable:
    """The tracking recorder of the store ``env`` opens, with our tables (``create_statements``,
    in the store's dialect) beside its own. With ``POSTGRES_SCHEMA`` in ``env`` every connection
    looks in that schema first. ``datastore``: an open PostgreSQL datastore (the market's) to
    share instead of opening a second pool; its schema must be the one ``env`` names."""
    base: type[Any] = (
        _SQLiteTracking
        if env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite"
        else _PostgresTracking
    )
    cls = type(base.__name__, (base,), {"extra_statements": list(create_statements)})
    if datastore is not None and base is _PostgresTracking:
        recorder = cls(datastore=datastore, tracking_table_name=f"{name.lower()}_tracking")
    else:
        factory = InfrastructureFactory.construct(Environment(name, {**env, "CREATE_TABLE": "no"}))
        name_connections(factory, env)
        recorder = factory.tracking_recorder(cls)
    create_tables(recorder)
    return TrackingTable(recorder)


def create_tables(recorder: Any, attempts: int = 8) -> None:
    """``recorder.create_table()``, again when another process created the same table at the
    same moment: PostgreSQL's ``CREATE TABLE IF NOT EXISTS`` is not atomic against a concurrent
    one (the loser fails on the catalog's unique index once the winner commits), and the
    library's ``CREATE OR REPLACE FUNCTION`` (run whether or not the function is used) fails
    with "tuple concurrently updated" against another process's, so processes started together
    on a fresh database would crash. A later try finds the tables; the waits between tries,
    random, keep the same processes from colliding again in step."""
    for attempt in range(attempts):
        try:
            recorder.create_table()
            return
        # A unique violation; a duplicate table or type; a concurrent replace of the function.
        except (IntegrityError, ProgrammingError, InternalError):
            if attempt == attempts - 1:
                raise
            time.sleep(random.uniform(0.0, 0.05 * (attempt + 1)))


# --------------------------------------------------------------------------- the log, raw


def notification_rows(app: Application[UUID]) -> Callable[[int, int | None, int], list[Any]]:
    """``rows(start, stop, limit)``: ``(notification id, originator id, version, topic,
    state)`` tuples after ``start`` (up to ``stop``), in id order, exactly the rows the
    library's ``select_notifications`` would give, without a ``Notification`` per row."""
    recorder = app.recorder
    if isinstance(recorder, SQLiteApplicationRecorder):
        return _sqlite_rows(recorder)
    if isinstance(recorder, PostgresApplicationRecorder):
        return _postgres_rows(recorder)

    def library_rows(start: int, stop: int | None, limit: int) -> list[Any]:
        notifications = recorder.select_notifications(
            start=start, limit=limit, stop=stop, inclusive_of_start=False
        )
        return [
            (n.id, n.originator_id, n.originator_version, n.topic, n.state) for n in notifications
        ]

    return library_rows


def _sqlite_rows(
    recorder: SQLiteApplicationRecorder,
) -> Callable[[int, int | None, int], list[Any]]:
    table = recorder.events_table_name

    def rows(start: int, stop: int | None, limit: int) -> list[Any]:
        statement = (
            f"SELECT rowid, originator_id, originator_version, topic, state FROM {table} "
            "WHERE rowid>? "
        )
        params: list[int] = [start]
        if stop is not None:
            statement += "AND rowid<=? "
            params.append(stop)
        statement += "ORDER BY rowid LIMIT ?"
        params.append(limit)
        with recorder.datastore.transaction(commit=False) as c, c as cursor:
            # Plain tuples: the library's connections make sqlite3.Row objects, which cost
            # more than the query.
            cursor.row_factory = None
            cursor.execute(statement, params)
            return cursor.fetchall()

    return rows


def _postgres_rows(
    recorder: PostgresApplicationRecorder,
) -> Callable[[int, int | None, int], list[Any]]:
    table = SQL("{schema}.{table}").format(
        schema=Identifier(recorder.datastore.schema),
        table=Identifier(recorder.events_table_name),
    )

    def rows(start: int, stop: int | None, limit: int) -> list[Any]:
        statement = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state "
            "FROM {table} WHERE notification_id>%s"
        ).format(table=table)
        params: list[int] = [start]
        if stop is not None:
            statement += SQL(" AND notification_id<=%s")
            params.append(stop)
        statement += SQL(" ORDER BY notification_id LIMIT %s")
        params.append(limit)
        with recorder.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as c:
            # Prepared unless the connection says no statement may be (PgBouncer).
            c.execute(statement, params, prepare=True)
            return c.fetchall()

    return rows


# A batch of the log: the last notification id in it (None when empty), how many notifications
# it covers, and the rows of those whose topics were not excluded.
RowBatch = tuple[int | None, int, list[Any]]


def stored_versions(app: Application[UUID]) -> Callable[[Collection[UUID]], dict[UUID, int]] | None:
    """``versions(ids)``: each aggregate's latest stored version (absent: none stored), in one
    query; None for a recorder without SQL of ours."""
    recorder = app.recorder
    if isinstance(recorder, SQLiteApplicationRecorder):
        table = recorder.events_table_name

        def sqlite_versions(ids: Collection[UUID]) -> dict[UUID, int]:
            # The library stores a UUID's hex digits as text.
            by_hex = {i.hex: i for i in ids}
            marks = ", ".join("?" * len(by_hex))
            with recorder.datastore.transaction(commit=False) as c, c as cursor:
                cursor.row_factory = None
                cursor.execute(
                    f"SELECT originator_id, max(originator_version) FROM {table} "
                    f"WHERE originator_id IN ({marks}) GROUP BY originator_id",
                    list(by_hex),
                )
                return {by_hex[i]: int(v) for i, v in cursor.fetchall()}

        return sqlite_versions
    if isinstance(recorder, PostgresApplicationRecorder):
        statement = SQL(
            "SELECT originator_id, max(originator_version) FROM {schema}.{table} "
            "WHERE originator_id = ANY(%s) GROUP BY originator_id"
        ).format(
            schema=Identifier(recorder.datastore.schema),
            table=Identifier(recorder.events_table_name),
        )

        def postgres_versions(ids: Collection[UUID]) -> dict[UUID, int]:
            with (
                recorder.datastore.get_connection() as conn,
                conn.cursor(row_factory=tuple_row) as c,
            ):
                c.execute(statement, [list(ids)])
                return {i: int(v) for i, v in c.fetchall()}

        return postgres_versions
    return None


# A mapped log (``notification_batches``): SQLite maps at most this much of a file (and no
# more than its compile-time limit, 2 GB by default); the rest is read as before.
MAPPED_LOG_BYTES = 1 << 40


def notification_batches(
    app: Application[UUID], mapped: bool = False
) -> Callable[[int, int | None, int, Collection[str]], RowBatch]:
    """``batch(start, stop, limit, excluded)``: the notifications ``notification_rows`` would
    give, as ``(last id, how many, rows)`` with the rows of ``excluded`` topics left in the
    database: a rebuild's part reads less than half of the log's events, and fetching the rest
    (bytes objects and row tuples for them, on PostgreSQL their transfer too) was a tenth of
    its time. The range and the rows are read in one transaction (one snapshot).

    ``mapped`` (SQLite; for a reader of the whole log, such as a rebuild's): the connections it
    reads with map the log file into memory (``PRAGMA mmap_size``) instead of copying every
    page out of the OS cache with a system call per page, twice per batch (the range, then
    the rows): a full read of a 100k-job log in 0.1 instead of 0.4 s of system time. Mapped
    pages also stay in memory while the connection lives, where the OS may drop a cached page
    that was not read for a while and the next pass reads it from disk again."""
    recorder = app.recorder
    if isinstance(recorder, SQLiteApplicationRecorder):
        return _sqlite_batches(recorder, mapped)
    if isinstance(recorder, PostgresApplicationRecorder):
        return _postgres_batches(recorder)
    rows = notification_rows(app)

    def library_batches(
        start: int, stop: int | None, limit: int, excluded: Collection[str]
    ) -> RowBatch:
        found = rows(start, stop, limit)
        if not found:
            return None, 0, []
        return found[-1][0], len(found), [r for r in found if r[3] not in excluded]

    return library_batches


def _sqlite_batches(
    recorder: SQLiteApplicationRecorder, mapped: bool
) -> Callable[[int, int | None, int, Collection[str]], RowBatch]:
    table = recorder.events_table_name
    # Per connection, outside a transaction; a no-op once set.
    mapping = f"PRAGMA mmap_size={MAPPED_LOG_BYTES}" if mapped else None

    def batch(start: int, stop: int | None, limit: int, excluded: Collection[str]) -> RowBatch:
        bound = "AND rowid<=? " if stop is not None else ""
        params: list[Any] = [start] if stop is None else [start, stop]
        with recorder.datastore.get_connection(commit=False) as conn:
            if mapping is not None:
                conn.cursor().execute(mapping)
            with conn.transaction(commit=False) as c, c as cursor:
                cursor.row_factory = None
                cursor.execute(
                    f"SELECT max(rowid), count(*) FROM (SELECT rowid FROM {table} "
                    f"WHERE rowid>? {bound}ORDER BY rowid LIMIT ?)",
                    [*params, limit],
                )
                last, count = cursor.fetchone()
                if not count:
                    return None, 0, []
                topics = list(excluded)
                unless = f"AND topic NOT IN ({', '.join('?' * len(topics))}) " if topics else ""
                cursor.execute(
                    f"SELECT rowid, originator_id, originator_version, topic, state FROM {table} "
                    f"WHERE rowid>? AND rowid<=? {unless}ORDER BY rowid",
                    [start, last, *topics],
                )
                return last, count, cursor.fetchall()

    return batch


def _postgres_batches(
    recorder: PostgresApplicationRecorder,
) -> Callable[[int, int | None, int, Collection[str]], RowBatch]:
    table = SQL("{schema}.{table}").format(
        schema=Identifier(recorder.datastore.schema),
        table=Identifier(recorder.events_table_name),
    )

    # Two statements, each prepared once: the range's end and size, then the rows in it that
    # are not excluded. (One statement with both, as a UNION, was planned for a range of
    # unknown size: a bitmap scan and a sort on disk, six times the server's time.) The range
    # was committed whole before the first statement ran, and the log is append-only, so the
    # second one, in a later snapshot, sees the same rows.
    def range_statement(bounded: bool) -> Any:
        bound = SQL(" AND notification_id<=%s") if bounded else SQL("")
        return SQL(
            "SELECT max(notification_id), count(*) FROM (SELECT notification_id FROM {table} "
            "WHERE notification_id>%s{bound} ORDER BY notification_id LIMIT %s) r"
        ).format(table=table, bound=bound)

    ranges = {True: range_statement(True), False: range_statement(False)}
    rows_statement = SQL(
        "SELECT notification_id, originator_id, originator_version, topic, state FROM {table} "
        "WHERE notification_id>%s AND notification_id<=%s AND NOT (topic = ANY(%s)) "
        "ORDER BY notification_id LIMIT %s"
    ).format(table=table)

    def batch(start: int, stop: int | None, limit: int, excluded: Collection[str]) -> RowBatch:
        params = [start, limit] if stop is None else [start, stop, limit]
        with recorder.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as c:
            # Prepared unless the connection says no statement may be (PgBouncer).
            c.execute(ranges[stop is not None], params, prepare=True)
            last, count = c.fetchone() or (None, 0)
            if not count:
                return None, 0, []
            c.execute(rows_statement, [start, last, list(excluded), limit], prepare=True)
            return last, count, c.fetchall()

    return batch


# --------------------------------------------------------------------------- decoding

# How the library's JSON transcoder marks a value it transcoded; in the encoded bytes a key
# spelled like this can't be part of a string (its quotes would be escaped).
_TYPE_KEY = b'"_type_"'
MAX_CACHED_UUIDS = 65_536

try:
    # Parses an event's JSON in less than half the time of the stdlib's scanner (a third of a
    # replay's decoding), to the same values: what it refuses (integers past 64 bits, NaN, lone
    # surrogates) goes to the library's mapper, which the stdlib parses as it always has.
    _orjson: Any = importlib.import_module("orjson")
except ImportError:  # pragma: no cover - an install without it decodes with the stdlib
    _orjson = None


def _json_parser(
    scan: Callable[[str, int], tuple[Any, int]],
) -> tuple[Callable[[bytes], Any], type[Exception] | tuple[()]]:
    """``(parse, errors)``: ``parse(state)`` is the value of a whole JSON document; it raises
    one of ``errors`` or returns None when ``state`` isn't one."""
    if _orjson is not None:
        return _orjson.loads, _orjson.JSONDecodeError

    def parse(state: bytes) -> Any:
        text = state.decode("utf8")
        try:
            value, end = scan(text, 0)
        except (ValueError, StopIteration):
            return None
        return value if end == len(text) else None

    return parse, ()


class EventDecoder:
    """Stored event fields to the domain event ``Mapper.to_domain_event`` would return.

    An event whose only transcoded value is its timestamp (nearly all of them) is decoded by the
    scanner inside ``json.loads`` and one ``fromisoformat``, skipping the library's ``object_hook``
    call per dict. Anything else (another transcoded value, an event class that upcasts, a
    cipher or a compressor, bytes that aren't JSON) goes through the library's own mapper, so
    the result is always exactly the event the library would give, or its error (which
    ``adapters.logreader`` wraps in ``UnreadableEvent`` to name the notification).
    """

    def __init__(self, app: Application[UUID]) -> None:
        mapper = app.mapper
        self._mapper = mapper
        transcoder: Any = mapper.transcoder
        self._fast = (
            mapper.cipher is None
            and mapper.compressor is None
            and isinstance(transcoder, JSONTranscoder)
            and type(transcoder)._decode_obj is JSONTranscoder._decode_obj
            and "datetime_iso" in transcoder.names
        )
        datetime_iso = transcoder.names.get("datetime_iso") if self._fast else None
        # The library's transcoding is fromisoformat behind an assert and a method call.
        self._datetime: Callable[[str], Any] = (
            datetime.fromisoformat
            if type(datetime_iso) is DatetimeAsISO
            else getattr(datetime_iso, "decode", datetime.fromisoformat)
        )
        # Per topic: the class, when it can take the fast path (None when it upcasts).
        self._classes: dict[str, type | None] = {}
        # What json.loads runs, without its wrappers (the library wrote no whitespace around).
        self._scan: Callable[[str, int], tuple[Any, int]] = make_scanner(json.JSONDecoder())  # type: ignore[arg-type]
        # A job's dozen events share one UUID object instead of parsing its id a dozen times.
        self._uuids: dict[str, UUID] = {}
        self.decode = self._decoder()
        self.header = self._header()

    @property
    def fast(self) -> bool:
        """Whether the common case skips the library (no cipher, compressor or other codec)."""
        return self._fast

    def _decoder(self) -> Callable[[UUID | str, int, str, bytes], Any]:
        # A closure over locals: this runs once per event of a replay, and attribute lookups
        # on self were a good part of its time.
        classes, fast_class, as_uuid = self._classes, self._fast_class, self._as_uuid
        (parse_json, json_errors), parse_datetime = _json_parser(self._scan), self._datetime
        library = self._mapper.to_domain_event
        new, set_attribute = object.__new__, object.__setattr__

        def decode(
            originator_id: UUID | str, originator_version: int, topic: str, state: bytes
        ) -> Any:
            try:
                cls = classes[topic]
            except KeyError:
                cls = classes[topic] = fast_class(topic)
            if type(state) is not bytes:  # a driver's memoryview
                state = bytes(state)
            if cls is not None and state.count(_TYPE_KEY) == 1:
                try:
                    event_state = parse_json(state)
                except json_errors:  # not JSON: the library says how
                    event_state = None
                timestamp = event_state.get("timestamp") if type(event_state) is dict else None
                if (
                    type(timestamp) is dict
                    and len(timestamp) == 2
                    and timestamp.get("_type_") == "datetime_iso"
                    and "_data_" in timestamp
                ):
                    event_state["timestamp"] = parse_datetime(timestamp["_data_"])
                    event_state["originator_id"] = (
                        as_uuid(originator_id) if type(originator_id) is str else originator_id
                    )
                    event_state["originator_version"] = originator_version
                    event: Any = new(cls)
                    set_attribute(event, "__dict__", event_state)
                    return event
            return library(StoredEvent(originator_id, originator_version, topic, state))

        return decode

    def _header(self) -> Callable[[UUID | str, int, str, bytes], Any]:
        """``header(originator id, version, topic, state)``: an event of the topic's class that
        has its originator's id and version and nothing else (its state is not even parsed),
        for a fold that reads no more of it; any other attribute raises AttributeError."""
        classes: dict[str, type] = {}
        as_uuid = self._as_uuid
        new, set_attribute = object.__new__, object.__setattr__

        def header(
            originator_id: UUID | str, originator_version: int, topic: str, state: bytes
        ) -> Any:
            cls = classes.get(topic)
            if cls is None:
                cls = classes[topic] = resolve_topic(topic)
            if type(originator_id) is str:
                originator_id = as_uuid(originator_id)
            event = new(cls)
            set_attribute(
                event,
                "__dict__",
                {"originator_id": originator_id, "originator_version": originator_version},
            )
            return event

        return header

    def _as_uuid(self, text: str) -> UUID:
        uuids = self._uuids
        uuid = uuids.get(text)
        if uuid is None:
            if len(uuids) >= MAX_CACHED_UUIDS:
                uuids.clear()
            uuid = uuids[text] = UUID(text)
        return uuid

    def _fast_class(self, topic: str) -> type | None:
        if not self._fast:
            return None
        cls = resolve_topic(topic)
        # A class that upcasts old versions needs the library's path for its stored versions.
        if getattr(cls, "class_version", 1) != 1:
            return None
        return cls
