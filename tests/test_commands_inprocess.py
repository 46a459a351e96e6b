"""The command side in one process (tests/fakes.py): the paths the real-process tests covered
through HTTP alone. Idempotent submits, holds under contention from two "processes" (two
command services on one store), deposits retried, and offer health from quotes and from the
seller's own changes. What stays with real processes is the HTTP surface (headers, status
codes, error bodies) and several processes' views of one database.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.persistence import IntegrityError

from adapters.venice import ProviderRefused, QuoteFailed
from api.validation import validate_video_request
from domain.aggregates import DepositConflict, InsufficientBalance
from services.commands import (
    IDEMPOTENCY_WINDOW_SECONDS,
    Commands,
    IdempotencyMismatch,
    NotFound,
    Submitted,
)
from services.commands.submit import GROUP_ROUNDS, SubmitRequest
from tests.fakes import (
    LIST_PRICE,
    SEEDANCE,
    InProcessEngine,
    charged_for,
    in_process_engine,
    skip_worker_waits,
)
from tests.test_ledger import CATALOG


@pytest.fixture
async def engine(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[InProcessEngine]:
    skip_worker_waits(monkeypatch)
    async with in_process_engine(tmp_path) as e:
        yield e


@pytest.fixture
async def engine_on_each_backend(
    tmp_path: Any, database_url: str
) -> AsyncIterator[InProcessEngine]:
    """Contention is where the backends differ (SQLite's one writer, PostgreSQL's conflicts)."""
    async with in_process_engine(tmp_path, database_url) as e:
        yield e


def other_process(engine: InProcessEngine) -> Commands:
    """A second command service on the same store: its locks don't serialise with ours, so
    contention between the two goes through the store's optimistic concurrency."""
    return Commands(engine.market, engine.secrets, clock=engine.clock)


def submit_request(
    buyer_id: UUID, hold: int, prompt: str = "a cat", key: str | None = None
) -> SubmitRequest:
    """A submit with a fixed route and hold (as routing decided them)."""
    request = validate_video_request(
        {"model": SEEDANCE, "prompt": prompt},
        CATALOG,
        allow_http_webhooks=False,
        allow_private_webhooks=False,
    )
    return SubmitRequest(
        buyer_id=buyer_id,
        request=request,
        route=[],
        routing={},
        estimated_cost=hold,
        hold=hold,
        ttl_seconds=60,
        min_discount=None,
        idempotency_key=key,
    )


def submitter(engine: InProcessEngine, hold: int) -> Callable[..., Submitted]:
    """A plain submit from any thread (``Commands.submit``, as commands other than the API's
    batches call it)."""

    def submit(
        commands: Commands, buyer_id: UUID, prompt: str = "a cat", key: str | None = None
    ) -> Submitted:
        return commands.submit(**vars(submit_request(buyer_id, hold, prompt, key)))

    return submit


# --------------------------------------------------------------------------- idempotency


async def test_an_idempotency_key_replays_its_job_and_refuses_another_body(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    engine.offer("key-a")
    first = await engine.submit_for(buyer, idempotency_key="order-1")
    assert not first.replayed
    hold = engine.job(first.job_id).max_cost

    for _ in range(2):
        again = await engine.submit_for(buyer, idempotency_key="order-1")
        assert again.replayed
        assert (again.job_id, again.job_token) == (first.job_id, first.job_token)
    # Same key, another body: refused, and nothing more is held.
    for changed in ({"prompt": "a dog"}, {"metadata": {"a": "1"}}):
        with pytest.raises(IdempotencyMismatch):
            await engine.submit_for(buyer, idempotency_key="order-1", **changed)
    assert engine.account(buyer).held == hold
    fingerprint = engine.job(first.job_id).fingerprint
    found = engine.commands.find_idempotent(buyer, "order-1", fingerprint)
    assert found is not None and found.job_id == first.job_id
    assert engine.commands.find_idempotent(buyer, "order-2", fingerprint) is None

    # Keys are per buyer: another buyer's "order-1" is a job of its own.
    other = engine.buyer()
    theirs = await engine.submit_for(other, idempotency_key="order-1")
    assert theirs.job_id != first.job_id and not theirs.replayed

    # Past its window the key is free again: a new job, and a new hold.
    engine.clock.advance(IDEMPOTENCY_WINDOW_SECONDS)
    later = await engine.submit_for(buyer, idempotency_key="order-1", prompt="a dog")
    assert later.job_id != first.job_id and not later.replayed
    assert engine.account(buyer).held == 2 * hold
    # And it now names the new job, for this body only.
    found = engine.commands.find_idempotent(buyer, "order-1", engine.job(later.job_id).fingerprint)
    assert found is not None and found.job_id == later.job_id
    with pytest.raises(IdempotencyMismatch):
        engine.commands.find_idempotent(buyer, "order-1", fingerprint)


def test_concurrent_duplicates_create_one_job_and_one_hold(
    engine_on_each_backend: InProcessEngine,
) -> None:
    engine = engine_on_each_backend
    buyer = engine.buyer()
    hold = 140_800
    submit = submitter(engine, hold)
    services = [engine.commands, other_process(engine)]
    start = threading.Barrier(20)

    def race(n: int) -> Submitted:
        start.wait()
        return submit(services[n % 2], buyer, key="race")

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(race, range(20)))

    assert len({a.job_id for a in answers}) == 1
    assert len({a.job_token for a in answers}) == 1
    assert sum(not a.replayed for a in answers) == 1
    account = engine.account(buyer)
    assert account.held == hold and account.jobs == 1


