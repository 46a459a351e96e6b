"""The engine in one process, for tests of the worker and the commands without real processes.

Everything is real except the provider and the clock: the event store, the views and their
projection (SQLite in a temporary directory), the command service, the router and the artifact
store. The provider is ``FakeProvider``, a scriptable stand-in for ``adapters.venice.VeniceClient``
that records every call; the clock is ``FakeClock``, moved only by the test.

What a test needs to synchronise on is an event, never a sleep: the provider's answers can be
callables that run at the exact moment of the call (a cancel during the queue call), ``Gate``
holds a call open until the test releases it, and ``InProcessEngine.until`` waits for a save.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache, partial
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.persistence import Recording

from adapters.artifacts import LocalArtifactStore
from adapters.crypto import Secrets
from adapters.eventstore import MarketApp, open_market, store_env
from adapters.media import render_mp4
from adapters.venice import Completed, ProviderLost, Queued, VideoParams
from api.validation import validate_video_request
from domain.aggregates import BuyerAccount, Job, Offer, Settlement, settlement_id
from domain.money import FeeSchedule, price_offer
from projections.runner import ProjectionRunner
from projections.views import VIEWS_NAME, Views, open_views
from projections.work import NAME as WORK_NAME
from projections.work import open_work
from services.commands import Commands, Submitted
from services.routing import OfferHealth, Providers, Router
from services.worker import Worker
from tests.test_ledger import CATALOG

T = TypeVar("T")

SEEDANCE = "venice-seedance-2-fast-t2v"
# The simulator's list price of seedance's default request (4 s at 480p), as the real tests use.
LIST_PRICE = 160_000
BASE_URL = "http://provider.invalid/api/v1"
# A fee with both parts, so that what the buyer pays and what the seller earns differ.
FEES = FeeSchedule(multiplier_bps=10_500, flat_usdc=1_000)
DEPOSIT = 10_000_000
TTL_SECONDS = 1800
# Any wall-clock instant will do; a round one makes expiry arithmetic easy to read.
EPOCH = 1_700_000_000.0
# A drive or a wait that never ends fails its test instead of hanging the suite; each takes a
# fraction of a second here, since the worker's waits cost no time.
HANG_GUARD_SECONDS = 30.0


@cache
def video_bytes() -> bytes:
    """A real MP4 of the default request's size, rendered once per test session."""
    return render_mp4(854, 480, 4)


class FakeClock:
    """The wall clock of commands, worker and router, and the router's quote-cache clock."""

    def __init__(self, now: float = EPOCH) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --------------------------------------------------------------------------- the provider


@dataclass(frozen=True)
class Call:
    method: str
    # The API key the call was made with; for ``download`` and ``revoke_download``, the URL.
    key: str
    args: tuple[Any, ...]


class _Default:
    """An answer that means "what the provider does unless scripted otherwise"."""


DEFAULT = _Default()
# A scripted answer: a value to return, an exception to raise, or a callable of the ``Call``
# (plain or async) that returns either, or raises, or returns ``DEFAULT``.
Answer = Any


class Gate:
    """An answer that holds its call open until ``release()``: ``entered`` is set once the call
    is under way, so a test can act while the provider "thinks"."""

    def __init__(self, then: Answer = DEFAULT) -> None:
        self.entered = asyncio.Event()
        self._released = asyncio.Event()
        self.then = then

    def release(self) -> None:
        self._released.set()

    async def __call__(self, call: Call) -> Any:
        self.entered.set()
        await self._released.wait()
        return self.then


def write_video(data: bytes) -> Callable[[Call], Completed]:
    """A retrieve (or download) answer that delivers ``data`` as the finished video."""

    def answer(call: Call) -> Completed:
        dest: Path = call.args[-1]
        dest.write_bytes(data)
        return Completed(path=dest, bytes=len(data))

    return answer


