"""Finished jobs' views kept in the process, so polling one needs no database read.

A client polls a job until it ends and often a while after; on PostgreSQL each of those reads
is a hand-off to the thread pool and a round trip (several times the CPU of the answer itself).
Only finished jobs are kept: no client command changes one any more, and what still can (the
settlement's resolution, the artifacts' purge) comes from the log like every other change.

Why an entry is never older than what the database would answer, give or take one look of the
projection runner (``ProjectionRunner.fresh_at``, every 50 ms or sooner):

* The runner tells ``forget`` which jobs every range of the log changes before its position
  moves past it, whether it applied the range or another process's runner did (it reads that
  range again: ``ProjectionRunner.on_passed``). So once this process's runner has reached a
  write, as a command's read-your-writes wait ensures, no entry predates that write.
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

from domain.aggregates import TERMINAL
from projections.jobviews import JobRow, changed_jobs

MAX_ENTRIES = 4096  # up to 4 KB each (a succeeded job's): 16 MB at most, however many are polled


class JobCache:
    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._rows: dict[str, JobRow] = {}
        self._lock = threading.Lock()  # the runner's thread forgets, the event loop stores
        self._reading: dict[str, int] = {}  # job id -> reads in flight
        self._spoiled: set[str] = set()  # jobs changed while a read of them was in flight

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, job_id: str) -> JobRow | None:
        return self._rows.get(job_id)

    def begin(self, job_id: str) -> None:
        """A read of ``job_id`` from the database starts; ``end`` it whatever happens."""
        with self._lock:
            self._reading[job_id] = self._reading.get(job_id, 0) + 1

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
                return
            held = self._rows.get(job_id)
            if held is not None and held.version >= row.version:
                return
            if held is None and len(self._rows) >= self.max_entries:
                del self._rows[next(iter(self._rows))]  # the oldest stored
            self._rows[job_id] = row

    def forget(self, job_ids: Iterable[str]) -> None:
        with self._lock:
            for job_id in job_ids:
                self._rows.pop(job_id, None)
                if job_id in self._reading:
                    self._spoiled.add(job_id)

    def forget_all(self) -> None:
        with self._lock:
            self._rows.clear()
            self._spoiled.update(self._reading)

    def passed(self, items: Any) -> None:
        """The projection runner's ``on_passed``: the views moved past ``items`` (None:
        past changes it could not list)."""
        if items is None:
            self.forget_all()
        else:
            changed = changed_jobs(items)
            if changed:
                self.forget(changed)
