"""The two databases a store can live in, and fresh scratch storage beside either for a replay.

SQLite: a file per store in WAL mode, point reads on the event loop's own connection, batches
serialised by SQLite's one write lock. PostgreSQL: autocommit reads, batches and schema changes
serialised by advisory locks per schema, so a replay's scratch schema never waits on the live one.
"""

from __future__ import annotations

import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import RawCursor
from psycopg.sql import SQL, Identifier

from adapters.esinternals import APPLICATION_NAME_KEY, open_tracking
from projections.store import Projection, Rows, Store, on_conflict_update

# Arbitrary constants, each with the views' schema the key of an advisory lock: the one that
# serialises view schema changes on PostgreSQL...
SCHEMA_LOCK_ID = 7_305_117
# ...and the one that serialises projection batches, so each reads the position it builds on.
BATCH_LOCK_ID = 7_305_118


class SQLiteStore(Store):
    # A primary-key read of a local WAL file takes microseconds, far less than a hand-off to
    # the thread pool and back; the event loop gets its own autocommit connection for them.
    inline_reads = True
    _inline: tuple[int, sqlite3.Connection] | None = None
    # Views are rebuilt from the log, so a commit need not wait for the disk: in WAL mode NORMAL
    # can lose the last batches on a power cut, never consistency, and the runner re-applies
    # them from the tracked position. Scratch views of a replay need no durability at all.
    synchronous = "NORMAL"

    @staticmethod
    def create_statements(projections: Sequence[Projection], indexes: bool = True) -> list[str]:
        statements = []
        for p in projections:
            for table, statement in p.tables.items():
                without = table in p.without_rowid
                statements.append(f"{statement} WITHOUT ROWID" if without else statement)
        return statements + [i for p in projections if indexes for i in p.indexes]

    # Scratch storage only (``without_durability``): how its connections journal a transaction.
    journal_mode: str | None = None
    # A copy into empty tables with the same indexes as the source's moves the index B-trees
    # across as they are (SQLite's transfer optimisation), so a parallel rebuild's second
    # process builds its part's indexes before the copy instead of this one after it.
    copies_indexes = True

    def _connection_pragmas(self, conn: Any) -> None:
        # Per connection, and only outside a transaction.
        cursor = conn.cursor()
        cursor.execute(f"PRAGMA synchronous={self.synchronous}")
        if self.journal_mode is not None:
            cursor.execute(f"PRAGMA journal_mode={self.journal_mode}")

    @contextmanager
    def _batch_transaction(self) -> Iterator[Any]:
        with self.datastore.get_connection(commit=True) as conn:
            self._connection_pragmas(conn)
            with conn.transaction(commit=True) as c:
                yield c

    def without_durability(self, goes_live: bool = False) -> None:
        # Even a rebuild's scratch file never goes live: its rows are copied into the live one.
        self.synchronous = "OFF"
        # Nothing reads scratch storage while it is written, so it needs no write-ahead log:
        # in WAL mode every page a batch changed was written twice, to the log and then back
        # into the file (the ledger part's copy alone, 150 MB at 100k jobs). The rollback
        # journal is kept in memory: a failed batch still rolls back. Leaving WAL needs the
        # only connection to the file, which a fresh scratch store has; if it is not, the
        # store stays in WAL mode, which is slower but as correct.
        self.journal_mode = "MEMORY"
        with self.datastore.get_connection(commit=True) as conn:
            self._connection_pragmas(conn)

    def bind_inline_reader(self) -> None:
        conn = sqlite3.connect(
            self.tracking.sqlite_file, uri=True, check_same_thread=False, isolation_level=None
        )
        conn.row_factory = sqlite3.Row
        self._inline = (threading.get_ident(), conn)

    def one(self, statement: str, params: Sequence[Any] = ()) -> Any:
        inline = self._inline
        if inline is not None and inline[0] == threading.get_ident():
            return inline[1].execute(statement, params).fetchone()
        return super().one(statement, params)

    def all(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        inline = self._inline
        if inline is not None and inline[0] == threading.get_ident():
            return inline[1].execute(statement, params).fetchall()
        return super().all(statement, params)

    def copy_tables_from(self, env: dict[str, str], tables: Iterable[str]) -> None:
        with self.datastore.get_connection(commit=True) as conn:
            self._connection_pragmas(conn)
            # Per connection, and only outside a transaction.
            conn.cursor().execute("ATTACH DATABASE ? AS part", (env["SQLITE_DBNAME"],))
            try:
                with conn.transaction(commit=True) as c:
                    for table in tables:
                        c.execute(f"INSERT INTO main.{table} SELECT * FROM part.{table}")
            finally:
                conn.cursor().execute("DETACH DATABASE part")

    def replace_with(
        self,
        fresh_env: dict[str, str],
        application_name: str,
        catch_up: Callable[[int], int],
        only_if_outdated: bool = False,
    ) -> bool:
        projections = list(self.projections.values())
        with self.datastore.get_connection(commit=True) as conn:
            # Per connection, and only outside a transaction.
            conn.cursor().execute("ATTACH DATABASE ? AS fresh", (fresh_env["SQLITE_DBNAME"],))
            try:
                with conn.transaction(commit=True) as c:
                    self._lock_batches(c)
                    if only_if_outdated and self._version(c) == self.schema_version:
                        return False
                    live_position = self.tracking.position(application_name, c)
                    # The fresh file is written by another connection; this transaction reads
                    # it only afterwards, so its snapshot has every row.
                    position = catch_up(live_position)
                    for table in self.tables:
                        c.execute(f"DROP TABLE IF EXISTS main.{table}")
                    for statement in self.create_statements(projections):
                        c.execute(statement)
                    for table in self.tables:
                        c.execute(f"INSERT INTO main.{table} SELECT * FROM fresh.{table}")
                    self._set_version(c, application_name, position)
                return True
            finally:
                conn.cursor().execute("DETACH DATABASE fresh")

    def _lock_batches(self, c: Any) -> None:
        # A write takes SQLite's one write lock now (a read first would pin a snapshot that a
        # committing runner could make stale); it matches no row and changes nothing.
        c.execute(self.tracking.lock_statement())


def column_types(create_table: str) -> dict[str, str]:
    """Each column's SQL type in a ``CREATE TABLE`` statement of ours (``name TYPE ...`` per
    column; table constraints, such as a composite primary key, are not columns)."""
    body = create_table[create_table.index("(") + 1 : create_table.rindex(")")]
    parts, depth, current = [], 0, ""
    for ch in body:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    types = {}
    for part in parts:
        words = part.split()
        if words and words[0].upper() not in ("PRIMARY", "UNIQUE", "CONSTRAINT", "CHECK"):
            types[words[0]] = "DOUBLE PRECISION" if words[1].upper() == "DOUBLE" else words[1]
    return types


# Writes of at least this many rows go through COPY (upserts through a staging table, see
# ``CopyOrValues``); for fewer, starting a COPY, and creating and dropping the table, cost more
# than one statement with the rows' values.
STAGED_UPSERT_ROWS = 50


class CopyOrValues:
    """``Rows`` on PostgreSQL: one statement per table and batch, where ``executemany`` was one
    per row, each parsed, planned and executed by the server (most of a replay's time in
    PostgreSQL). From ``STAGED_UPSERT_ROWS`` rows on (a replay, a backlog), new rows are
    streamed in with ``COPY``, and an upsert's rows copied into a temporary table and upserted
    from it; fewer rows (what the live runner writes per batch) go as one ``INSERT ... VALUES``
    with a parameter per value. Both adapt each value in C. The one-array-per-column
    ``unnest`` this replaced had psycopg build each array in Python, element by element,
    escaping every string with a regular expression: for the job views' documents a third of
    a rebuild's CPU, and under submit load 6% of an API process's.
    """

    def __init__(self, tables: dict[str, str]) -> None:
        self.types = {table: column_types(statement) for table, statement in tables.items()}
        # (table, columns, rows): the VALUES statement's head and its list of rows.
        self._values: dict[tuple[str, tuple[str, ...], int], str] = {}

    def insert(
        self, c: Any, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> None:
        if not rows:
            return
        if len(rows) < STAGED_UPSERT_ROWS:
            self._execute_values(c, self._values_statement(table, columns, len(rows)), rows)
            return
        statement = SQL("COPY {} ({}) FROM STDIN").format(
            Identifier(table), SQL(", ").join(map(Identifier, columns))
        )
        with c.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)

    def upsert(
        self,
        c: Any,
        table: str,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        key: str,
        keep: Sequence[str] = (),
    ) -> None:
        if not rows:
            return
        conflict = on_conflict_update(columns, key, keep)
        if len(rows) < STAGED_UPSERT_ROWS:
            values = self._values_statement(table, columns, len(rows))
            self._execute_values(c, f"{values} {conflict}", rows)
            return
        # Created and dropped inside the transaction (rolled back with it): a temporary table
        # left in a server session (kept by PgBouncer across clients) could have an older shape.
        names = ", ".join(columns)
        stage = f"mm_stage_{table}"
        c.execute(f"CREATE TEMPORARY TABLE {stage} (LIKE {table})")
        self.insert(c, stage, columns, rows)
        c.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM {stage} {conflict}")
        c.execute(f"DROP TABLE {stage}")

    def _values_statement(self, table: str, columns: Sequence[str], count: int) -> str:
        """``INSERT INTO table (columns) VALUES (...), ...`` for ``count`` rows, each value
        cast to its column's type as the table declares it, in PostgreSQL's own placeholders
        (``$1``...): psycopg parses a statement for its ``%s`` in Python, and caches that only
        for statements of up to 50 parameters."""
        cache_key = (table, tuple(columns), count)
        statement = self._values.get(cache_key)
        if statement is None:
            types = [self.types[table][k] for k in columns]
            width = len(columns)
            rows = (
                f"({', '.join(f'${n * width + i + 1}::{t}' for i, t in enumerate(types))})"
                for n in range(count)
            )
            statement = f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join(rows)}"
            self._values[cache_key] = statement
        return statement

    @staticmethod
    def _execute_values(c: Any, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        with RawCursor(c.connection) as raw:
            raw.execute(statement, [value for row in rows for value in row])


class PostgresStore(Store):
    # ``INSERT ... SELECT`` into indexed tables updates each index row by row: indexes are
    # built after a copy, over the rows.
    copies_indexes = False

    def q(self, statement: str) -> Any:
        return statement.replace("?", "%s")

    _rows: CopyOrValues | None = None

    def rows_writer(self) -> Rows:
        if self._rows is None:
            self._rows = CopyOrValues(self.tables)
        return self._rows

    # Reads run on autocommit connections: one round trip, not BEGIN, SELECT and ROLLBACK.
    def one(self, statement: str, params: Sequence[Any] = ()) -> Any:
        with self.datastore.get_connection() as conn:
            return conn.execute(self.q(statement), params).fetchone()

    def all(self, statement: str, params: Sequence[Any] = ()) -> list[Any]:
        with self.datastore.get_connection() as conn:
            return list(conn.execute(self.q(statement), params).fetchall())

    def without_durability(self, goes_live: bool = False) -> None:
        """Unlogged tables: their rows are not written to the server's WAL (a 100k-job replay:
        12.1 against 13.4 s of server CPU; the ledger part alone, 20k jobs: 2.1 against 3.1 s).
        They are emptied after a server crash, which a scratch schema that is dropped afterwards
        does not mind. Not for tables that go live: they would have to be logged first, a
        rewrite of each into the WAL (100k jobs: 2.4 s of server CPU, 3.3 s) that costs more
        than folding them logged."""
        if goes_live:
            return
        with self.datastore.transaction(commit=True) as c:
            for table in self.tables:
                c.execute(SQL("ALTER TABLE {} SET UNLOGGED").format(Identifier(table)))

    def _lock_schema(self, c: Any) -> None:
        c.execute("SELECT pg_advisory_xact_lock(%s, hashtext(current_schema()))", (SCHEMA_LOCK_ID,))

    def _repeatable_read(self, c: Any) -> None:
        c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        # A snapshot's reader hashes or sums every row in Python between its statements: on a
        # big log that outlasted the pool's idle-in-transaction timeout (5 s), and PostgreSQL
        # ended the connection mid-check (replay --verify of 100k jobs on a busy machine).
        # Read-only, so idling inside it holds back nothing but vacuum.
        c.execute("SET LOCAL idle_in_transaction_session_timeout = 0")

    # Appended to the schema in the batch lock's key: stores in one schema that fold apart (the
    # views and the work queue) don't wait on each other. The views' is empty, as it always was.
    batch_lock_suffix = ""

    def _lock_batches(self, c: Any) -> None:
        # Per schema: views in another schema (a rebuild's scratch parts) have their own.
        c.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(current_schema() || %s))",
            (BATCH_LOCK_ID, self.batch_lock_suffix),
        )

    def replace_with(
        self,
        fresh_env: dict[str, str],
        application_name: str,
        catch_up: Callable[[int], int],
        only_if_outdated: bool = False,
    ) -> bool:
        fresh = Identifier(fresh_env["POSTGRES_SCHEMA"])
        live = Identifier(self.datastore.schema)
        with self.datastore.transaction(commit=True) as c:
            self._lock_schema(c)
            self._lock_batches(c)
            if only_if_outdated and self._version(c) == self.schema_version:
                return False
            position = catch_up(self.tracking.position(application_name, c))
            for table in self.tables:
                c.execute(SQL("DROP TABLE IF EXISTS {}.{}").format(live, Identifier(table)))
            for table in self.tables:
                # Logged already unless folded as a replay's scratch (then a no-op): live tables
                # must never be unlogged.
                c.execute(SQL("ALTER TABLE {}.{} SET LOGGED").format(fresh, Identifier(table)))
            for table in self.tables:
                # Its indexes move with it; their names are free since the old table's went.
                c.execute(
                    SQL("ALTER TABLE {}.{} SET SCHEMA {}").format(fresh, Identifier(table), live)
                )
            self._set_version(c, application_name, position)
        return True

    def copy_tables_from(self, env: dict[str, str], tables: Iterable[str]) -> None:
        schema = Identifier(env["POSTGRES_SCHEMA"])
        with self.datastore.transaction(commit=True) as c:
            for table in tables:
                c.execute(
                    SQL("INSERT INTO {} SELECT * FROM {}.{}").format(
                        Identifier(table), schema, Identifier(table)
                    )
                )