class FakeProvider:
    """A provider behind the ``VeniceClient`` interface. Unscripted, it behaves like the
    simulator's ``sim_ok`` key: quotes ``LIST_PRICE``, accepts every job, and delivers a real
    MP4 on the first retrieve. ``script`` queues other answers per method and key."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.list_prices: dict[str, int] = {}
        # What the provider accepted (and so billed): queue id -> the API key billed.
        self.accepted: dict[str, str] = {}
        # Queue ids whose copy the engine asked the provider to delete.
        self.deleted: list[str] = []
        self._scripts: dict[tuple[str, str | None], deque[Answer]] = defaultdict(deque)

    def script(self, method: str, key: str | None, *answers: Answer) -> None:
        """The next answers of ``method`` for ``key`` (None: for any key), in order; once they
        are used up the provider answers as it does unscripted."""
        self._scripts[(method, key)].extend(answers)

    def called(self, method: str, key: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.method == method and key in (None, c.key)]

    def billed(self, key: str) -> int:
        """How many jobs the provider accepted (and billed) on ``key``."""
        return sum(k == key for k in self.accepted.values())

    async def _answer(self, call: Call, default: Callable[[], Any]) -> Any:
        self.calls.append(call)
        for scripted in (
            self._scripts.get((call.method, call.key)),
            self._scripts.get((call.method, None)),
        ):
            if scripted:
                answer = scripted.popleft()
                break
        else:
            answer = DEFAULT
        while True:
            if isinstance(answer, BaseException):
                raise answer
            if isinstance(answer, _Default):
                return default()
            if not callable(answer) or isinstance(answer, type):
                return answer
            answer = answer(call)
            if inspect.isawaitable(answer):
                answer = await answer

    # The VeniceClient interface, as the router and the worker call it.

    async def quote(self, api_key: str, params: VideoParams) -> int:
        return await self._answer(
            Call("quote", api_key, (params,)), lambda: self.list_prices.get(api_key, LIST_PRICE)
        )

    async def check_key(self, api_key: str, model: str) -> None:
        await self._answer(Call("check_key", api_key, (model,)), lambda: None)

    async def queue(
        self, api_key: str, params: VideoParams, prompt: str, image_url: str | None
    ) -> Queued:
        def accept() -> Queued:
            queue_id = f"q-{len(self.accepted) + 1}"
            self.accepted[queue_id] = api_key
            return Queued(queue_id)

        answer = await self._answer(Call("queue", api_key, (params, prompt, image_url)), accept)
        if isinstance(answer, Queued) and answer.queue_id not in self.accepted:
            # A scripted acceptance is still an acceptance: the provider billed the key.
            self.accepted[answer.queue_id] = api_key
        return answer

    async def retrieve(self, api_key: str, model: str, queue_id: str, dest: Path) -> Any:
        call = Call("retrieve", api_key, (model, queue_id, dest))

        def deliver() -> Completed:
            if queue_id not in self.accepted:
                raise ProviderLost(404, "the provider has no such job")
            return write_video(video_bytes())(call)

        return await self._answer(call, deliver)

    async def download(self, url: str, dest: Path) -> Completed:
        call = Call("download", url, (dest,))
        return await self._answer(call, lambda: write_video(video_bytes())(call))

    async def revoke_download(self, url: str) -> None:
        await self._answer(Call("revoke_download", url, ()), lambda: None)

    async def complete(self, api_key: str, model: str, queue_id: str) -> None:
        await self._answer(
            Call("complete", api_key, (model, queue_id)), lambda: self.deleted.append(queue_id)
        )


class FakeProviders(Providers):
    """The real ``Providers`` (its quote cache and sharing included) with every base URL
    answered by one ``FakeProvider``."""

    def __init__(self, provider: FakeProvider, clock: Callable[[], float]) -> None:
        super().__init__(
            None,  # type: ignore[arg-type]  # no HTTP: the fake is the client
            {"venice": BASE_URL},
            quote_timeout=1.0,
            queue_timeout=1.0,
            clock=clock,
        )
        self.fake = provider

    def client(self, provider: str, base_url: str | None) -> Any:
        return self.fake


# --------------------------------------------------------------------------- the engine


class OneThread:
    """The ``blocking`` callable: like the composition root's pool, off the event loop, but with
    one thread, so the order of commands is the order the loop asked for them."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="es-test")

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, partial(fn, *args, **kwargs))


