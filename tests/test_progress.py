"""Long commands show their progress: a live bar on a terminal, plain lines anywhere else."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from adapters.eventstore import open_market, store_env
from adapters.progress import Progress
from bench.replay import LogGenerator
from projections.runner import ProjectionRunner
from projections.views import VIEWS_NAME, open_views
from tests.harness import BIN, base_env, free_port

ANSI = re.compile(r"\x1b\[")
# A market's data directory, the environment to run the CLI on it, and its log's length.
SmallMarket = tuple[Path, dict[str, str], int]


def test_off_a_terminal_progress_is_plain_lines_with_rate_and_time_left() -> None:
    out = io.StringIO()
    with Progress(1000, "rebuild", stream=out, every=0.0) as progress:
        progress.update(0)
        for _ in range(4):
            time.sleep(0.01)  # a measurable rate
            progress.advance(250)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and not ANSI.search(out.getvalue())
    assert lines[0] == "rebuild: 0/1,000 events, 0/s", lines  # at the start: no rate yet
    assert re.fullmatch(r"rebuild: 250/1,000 events, [\d,]+/s, \d+ s left", lines[1]), lines
    assert re.fullmatch(r"rebuild: 1,000 events in \d+\.\d s, [\d,]+/s", lines[-1]), lines


def test_off_a_terminal_a_short_job_prints_only_its_summary() -> None:
    out = io.StringIO()
    with Progress(0, "replay", stream=out) as progress:
        progress.update(0, 500)
        progress.update(500)
        progress.update(500)  # after the end (tracking confirmed): no second line
    assert out.getvalue().count("\n") == 1
    assert out.getvalue().startswith("replay: 500 events in ")


def test_on_a_terminal_progress_is_a_bar_with_rate_and_time_left() -> None:
    out = io.StringIO()
    with Progress(10_000, "rebuild", stream=out, interactive=True) as progress:
        progress.update(0)
        time.sleep(0.01)
        progress.advance(10_000)
    text = out.getvalue()
    assert "\r" in text
    assert re.search(r"rebuild: 100%.*10\.0k/10\.0k \[00:00<00:00, [\d.]+k? events/s\]", text), text


@pytest.fixture(scope="module")
def small_market(tmp_path_factory: pytest.TempPathFactory) -> SmallMarket:
    """A SQLite market of 20 jobs with live views, and the environment to run the CLI on it."""
    directory = tmp_path_factory.mktemp("progress")
    url = f"sqlite:///{directory}/data"
    app = open_market(url)
    views = open_views(store_env(url, role=VIEWS_NAME))
    try:
        LogGenerator(app, jobs=20, rate=10.0, seed=5).generate()
        views.ensure_schema(app.name)
        ProjectionRunner(app, views).catch_up()
        events = app.recorder.max_notification_id() or 0
    finally:
        views.datastore.close()
        app.close()
    return directory, base_env(url, free_port()), events


@pytest.mark.parametrize(
    ("args", "label"), [(("projections", "rebuild"), "rebuild"), (("replay", "--verify"), "replay")]
)
def test_piped_commands_print_a_plain_summary_line(
    small_market: SmallMarket, args: tuple[str, ...], label: str
) -> None:
    directory, env, events = small_market
    done = subprocess.run(
        [str(BIN), *args], cwd=directory, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for text in (done.stdout, done.stderr):
        assert "\r" not in text and not ANSI.search(text), text
    summary = rf"{label}: {events:,} events in \d+\.\d s, [\d,]+/s"
    assert re.search(rf"^{summary}$", done.stderr, re.M), done.stderr


def test_a_rebuild_on_a_terminal_shows_a_bar(small_market: SmallMarket) -> None:
    directory, env, events = small_market
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    try:
        proc = subprocess.Popen(
            [str(BIN), "projections", "rebuild"],
            cwd=directory,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=follower,
        )
        os.close(follower)
        seen = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(leader, 4096)
                except OSError:  # EIO: the command ended and closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=10) == 0, seen
    finally:
        os.close(leader)
    text = seen.decode(errors="replace")
    assert "\r" in text
    # The finished bar: everything done, the time taken and left, and the rate.
    assert re.search(rf"rebuild: 100%.*{events}/{events} \[\d\d:\d\d<00:00, ", text), text
    assert "events/s]" in text, text