def open_store(
    name: str,
    env: dict[str, str],
    projections: Sequence[Projection],
    sqlite: type[SQLiteStore],
    pg: type[PostgresStore],
    datastore: Any = None,
) -> Store:
    """The store ``env`` opens (its tables created when absent), as ``sqlite`` or ``pg``; on
    PostgreSQL in ``datastore``'s pool when given (the market's: one pool per process)."""
    cls = sqlite if env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite" else pg
    tracking = open_tracking(name, env, cls.create_statements(projections), datastore)
    return cls(tracking, projections)


@contextmanager
def scratch_env(env: dict[str, str]) -> Iterator[dict[str, str]]:
    """Fresh storage beside the live store (a temporary SQLite file, or a temporary PostgreSQL
    schema), removed afterwards; yields the environment that opens it."""
    if env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite":
        with tempfile.TemporaryDirectory(prefix="mediamarket-replay-") as directory:
            yield {**env, "SQLITE_DBNAME": f"{directory}/views.db"}
        return
    schema = f"mm_replay_{uuid.uuid4().hex[:12]}"
    admin = psycopg.connect(
        **_pg_connect_args(env),
        autocommit=True,
        application_name=env.get(APPLICATION_NAME_KEY) or "mediamarket-scratch",
    )
    try:
        admin.execute(SQL("CREATE SCHEMA {}").format(Identifier(schema)))
        # One runner folds into it: two connections at most, beside the process's own pool.
        yield {
            **env,
            "POSTGRES_SCHEMA": schema,
            "POSTGRES_POOL_SIZE": "1",
            "POSTGRES_MAX_OVERFLOW": "1",
        }
    finally:
        admin.execute(SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(Identifier(schema)))
        admin.close()


def _pg_connect_args(env: dict[str, str]) -> dict[str, Any]:
    return {
        "dbname": env["POSTGRES_DBNAME"],
        "host": env["POSTGRES_HOST"],
        "port": env["POSTGRES_PORT"],
        "user": env["POSTGRES_USER"],
        "password": env.get("POSTGRES_PASSWORD") or None,
    }
