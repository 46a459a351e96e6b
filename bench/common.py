"""What the bench's entry points share: where the repository is, the model every workload
asks for, the replay log's default size, and progress lines on stderr."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# A model of the embedded simulator's catalog: the HTTP workloads submit it, the replay's
# market trades it.
MODEL = "venice-seedance-2-fast-t2v"
REPLAY_JOBS = 100_000  # jobs in the replayed log (--quick: QUICK_REPLAY_JOBS)
QUICK_REPLAY_JOBS = 5_000


def say(text: str, who: str = "bench") -> None:
    """One progress line on stderr (stdout is kept for the report or the JSON lines)."""
    print(f"{who}: {text}", file=sys.stderr, flush=True)
