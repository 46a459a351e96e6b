"""The projections' log reader gives exactly the events the library's own reader gives."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.domain import Aggregate, event
from eventsourcing.persistence import MapperDeserialisationError
from eventsourcing.utils import get_topic

from adapters.eventstore import MarketApp, open_market
from adapters.logreader import EventDecoder, LogReader, UnreadableEvent
from bench.replay import LogGenerator
from domain.aggregates import Job
from projections.runner import ProjectionRunner
from projections.views import PROJECTIONS, scratch_views
from tests.test_rebuild import generated_market

# Job events no read model handles (lease renewals and the like): a reader may skip them.
_Job: Any = Job
IGNORED_TOPICS = frozenset(
    cls.TOPIC for cls in (_Job.Claimed, _Job.Skipped, _Job.CancelRequested, _Job.UpstreamDeleted)
)


class Ledgerish(Aggregate):
    """Events with values the fast path must leave to the library."""

    @event("Noted")
    def note(self, amount: Decimal, ref: UUID, at: datetime) -> None:
        self.amount = amount

    @event("Named")
    def name(self, name: dict[str, Any]) -> None:
        self.name_ = name

    class Renamed(Aggregate.Event):
        topic = "tests.test_logreader:Ledgerish.Renamed"
        class_version = 2
        title: str
        source: str

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["source"] = "v1"

        def apply(self, aggregate: Any) -> None:
            aggregate.title = self.title


def library_events(app: MarketApp) -> list[tuple[int, Any]]:
    notifications = app.recorder.select_notifications(start=1, limit=10**6)
    return [(n.id, app.mapper.to_domain_event(n)) for n in notifications]


def same(ours: list[tuple[int, Any]], theirs: list[tuple[int, Any]]) -> None:
    assert [(i, type(e), e.__dict__) for i, e in ours] == [
        (i, type(e), e.__dict__) for i, e in theirs
    ]


def test_a_market_log_reads_as_the_library_reads_it(database_url: str) -> None:
    app = open_market(database_url)
    try:
        LogGenerator(app, jobs=120, rate=20.0, seed=7).generate()
        theirs = library_events(app)
        assert len(theirs) > 1500
        reader = LogReader(app)
        ours: list[tuple[int, Any]] = []
        position = 0
        while (batch := reader.read(position, 97)).last is not None:
            assert batch.count == len(batch.items)
            ours += batch.items
            position = batch.last
        same(ours, theirs)
        assert all(isinstance(e.originator_id, UUID) for _, e in ours)

        # Skipped topics are counted, not decoded; ``stop`` bounds a batch.
        skipping = LogReader(app, skip=IGNORED_TOPICS)
        batch = skipping.read(0, 10**6, stop=1000)
        assert batch.last == 1000 and batch.count == 1000
        first = app.recorder.select_notifications(start=1, limit=1000)
        assert [i for i, _ in batch.items] == [n.id for n in first if n.topic not in IGNORED_TOPICS]
        assert 0 < len(batch.items) < 1000
        assert skipping.read(len(theirs), 10).last is None

        # Topics once seen skipped are left in the database: later batches still cover (and
        # count) every notification, and hold the same events.
        ids = [i for i, _ in theirs]
        position, kept = 0, []
        for k in range(0, len(ids), 97):
            batch = skipping.read(position, 97)
            assert (batch.last, batch.count) == (
                ids[min(k + 96, len(ids) - 1)],
                len(ids[k : k + 97]),
            )
            kept += batch.items
            position = batch.last
        assert skipping.read(position, 97).last is None
        same(kept, [(i, e) for i, e in theirs if e.TOPIC not in IGNORED_TOPICS])
    finally:
        app.close()


def test_events_of_header_topics_have_their_class_and_header_only(database_url: str) -> None:
    app = open_market(database_url)
    try:
        LogGenerator(app, jobs=30, rate=20.0, seed=5).generate()
        theirs = library_events(app)
        headers = {_Job.Succeeded.TOPIC, _Job.Dispatched.TOPIC}
        reader = LogReader(app, skip=IGNORED_TOPICS, headers=headers.__contains__)
        batch = reader.read(0, 10**6)
        kept = [(i, e) for i, e in theirs if e.TOPIC not in IGNORED_TOPICS]
        assert [(i, type(e)) for i, e in batch.items] == [(i, type(e)) for i, e in kept]
        bare = 0
        for (_, ours), (_, full) in zip(batch.items, kept, strict=True):
            if full.TOPIC in headers:
                bare += 1
                assert ours.__dict__ == {
                    "originator_id": full.originator_id,
                    "originator_version": full.originator_version,
                }
                with pytest.raises(AttributeError):
                    _ = ours.timestamp
            else:
                assert ours.__dict__ == full.__dict__
        assert bare > 30
    finally:
        app.close()


def test_the_read_models_headers_only_events_are_rebuilt_as_in_full(database_url: str) -> None:
    """Each read model's ``headers_only`` classes: a rebuild given their headers only folds the
    same views as the live runner, which gets them in full."""
    with (
        generated_market(database_url, jobs=60, seed=11) as (app, env, live),
        scratch_views(env, app.name) as fresh,
    ):
        runner = ProjectionRunner(app, fresh, headers=True)
        assert any(runner.reader._header_topic(t) for t in headers_topics())  # type: ignore[misc]
        runner.catch_up()
        assert fresh.digest() == live.digest()


def headers_topics() -> set[str]:
    return {cls.TOPIC for p in PROJECTIONS for cls in p.headers_only}


def test_events_the_fast_path_cannot_decode_go_through_the_library(database_url: str) -> None:
    app = open_market(database_url)
    try:
        thing = Ledgerish()
        thing.note(Decimal("1.10"), uuid4(), datetime(2026, 1, 2, tzinfo=UTC))
        thing.name({"_type_": "not ours", "x": 1})
        thing.trigger_event(Ledgerish.Renamed, title="t", source="v2")
        # Values a fast JSON parser may refuse or round differently (past 64 bits, floats at
        # the edges of precision, escapes): decoded to what the library's parser makes of them.
        thing.name({"big": 2**70, "small": -(2**64), "tiny": 5e-324, "pi": 3.141592653589793})
        thing.name({"text": "caf\u00e9 \u2603 \U0001f600", "ctl": "a\x00b\n", "e": 1e308})
        app.save(thing)
        ours = LogReader(app).read(0, 100).items
        same(ours, library_events(app))
        noted = ours[1][1]
        assert noted.amount == Decimal("1.10") and isinstance(noted.ref, UUID)
        assert ours[4][1].name["big"] == 2**70
    finally:
        app.close()


def test_a_processs_own_saves_are_read_from_memory_as_the_log_gives_them(
    database_url: str,
) -> None:
    """The live runner's reader remembers what this process saves (``LogReader.remember``):
    a run of them from the reader's position needs no read of the log, and a notification in
    between that isn't remembered (another process's save) is read from the log in the same
    pass. Either way the batch is what the log would give, skipped topics included."""
    app = open_market(database_url)
    other = open_market(database_url)  # another process writing the same log
    try:
        reader = LogReader(app, skip={get_topic(Ledgerish.Named)})
        app.on_recorded.append(reader.remember)
        log_reads: list[int] = []
        select = reader._select

        def counted(start: int, *args: Any) -> Any:
            log_reads.append(start)
            return select(start, *args)

        reader._select = counted  # type: ignore[method-assign]

        def saved_here() -> int:
            thing = Ledgerish()
            thing.note(Decimal("2.50"), uuid4(), datetime(2026, 1, 2, tzinfo=UTC))
            thing.name({"skipped": True})
            return app.save(thing)[-1].notification.id

        first = saved_here()
        batch = reader.read(0, 100)
        assert log_reads == [] and batch.last == first == batch.count == 3
        expected = [(n, e) for n, e in library_events(app) if type(e) is not Ledgerish.Named]
        same(batch.items, expected)

        # Ours, another process's, ours: one pass, the log read from where memory stops.
        saved_here()
        theirs = Ledgerish()
        theirs.note(Decimal("1"), uuid4(), datetime(2026, 1, 3, tzinfo=UTC))
        other.save(theirs)
        last = saved_here()
        batch = reader.read(first, 100)
        assert log_reads == [first + 3] and batch.last == last and batch.count == last - first
        expected = [(n, e) for n, e in library_events(app) if type(e) is not Ledgerish.Named]
        same(batch.items, expected[2:])
        assert reader._remembered == {}  # what the log read passed is forgotten

        # A limit and a stop end a run early; the rest is read next time, still from memory.
        more = saved_here()
        assert reader.read(last, 1).last == last + 1
        assert reader.read(last + 1, 100, stop=more - 1).last == more - 1
        assert reader.read(more - 1, 100).last == more
        assert log_reads == [first + 3]
    finally:
        other.close()
        app.close()


def test_a_compressed_log_is_left_to_the_library(tmp_path: Path) -> None:
    app = MarketApp(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": str(tmp_path / "market.db"),
            "COMPRESSOR_TOPIC": "eventsourcing.compressor:ZlibCompressor",
        }
    )
    try:
        LogGenerator(app, jobs=5, rate=5.0, seed=1).generate()
        assert not EventDecoder(app)._fast
        same(LogReader(app).read(0, 10**6).items, library_events(app))
    finally:
        app.close()


def test_a_corrupt_event_fails_as_the_library_fails(tmp_path: Path) -> None:
    app = open_market(f"sqlite:///{tmp_path}/data")
    try:
        LogGenerator(app, jobs=2, rate=5.0, seed=1).generate()
        truncated = b'{"timestamp":{"_type_":"datetime_iso","_data_":"2026-01-0'
        with sqlite3.connect(tmp_path / "data" / "market.db") as db:
            db.execute("UPDATE stored_events SET state = ? WHERE rowid = 2", (truncated,))
        with pytest.raises(MapperDeserialisationError):
            app.mapper.to_domain_event(app.recorder.select_notifications(2, 1)[0])
        # The library's error, naming the notification (a runner stops there; see the runner).
        with pytest.raises(UnreadableEvent) as failed:
            LogReader(app).read(0, 10)
        assert failed.value.position == 2
        assert isinstance(failed.value.__cause__, MapperDeserialisationError)
    finally:
        app.close()
