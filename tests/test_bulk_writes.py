"""How folds write many rows at once (``Store.rows_writer``: executemany on SQLite; on
PostgreSQL one INSERT with every row's values, or COPY for many rows), and the collector
setting a catch-up uses."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from adapters.eventstore import open_market, store_env
from projections import dialects
from projections.dialects import STAGED_UPSERT_ROWS, PostgresStore, column_types
from projections.ledger import LEDGER_TABLES
from projections.orderbook import OfferRow
from projections.runner import fewer_collections
from projections.views import (
    TABLES,
    VIEWS_NAME,
    Views,
    open_scratch_views,
    open_views,
    scratch_env,
    scratch_views,
)


@pytest.fixture
def views(database_url: str) -> Iterator[Views]:
    """Fresh views on either database, with their tables."""
    market = open_market(database_url)
    views = open_views(store_env(database_url, role=VIEWS_NAME))
    try:
        views.ensure_schema(market.name)
        yield views
    finally:
        views.datastore.close()
        market.close()


def test_column_types_read_every_column_and_skip_table_constraints() -> None:
    types = column_types(LEDGER_TABLES["mm_ledger_postings"])
    assert types == {
        "entry_no": "BIGINT",
        "line": "BIGINT",
        "account": "TEXT",
        "debit": "BIGINT",
        "credit": "BIGINT",
    }
    offers = "CREATE TABLE t (a TEXT PRIMARY KEY, b DOUBLE PRECISION NOT NULL, c BIGINT)"
    assert column_types(offers) == {"a": "TEXT", "b": "DOUBLE PRECISION", "c": "BIGINT"}


def test_insert_and_upsert_write_the_same_rows_on_either_database(views: Views) -> None:
    rows = views.rows_writer()
    columns = ("buyer_id", "version")
    posting = ("entry_no", "line", "account", "debit", "credit")
    with views.datastore.transaction(commit=True) as c:
        # A quote and a tab: COPY's text format must escape them.
        written = [(4, 0, "a", 5, 0), (4, 1, "b\tc", 0, 5), (8, 0, "o'neil", 0, 0)]
        rows.insert(c, "mm_ledger_postings", posting, written)
        rows.upsert(c, "mm_ledger_buyers", columns, [("x", 1), ("y", 2)], key="buyer_id")
        rows.upsert(c, "mm_ledger_buyers", columns, [("y", 3), ("z", 4)], key="buyer_id")
        rows.insert(c, "mm_ledger_postings", posting, [])
        rows.upsert(c, "mm_ledger_buyers", columns, [], key="buyer_id")
    postings = views.all(
        "SELECT entry_no, line, account, debit, credit FROM mm_ledger_postings "
        "ORDER BY entry_no, line"
    )
    read = [tuple(int(r[k]) if k != "account" else r[k] for k in posting) for r in postings]
    assert read == written
    buyers = views.all("SELECT buyer_id, version FROM mm_ledger_buyers ORDER BY buyer_id")
    assert {r["buyer_id"]: int(r["version"]) for r in buyers} == {"x": 1, "y": 3, "z": 4}


class Statements:
    """A cursor that records the statements run through it, or through the raw cursors made
    on its connection (``record_raw``)."""

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor
        self.run: list[str] = []

    @property
    def connection(self) -> Any:
        return self.cursor.connection

    def record_raw(self, monkeypatch: pytest.MonkeyPatch) -> None:
        run = self.run

        class Recording(psycopg.RawCursor):
            def execute(self, query: Any, params: Any = None, **options: Any) -> Any:
                run.append(str(query))
                return super().execute(query, params, **options)

        monkeypatch.setattr(dialects, "RawCursor", Recording)

    def execute(self, statement: Any, params: Any = None) -> Any:
        self.run.append(str(statement))
        return self.cursor.execute(statement, params)

    def executemany(self, statement: Any, params: Any) -> Any:
        self.run.append(str(statement))
        return self.cursor.executemany(statement, params)

    def copy(self, statement: Any) -> Any:
        self.run.append(f"COPY {statement!r}")
        return self.cursor.copy(statement)


def test_a_few_rows_of_any_type_are_one_statement_with_their_values(
    views: Views, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the live runner writes per batch: a few rows per table. On PostgreSQL each call is
    one INSERT carrying the values (no COPY to start, no array to build in Python), and every
    type of column reads back as written."""
    rows = views.rows_writer()
    columns = list(OfferRow.__dataclass_fields__)
    offer = {
        "offer_id": "o1",
        "seq": 2**40,
        "seller_id": "s1",
        "model": "m",
        "provider": "venice",
        "base_url": None,
        "sealed_key": '{"k": "v\\u00e9"}',
        "key_sha256": "ab",
        "cost_multiplier": "0.8",
        "max_concurrent_jobs": None,
        "state": "active",
        "deactivated_reason": 'it\'s\ta "quote" and é, 中',
        "backoff_until": 1764150000.125,
        "backoff_reason": None,
        "failures": 0,
        "in_flight": 3,
        "jobs": 7,
        "volume": 123456789,
        "payout": -5,
    }
    second = {**offer, "offer_id": "o2", "backoff_until": 0.0, "base_url": "http://x/\\"}
    posting = ("entry_no", "line", "account", "debit", "credit")
    with views.datastore.transaction(commit=True) as c:
        recorded = Statements(c)
        recorded.record_raw(monkeypatch)
        rows.upsert(recorded, "mm_offers", columns, [list(offer.values())], key="offer_id")
        changed = {**offer, "in_flight": 2, "state": "paused"}
        rows.upsert(
            recorded,
            "mm_offers",
            columns,
            [list(changed.values()), list(second.values())],
            key="offer_id",
        )
        rows.insert(recorded, "mm_ledger_postings", posting, [(1, 0, "a\nb", 5, 0)])
    if isinstance(views, PostgresStore):
        assert len(recorded.run) == 3
        assert all(s.startswith("INSERT INTO") and " VALUES " in s for s in recorded.run)
    read = {o.offer_id: o for o in views.offers(include_deleted=True)}
    assert vars(read["o1"]) | {"sealed_key": offer["sealed_key"]} == changed
    assert read["o2"].backoff_until == 0.0 and read["o2"].base_url == "http://x/\\"
    line = views.one("SELECT account, debit FROM mm_ledger_postings WHERE entry_no = 1")
    assert (line["account"], int(line["debit"])) == ("a\nb", 5)


