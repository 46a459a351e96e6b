"""Calls from the event loop gathered into batches: one hand-off, one query, one save for many.

Three things a request does are far cheaper per request when done for many at once: the
submit's command (one pool hand-off and one transaction for a batch of submits), the routing
read before it (the order book and the buyers' keys, one query each for every submit of a
batch) and the read-your-writes answer after it (the views waited for once, every job view
read in one query). On a virtual machine each hand-off to a pool thread and back is a costly
cross-CPU wake-up, and on PostgreSQL each read is one besides.

``Batches`` gathers the calls that arrive while its previous batch runs and runs them as the
next, each call getting its own outcome. Nobody waits for a batch to fill: an idle process runs
a call at once (in a batch of one), a busy one in batches as big as its backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# What a batch gives back: one outcome per item, in order; an exception is that item's error.
RunBatch = Callable[[Sequence[T]], Awaitable[Sequence[R | Exception]]]


class Batches(Generic[T, R]):
    def __init__(self, run: RunBatch[T, R], max_batch: int | None = None) -> None:
        """``run(items)`` runs one batch; ``max_batch`` bounds a batch (None: any size)."""
        self._run = run
        self._max_batch = max_batch
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._drain: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        """Nothing is waiting and no batch runs."""
        return self._drain is None and not self._waiting

    async def __call__(self, item: T) -> R:
        """``item``'s outcome from the batch it ran in: its result, or its error raised."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._waiting.append((item, future))
        if self._drain is None:
            self._drain = loop.create_task(self._drain_all())
        return await future

    async def _drain_all(self) -> None:
        try:
            while self._waiting:
                if self._max_batch is None:
                    batch, self._waiting = self._waiting, []
                else:
                    batch = self._waiting[: self._max_batch]
                    del self._waiting[: self._max_batch]
                try:
                    outcomes: Sequence[R | Exception] = await self._run([i for i, _ in batch])
                except Exception as e:  # the whole batch failed: each of its items did
                    outcomes = [e] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # its caller went away; what it asked for stands
                        continue
                    if isinstance(outcome, Exception):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._drain = None
