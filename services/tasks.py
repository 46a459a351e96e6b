"""One asyncio task per key (a job being driven, a webhook being sent): the worker and the
webhook sender start one for each due key they find, never two for the same key, and cancel
them all at shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class TasksByKey:
    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def running(self) -> list[str]:
        return list(self._tasks)

    def start(self, key: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work()`` for ``key`` unless a task for it is still running."""
        if key in self._tasks:
            return
        task = asyncio.create_task(work())
        self._tasks[key] = task
        task.add_done_callback(lambda _: self._tasks.pop(key, None))

    async def cancel_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
