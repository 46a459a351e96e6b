"""The projection runner: tails the market's notification log into the views.

Works the same on SQLite (which has no subscriptions) and PostgreSQL: read a batch after the
tracked position, apply it in one transaction with the tracking row, repeat. It is woken at once
by saves in this process and polls on a short timer for saves made by other processes. The
position is read from the database before every batch, so several runners (one per API process)
and a rebuild can share one view safely: a loser of a race gets ``IntegrityError`` and re-reads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog
from eventsourcing.persistence import IntegrityError, OperationalError, Tracking

from adapters.eventstore import MarketApp
from adapters.logreader import LogReader
from projections.views import ALL, Part, Views, skips

log = structlog.get_logger("projections")
# Catching up (a rebuild, a replay, a backlog at start) applies big batches: fewer commits and
# fewer reloads of the same job rows. Tailing the live log applies whatever is new.
CATCH_UP_BATCH_SIZE = 5000


class ProjectionRunner:
    def __init__(
        self,
        app: MarketApp,
        views: Views,
        *,
        batch_size: int = 500,
        poll_interval: float = 0.05,
        part: Part = ALL,
    ) -> None:
        self.app = app
        self.views = views
        self.part = part
        # Events no view reads are not even decoded (a fifth of a busy log is lease renewals);
        # the tracked position still moves past them.
        self.reader = LogReader(app, skip=skips(part))
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.position = views.position(app.name)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._caught_up = threading.Condition()
        self.on_advance: list[Callable[[int], None]] = []

    def run_once(self, until: int | None = None, limit: int | None = None) -> int:
        """Apply the next batch, if any, up to ``until``; returns how many it covered."""
        start = self.views.position(self.app.name)
        if until is not None and start >= until:
            return 0
        batch = self.reader.read(start, limit or self.batch_size, until)
        if batch.last is None:
            self._advance(start)
            return 0
        try:
            tracking = Tracking(self.app.name, batch.last)
            self.views.apply_batch(batch.items, tracking, start, self.part)
        except IntegrityError:
            # Another runner applied (part of) this range first; start again from its position.
            self._advance(self.views.position(self.app.name))
            return 0
        self._advance(batch.last)
        return batch.count

    def catch_up(self, until: int | None = None) -> int:
        """Apply the log up to its end (or up to ``until``); returns how many were applied."""
        total = 0
        while True:
            n = self.run_once(until, CATCH_UP_BATCH_SIZE)
            total += n
            if n == 0:
                end = self._log_end() if until is None else min(until, self._log_end())
                if self.views.position(self.app.name) >= end:
                    return total

    def _log_end(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def _advance(self, position: int) -> None:
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
                while (applied := self.run_once(limit=limit)) and not self._stop.is_set():
                    # A full batch means a backlog (a start after a schema change, a burst):
                    # catch up in big batches, then go back to small ones for fresh writes.
                    limit = CATCH_UP_BATCH_SIZE if applied >= limit else self.batch_size
            except OperationalError as e:
                # A locked SQLite file or a PostgreSQL hiccup: try again on the next tick.
                log.warning("projection_batch_retry", error=str(e))
                time.sleep(self.poll_interval)
            except Exception:
                log.exception("projection_batch_failed")
                time.sleep(1.0)
            self._wake.wait(self.poll_interval)
            self._wake.clear()

    def wait_for(self, position: int, timeout: float) -> bool:
        """Block until the views include ``position`` (read-your-writes for a command)."""
        deadline = time.monotonic() + timeout
        with self._caught_up:
            while self.position < position:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.set()
                self._caught_up.wait(min(remaining, 0.005))
        if self.position >= position:
            return True
        # Another process may own the progress (its runner applied it): ask the database.
        self._advance(self.views.position(self.app.name))
        return self.position >= position
