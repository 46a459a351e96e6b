"""Waiting without polling (SPEC 7): ``Prefer: wait=N`` on poll and the job's SSE stream.

Every API process tails the log into the views (``projections.runner``), whichever process or
worker wrote an event. So a change to a job's view is seen here when the runner's position moves
past it; ``JobWatchers`` is the one wake-up per process hung on that: on each advance, if anyone
waits, one query reads the version of every job waited on and resolves the futures of those that
changed. A waiter costs a future and a dict entry; an idle process runs nothing at all.

The version of a view is the log position of the last event that changed it, the same in every
process and after a rebuild, so it serves as the SSE event id and ``Last-Event-ID`` resumes on
any process.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger("stream")

# The longest ``Prefer: wait`` honoured (SPEC 7); a larger one is cut to it.
MAX_WAIT_SECONDS = 60
# A comment line on an idle stream this often, so proxies keep it open and a client that went
# away is noticed (its write fails) instead of holding a waiter until the job changes.
KEEPALIVE_SECONDS = 15.0
_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d{1,9})\"?\s*(?:$|[,;\s])", re.IGNORECASE)

VersionReader = Callable[[Sequence[str]], Awaitable[dict[str, int]]]


def preferred_wait(header: str | None) -> int | None:
    """The ``wait`` preference of a ``Prefer`` header (RFC 7240), capped at 60 seconds.

    A preference the server does not understand is ignored, as RFC 7240 asks: a malformed or
    absent ``wait`` means no wait, never an error."""
    if not header:
        return None
    match = _WAIT.search(header)
    if match is None:
        return None
    return min(int(match.group(1)), MAX_WAIT_SECONDS)


class JobWatchers:
    """Futures waiting for a job's view to move past a version, woken by the runner."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_versions: VersionReader) -> None:
        self._loop = loop
        self._read_versions = read_versions
        # job id -> {future: the version its waiter has seen}
        self._waiting: dict[str, dict[asyncio.Future[int], int]] = {}
        self._checking = False
        self._again = False
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiting.values())

    def advanced(self, position: int) -> None:
        """The runner's hook (its own thread): the views moved; look only if someone waits."""
        if self._waiting:
            self._loop.call_soon_threadsafe(self._check_soon)

    def _check_soon(self) -> None:
        if self._checking:
            # One check at a time; one more after it covers every advance in between.
            self._again = True
            return
        self._checking = True
        self._loop.create_task(self._check())

    async def _check(self) -> None:
        try:
            while self._waiting and not self._closed:
                self._again = False
                try:
                    versions = await self._read_versions(list(self._waiting))
                except Exception:
                    # The next advance (or a waiter's own timeout) tries again.
                    log.exception("watch_check_failed")
                    return
                for job_id, version in versions.items():
                    for future, seen in list(self._waiting.get(job_id, {}).items()):
                        if version > seen and not future.done():
                            future.set_result(version)
                if not self._again:
                    return
        finally:
            self._checking = False

    async def changed(self, job_id: str, seen: int, seconds: float | None) -> bool:
        """Wait until the job's view is past version ``seen`` (True) or ``seconds`` pass."""
        if self._closed:
            return False
        future: asyncio.Future[int] = self._loop.create_future()
        self._waiting.setdefault(job_id, {})[future] = seen
        # It may have changed between the caller's read and now: one look closes that gap
        # (coalesced with every other waiter's).
        self._check_soon()
        try:
            await asyncio.wait_for(future, seconds)
            return future.result() > seen
        except TimeoutError:
            return False
        finally:
            waiters = self._waiting.get(job_id)
            if waiters is not None:
                waiters.pop(future, None)
                if not waiters:
                    del self._waiting[job_id]

    def close(self) -> None:
        """The process is stopping: every waiter returns now, and later ones at once."""
        self._closed = True
        for waiters in self._waiting.values():
            for future in waiters:
                if not future.done():
                    future.set_result(-1)


def sse_event(version: int, body: dict[str, Any]) -> bytes:
    """One ``job`` event: the view as one line of JSON, its version as the id."""
    data = json.dumps(body, separators=(",", ":"))
    return f"id: {version}\nevent: job\ndata: {data}\n\n".encode()


def last_event_id(request: web.Request) -> int | None:
    """The version a reconnecting client has (``Last-Event-ID``); None if absent or unusable."""
    value = request.headers.get("Last-Event-ID", "").strip()
    if value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    return None
