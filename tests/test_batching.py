"""Calls gathered into batches (api/batching.py), and the batched reads the API makes with it:
the routing inputs of many submits in two queries per model (``Views.routing_inputs``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any
from uuid import UUID

import pytest

from api.batching import Batches
from tests.fakes import SEEDANCE, InProcessEngine, in_process_engine

OTHER_MODEL = "venice-other-model"


class Recorder:
    """A batch function that records its batches and, while ``gate`` is clear, holds each."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.started = asyncio.Event()

    async def __call__(self, items: Sequence[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.started.set()
        await self.gate.wait()
        outcomes: list[Any] = []
        for item in items:
            if item == "boom":
                raise ConnectionError("the database went away")
            outcomes.append(ValueError(item) if item.startswith("bad") else item.upper())
        return outcomes


async def test_calls_arriving_while_a_batch_runs_make_the_next_batch() -> None:
    run = Recorder()
    batches = Batches(run)
    run.gate.clear()
    first = asyncio.ensure_future(batches("a"))
    await run.started.wait()  # the first batch starts with the one call there is
    assert run.batches == [["a"]]
    later = [asyncio.ensure_future(batches(x)) for x in ("b", "c", "d")]
    await asyncio.sleep(0)  # one turn of the loop: each of them is queued
    assert run.batches == [["a"]]  # nobody waits for a batch to fill, nor starts a second
    run.gate.set()
    assert await asyncio.gather(first, *later) == ["A", "B", "C", "D"]
    assert run.batches == [["a"], ["b", "c", "d"]]
    assert batches.idle


async def test_a_bound_splits_the_backlog_in_order() -> None:
    run = Recorder()
    batches = Batches(run, max_batch=2)
    results = await asyncio.gather(*(batches(x) for x in "abcde"))
    assert results == list("ABCDE")
    assert run.batches == [["a", "b"], ["c", "d"], ["e"]]


async def test_each_call_gets_its_own_outcome_and_a_failed_batch_fails_each() -> None:
    run = Recorder()
    batches = Batches(run)
    outcomes = await asyncio.gather(
        batches("ok"), batches("bad one"), batches("fine"), return_exceptions=True
    )
    assert outcomes[0] == "OK" and outcomes[2] == "FINE"
    assert isinstance(outcomes[1], ValueError)

    failed = await asyncio.gather(batches("x"), batches("boom"), return_exceptions=True)
    assert all(isinstance(o, ConnectionError) for o in failed)
    assert await batches("again") == "AGAIN"  # the next batch runs as usual
    assert batches.idle


async def test_a_caller_that_went_away_leaves_the_others_their_outcomes() -> None:
    run = Recorder()
    batches = Batches(run)
    run.gate.clear()
    running = asyncio.ensure_future(batches("a"))
    await run.started.wait()
    gone = asyncio.ensure_future(batches("b"))
    stays = asyncio.ensure_future(batches("c"))
    await asyncio.sleep(0)  # one turn of the loop: both are queued
    gone.cancel()
    run.gate.set()
    assert await running == "A" and await stays == "C"
    assert gone.cancelled()
    assert run.batches == [["a"], ["b", "c"]]  # what it asked for still ran


# --------------------------------------------------------------------------- routing inputs


@pytest.fixture
async def engine(tmp_path: Any, database_url: str) -> AsyncIterator[InProcessEngine]:
    async with in_process_engine(tmp_path, database_url) as e:
        yield e


def add_key(engine: InProcessEngine, buyer: UUID, model: str | None) -> UUID:
    provider_id, _ = engine.commands.add_buyer_provider(
        buyer_id=buyer, provider="venice", model=model, base_url=None, api_key=f"k-{model}"
    )
    return provider_id


async def test_routing_inputs_read_together_are_each_submits_own(engine: InProcessEngine) -> None:
    seller = engine.seller()
    for n, model in enumerate((SEEDANCE, SEEDANCE, OTHER_MODEL)):
        engine.commands.create_offer(
            seller_id=seller,
            model=model,
            provider="venice",
            base_url=None,
            api_key=f"offer-{n}",
            cost_multiplier="0.9",
            max_concurrent_jobs=None,
        )
    with_keys, catch_all_only, without_keys = engine.buyer(), engine.buyer(), engine.buyer()
    add_key(engine, with_keys, SEEDANCE)
    add_key(engine, with_keys, None)
    add_key(engine, with_keys, OTHER_MODEL)
    engine.commands.delete_buyer_provider(with_keys, add_key(engine, with_keys, SEEDANCE))
    add_key(engine, catch_all_only, None)
    views = engine.views

    wanted = [
        (SEEDANCE, str(with_keys)),
        (SEEDANCE, str(catch_all_only)),
        (OTHER_MODEL, str(with_keys)),
        (SEEDANCE, str(without_keys)),
        (SEEDANCE, str(with_keys)),  # the same buyer twice in one batch
        ("no-such-model", str(with_keys)),
    ]
    together = views.routing_inputs(wanted)
    alone = [(views.offers(model=m), views.buyer_providers(b, m)) for m, b in wanted]
    assert together == alone
    # What the comparison stands on: each case is there.
    assert [(len(o), len(k)) for o, k in together] == [
        (2, 2),
        (2, 1),
        (1, 2),
        (2, 0),
        (2, 2),
        (0, 1),
    ]
