"""Replay that proves itself: rebuild every projection from the log into fresh storage and
compare it, row by row, with the live views at the same log position."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import Synchronized

from adapters.esinternals import APPLICATION_NAME_KEY, PREPARED_STATEMENTS_KEY
from adapters.eventstore import Connections, MarketApp, open_market
from projections.runner import ProjectionRunner
from projections.views import (
    PROJECTIONS,
    REBUILD_PARTS,
    Part,
    Views,
    open_scratch_views,
    part_tables,
    scratch_env,
)

# Which read model each table belongs to, for the report.
PROJECTION_OF = {table: p.name for p in PROJECTIONS for table in p.tables}
MAX_NAMED_ROWS = 10
# Below this many events a second process costs more (its start-up, the merge) than it saves.
PARALLEL_MIN_EVENTS = 100_000
# How often the progress of a second process's fold is looked at once this one's is done.
PROGRESS_POLL_SECONDS = 0.5

# ``(done, total)``: notifications folded so far and how many there are (see ``catch_up``).
OnProgress = Callable[[int, int], None]
# In the second process of a parallel rebuild: where it publishes how far its fold has got.
_published: Synchronized[int] | None = None


@dataclass(frozen=True)
class LogSource:
    """What a second process needs to fold the same log into storage of its own."""

    database_url: str
    views_env: dict[str, str]


def rebuild(
    app: MarketApp,
    fresh: Views,
    until: int,
    source: LogSource | None = None,
    parallel: bool | None = None,
    on_progress: OnProgress | None = None,
) -> int:
    """Fold the log up to ``until`` into ``fresh`` (empty scratch views); returns how many
    notifications that covered. ``on_progress`` sees how far the fold has got (in a parallel
    rebuild, the part that is behind).

    The fold is CPU-bound Python, so given a ``source`` and a long log (or ``parallel``), a
    second process folds one part of the views (``REBUILD_PARTS``) into scratch storage of its
    own while this one folds the other; its tables are then copied in. Each process runs the
    same fold as the live runner, for its part of the tables only.

    Scratch views are folded into without their secondary indexes (``open_scratch_views``);
    they are built here once the rows are in (this process's part's, before it waits for the
    other's).
    """
    start = fresh.position(app.name)
    if parallel is None:
        parallel = (
            source is not None
            and (os.cpu_count() or 1) > 1
            and until - start >= PARALLEL_MIN_EVENTS
        )
    if not parallel:
        runner = ProjectionRunner(app, fresh, headers=True)
        applied = runner.catch_up(until=until, on_progress=on_progress)
        fresh.create_indexes()
        return applied
    if source is None:
        raise ValueError("a parallel rebuild needs the log's source")
    spawn = multiprocessing.get_context("spawn")  # no fork of a process that runs threads
    theirs = spawn.Value("q", 0)  # how far the other process's fold has got
    with (
        scratch_env(source.views_env) as other_env,
        ProcessPoolExecutor(
            1, mp_context=spawn, initializer=_publish_progress_in, initargs=(theirs,)
        ) as pool,
    ):
        here, there = REBUILD_PARTS
        other = pool.submit(fold_part, source.database_url, other_env, app.name, there, until)

        def behind(done_here: int, total: int) -> None:
            """Reports the part that is behind: the rebuild is done that far."""
            if on_progress is not None:
                on_progress(min(done_here, theirs.value), total)

        report = behind if on_progress is not None else None
        runner = ProjectionRunner(app, fresh, part=here, headers=True)
        applied = runner.catch_up(until=until, on_progress=report)
        # This part's indexes while the other part is still being folded (most often it is).
        fresh.create_indexes(here)
        if on_progress is not None:
            while wait([other], PROGRESS_POLL_SECONDS, FIRST_COMPLETED).not_done:
                behind(until - start, until - start)
        other_applied = other.result()
        behind(until - start, until - start)
        if other_applied != applied:
            raise RuntimeError(f"the parts covered {applied} and {other_applied} notifications")
        if fresh.copies_indexes:
            # On the empty tables, at once: the copy then brings the other process's indexes
            # across (see ``fold_part``) instead of this process sorting them after it.
            fresh.create_indexes(there)
        fresh.copy_tables_from(other_env, part_tables(there))
        fresh.create_indexes(there)  # where the copy did not bring them
    return applied


def _publish_progress_in(value: Synchronized[int]) -> None:
    global _published
    _published = value


def _publish(done: int, _: int) -> None:
    if _published is not None:
        _published.value = done


def fold_part(
    database_url: str, views_env: dict[str, str], application_name: str, part: Part, until: int
) -> int:
    """One part of a parallel rebuild, in its own process and scratch storage: two connections,
    named as its parent's with a ``-part`` suffix and its pid."""
    parent = views_env.get(APPLICATION_NAME_KEY) or "mediamarket"
    connections = Connections(
        pool_size=2,
        application_name=f"{parent.rsplit('-', 1)[0]}-part-{os.getpid()}",
        prepared_statements=views_env.get(PREPARED_STATEMENTS_KEY) != "no",
    )
    app = open_market(database_url, connections)
    try:
        views = open_scratch_views(views_env, application_name)
        try:
            runner = ProjectionRunner(app, views, part=part, headers=True)
            applied = runner.catch_up(until=until, on_progress=_publish)
            if views.copies_indexes:
                # Built here, in parallel with the parent's fold, and copied with the rows.
                views.create_indexes(part)
            return applied
        finally:
            views.datastore.close()
    finally:
        app.close()


@dataclass
class TableResult:
    table: str
    live_rows: int
    replayed_rows: int
    differing: list[str] = field(default_factory=list)
    more: int = 0

    @property
    def identical(self) -> bool:
        return not self.differing


@dataclass
class Verification:
    position: int
    events: int
    seconds: float
    tables: list[TableResult]

    @property
    def ok(self) -> bool:
        return all(t.identical for t in self.tables)

    def render(self) -> str:
        rate = self.events / self.seconds if self.seconds > 0 else 0.0
        out = [
            f"Replayed {self.events} events (log position {self.position}) into fresh storage"
            f" in {self.seconds:.2f} s ({rate:,.0f} events/s)",
            "",
            f"{'projection':<11} {'table':<20} {'live rows':>10} {'replayed':>10}  result",
        ]
        for t in self.tables:
            projection = PROJECTION_OF.get(t.table, "")
            result = "identical" if t.identical else f"DIFFERENT ({len(t.differing) + t.more} rows)"
            out.append(
                f"{projection:<11} {t.table:<20} {t.live_rows:>10} {t.replayed_rows:>10}  {result}"
            )
        for t in self.tables:
            for line in t.differing:
                out.append(f"  {t.table}: {line}")
            if t.more:
                out.append(f"  {t.table}: ... and {t.more} more")
        out += ["", "OK: the replay equals the live views." if self.ok else "FAILED: see above."]
        return "\n".join(out)


def verify(
    app: MarketApp,
    live: Views,
    fresh: Views,
    source: LogSource | None = None,
    parallel: bool | None = None,
    on_progress: OnProgress | None = None,
) -> Verification:
    """Replay the log into ``fresh`` (empty views) up to the live views' position; compare.
    ``on_progress`` sees the replay's progress (see ``rebuild``)."""
    position, live_rows = live.row_hashes(app.name)
    started = time.perf_counter()
    events = rebuild(app, fresh, position, source, parallel, on_progress)
    seconds = time.perf_counter() - started
    replayed_position, replayed_rows = fresh.row_hashes(app.name)
    tables = []
    for table, rows in live_rows.items():
        ours = replayed_rows.get(table, {})
        differing = []
        for key in sorted(set(rows) | set(ours)):
            if key not in ours:
                differing.append(f"row {key} is live but not in the replay")
            elif key not in rows:
                differing.append(f"row {key} is in the replay but missing from the live view")
            elif rows[key] != ours[key]:
                differing.append(f"row {key} differs")
        tables.append(
            TableResult(
                table,
                len(rows),
                len(ours),
                differing[:MAX_NAMED_ROWS],
                max(len(differing) - MAX_NAMED_ROWS, 0),
            )
        )
    if replayed_position != position:
        tables.append(
            TableResult("tracking", position, replayed_position, ["the positions differ"])
        )
    return Verification(position, events, seconds, tables)
