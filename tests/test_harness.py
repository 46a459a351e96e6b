"""The test harness itself: the processes the tests start run the code under test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.harness import base_env, free_port

ROOT = Path(__file__).resolve().parent.parent


def test_the_processes_the_tests_start_import_this_checkout(tmp_path: Path) -> None:
    """From a git worktree sharing the main checkout's venv, an engine started through
    ``base_env`` imported the main checkout's code: the venv's editable install points there,
    and a console script's own directory, not the current one, is first on its path."""
    env = base_env(f"sqlite:///{tmp_path}/data", free_port())
    script = "import api, domain; print(api.__file__); print(domain.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,  # not the checkout: as for the engines, which run in their data dirs
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for line in done.stdout.splitlines():
        assert Path(line).resolve().is_relative_to(ROOT), line
