"""The contract with eventsourcing's internals (``adapters.esinternals``): each private name or
undocumented attribute the project uses exists, has the shape we call it with, and behaves as we
rely on. A library upgrade that changes one fails here first, by name, instead of somewhere deep
in a projection or a replay."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import (
    DatetimeAsISO,
    IntegrityError,
    JSONTranscoder,
    Recording,
    Tracking,
)
from eventsourcing.postgres import (
    PostgresApplicationRecorder,
    PostgresDatastore,
    PostgresTrackingRecorder,
)
from eventsourcing.sqlite import (
    SQLiteApplicationRecorder,
    SQLiteConnectionPool,
    SQLiteTrackingRecorder,
)

from adapters.esinternals import EventDecoder, notification_rows, open_tracking
from adapters.eventstore import open_market, store_env
from bench.replay import LogGenerator
from domain.aggregates import Seller
from projections.dialects import scratch_env


def positional(function: Any) -> list[str]:
    return [
        p.name
        for p in inspect.signature(function).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


@pytest.mark.parametrize("recorder", [SQLiteTrackingRecorder, PostgresTrackingRecorder])
def test_the_cursor_level_tracking_methods_take_what_we_pass(recorder: type) -> None:
    # Called positionally: _insert_tracking(cursor, tracking), _max_tracking_id(name, cursor).
    insert = positional(recorder._insert_tracking)
    assert len(insert) == 3 and insert[2] == "tracking", insert
    max_id = positional(recorder._max_tracking_id)
    assert len(max_id) == 3 and max_id[1] == "application_name", max_id
    assert positional(recorder.max_tracking_id) == ["self", "application_name"]


def test_the_create_statement_hooks_and_pool_attributes_exist() -> None:
    assert callable(SQLiteTrackingRecorder.construct_create_table_statements)
    assert "db_name" in inspect.signature(SQLiteConnectionPool.__init__).parameters
    # The PostgreSQL recorder's statements and the pool's connect kwargs are plain attributes
    # set in __init__: checked on live objects in the tests below.
    assert "schema" in inspect.signature(PostgresDatastore.__init__).parameters


def test_the_json_transcoder_decodes_as_the_fast_path_repeats() -> None:
    transcoder = JSONTranscoder()
    transcoder.register(DatetimeAsISO())
    assert isinstance(transcoder.names["datetime_iso"], DatetimeAsISO)  # type: ignore[attr-defined]
    assert positional(JSONTranscoder._decode_obj) == ["self", "d"]
    encoded = transcoder.encode({"timestamp": datetime(2026, 1, 2, tzinfo=UTC)})
    assert encoded.count(b'"_type_"') == 1 and b'"datetime_iso"' in encoded


def test_the_tracking_table_behaves_as_the_runner_relies_on(database_url: str) -> None:
    env = store_env(database_url, role="contract")
    with scratch_env(env) as scratch:
        table = "CREATE TABLE IF NOT EXISTS mm_contract (k BIGINT PRIMARY KEY)"
        tracking = open_tracking("contract", scratch, [table])
        try:
            if database_url.startswith("sqlite"):
                assert tracking.is_sqlite and tracking.sqlite_file == scratch["SQLITE_DBNAME"]
            else:
                # The schema reached every connection: our unqualified table landed in it.
                pool_kwargs = tracking.datastore.pool.kwargs
                assert pool_kwargs["options"] == f"-c search_path={scratch['POSTGRES_SCHEMA']}"
                with tracking.datastore.get_connection() as conn:
                    row = conn.execute(
                        "SELECT table_schema FROM information_schema.tables "
                        "WHERE table_name = 'mm_contract'"
                    ).fetchone()
                assert row["table_schema"] == scratch["POSTGRES_SCHEMA"]
            assert tracking.position("app") == 0
            with tracking.datastore.transaction(commit=True) as c:
                c.execute("SELECT COUNT(*) AS n FROM mm_contract")  # created with tracking
                tracking.insert(c, Tracking("app", 5))
                assert tracking.position("app", c) == 5
            # The single-row upsert refuses a position it has reached or passed.
            for position in (5, 3):
                with (
                    pytest.raises(IntegrityError),
                    tracking.datastore.transaction(commit=True) as c,
                ):
                    tracking.insert(c, Tracking("app", position))
            assert tracking.position("app") == 5
            with tracking.datastore.transaction(commit=True) as c:
                tracking.reset(c, "app")
                c.execute(tracking.lock_statement() if tracking.is_sqlite else "SELECT 1")
            assert tracking.position("app") == 0
        finally:
            tracking.datastore.close()


def test_the_raw_log_and_the_decoder_equal_the_librarys_own(database_url: str) -> None:
    app = open_market(database_url)
    try:
        recorder = app.recorder
        assert isinstance(recorder, SQLiteApplicationRecorder | PostgresApplicationRecorder)
        assert isinstance(recorder.events_table_name, str)
        if isinstance(recorder, PostgresApplicationRecorder):
            assert isinstance(recorder.datastore.schema, str)
        LogGenerator(app, jobs=15, rate=10.0, seed=11).generate()
        notifications = recorder.select_notifications(start=0, limit=10**6)
        rows = notification_rows(app)(0, None, 10**6)
        # SQLite keeps ids as hex text (the decoder makes UUIDs), PostgreSQL as UUIDs.
        assert [(r[0], UUID(str(r[1])), r[2], r[3]) for r in rows] == [
            (n.id, n.originator_id, n.originator_version, n.topic) for n in notifications
        ]
        assert [bytes(r[4]) for r in rows] == [bytes(n.state) for n in notifications]
        assert notification_rows(app)(3, 7, 100)[-1][0] == 7

        decoder = EventDecoder(app)
        assert decoder.fast, "the common case no longer takes the fast path"
        mapper = app.mapper
        assert mapper.cipher is None and mapper.compressor is None
        for row, n in zip(rows, notifications, strict=True):
            ours, theirs = decoder.decode(*row[1:]), mapper.to_domain_event(n)
            assert type(ours) is type(theirs) and ours.__dict__ == theirs.__dict__, n.topic
    finally:
        app.close()


def test_save_returns_recordings_with_positions_and_wakes_the_process(database_url: str) -> None:
    app = open_market(database_url)
    try:
        woken: list[int] = []
        app.on_saved.append(lambda: woken.append(1))
        recordings = app.save(Seller(id=uuid4(), name="s", api_key_hash="h"))
        assert app.save() == []  # nothing to save: no recordings, and a wake all the same
        assert len(recordings) == 1 and isinstance(recordings[0], Recording)
        assert recordings[0].notification.id == app.recorder.max_notification_id()
        assert woken == [1, 1]
    finally:
        app.close()
