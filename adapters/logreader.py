"""Reads the market's notification log for the projections, faster than the library's
``select_notifications`` + ``Mapper.to_domain_event`` pair and to the same domain events.

Rebuilding every view from a long log is bound by the CPU, and the library's pair spends most
of its time on work the projections don't need: a ``Notification`` object per row, a dict per
row on PostgreSQL, and a JSON ``object_hook`` call for every dict in every event. Here rows come
back as plain tuples, events whose topics no view reads are counted but never decoded, and an
event whose only transcoded value is its timestamp (nearly all of them) is decoded by the
scanner inside ``json.loads`` and one ``fromisoformat``. Anything else (another transcoded
value, an event class that upcasts, a cipher or a compressor, bytes that aren't JSON) goes
through the library's own mapper, so the result is always exactly the event the library would
give, or its error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from json.scanner import make_scanner
from typing import Any
from uuid import UUID

from eventsourcing.persistence import DatetimeAsISO, JSONTranscoder, StoredEvent
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.sqlite import SQLiteApplicationRecorder
from eventsourcing.utils import resolve_topic
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Identifier

from adapters.eventstore import MarketApp

# How the library's JSON transcoder marks a value it transcoded; in the encoded bytes a key
# spelled like this can't be part of a string (its quotes would be escaped).
_TYPE_KEY = b'"_type_"'
MAX_CACHED_UUIDS = 65_536


@dataclass(frozen=True)
class LogBatch:
    """The notifications after a position: the last id read (None when there were none), how
    many there were, and ``(notification id, domain event)`` for those not skipped."""

    last: int | None
    count: int
    items: list[tuple[int, Any]]


class EventDecoder:
    """Stored event fields to the domain event ``Mapper.to_domain_event`` would return."""

    def __init__(self, app: MarketApp) -> None:
        mapper = app.mapper
        self._mapper = mapper
        transcoder = mapper.transcoder
        self._fast = (
            mapper.cipher is None
            and mapper.compressor is None
            and isinstance(transcoder, JSONTranscoder)
            and type(transcoder)._decode_obj is JSONTranscoder._decode_obj
            and "datetime_iso" in transcoder.names
        )
        datetime_iso = transcoder.names.get("datetime_iso") if self._fast else None  # type: ignore[attr-defined]
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

    def _decoder(self) -> Callable[[UUID | str, int, str, bytes], Any]:
        # A closure over locals: this runs once per event of a replay, and attribute lookups
        # on self were a good part of its time.
        classes, fast_class, uuids = self._classes, self._fast_class, self._uuids
        scan, parse_datetime, library = self._scan, self._datetime, self._mapper.to_domain_event
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
                text = state.decode("utf8")
                try:
                    event_state, end = scan(text, 0)
                except (ValueError, StopIteration):  # not JSON: the library says how
                    event_state, end = None, -1
                timestamp = event_state.get("timestamp") if type(event_state) is dict else None
                if (
                    end == len(text)
                    and type(timestamp) is dict
                    and len(timestamp) == 2
                    and timestamp.get("_type_") == "datetime_iso"
                    and "_data_" in timestamp
                ):
                    event_state["timestamp"] = parse_datetime(timestamp["_data_"])
                    if type(originator_id) is str:
                        uuid = uuids.get(originator_id)
                        if uuid is None:
                            if len(uuids) >= MAX_CACHED_UUIDS:
                                uuids.clear()
                            uuid = uuids[originator_id] = UUID(originator_id)
                        event_state["originator_id"] = uuid
                    else:
                        event_state["originator_id"] = originator_id
                    event_state["originator_version"] = originator_version
                    event: Any = new(cls)
                    set_attribute(event, "__dict__", event_state)
                    return event
            return library(StoredEvent(originator_id, originator_version, topic, state))

        return decode

    def _fast_class(self, topic: str) -> type | None:
        if not self._fast:
            return None
        cls = resolve_topic(topic)
        # A class that upcasts old versions needs the library's path for its stored versions.
        if getattr(cls, "class_version", 1) != 1:
            return None
        return cls


class LogReader:
    """Batches of the market's log after a position, decoded, but for the events of the topics
    ``skip`` names (a collection of topics, or a test decided once per topic)."""

    def __init__(self, app: MarketApp, skip: Collection[str] | Callable[[str], bool] = ()) -> None:
        self.app = app
        self._skip_topic = skip if callable(skip) else frozenset(skip).__contains__
        self._skipped: dict[str, bool] = {}
        self.decode = EventDecoder(app).decode
        recorder = app.recorder
        self._select: Callable[[int, int | None, int], list[tuple[Any, ...]]]
        if isinstance(recorder, SQLiteApplicationRecorder):
            self._select = self._sqlite_rows
        elif isinstance(recorder, PostgresApplicationRecorder):
            self._select = self._postgres_rows
        else:
            self._select = self._library_rows

    def read(self, start: int, limit: int, stop: int | None = None) -> LogBatch:
        """The notifications with ids after ``start`` (up to ``stop``), at most ``limit``."""
        rows = self._select(start, stop, limit)
        if not rows:
            return LogBatch(None, 0, [])
        skipped, decode = self._skipped, self.decode
        for topic in {row[3] for row in rows}.difference(skipped):
            skipped[topic] = self._skip_topic(topic)
        items = [
            (row[0], decode(row[1], row[2], row[3], row[4])) for row in rows if not skipped[row[3]]
        ]
        return LogBatch(rows[-1][0], len(rows), items)

    # Each gives (notification id, originator id, version, topic, state) rows in id order,
    # exactly the rows the library's select_notifications would.

    def _sqlite_rows(self, start: int, stop: int | None, limit: int) -> list[tuple[Any, ...]]:
        recorder = self.app.recorder
        assert isinstance(recorder, SQLiteApplicationRecorder)
        statement = (
            "SELECT rowid, originator_id, originator_version, topic, state "
            f"FROM {recorder.events_table_name} WHERE rowid>? "
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

    def _postgres_rows(self, start: int, stop: int | None, limit: int) -> list[tuple[Any, ...]]:
        recorder = self.app.recorder
        assert isinstance(recorder, PostgresApplicationRecorder)
        statement = SQL(
            "SELECT notification_id, originator_id, originator_version, topic, state "
            "FROM {schema}.{table} WHERE notification_id>%s"
        ).format(
            schema=Identifier(recorder.datastore.schema),
            table=Identifier(recorder.events_table_name),
        )
        params: list[int] = [start]
        if stop is not None:
            statement += SQL(" AND notification_id<=%s")
            params.append(stop)
        statement += SQL(" ORDER BY notification_id LIMIT %s")
        params.append(limit)
        with recorder.datastore.get_connection() as conn, conn.cursor(row_factory=tuple_row) as c:
            c.execute(statement, params, prepare=True)
            return c.fetchall()

    def _library_rows(self, start: int, stop: int | None, limit: int) -> list[tuple[Any, ...]]:
        notifications = self.app.recorder.select_notifications(
            start=start, limit=limit, stop=stop, inclusive_of_start=False
        )
        return [
            (n.id, n.originator_id, n.originator_version, n.topic, n.state) for n in notifications
        ]
