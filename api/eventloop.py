"""The event loop every command of the CLI runs on: uvloop's where it is installed.

uvloop (libuv, the loop under Node.js) does in C what asyncio's own loop does in Python: the
selector, the ready queue, the socket transports and the wake-ups from other threads. A submit
is several hand-offs between the loop and the command and projection threads, so the loop's own
overhead was a tenth of a submit's CPU (``make bench``: 1.55 and 1.44 ms of server CPU per
SQLite submit on asyncio's loop, 1.38 and 1.37 on uvloop, alternated in one session). Windows has
no uvloop: there, and wherever it is missing, asyncio's loop runs the same code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop, or None (asyncio's default) where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop above."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