def test_a_big_upsert_writes_what_a_small_one_does(views: Views) -> None:
    """From ``STAGED_UPSERT_ROWS`` rows on, PostgreSQL stages an upsert in a temporary table:
    twice in one transaction, with ``keep``, it must leave what the statement per row does."""
    rows = views.rows_writer()
    columns = ("buyer_id", "version")
    many = STAGED_UPSERT_ROWS + 10
    with views.datastore.transaction(commit=True) as c:
        rows.upsert(c, "mm_ledger_buyers", columns, [(f"b{i}", i) for i in range(many)], "buyer_id")
        again = [(f"b{i}", 1000 + i) for i in range(5, many + 5)]
        rows.upsert(c, "mm_ledger_buyers", columns, again, key="buyer_id")
        # Every column but the key kept: rows that exist are left as they are.
        kept = [(f"b{i}", -1) for i in range(many + 10)]
        rows.upsert(c, "mm_ledger_buyers", columns, kept, key="buyer_id", keep=("version",))
    buyers = views.all("SELECT buyer_id, version FROM mm_ledger_buyers")
    expected = {f"b{i}": i for i in range(5)}
    expected |= {f"b{i}": 1000 + i for i in range(5, many + 5)}
    expected |= {f"b{i}": -1 for i in range(many + 5, many + 10)}
    assert {r["buyer_id"]: int(r["version"]) for r in buyers} == expected


def test_scratch_views_skip_durability_unless_they_go_live(database_url: str) -> None:
    market = open_market(database_url)
    env = store_env(database_url, role=VIEWS_NAME)
    try:
        with scratch_views(env, market.name) as views:
            if not isinstance(views, PostgresStore):
                assert views.synchronous == "OFF"  # type: ignore[attr-defined]
                return
            persistence = (
                "SELECT relpersistence FROM pg_class WHERE relname = ? "
                "AND relnamespace = to_regnamespace(current_schema())::oid"
            )
            for table in TABLES:
                assert views.one(persistence, (table,))["relpersistence"] == "u", table
        with scratch_env(env) as fresh_env:
            fresh = open_scratch_views(fresh_env, market.name, goes_live=True)
            try:
                for table in TABLES:
                    assert fresh.one(persistence, (table,))["relpersistence"] == "p", table
            finally:
                fresh.datastore.close()
    finally:
        market.close()


def test_overlapping_catch_ups_restore_the_collector_once_the_last_ends() -> None:
    before = gc.get_threshold()
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with fewer_collections():
            entered.set()
            release.wait(5)

    thread = threading.Thread(target=other)
    thread.start()
    assert entered.wait(5)
    with fewer_collections():
        assert gc.get_threshold() != before
    assert gc.get_threshold() != before  # the other catch-up is still running
    release.set()
    thread.join(5)
    assert gc.get_threshold() == before
