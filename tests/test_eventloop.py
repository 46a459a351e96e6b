"""Every CLI command runs on uvloop where it is installed, and on asyncio's loop without it."""

from __future__ import annotations

import asyncio
import sys

import pytest

from api import eventloop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__


def test_commands_run_on_uvloop_where_it_is_installed() -> None:
    pytest.importorskip("uvloop", reason="uvloop has no build for this platform")
    assert eventloop.run(_loop_module()).startswith("uvloop")


def test_without_uvloop_the_same_code_runs_on_asyncios_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if not installed: import fails
    assert eventloop.run(_loop_module()).startswith("asyncio")
