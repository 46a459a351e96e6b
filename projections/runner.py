"""The projection runner: tails the market's notification log into the views.

Works the same on SQLite (which has no subscriptions) and PostgreSQL: read a batch after the
tracked position, apply it in one transaction with the tracking row, repeat. It is woken at once
by saves in this process and polls on a short timer for saves made by other processes. The
position is read from the database before every batch, so several runners (one per API process)
and a rebuild can share one view safely: a loser of a race gets ``LostRace`` and re-reads.

Only that race is retried (and a locked or unreachable database, on the next tick). Any other
error is the views' own (a constraint a row violates, a bug in a fold) or an event that can't be
decoded, and would fail the same way on every retry: the runner finds the event it fails on,
applies everything before it, records the failure (position, error, time) and stops;
``/healthz`` and ``/metrics`` show it.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import structlog
from eventsourcing.persistence import OperationalError, Tracking

from adapters.eventstore import MarketApp
from adapters.logreader import LogBatch, LogReader, UnreadableEvent
from projections.store import LostRace, Store
from projections.views import Part, headers_only, skips

log = structlog.get_logger("projections")
# Catching up (a rebuild, a replay, a backlog at start) applies big batches: fewer commits and
# fewer reloads of the same job rows (20,000 folded a replay in 10-15% less CPU than 5,000).
# Tailing the live log applies whatever is new, a backlog met while serving in batches of
# BACKLOG_BATCH_SIZE, which hold the views' batch lock for less time.
CATCH_UP_BATCH_SIZE = 20_000
BACKLOG_BATCH_SIZE = 5000
# A range of the log other runners applied is read again (its aggregate ids) for
# ``on_passed_elsewhere`` up to this long; past it, its callbacks are told that anything may
# have changed.
MAX_PASSED_READ = 20_000
# The collector's young-generation threshold while catching up (the default is 700).
CATCH_UP_GC_THRESHOLD = 100_000


_collections_lock = threading.Lock()
_catching_up = 0  # catch-ups running in this process (threads may overlap)
_saved_thresholds: tuple[int, int, int] = gc.get_threshold()


@contextmanager
def fewer_collections() -> Iterator[None]:
    """A catch-up makes millions of short-lived objects (events, rows, documents) that die
    with their batch, in a process holding far more that live on (modules, caches): each young
    collection promoted survivors and the older passes kept re-scanning them, a fifth of a
    replay's CPU. Objects from before are frozen out of the collector and collections made
    rarer until the last overlapping catch-up of the process ends (the setting is process-wide;
    catch-ups run before serving, in a process of their own, or briefly in a rebuild)."""
    global _catching_up, _saved_thresholds
    with _collections_lock:
        _catching_up += 1
        if _catching_up == 1:
            _saved_thresholds = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(CATCH_UP_GC_THRESHOLD, 50, 100)
    try:
        yield
    finally:
        with _collections_lock:
            _catching_up -= 1
            if _catching_up == 0:
                gc.set_threshold(*_saved_thresholds)
                gc.unfreeze()


@dataclass(frozen=True)
class Failure:
    """Why a projection stopped: the notification it could not apply, the error, and when
    (Unix time)."""

    position: int
    error: str
    at: float


class ProjectionFailed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(f"the views failed at log position {failure.position}: {failure.error}")
        self.failure = failure


class ProjectionRunner:
    def __init__(
        self,
        app: MarketApp,
        views: Store,
        *,
        batch_size: int = 500,
        poll_interval: float = 0.05,
        part: Part | None = None,
        headers: bool = False,
    ) -> None:
        """``headers``: events the folds read only the header of come without their state
        (``Projection.headers_only``); for a rebuild, whose runner has no callbacks, since
        those may read any event in full. A rebuild's runner also reads the whole log, and
        reads it memory-mapped (``LogReader``'s ``mapped``)."""
        self.app = app
        self.views = views
        # Every read model of the store (the views, or the work queue's), unless told a part.
        self.part = frozenset(views.projections) if part is None else part
        # Events no view reads are not even decoded (a fifth of a busy log is lease renewals);
        # the tracked position still moves past them.
        projections = list(views.projections.values())
        self.reader = LogReader(
            app,
            skip=skips(self.part, projections),
            headers=headers_only(self.part, projections) if headers else None,
            mapped=headers,
        )
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.position = views.position(app.name)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._caught_up = threading.Condition()
        self.on_advance: list[Callable[[int], None]] = []
        # Called in the runner's thread with the items of each batch this runner applied, once
        # committed: across every process sharing the views, each event reaches exactly one
        # runner's callbacks (a loser of the race applied nothing), so counts made here add up.
        self.on_applied: list[Callable[[Sequence[tuple[int, Any]]], None]] = []
        # Called before ``position`` moves past a range of the log: with the items of a range
        # applied here (or read here and then applied by another runner first), and for a
        # range another process's runner applied, with the ids of the aggregates its events
        # changed (read again here, without decoding an event; None when too long or
        # unreadable: anything may have changed). What a process keeps of the views
        # (api/jobcache.py) is invalidated from these, so it listens to both.
        self.on_passed: list[Callable[[Sequence[tuple[int, Any]]], None]] = []
        self.on_passed_elsewhere: list[Callable[[set[str] | None], None]] = []
        # The same ranges' event topics (None: any may have changed).
        self.on_topics_elsewhere: list[Callable[[set[str] | None], None]] = []
        # When (time.monotonic()) the last look at the views' position started: every change
        # committed to the views before it has been passed to ``on_passed``.
        self.fresh_at = 0.0
        # Set once, when the views fail on an event: the runner has stopped for good.
        self.failure: Failure | None = None
        self.failed = threading.Event()

    def run_once(self, until: int | None = None, limit: int | None = None) -> int:
        """Apply the next batch, if any, up to ``until``; returns how many it covered.

        Raises ``ProjectionFailed`` (and stays failed) when the views can't apply an event."""
        if self.failure is not None:
            raise ProjectionFailed(self.failure)
        looked = time.monotonic()
        read: list[tuple[int, LogBatch]] = []

        def read_after(start: int) -> LogBatch:
            # Under the batch lock: another runner's batch is in the views by now.
            if until is not None and start >= until:
                batch = LogBatch(None, 0, [])
            else:
                batch = self.reader.read(start, limit or self.batch_size, until)
            read.append((start, batch))
            return batch

        try:
            start, batch = self.views.apply_next(self.app.name, read_after, self.part)
        except UnreadableEvent as e:
            self._record_failure(e.position, e)
        except LostRace:
            # Another runner applied (part of) this range first; start again from its position.
            self._moved_elsewhere(self.views.position(self.app.name))
            return 0
        except OperationalError:
            raise  # locked or unreachable: the loop tries again on its next tick
        except Exception as e:
            if not read or read[0][1].last is None:
                raise  # not the views' fold: the loop tries again shortly
            start, batch = read[0]
            self._looked(start, looked)
            try:
                self._apply_singly(start, batch, e)
            except LostRace:
                self._moved_elsewhere(self.views.position(self.app.name), batch)
                return 0
            assert batch.last is not None
            self._advance(batch.last)
            return batch.count
        self._looked(start, looked)
        if batch.last is None:
            return 0
        self._applied(batch.items)
        self._advance(batch.last)
        return batch.count

    def _looked(self, start: int, looked: float) -> None:
        """The views were at ``start`` when the pass that began at ``looked`` read the log:
        what other runners applied before that goes to ``on_passed_elsewhere`` first."""
        if start > self.position:
            self._moved_elsewhere(start)
        else:
            self._advance(start)
        self.fresh_at = looked

    def _applied(self, items: Sequence[tuple[int, Any]]) -> None:
        self._passed(items)
        for callback in self.on_applied:
            try:
                callback(items)
            except Exception:
                # The batch is committed: a callback's bug must not stop the views.
                log.exception("projection_callback_failed")

    def _apply_singly(self, start: int, batch: LogBatch, error: Exception) -> None:
        """After a batch failed (and was rolled back): apply its events one notification at a
        time, to find the one the views can't apply. Everything before it is applied; that one
        is recorded as the failure and the runner stops (``ProjectionFailed``)."""
        assert batch.last is not None
        for seq, event in batch.items:
            try:
                self.views.apply_batch(
                    [(seq, event)], Tracking(self.app.name, seq), start, self.part
                )
            except (LostRace, OperationalError):
                raise
            except Exception as e:
                self._record_failure(seq, e)
            self._applied([(seq, event)])
            self._advance(seq)
            start = seq
        if start != batch.last:
            # Only notifications no view reads are left: move tracking past them.
            self.views.apply_batch([], Tracking(self.app.name, batch.last), start, self.part)

    def _record_failure(self, position: int, error: Exception) -> NoReturn:
        failure = Failure(position, f"{type(error).__name__}: {error}", time.time())
        self.failure = failure
        self.failed.set()
        log.error(
            "projection_failed",
            position=failure.position,
            error=failure.error,
            part=sorted(self.part),
        )
        raise ProjectionFailed(failure) from error

    def catch_up(
        self,
        until: int | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Apply the log up to its end (or up to ``until``); returns how many were applied.

        ``on_progress(done, total)`` is called after every batch with the notifications covered
        since the start and how many there are to cover (more, when the log grows meanwhile)."""
        with fewer_collections():
            return self._catch_up(until, on_progress)

    def _catch_up(self, until: int | None, on_progress: Callable[[int, int], None] | None) -> int:
        applied = start = end = 0
        if on_progress is not None:
            start = self.views.position(self.app.name)
            end = self._log_end() if until is None else min(until, self._log_end())
            on_progress(0, max(end - start, 0))
        while True:
            n = self.run_once(until, CATCH_UP_BATCH_SIZE)
            applied += n
            if n == 0:
                end = self._log_end() if until is None else min(until, self._log_end())
            if on_progress is not None:
                # From the views' tracked position, not the batches' counts: a batch another
                # runner applied first (a lost race) is done too.
                done = self.views.position(self.app.name) - start
                on_progress(done, max(end - start, done))
            if n == 0 and self.views.position(self.app.name) >= end:
                return applied

    def _log_end(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def _passed(self, items: Sequence[tuple[int, Any]]) -> None:
        for callback in self.on_passed:
            try:
                callback(items)
            except Exception:
                log.exception("projection_callback_failed")

    def _moved_elsewhere(self, position: int, batch: LogBatch | None = None) -> None:
        """Advance to ``position``, which other runners brought the views to: what they applied
        goes to ``on_passed`` first, from ``batch`` (read here, then lost to them) as far as it
        goes, read from the log again beyond it."""
        start = self.position
        if batch is not None and batch.last is not None and self.on_passed:
            known = min(position, batch.last)
            self._passed([item for item in batch.items if start < item[0] <= known])
            start = max(start, known)
        self._passed_elsewhere(start, position)
        self._advance(position)

    def _passed_elsewhere(self, start: int, stop: int) -> None:
        """Tell ``on_passed_elsewhere`` which aggregates ``(start, stop]`` changed, which
        another runner applied: their ids, read from the log again without decoding an event
        (every process sharing the views reads every range once, applied or not: decoding it
        again here was most of a second API process's extra CPU per job)."""
        if not (self.on_passed_elsewhere or self.on_topics_elsewhere) or stop <= start:
            return
        changed: set[str] | None = set()
        topics: set[str] | None = set()
        if stop - start > MAX_PASSED_READ:
            changed = topics = None
        else:
            try:
                while changed is not None and start < stop:
                    last = self.reader.originators(start, BACKLOG_BATCH_SIZE, stop, changed, topics)
                    if last is None:
                        break
                    start = last
            except Exception:
                log.exception("projection_passed_read_failed")
                changed = topics = None
        for callbacks, passed in (
            (self.on_passed_elsewhere, changed),
            (self.on_topics_elsewhere, topics),
        ):
            for callback in callbacks:
                try:
                    callback(passed)
                except Exception:
                    log.exception("projection_callback_failed")

    def _advance(self, position: int) -> None:
        # Whatever it moves past has gone to ``on_passed`` or ``on_passed_elsewhere`` already
        # (``_applied`` or ``_moved_elsewhere``).
        with self._caught_up:
            advanced = position > self.position
            if advanced:
                self.position = position
            self._caught_up.notify_all()
        if advanced:
            for callback in self.on_advance:
                callback(position)

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="projection-runner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                limit = self.batch_size
                while not self._stop.is_set():
                    # Cleared before the read, not after the wait: a save that commits after
                    # this read sets it again, so the wait below returns at once for it. A pass
                    # that found less than a full batch has seen everything saved before it, so
                    # it waits instead of reading again (under submit load that second, empty
                    # pass was half the runner's passes: a tracking and a log query each).
                    self._wake.clear()
                    applied = self.run_once(limit=limit)
                    if applied < limit:
                        break
                    # A full batch means a backlog (a start after a schema change, a burst):
                    # catch up in big batches, then go back to small ones for fresh writes.
                    limit = BACKLOG_BATCH_SIZE
            except ProjectionFailed:
                return  # logged once, kept in self.failure; retrying would fail the same way
            except OperationalError as e:
                # A locked SQLite file or a PostgreSQL hiccup: try again on the next tick.
                log.warning("projection_batch_retry", error=str(e))
                time.sleep(self.poll_interval)
            except Exception:
                # Reading the log failed (the views were not touched): try again shortly.
                log.exception("projection_read_failed")
                time.sleep(1.0)
            self._wake.wait(self.poll_interval)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        """Wait for the runner's thread to end (it ends by itself only when it failed)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_for(self, position: int, timeout: float) -> bool:
        """Block until the views include ``position`` (read-your-writes for a command)."""
        deadline = time.monotonic() + timeout
        with self._caught_up:
            while self.position < position and self.failure is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.set()
                self._caught_up.wait(min(remaining, 0.005))
        if self.position >= position:
            return True
        # Another process may own the progress (its runner applied it): ask the database.
        self._moved_elsewhere(self.views.position(self.app.name))
        return self.position >= position
