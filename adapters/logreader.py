"""Reads the market's notification log for the projections, faster than the library's
``select_notifications`` + ``Mapper.to_domain_event`` pair and to the same domain events.

Rebuilding every view from a long log is bound by the CPU, and the library's pair spends most
of its time on work the projections don't need: a ``Notification`` object per row, a dict per
row on PostgreSQL, and a JSON ``object_hook`` call for every dict in every event. Here rows come
back as plain tuples, and events whose topics no view reads are counted but neither fetched nor
decoded (a topic is looked at once, the first time it comes back); the raw rows and the
decoder are the library's internals, so they live in ``adapters.esinternals``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from eventsourcing.application import Application
from eventsourcing.persistence import Recording
from eventsourcing.utils import get_topic

from adapters.esinternals import EventDecoder, notification_batches

__all__ = ["EventDecoder", "LogBatch", "LogReader", "UnreadableEvent"]

# Events saved in this process that a reader keeps for its next reads, at most: a reader that
# stopped reading (a runner that failed) must not hold them without bound.
MAX_REMEMBERED = 10_000


def _id_text(value: Any) -> str:
    """An originator id as ``str(UUID)`` spells it: PostgreSQL gives UUIDs, SQLite the 32 hex
    digits the library stores."""
    if isinstance(value, UUID):
        return str(value)
    h = value.lower()
    if len(h) == 32:
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return str(UUID(h))


class UnreadableEvent(Exception):
    """A stored event that can't be decoded (a corrupt row, a topic this code doesn't know):
    reading again gives the same error."""

    def __init__(self, position: int, cause: Exception) -> None:
        super().__init__(f"notification {position} cannot be decoded: {cause!r}")
        self.position = position


@dataclass(frozen=True)
class LogBatch:
    """The notifications after a position: the last id read (None when there were none), how
    many there were, and ``(notification id, domain event)`` for those not skipped."""

    last: int | None
    count: int
    items: list[tuple[int, Any]]


class LogReader:
    """Batches of the market's log after a position, decoded, but for the events of the topics
    ``skip`` names (a collection of topics, or a test decided once per topic), and those of
    the topics ``headers`` names, which come back with their originator's id and version only
    (``EventDecoder.header``: for readers that need no more of them, such as a rebuild's
    folds; the state of such an event is not parsed at all)."""

    def __init__(
        self,
        app: Application[UUID],
        skip: Collection[str] | Callable[[str], bool] = (),
        headers: Callable[[str], bool] | None = None,
        mapped: bool = False,
    ) -> None:
        """``mapped``: read the log through memory-mapped I/O where the database offers it
        (``notification_batches``), for a reader of the whole log."""
        self.app = app
        self._skip_topic = skip if callable(skip) else frozenset(skip).__contains__
        self._skipped: dict[str, bool] = {}
        decoder = EventDecoder(app)
        self.decode = decoder.decode
        self._header, self._header_topic = decoder.header, headers
        # Per topic not skipped: how its events are decoded.
        self._decoders: dict[str, Callable[[Any, int, str, bytes], Any]] = {}
        self._select = notification_batches(app, mapped)
        # The topics seen so far that are skipped: their rows stay in the database.
        self._excluded: list[str] = []
        # Events this process saved (``remember``), by notification id, until read.
        self._remembered: dict[int, Any] = {}
        self._remembering = threading.Lock()
        # Per event class: whether its topic is skipped.
        self._skipped_class: dict[type, bool] = {}

    def remember(self, recordings: Sequence[Recording[UUID]]) -> None:
        """The events of a save this process just committed, which ``read`` then gives from
        memory instead of reading and decoding them from the log again (for the live runner,
        whose log is mostly this process's own saves). A read takes them only as a run of
        consecutive notification ids from its start, so anything saved elsewhere in between,
        or remembered late, is read from the log as before."""
        with self._remembering:
            remembered = self._remembered
            if len(remembered) >= MAX_REMEMBERED:
                remembered.clear()
            for recording in recordings:
                remembered[recording.notification.id] = recording.domain_event

    def read(self, start: int, limit: int, stop: int | None = None) -> LogBatch:
        """The notifications with ids after ``start`` (up to ``stop``), at most ``limit``."""
        batch = self._read_remembered(start, limit, stop) if self._remembered else None
        if batch is None:
            batch = self._read_log(start, limit, stop)
        elif batch.count < limit and batch.last != stop and self._remembered:
            # Some of this process's later saves are remembered but a notification before them
            # is not (another process's, or a save not yet remembered): read on from the log,
            # so one pass still applies everything that was there to read.
            assert batch.last is not None
            rest = self._read_log(batch.last, limit - batch.count, stop)
            if rest.last is not None:
                batch = LogBatch(rest.last, batch.count + rest.count, batch.items + rest.items)
        if self._remembered and batch.last is not None:
            # Read past them here, or by another process's runner before this read began.
            self._forget_through(batch.last)
        return batch

    def _forget_through(self, last: int) -> None:
        """Drop what is remembered up to ``last``: the log was read past it."""
        with self._remembering:
            remembered = self._remembered
            for seq in [n for n in remembered if n <= last]:
                del remembered[seq]

    def _read_log(self, start: int, limit: int, stop: int | None) -> LogBatch:
        last, count, rows = self._select(start, stop, limit, self._excluded)
        if last is None:
            return LogBatch(None, 0, [])
        skipped, decoders = self._skipped, self._decoders
        new_topics = {row[3] for row in rows}.difference(skipped)
        for topic in new_topics:
            skipped[topic] = skip = self._skip_topic(topic)
            if skip:
                self._excluded.append(topic)
            elif self._header_topic is not None and self._header_topic(topic):
                decoders[topic] = self._header
            else:
                decoders[topic] = self.decode
        try:
            items = [
                (row[0], decoders[row[3]](row[1], row[2], row[3], row[4]))
                for row in rows
                if not skipped[row[3]]
            ]
        except Exception:
            self._find_unreadable(rows)
            raise
        return LogBatch(last, count, items)

    def _read_remembered(self, start: int, limit: int, stop: int | None) -> LogBatch | None:
        """The remembered events with ids ``start + 1``, ``start + 2``... as far as they run
        (None when the first is not remembered)."""
        end = start + limit if stop is None else min(start + limit, stop)
        items: list[tuple[int, Any]] = []
        seq = start
        with self._remembering:
            remembered = self._remembered
            while seq < end:
                event = remembered.pop(seq + 1, None)
                if event is None:
                    break
                seq += 1
                items.append((seq, event))
        if not items:
            return None
        skipped = self._skipped_class
        for cls in {type(event) for _, event in items}.difference(skipped):
            topic = get_topic(cls)
            skip = self._skipped.get(topic)
            skipped[cls] = self._skip_topic(topic) if skip is None else skip
        return LogBatch(seq, seq - start, [item for item in items if not skipped[type(item[1])]])

    def originators(
        self,
        start: int,
        limit: int,
        stop: int | None,
        into: set[str],
        topics: set[str] | None = None,
    ) -> int | None:
        """Add to ``into`` the ids of the aggregates the notifications after ``start`` (up to
        ``stop``, at most ``limit``) changed, decoding none, and to ``topics`` their events'
        topics; returns the last id read (None when there were none). Events of the topics
        ``read`` skips change no view, so they are left out."""
        last, _, rows = self._select(start, stop, limit, self._excluded)
        if last is None:
            return None
        skipped = self._skipped
        kept = [r for r in rows if not skipped.get(r[3], False)]
        into.update(_id_text(r[1]) for r in kept)
        if topics is not None:
            topics.update(r[3] for r in kept)
        return int(last)

    def _find_unreadable(self, rows: list[Any]) -> None:
        """Raise ``UnreadableEvent`` naming the first row of ``rows`` that fails to decode."""
        for row in rows:
            if not self._skipped[row[3]]:
                try:
                    self._decoders[row[3]](row[1], row[2], row[3], row[4])
                except Exception as e:
                    raise UnreadableEvent(row[0], e) from e
