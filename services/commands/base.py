"""What every command shares: retrying optimistic-concurrency conflicts, serialising the
writers of one hot aggregate within this process, loading, and the answers commands give.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import IntegrityError

from adapters.crypto import Secrets
from adapters.eventstore import GroupCommit, MarketApp

T = TypeVar("T")
A = TypeVar("A", bound=Aggregate)
IDEMPOTENCY_WINDOW_SECONDS = 24 * 3600
MAX_ATTEMPTS = 200
# Hot aggregates (buyer accounts) kept between commands without copying; each holds its open
# holds, so the bound is in accounts rather than bytes.
OWNED_MAXSIZE = 4096


class ConflictError(Exception):
    """Optimistic-concurrency retries exhausted (practically unreachable)."""


class Stale(Exception):
    """What a command loaded was overtaken before it could save: another writer ended the job
    (its settlement is resolved, its hold gone). The save would conflict anyway; this says so
    before a rule refuses the stale decision, and the command retries on fresh state."""


class IdempotencyMismatch(Exception):
    """The Idempotency-Key was used before with a different request body."""


class NotFound(Exception):
    pass


@dataclass(frozen=True)
class Written:
    """What a command wrote: the log position to wait for before answering the caller."""

    position: int


@dataclass(frozen=True)
class Submitted:
    job_id: UUID
    job_token: str
    position: int
    replayed: bool


def position_of(recordings: list[Any]) -> int:
    return max((r.notification.id for r in recordings), default=0)


def idempotent_job_id(buyer_id: str, key: str, generation: int) -> UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"/mediamarket/idempotency/{buyer_id}/{generation}/{key}")


class CommandBase:
    def __init__(self, app: MarketApp, secrets: Secrets, clock: Callable[[], float] = time.time):
        self.app = app
        self.secrets = secrets
        self.clock = clock
        self._open_keys: dict[tuple[str, str], str] = {}
        self._locks: weakref.WeakValueDictionary[str, threading.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._locks_guard = threading.Lock()
        self._owned_cache: OrderedDict[UUID, Aggregate] = OrderedDict()
        self._owned_guard = threading.Lock()
        # Submits save through it: a busy buyer's lock is held until the batch commits.
        self._group_commit = GroupCommit(app)

    @contextmanager
    def _serialised(self, *names: str) -> Iterator[None]:
        """Serialise this process's writes to hot aggregates (a buyer's account, an offer).

        Concurrent writers would otherwise load the same version and all but one would redo
        their work after a conflict; other processes still conflict and retry, which stays
        correct, just slower. Locks are taken in sorted order, so two commands that need the
        same pair can never deadlock.
        """
        with self._locks_guard:
            locks = []
            for name in sorted(set(names)):
                lock = self._locks.get(name)
                if lock is None:
                    lock = threading.Lock()
                    self._locks[name] = lock
                locks.append(lock)
        with contextlib.ExitStack() as stack:
            for lock in locks:
                stack.enter_context(lock)
            yield

    def _try_serialised(self, name: str) -> Callable[[], None] | None:
        """``_serialised`` for one name without waiting: its release, or None when another
        thread holds it."""
        with self._locks_guard:
            lock = self._locks.get(name)
            if lock is None:
                lock = threading.Lock()
                self._locks[name] = lock
        # The bound method keeps the lock alive (the registry holds it only weakly).
        return lock.release if lock.acquire(blocking=False) else None

    def _account(self, buyer_id: UUID | str) -> contextlib.AbstractContextManager[None]:
        return self._serialised(f"buyer:{buyer_id}")

    @contextmanager
    def _owned(self, cls: type[A], aggregate_id: UUID, current: bool = False) -> Iterator[A]:
        """A hot aggregate for a command that holds its serialisation lock, without the deep
        copy ``repository.get`` makes of every cached aggregate (the copy of a buyer account
        grows with its open holds: it was the biggest single cost of a submit).

        The object lives in this process's own cache only between commands: it is taken out
        while a command uses it and put back only when it is certainly the stored state, so no
        other thread ever sees it half-changed. That is: after a normal exit with nothing left
        unsaved, or after an exception that changed nothing (a refusal, say). A command that
        changed it and then raised, a failed save included (its events were already collected,
        but another writer's are in the log at those versions), loses it, and the next one
        loads afresh. Commands under ``_owned`` must therefore let a failed save propagate.

        Writes by other threads and processes are caught up with from the log on every take
        (the same one query ``repository.get``'s fast-forward makes), so refusals such as an
        insufficient balance are decided on current state; ``current``: the caller has just
        found the kept object to be the stored state (``_current_owned``).
        """
        with self._owned_guard:
            aggregate = self._owned_cache.pop(aggregate_id, None)
        if aggregate is None:
            loaded: Aggregate = self._get(cls, aggregate_id)
        elif current:
            loaded = aggregate
        else:
            caught_up = self.app.caught_up(aggregate)
            if caught_up is None:
                raise NotFound(str(aggregate_id))
            loaded = caught_up
        assert isinstance(loaded, cls)
        version = loaded.version
        try:
            yield loaded
        except BaseException:
            if loaded.version == version and not loaded.pending_events:
                self._keep_owned(aggregate_id, loaded)
            raise
        if not loaded.pending_events:
            self._keep_owned(aggregate_id, loaded)

    def _current_owned(self, aggregate_ids: Sequence[UUID]) -> set[UUID]:
        """Those of ``aggregate_ids`` (each held by the caller under its serialisation lock)
        whose kept object (``_owned``) is the stored state: one query for all of them, where
        ``_owned`` makes one each to catch up (a batch of submits, one per buyer)."""
        with self._owned_guard:
            kept = {i: self._owned_cache.get(i) for i in aggregate_ids}
        try:
            versions = self.app.stored_versions([i for i, a in kept.items() if a is not None])
        except Exception:
            # Each is then caught up on its own, where the error (an outage, say) is its own.
            return set()
        return {i for i, a in kept.items() if a is not None and versions.get(i, 0) == a.version}

    def _keep_owned(self, aggregate_id: UUID, aggregate: Aggregate) -> None:
        with self._owned_guard:
            self._owned_cache[aggregate_id] = aggregate
            if len(self._owned_cache) > OWNED_MAXSIZE:
                self._owned_cache.popitem(last=False)

    def _retrying(self, attempt: Callable[[], T]) -> T:
        for n in range(MAX_ATTEMPTS):
            try:
                return attempt()
            except (IntegrityError, Stale):
                # Contention on a hot aggregate (a busy buyer's account): back off a little,
                # with jitter so the losers don't collide again in lockstep.
                time.sleep(random.uniform(0, min(0.001 * (n + 1), 0.02)))
        raise ConflictError("too much contention; try again")

    def _get(self, cls: type[T], aggregate_id: UUID) -> T:
        try:
            aggregate: Any = self.app.repository.get(aggregate_id)
        except AggregateNotFoundError:
            raise NotFound(str(aggregate_id)) from None
        if not isinstance(aggregate, cls):
            raise NotFound(str(aggregate_id))
        return aggregate
