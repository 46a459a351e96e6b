"""Finished jobs' views kept in the process, so polling one needs no database read.

A client polls a job until it ends and often a while after; on PostgreSQL each of those reads
is a hand-off to the thread pool and a round trip (several times the CPU of the answer itself).
Only finished jobs are kept: no client command changes one any more, and what still can (the
settlement's resolution, the artifacts' purge) comes from the log like every other change.

Why an entry is never older than what the database would answer, give or take one look of the
projection runner (``ProjectionRunner.fresh_at``, every 50 ms or sooner):

* The runner tells ``forget`` which jobs every range of the log changes before its position
  moves past it, whether it applied the range (``ProjectionRunner.on_passed``: its events) or
  another process's runner did (``on_passed_elsewhere``: the ids of the aggregates the range
  changed, read without decoding an event; a job's settlement is known by its id, a
  function of the job's). So once this process's runner has reached a write, as a command's
  read-your-writes wait ensures, no entry predates that write.
* An entry is read from the database and then stored; a change forgotten between the two
  spoils the read (``begin`` / ``end``), and an entry never replaces a newer one (``version``,
  the log position of the job's last change, only grows). So a read that started before a
  change is never kept after the runner passed that change.
* Entries are served only while the runner keeps looking (``Engine.job_row``): a runner that
  failed or cannot reach the database stops invalidating, and then every poll reads the
  database as before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any
from uuid import UUID

from domain.aggregates import TERMINAL, settlement_id
from projections.jobviews import JobRow, changed_jobs

MAX_ENTRIES = 4096  # up to 4 KB each (a succeeded job's): 16 MB at most, however many are polled


def _settlement_key(job_id: str) -> str | None:
    try:
        return str(settlement_id(UUID(job_id)))
    except ValueError:
        return None  # no job has such an id: nothing to key


class JobCache:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._rows: dict[str, JobRow] = {}
        self._lock = threading.Lock()  # the runner's thread forgets, the event loop stores
        self._reading: dict[str, int] = {}  # job id -> reads in flight
        self._spoiled: set[str] = set()  # jobs changed while a read of them was in flight
        # The settlement id of each job kept or being read, both ways: a settlement's change
        # is its job's (``forget_changed``).
        self._settlement_of: dict[str, str] = {}
        self._job_of_settlement: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, job_id: str) -> JobRow | None:
        return self._rows.get(job_id)

    def begin(self, job_id: str) -> None:
        """A read of ``job_id`` from the database starts; ``end`` it whatever happens."""
        settlement = None
        if job_id not in self._settlement_of:
            settlement = _settlement_key(job_id)  # outside the lock: a uuid5
        with self._lock:
            self._reading[job_id] = self._reading.get(job_id, 0) + 1
            if settlement is not None and job_id not in self._settlement_of:
                self._settlement_of[job_id] = settlement
                self._job_of_settlement[settlement] = job_id

    def end(self, job_id: str, row: JobRow | None) -> None:
        """The read ``begin`` announced is done: keep ``row`` if it is a finished job's and
        nothing changed that job meanwhile."""
        with self._lock:
            left = self._reading[job_id] - 1
            spoiled = job_id in self._spoiled
            if left:
                self._reading[job_id] = left
            else:
                del self._reading[job_id]
                self._spoiled.discard(job_id)
            if row is None or spoiled or row.status not in TERMINAL:
                self._release(job_id)
                return
            held = self._rows.get(job_id)
            if held is not None and held.version >= row.version:
                return
            if held is None and len(self._rows) >= self.max_entries:
                oldest = next(iter(self._rows))  # the oldest stored
                del self._rows[oldest]
                self._release(oldest)
            self._rows[job_id] = row

    def _release(self, job_id: str) -> None:
        """Drop ``job_id``'s settlement id once the job is neither kept nor being read."""
        if job_id not in self._rows and job_id not in self._reading:
            settlement = self._settlement_of.pop(job_id, None)
            if settlement is not None:
                del self._job_of_settlement[settlement]

    def forget(self, job_ids: Iterable[str]) -> None:
        with self._lock:
            for job_id in job_ids:
                self._forget(job_id)

    def _forget(self, job_id: str) -> None:
        if self._rows.pop(job_id, None) is not None:
            self._release(job_id)
        if job_id in self._reading:
            self._spoiled.add(job_id)

    def forget_changed(self, aggregate_ids: Iterable[str] | None) -> None:
        """The projection runner's ``on_passed_elsewhere``: another process applied changes
        to the aggregates ``aggregate_ids`` (None: to any). Jobs and settlements matter; the
        rest (accounts, offers) are no job here, and forgetting them costs a lookup."""
        if aggregate_ids is None:
            self.forget_all()
            return
        with self._lock:
            job_of_settlement = self._job_of_settlement
            for aggregate_id in aggregate_ids:
                self._forget(job_of_settlement.get(aggregate_id, aggregate_id))

    def forget_all(self) -> None:
        with self._lock:
            self._rows.clear()
            self._spoiled.update(self._reading)
            for job_id in [j for j in self._settlement_of if j not in self._reading]:
                self._release(job_id)

    def passed(self, items: Any) -> None:
        """The projection runner's ``on_passed``: the views moved past ``items``."""
        changed = changed_jobs(items)
        if changed:
            self.forget(changed)
