"""Read-your-writes for many answers at once (``Engine.job_row_after``): the answers of submits
saved together wait for the views once and read them in one query. The engine's parts it uses
are stood in for here; tests/test_api_jobs.py covers the same path through HTTP."""

from __future__ import annotations

import asyncio
from functools import partial
from types import SimpleNamespace
from typing import Any

from api.batching import Batches
from api.bootstrap import Engine
from projections.jobviews import JobRow


def engine_parts(rows: dict[str, JobRow], caught_up: bool = True) -> Any:
    calls: dict[str, list[Any]] = {"caught_up": [], "get_jobs": []}

    async def wait_for_views(position: int, wait_seconds: float) -> bool:
        calls["caught_up"].append((position, wait_seconds))
        await asyncio.sleep(0)
        return caught_up

    def get_jobs(job_ids: list[str]) -> dict[str, JobRow]:
        calls["get_jobs"].append(sorted(job_ids))
        if "broken" in job_ids:
            raise ConnectionError("the database went away")
        return {j: rows[j] for j in job_ids if j in rows}

    async def read(fn: Any, *args: Any) -> Any:
        return fn(*args)

    parts = SimpleNamespace(
        caught_up=wait_for_views,
        read=read,
        views=SimpleNamespace(get_jobs=get_jobs),
        calls=calls,
    )
    parts._rows_after = Batches(partial(Engine._read_rows, parts))
    parts.job_row_after = partial(Engine.job_row_after, parts)
    return parts


def row(job_id: str) -> JobRow:
    return JobRow(job_id, "buyer", "queued", "hash", {"id": job_id}, 1)


async def test_answers_asked_together_wait_once_and_read_once() -> None:
    engine = engine_parts({j: row(j) for j in ("a", "b", "c")})
    found = await asyncio.gather(
        engine.job_row_after("a", 7, 5.0),
        engine.job_row_after("b", 9, 5.0),
        engine.job_row_after("c", 8, 5.0),
        engine.job_row_after("missing", 8, 5.0),
    )
    assert [r.job_id if r else None for r in found] == ["a", "b", "c", None]
    # One wait, for the furthest position asked for, and one read for all four.
    assert engine.calls["caught_up"] == [(9, 5.0)]
    assert engine.calls["get_jobs"] == [["a", "b", "c", "missing"]]
    assert engine._rows_after.idle


async def test_views_that_lag_answer_none_and_a_failed_read_fails_each() -> None:
    lagging = engine_parts({"a": row("a")}, caught_up=False)
    assert await lagging.job_row_after("a", 3, 0.1) is None
    assert lagging.calls["get_jobs"] == []

    engine = engine_parts({"a": row("a")})
    await engine.job_row_after("a", 1, 5.0)
    outcomes = await asyncio.gather(
        engine.job_row_after("a", 2, 5.0),
        engine.job_row_after("broken", 2, 5.0),
        return_exceptions=True,
    )
    # Asked together, read together: both see the failure, and the next read works again.
    assert all(isinstance(o, ConnectionError) for o in outcomes)
    again = await engine.job_row_after("a", 3, 5.0)
    assert again is not None and again.job_id == "a"
