"""Submits handed to the thread pool in batches, from the event loop.

A submit's command (load the buyer's account, decide, save) runs in the pool: the event store
has no asyncio API. One pool call per submit, each then joining a group commit in its thread,
cost a hand-off to a pool thread, a wake-up per waiting thread when the batch committed and
another back to the loop, for every submit; on a virtual machine each wake-up is a costly
cross-CPU interrupt. Here the loop queues submits while one batch is in the pool and hands
the next batch over in one call (``SubmitCommands.submit_many``): one round trip per batch,
whose submits are saved in one transaction. Nobody waits for a batch to fill: an idle process
hands a submit over at once, a busy one in batches as big as its backlog.

Callers keep one submit per buyer in the queue (``Engine.buyer_turn``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from services.commands import Submitted
from services.commands.submit import SubmitRequest

Outcome = Submitted | Exception
RunBatch = Callable[[Sequence[SubmitRequest]], Awaitable[list[Outcome]]]
MAX_BATCH = 64


class SubmitQueue:
    def __init__(self, run_batch: RunBatch, max_batch: int = MAX_BATCH) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._waiting: list[tuple[SubmitRequest, asyncio.Future[Submitted]]] = []
        self._drain: asyncio.Task[None] | None = None

    async def submit(self, request: SubmitRequest) -> Submitted:
        """The submit's outcome: what ``SubmitCommands.submit`` returns or raises."""
        future: asyncio.Future[Submitted] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_task(self._drain_all())
        return await future

    async def _drain_all(self) -> None:
        try:
            while self._waiting:
                batch = self._waiting[: self._max_batch]
                del self._waiting[: self._max_batch]
                try:
                    outcomes = await self._run_batch([request for request, _ in batch])
                except Exception as e:  # the whole batch failed: each of its submits did
                    outcomes = [e] * len(batch)
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # its caller went away; the submit stands
                        continue
                    if isinstance(outcome, Exception):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._drain = None
