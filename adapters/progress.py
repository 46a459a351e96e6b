"""Progress of a long command (a rebuild, a replay, the bench's log generation) on stderr.

On a terminal: a live tqdm bar with the count done of the total, the rate and the time left.
Anywhere else (a pipe, a file, CI's log): plain lines only, no carriage returns or escape codes,
at most one every ``every`` seconds, and one summary line at the end, so a log stays readable
and greppable.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

# A line every ten seconds tells a watcher a long job is alive without flooding a log.
LINE_EVERY_SECONDS = 10.0


def duration(seconds: float) -> str:
    """``34 s``, ``12 min``, ``2.5 h``: as precise as a person reading an estimate needs."""
    if seconds < 100:
        return f"{seconds:.0f} s"
    if seconds < 100 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """``done`` of ``total`` (``unit``) under ``label``; feed it with ``advance`` (a delta) or
    ``update`` (the count so far, and the total when it is known or grew), then ``close`` it.

    The clock starts at the first ``advance`` or ``update``, so work before it (opening, reading
    what the job will be compared with) does not count in the rate; a caller whose total is
    known only once the work starts reports ``update(0, total)`` first."""

    def __init__(
        self,
        total: int,
        label: str,
        unit: str = "events",
        *,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        every: float = LINE_EVERY_SECONDS,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.label = label
        self.unit = unit
        self.total = max(total, 0)
        self.done = 0
        self.every = every
        self.interactive = _is_terminal(self.stream) if interactive is None else interactive
        self._started: float | None = None
        self._next_line = 0.0
        self._closed = False
        self._bar: Any = None

    def advance(self, n: int) -> None:
        self.update(self.done + n)

    def update(self, done: int, total: int | None = None) -> None:
        if self._closed:
            return
        if total is not None:
            self.total = max(self.total, total)
        if self._started is None:
            self._start()
        done = max(done, self.done)
        delta, self.done = done - self.done, done
        self.total = max(self.total, done)
        if self._bar is not None:
            if self._bar.total != self.total:
                self._bar.total = self.total
                self._bar.refresh()
            if delta:
                self._bar.update(delta)
            return
        now = time.monotonic()
        if now >= self._next_line:
            self._next_line = now + self.every
            assert self._started is not None
            self._line(self._progress_line(now - self._started))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()  # the finished bar stays, with the count, time and rate
            return
        now = time.monotonic()
        elapsed = now - (self._started if self._started is not None else now)
        rate = f", {self.done / elapsed:,.0f}/s" if elapsed > 0 and self.done else ""
        self._line(f"{self.label}: {self.done:,} {self.unit} in {elapsed:.1f} s{rate}")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _start(self) -> None:
        self._started = time.monotonic()
        # The first plain line after a full interval: a short job prints only its summary.
        self._next_line = self._started + self.every
        if self.interactive:
            # Imported only for a bar on a terminal: every process imports this module, and
            # most never draw one.
            from tqdm import tqdm

            sized = _width(self.stream) > 0
            self._bar = tqdm(
                total=self.total,
                desc=self.label,
                unit=f" {self.unit}",
                unit_scale=True,
                file=self.stream,
                # Follows the window's size; a terminal that reports none (a bare pty) is taken
                # as 80x24, where tqdm would print nothing at all.
                dynamic_ncols=sized,
                ncols=None if sized else 80,
                nrows=None if sized else 24,
                bar_format=(
                    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}"
                    " [{elapsed}<{remaining}, {rate_fmt}]"
                ),
            )

    def _progress_line(self, elapsed: float) -> str:
        rate = self.done / elapsed if elapsed > 0 else 0.0
        line = f"{self.label}: {self.done:,}/{self.total:,} {self.unit}, {rate:,.0f}/s"
        if rate > 0:
            line += f", {duration((self.total - self.done) / rate)} left"
        return line

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def _width(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or bare stream
        return False