class FreshViews:
    """The views, caught up with the log before every read: the worker then always sees what
    the commands wrote, so a test never waits for the projection."""

    def __init__(self, views: Views, catch_up: Callable[[], object]) -> None:
        self._views = views
        self._catch_up = catch_up

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._views, name)
        if not callable(attr):
            return attr

        def read(*args: Any, **kwargs: Any) -> Any:
            self._catch_up()
            return attr(*args, **kwargs)

        return read


class WorkerAsyncio:
    """Stands in for the ``asyncio`` module inside ``services.worker``: the worker's waits
    between polls are recorded in ``delays`` and cost no time; everything else is asyncio."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    async def sleep(self, delay: float, result: Any = None) -> Any:
        self.delays.append(delay)
        await asyncio.sleep(0)
        return result


def skip_worker_waits(monkeypatch: Any) -> WorkerAsyncio:
    """Patch ``services.worker``'s view of asyncio (only that module's) for the test."""
    import services.worker

    fake = WorkerAsyncio()
    monkeypatch.setattr(services.worker, "asyncio", fake)
    return fake


def _typed(value: Any) -> Any:
    """``value`` with the type of every part spelled out, so a list and a tuple, or a key 1
    and a key "1", compare unequal."""
    if isinstance(value, dict):
        return ("dict", {_typed(k): _typed(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_typed(v) for v in value])
    return (type(value).__name__, value)


def assert_read_back_the_same(mapper: Any, recordings: Sequence[Recording[UUID]]) -> None:
    """Each event as the log gives it back (the library's mapper both ways) is the event the
    process saved, to the type of each value: what ``LogReader.remember`` relies on."""
    for recording in recordings:
        event = recording.domain_event
        back = mapper.to_domain_event(mapper.to_stored_event(event))
        assert type(back) is type(event), (type(back), type(event))
        assert _typed(vars(back)) == _typed(vars(event)), (vars(back), vars(event))


@dataclass
class Saved:
    """One save: the events it wrote, as (aggregate id, event class name)."""

    events: list[tuple[UUID, str]]

    def names(self, aggregate_id: UUID | None = None) -> list[str]:
        return [n for a, n in self.events if aggregate_id in (None, a)]


@dataclass(eq=False)
class _Waiter:
    predicate: Callable[[], bool]
    future: asyncio.Future[None]
    loop: asyncio.AbstractEventLoop


@dataclass
class InProcessEngine:
    directory: Path
    # SQLite in ``directory`` unless given (a PostgreSQL database, say).
    database_url: str | None = None
    clock: FakeClock = field(default_factory=FakeClock)
    fees: FeeSchedule = FEES

    def __post_init__(self) -> None:
        url = self.database_url or f"sqlite:///{self.directory}/data"
        self.market: MarketApp = open_market(url)
        self.saves: list[Saved] = []
        self._waiters: list[_Waiter] = []
        self._waiting = threading.Lock()
        self._record_saves()
        self.raw_views = open_views(store_env(url, role=VIEWS_NAME))
        self.raw_views.ensure_schema(self.market.name)
        self.runner = ProjectionRunner(self.market, self.raw_views)
        self.raw_work = open_work(store_env(url, role=WORK_NAME))
        self.raw_work.ensure_schema(self.market.name)
        self.work_runner = ProjectionRunner(self.market, self.raw_work)
        # As the composition root wires them: the runners take this process's saves from
        # memory, and every event saved must read back from the log as the same event (or a
        # fold would see one thing live and another in a replay).
        self.market.on_recorded.append(partial(assert_read_back_the_same, self.market.mapper))
        self.market.on_recorded.append(self.runner.reader.remember)
        self.market.on_recorded.append(self.work_runner.reader.remember)
        self._projecting = threading.Lock()
        self.views: Any = FreshViews(self.raw_views, self.project)
        self.work: Any = FreshViews(self.raw_work, self.project)
        self.secrets = Secrets("k" * 32)
        self.commands = Commands(self.market, self.secrets, clock=self.clock)
        self.blocking = OneThread()
        self.provider = FakeProvider()
        self.providers = FakeProviders(self.provider, self.clock)
        self.health = OfferHealth(self.commands, self.blocking, clock=self.clock)
        self.router = Router(
            self.providers,
            self.fees,
            self.commands.open_key,
            wall_clock=self.clock,
            on_quote_failed=self.health.quote_failed,
        )
        self.store = LocalArtifactStore(self.directory / "artifacts")
        self.jobs: list[UUID] = []

    def _record_saves(self) -> None:
        original = self.market.save

        def save(*objs: Any, **kwargs: Any) -> Any:
            recordings = original(*objs, **kwargs)
            self.saves.append(
                Saved(
                    [
                        (r.domain_event.originator_id, type(r.domain_event).__qualname__)
                        for r in recordings
                    ]
                )
            )
            ready: list[_Waiter] = []
            with self._waiting:
                waiting = []
                for waiter in self._waiters:
                    (ready if waiter.predicate() else waiting).append(waiter)
                self._waiters = waiting
            for waiter in ready:
                waiter.loop.call_soon_threadsafe(_resolve, waiter.future)
            return recordings

        self.market.save = save  # type: ignore[method-assign]

    async def until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate`` (checked after every save) holds."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(predicate, loop.create_future(), loop)
        # Checked and registered under the saves' lock, so no save can slip in between.
        with self._waiting:
            if predicate():
                return
            self._waiters.append(waiter)
        async with asyncio.timeout(HANG_GUARD_SECONDS):
            await waiter.future

    async def drain(self) -> None:
        """Return once everything already handed to the pool has run: its one thread runs
        calls in order (a health report made during a submit is saved before this returns)."""
        await self.blocking(lambda: None)

    def project(self) -> None:
        with self._projecting:
            self.runner.catch_up()
            self.work_runner.catch_up()

    def close(self) -> None:
        self.blocking.pool.shutdown(wait=True, cancel_futures=True)
        self.market.close()
        self.raw_views.datastore.close()
        self.raw_work.datastore.close()

    # ------------------------------------------------------------------ the worker

    def worker(self, worker_id: str = "worker-1", **options: Any) -> Worker:
        return Worker(
            commands=self.commands,
            views=self.views,
            work=self.work,
            router=self.router,
            store=self.store,
            blocking=self.blocking,
            worker_id=worker_id,
            artifact_ttl_seconds=3600,
            clock=self.clock,
            **options,
        )

    async def drive(self, job_id: UUID, worker: Worker | None = None) -> None:
        """One job driven by ``worker`` (a new one by default) as far as it goes."""
        async with asyncio.timeout(HANG_GUARD_SECONDS):
            await (worker or self.worker()).drive(job_id)

    @asynccontextmanager
    async def running(self, worker: Worker) -> Any:
        """The worker's own loop, woken by saves as the composition root wires it."""
        loop = asyncio.get_running_loop()

        def wake() -> None:
            loop.call_soon_threadsafe(worker.wake)

        self.market.on_saved.append(wake)
        task = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            await worker.stop()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self.market.on_saved.remove(wake)

    # ------------------------------------------------------------------ the market

    def buyer(self, deposit: int = DEPOSIT) -> UUID:
        buyer_id, _, _ = self.commands.create_buyer("buyer")
        self.commands.deposit(buyer_id, deposit)
        return buyer_id

    def seller(self) -> UUID:
        return self.commands.create_seller("seller")[0]

    def offer(
        self,
        api_key: str,
        multiplier: str = "0.80",
        *,
        seller_id: UUID | None = None,
        max_concurrent_jobs: int | None = None,
    ) -> UUID:
        offer_id, _ = self.commands.create_offer(
            seller_id=seller_id or self.seller(),
            model=SEEDANCE,
            provider="venice",
            base_url=None,
            api_key=api_key,
            cost_multiplier=multiplier,
            max_concurrent_jobs=max_concurrent_jobs,
        )
        return offer_id

    async def submit(self, buyer_id: UUID, **options: Any) -> UUID:
        return (await self.submit_for(buyer_id, **options)).job_id

    async def submit_for(
        self,
        buyer_id: UUID,
        *,
        min_discount: int | None = None,
        ttl_seconds: int = TTL_SECONDS,
        idempotency_key: str | None = None,
        **body: Any,
    ) -> Submitted:
        """A submit as the API makes it: route on live quotes, hold, save (SPEC 1, 3)."""
        request = validate_video_request(
            {"model": SEEDANCE, "prompt": "a cat", **body},
            CATALOG,
            allow_http_webhooks=False,
            allow_private_webhooks=False,
        )
        [(offers, own_keys)] = self.views.routing_inputs([(request.model.id, str(buyer_id))])
        route = await self.router.route(request, offers, min_discount, own_keys)
        submitted = await self.blocking(
            self.commands.submit,
            buyer_id=buyer_id,
            request=request,
            route=route.as_event_data(),
            routing=route.decision(),
            estimated_cost=route.best.price.buyer_cost,
            hold=route.hold(request.max_cost),
            ttl_seconds=ttl_seconds,
            min_discount=min_discount,
            idempotency_key=idempotency_key,
        )
        if submitted.job_id not in self.jobs:
            self.jobs.append(submitted.job_id)
        return submitted

    # ------------------------------------------------------------------ reading back

    def job(self, job_id: UUID) -> Job:
        return self.commands.job(job_id)

    def settlement(self, job_id: UUID) -> Settlement:
        settlement = self.market.repository.get(settlement_id(job_id))
        assert isinstance(settlement, Settlement)
        return settlement

    def offer_state(self, offer_id: UUID) -> Offer:
        offer = self.market.repository.get(offer_id)
        assert isinstance(offer, Offer)
        return offer

    def account(self, buyer_id: UUID) -> BuyerAccount:
        return self.commands.buyer(buyer_id)

    def doc(self, job_id: UUID) -> dict[str, Any]:
        """The job's poll document, as the API serves it from the views."""
        row = self.views.get_job(str(job_id))
        assert row is not None
        return dict(row.doc)

    def save_with(self, job_id: UUID, event_name: str) -> Saved:
        """The one save that wrote ``event_name`` for the job."""
        [saved] = [s for s in self.saves if event_name in s.names(job_id)]
        return saved

    def events(self, job_id: UUID) -> list[str]:
        return [n for s in self.saves for n in s.names(job_id)]

    def assert_money_invariants(self, buyer_id: UUID, deposited: int = DEPOSIT) -> None:
        """SPEC 1 over every job this engine submitted for the buyer, once all have ended: each
        hold resolved exactly once into charged + released, nothing charged beyond the hold or
        for an outcome that is not billed, the account's totals the sum of its settlements, and
        every offer's capacity given back."""
        account = self.account(buyer_id)
        spent = 0
        for job_id in self.jobs:
            job = self.job(job_id)
            if job.buyer_id != str(buyer_id):
                continue
            assert job.is_terminal, (job_id, job.status)
            settlement = self.settlement(job_id)
            assert settlement.resolved, job_id
            assert settlement.hold == job.max_cost
            assert settlement.charged + settlement.released == settlement.hold
            buyer_cost, seller_cost = job.charge
            assert settlement.charged == buyer_cost
            assert 0 <= seller_cost <= buyer_cost <= job.max_cost
            if buyer_cost:
                assert job.status in ("succeeded", "canceled"), job.status
                assert settlement.seller_cost == seller_cost
                assert settlement.platform_fee == buyer_cost - seller_cost
            usage = self.doc(job_id)["usage"]
            assert usage["buyer_cost_usdc"] == str(settlement.charged), usage
            assert usage["settlement_status"] == ("confirmed" if buyer_cost else "released")
            spent += settlement.charged
        assert account.held == 0 and account.holds == {}
        assert account.deposited == deposited
        assert account.spent == spent
        for offer in self.views.offers(model=SEEDANCE, include_deleted=True):
            assert self.offer_state(UUID(offer.offer_id)).in_flight == set(), offer.offer_id


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@asynccontextmanager
async def in_process_engine(directory: Path, database_url: str | None = None) -> Any:
    engine = InProcessEngine(directory, database_url)
    try:
        yield engine
    finally:
        engine.close()


def charged_for(list_price: int, multiplier: str, fees: FeeSchedule = FEES) -> tuple[int, int]:
    """(buyer cost, seller cost) of an offer at ``multiplier`` for ``list_price``."""
    price = price_offer(list_price, Fraction(multiplier), fees)
    return price.buyer_cost, price.seller_cost