def test_concurrent_submits_never_overdraw(engine_on_each_backend: InProcessEngine) -> None:
    engine = engine_on_each_backend
    hold = 140_800
    buyer = engine.buyer(deposit=10 * hold + hold - 1)
    submit = submitter(engine, hold)
    services = [engine.commands, other_process(engine)]
    start = threading.Barrier(30)

    def one(n: int) -> Submitted | InsufficientBalance:
        start.wait()
        try:
            return submit(services[n % 2], buyer, prompt=f"submit {n}")
        except InsufficientBalance as e:
            return e

    with ThreadPoolExecutor(30) as pool:
        outcomes = list(pool.map(one, range(30)))

    accepted = [o for o in outcomes if isinstance(o, Submitted)]
    assert len(accepted) == 10
    assert all(isinstance(o, InsufficientBalance) for o in outcomes if o not in accepted)
    account = engine.account(buyer)
    assert account.held == 10 * hold and account.available == hold - 1 and account.jobs == 10
    # Each accepted job holds its own hold; cancelled before dispatch, every hold comes back.
    for submitted in accepted:
        engine.commands.cancel(submitted.job_id)
    account = engine.account(buyer)
    assert (account.held, account.spent) == (0, 0)


def test_a_submit_whose_save_conflicts_decides_again_on_the_stored_account(
    engine_on_each_backend: InProcessEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The account a command service keeps between submits (not copied, services.commands.base)
    is dropped when a save fails after the hold changed it: the retry must see the other
    process's write that made the save conflict, not build on its own unsaved hold."""
    engine = engine_on_each_backend
    hold = 140_800
    buyer = engine.buyer(deposit=3 * hold)
    submit = submitter(engine, hold)
    submit(engine.commands, buyer, prompt="first")  # the account is now kept
    other = other_process(engine)
    save = engine.market.save
    interleaved = False

    def another_process_writes_first(*objs: Any, **kwargs: Any) -> Any:
        nonlocal interleaved
        if not interleaved:
            interleaved = True
            other.deposit(buyer, 5, "in-between")
        return save(*objs, **kwargs)

    monkeypatch.setattr(engine.market, "save", another_process_writes_first)
    submit(engine.commands, buyer, prompt="conflicts once")
    assert interleaved
    submit(engine.commands, buyer, prompt="third")
    with pytest.raises(InsufficientBalance):
        submit(engine.commands, buyer, prompt="fourth")
    account = engine.account(buyer)
    assert (account.held, account.available, account.jobs) == (3 * hold, 5, 3)


def test_saves_joined_in_one_transaction_keep_their_own_outcomes(
    engine_on_each_backend: InProcessEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commit (adapters.eventstore.GroupCommit): saves joined in one transaction each get
    their own recordings, and a conflicting one fails alone, the others saved together."""
    engine = engine_on_each_backend
    market = engine.market
    first, stale, last = (engine.buyer(deposit=1_000) for _ in range(3))
    accounts = [engine.account(b) for b in (first, stale, last)]
    overtaking = engine.account(stale)
    overtaking.deposit(1, "overtakes")
    market.save(overtaking)
    for n, account in enumerate(accounts):
        account.deposit(10, f"joined-{n}")
    transactions: list[int] = []
    save_collected = market._save_collected

    def counted(processing_event: Any) -> Any:
        transactions.append(len(processing_event.events))
        return save_collected(processing_event)

    monkeypatch.setattr(market, "_save_collected", counted)

    outcomes = market.save_together([[a] for a in accounts])

    # The joint save, then the two fresh groups together again (not one transaction each).
    assert transactions == [3, 2]
    assert isinstance(outcomes[1], IntegrityError)
    for n in (0, 2):
        saved = outcomes[n]
        assert isinstance(saved, list) and len(saved) == 1
        assert saved[0].domain_event.originator_id == accounts[n].id
    assert [engine.account(b).deposited for b in (first, stale, last)] == [1_010, 1_001, 1_010]

    # Without a conflict: one transaction, and each save still gets its own recordings.
    accounts = [engine.account(b) for b in (first, stale, last)]
    for n, account in enumerate(accounts):
        account.deposit(100, f"together-{n}")
        account.deposit(100, f"together-again-{n}")
    outcomes = market.save_together([[a] for a in accounts])
    positions = []
    for n, saved in enumerate(outcomes):
        assert isinstance(saved, list)
        assert [r.domain_event.originator_id for r in saved] == [accounts[n].id] * 2
        positions += [r.notification.id for r in saved]
    positions.sort()
    assert positions == list(range(positions[0], positions[0] + 6))
    assert [engine.account(b).deposited for b in (first, stale, last)] == [1_210, 1_201, 1_210]


def test_a_batch_of_submits_keeps_each_submits_own_outcome(
    engine_on_each_backend: InProcessEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``submit_many`` (the API's submits, a batch per thread-pool call): each submit gets what
    ``submit`` would have given it. A refusal, an unknown buyer or an idempotent replay is its
    own; a buyer whose save conflicts is decided and saved again; the others (one buyer's two
    submits among them) are saved together."""
    engine = engine_on_each_backend
    hold = 140_800
    ok, poor, twice, conflicting, replaying = (engine.buyer(deposit=5 * hold) for _ in range(5))
    first = submitter(engine, hold)(engine.commands, replaying, key="order-1")

    def request(buyer: UUID, key: str | None = None, amount: int = hold) -> SubmitRequest:
        return submit_request(buyer, amount, key=key)

    other = other_process(engine)
    save_together = engine.market.save_together
    joint: list[int] = []

    def another_process_writes_first(groups: Any) -> Any:
        if not joint:
            other.deposit(conflicting, 5, "in-between")
        joint.append(len(groups))
        return save_together(groups)

    monkeypatch.setattr(engine.market, "save_together", another_process_writes_first)
    unknown = uuid4()
    outcomes = engine.commands.submit_many(
        [
            request(ok),
            request(poor, amount=6 * hold),
            request(twice),
            request(conflicting),
            request(twice),
            request(replaying, key="order-1"),
            request(unknown),
        ]
    )

    # ok, twice (both jobs with its account) and conflicting together; then conflicting again,
    # decided on its account as the other process left it, in a batch's second round.
    assert joint == [3, 1]
    assert isinstance(outcomes[0], Submitted) and not outcomes[0].replayed
    assert isinstance(outcomes[1], InsufficientBalance)
    assert isinstance(outcomes[2], Submitted) and isinstance(outcomes[4], Submitted)
    assert outcomes[2].job_id != outcomes[4].job_id
    assert isinstance(outcomes[3], Submitted)
    replayed = outcomes[5]
    assert isinstance(replayed, Submitted) and replayed.replayed
    assert replayed.job_id == first.job_id
    assert isinstance(outcomes[6], NotFound)
    for n in (0, 2, 3, 4):
        submitted = outcomes[n]
        assert isinstance(submitted, Submitted)
        assert engine.job(submitted.job_id).max_cost == hold
    expected = {ok: (1, 0), poor: (0, 0), twice: (2, 0), conflicting: (1, 5), replaying: (1, 0)}
    for buyer, (jobs, extra) in expected.items():
        account = engine.account(buyer)
        assert (account.jobs, account.held) == (jobs, jobs * hold)
        assert account.available == 5 * hold + extra - jobs * hold
    # The accounts this service kept are the stored ones: its next submits decide on them.
    again = engine.commands.submit_many([request(b) for b in expected])
    assert all(isinstance(o, Submitted) for o in again)
    assert engine.account(conflicting).held == 2 * hold


def test_one_buyers_submits_in_a_batch_are_decided_in_turn_and_saved_together(
    engine_on_each_backend: InProcessEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A buyer's submits in one batch are decided in the order given on its account, so a
    later one meets the earlier ones' holds (the one the balance no longer covers is refused,
    and one after it that fits still goes through), and all are saved in one transaction with
    the account. A second submit with the same Idempotency-Key gets the first one's job."""
    engine = engine_on_each_backend
    hold = 140_800
    buyer = engine.buyer(deposit=3 * hold)
    transactions: list[int] = []
    save_collected = engine.market._save_collected

    def counted(processing_event: Any) -> Any:
        transactions.append(len(processing_event.events))
        return save_collected(processing_event)

    monkeypatch.setattr(engine.market, "_save_collected", counted)
    outcomes = engine.commands.submit_many(
        [
            submit_request(buyer, hold, key="order-1"),
            submit_request(buyer, hold),
            submit_request(buyer, 2 * hold),  # only hold is left: refused
            submit_request(buyer, hold, key="order-1"),  # the first one's job
            submit_request(buyer, hold // 2),  # fits in what is left
        ]
    )

    first, second, refused, again, last = outcomes
    assert isinstance(refused, InsufficientBalance)
    assert (refused.available, refused.wanted) == (hold, 2 * hold)
    for submitted in (first, second, last):
        assert isinstance(submitted, Submitted) and not submitted.replayed
    assert isinstance(again, Submitted) and again.replayed
    assert isinstance(first, Submitted) and again.job_id == first.job_id
    # Three jobs, their settlements and the three holds: one transaction.
    assert transactions == [9]
    account = engine.account(buyer)
    assert (account.jobs, account.held) == (3, 2 * hold + hold // 2)
    assert account.available == hold // 2


def test_a_conflicting_group_is_decided_again_and_then_submitted_alone(
    engine_on_each_backend: InProcessEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process writes a buyer's account while a batch saves: the buyer's submits are
    all decided again on the account as it now stands (a refusal for want of what an earlier
    one held included), in the batch's next round; one that keeps conflicting for every round
    is then submitted on its own."""
    engine = engine_on_each_backend
    hold = 140_800
    buyer = engine.buyer(deposit=hold)
    other = other_process(engine)
    save_together = engine.market.save_together
    rounds: list[int] = []
    deposits = 1

    def another_process_writes_first(groups: Any) -> Any:
        if len(rounds) < deposits:
            other.deposit(buyer, hold)
        rounds.append(len(groups))
        return save_together(groups)

    monkeypatch.setattr(engine.market, "save_together", another_process_writes_first)
    first, second = engine.commands.submit_many(
        [submit_request(buyer, hold), submit_request(buyer, hold)]
    )
    # Refused in the first round (only one hold's worth), taken in the second.
    assert isinstance(first, Submitted) and isinstance(second, Submitted)
    assert rounds == [1, 1]
    assert engine.account(buyer).held == 2 * hold

    other.deposit(buyer, hold, "for one more")
    rounds.clear()
    deposits = GROUP_ROUNDS
    (alone,) = engine.commands.submit_many([submit_request(buyer, hold)])
    assert isinstance(alone, Submitted)
    assert rounds == [1] * GROUP_ROUNDS + [1]  # every round conflicted, then its own save
    account = engine.account(buyer)
    assert account.held == 3 * hold
    assert account.available == GROUP_ROUNDS * hold  # what came in during the rounds


def test_a_batch_finds_its_kept_accounts_current_in_one_query(
    engine_on_each_backend: InProcessEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accounts a batch's buyers kept from their last submit are checked against the store
    in one query for the whole batch; only one another process wrote since is caught up (and
    decided on as it now stands: here, a deposit that makes the hold affordable)."""
    engine = engine_on_each_backend
    hold = 140_800
    buyers = [engine.buyer(deposit=2 * hold) for _ in range(3)]
    topped_up = engine.buyer(deposit=hold)
    everyone = [*buyers, topped_up]
    first = engine.commands.submit_many([submit_request(b, hold) for b in everyone])
    assert all(isinstance(o, Submitted) for o in first)
    other_process(engine).deposit(topped_up, hold, "from elsewhere")

    caught_up: list[UUID] = []
    checked: list[list[UUID]] = []
    catch_up, versions = engine.market.caught_up, engine.market.stored_versions

    def counted_catch_up(aggregate: Any) -> Any:
        caught_up.append(aggregate.id)
        return catch_up(aggregate)

    def counted_versions(ids: Any) -> Any:
        checked.append(list(ids))
        return versions(ids)

    monkeypatch.setattr(engine.market, "caught_up", counted_catch_up)
    monkeypatch.setattr(engine.market, "stored_versions", counted_versions)
    again = engine.commands.submit_many([submit_request(b, hold) for b in everyone])
    assert all(isinstance(o, Submitted) for o in again), again
    assert [sorted(c) for c in checked] == [sorted(everyone)]
    assert caught_up == [topped_up]
    assert engine.account(topped_up).held == 2 * hold


def test_a_deposit_retried_with_its_id_is_credited_once(engine: InProcessEngine) -> None:
    buyer = engine.buyer(deposit=1)
    written = engine.commands.deposit(buyer, 1_000_000, "wire-001")
    assert written.position > 0
    # The retry writes nothing: nothing to wait for.
    assert engine.commands.deposit(buyer, 1_000_000, "wire-001").position == 0
    assert other_process(engine).deposit(buyer, 1_000_000, "wire-001").position == 0
    with pytest.raises(DepositConflict):
        engine.commands.deposit(buyer, 2_000_000, "wire-001")
    engine.commands.deposit(buyer, 2_000_000, "wire-002")
    assert engine.account(buyer).deposited == 1 + 3_000_000


# --------------------------------------------------------------------------- offer health


async def test_a_failed_quote_backs_the_offer_off_and_a_refused_key_switches_it_off(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    flaky = engine.offer("key-a", "0.70")
    revoked = engine.offer("key-b", "0.75")
    fine = engine.offer("key-c", "0.80")
    engine.provider.script("quote", "key-a", QuoteFailed(503, "busy"))
    engine.provider.script("quote", "key-b", QuoteFailed(401, "bad key"))

    job_id = await engine.submit(buyer)
    # Passive health is reported off the submit's path; wait for both reports.
    await engine.until(
        lambda: (
            engine.offer_state(flaky).failures == 1 and engine.offer_state(revoked).failures == 1
        )
    )

    # The submit itself went to the offer that could quote.
    assert engine.job(job_id).route[0]["offer_id"] == str(fine)
    assert engine.job(job_id).estimated_cost == charged_for(LIST_PRICE, "0.80")[0]
    assert engine.offer_state(flaky).deactivated_reason is None
    assert engine.offer_state(flaky).backoff_until > engine.clock()
    assert "401" in (engine.offer_state(revoked).deactivated_reason or "")
    assert engine.offer_state(fine).failures == 0
    skipped = {s["offer_id"]: s["reason"] for s in engine.job(job_id).routing["skipped"]}
    assert skipped == {str(flaky): "quote_failed", str(revoked): "quote_failed"}


async def test_a_quote_refused_for_the_request_does_not_count_against_the_offer(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    picky = engine.offer("key-a", "0.70")
    engine.offer("key-b", "0.80")
    engine.provider.script("quote", "key-a", QuoteFailed(400, "invalid request"))

    await engine.submit(buyer)
    await engine.drain()

    assert engine.offer_state(picky).failures == 0


async def test_a_switched_off_offer_stays_off_until_the_seller_gives_a_new_key(
    engine: InProcessEngine,
) -> None:
    buyer = engine.buyer()
    seller = engine.seller()
    offer = engine.offer("key-a", seller_id=seller)
    engine.provider.script("queue", "key-a", ProviderRefused(401, "bad key"))
    job_id = await engine.submit(buyer)
    await engine.drive(job_id)
    assert engine.job(job_id).status == "failed"
    assert engine.offer_state(offer).deactivated_reason is not None

    # Pausing and resuming is not a new key: it stays switched off.
    for paused, state in ((True, "paused"), (False, "deactivated")):
        engine.commands.update_offer(seller, offer, {"paused": paused})
        assert engine.views.offer(str(offer)).state == state

    engine.commands.update_offer(seller, offer, {"api_key": "key-a2"})
    healed = engine.offer_state(offer)
    assert healed.deactivated_reason is None and healed.failures == 0
    assert engine.views.offer(str(offer)).state == "active"
    # The new key is the one the next job is sent with.
    again = await engine.submit(buyer)
    await engine.drive(again)
    assert engine.job(again).status == "succeeded"
    assert engine.provider.billed("key-a2") == 1
    engine.assert_money_invariants(buyer)
