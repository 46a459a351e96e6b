"""The composition root: settings in, a running engine out. Adapters are chosen here, once."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import os
import random
import secrets as pysecrets
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import psycopg
import structlog
from eventsourcing.persistence import InterfaceError, OperationalError

from adapters.artifacts import ArtifactStore, LocalArtifactStore, S3ArtifactStore, parse_s3_store
from adapters.crypto import SecretError, Secrets
from adapters.eventstore import Connections, MarketApp, open_market, probe, store_env
from adapters.logs import mask_in_logs
from adapters.outbound import Outbound, OutboundPolicy, parse_allowed_hosts
from adapters.settings import ConfigError, Settings
from adapters.venice import ProviderError, parse_venice_models
from api.batching import Batches
from api.jobcache import JobCache
from api.metrics import Metrics
from api.routingcache import RoutingCache
from api.stream import JobWatchers
from domain.catalog import Catalog
from domain.money import FeeSchedule, MoneyError
from projections.jobviews import JobRow, job_versions
from projections.runner import ProjectionRunner
from projections.views import VIEWS_NAME, RoutingInputs, Views, open_views
from projections.work import JOB, WorkStore, open_work
from projections.work import NAME as WORK_NAME
from services.commands import Commands, Submitted
from services.commands.submit import SubmitRequest
from services.market import Market
from services.rebuild import rebuild_live
from services.routing import OfferHealth, Providers, Router
from services.webhooks import WebhookCommands, WebhookSender
from services.worker import Worker

log = structlog.get_logger("engine")
T = TypeVar("T")
PROVIDERS = ("venice",)
# Waits between tries to reach an unreachable database: doubling, with jitter so processes
# restarted together don't knock in step, up to this.
MAX_RETRY_SECONDS = 30.0
# How long /healthz waits for the database before it says it is unreachable.
HEALTH_PROBE_SECONDS = 2.0
# Finished jobs are polled, and submits routed, from the process's caches (api/jobcache.py,
# api/routingcache.py) only while its projection runner looked at the views this recently (it
# looks every 50 ms): how stale a change another process made can be here, at worst, when this
# runner stalls.
CACHE_FRESH_SECONDS = 0.5
# Submits saved in one transaction at most: a batch holds the event store's write lock (and
# each of its buyers' locks) while it is decided and saved, so one too big would make the
# writers of other threads (the worker, another batch) wait for all of it.
MAX_SUBMIT_BATCH = 64
# The errors of a PostgreSQL server that is down, restarting or out of connections.
UNREACHABLE = (OperationalError, InterfaceError, psycopg.OperationalError)


class Blocking:
    """The process's one bounded thread pool for every eventsourcing and view call: the library
    has no asyncio API, and the bound keeps its connection pool from being outrun."""

    def __init__(self, max_workers: int = 16) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="es")

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _persisted_secret(path: Path, make: str) -> str:
    """Embedded mode keeps a generated secret next to its data so restarts can read old data."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(make)
    return make


def resolve_secrets(settings: Settings) -> tuple[Secrets, str]:
    """The master key and the admin token: from the environment, or generated (embedded only)."""
    master = settings.MEDIAMARKET_SECRET_KEY
    admin = settings.MEDIAMARKET_ADMIN_TOKEN
    if not settings.is_sqlite and (not master or not admin):
        raise ConfigError(
            "MEDIAMARKET_SECRET_KEY and MEDIAMARKET_ADMIN_TOKEN must be set with PostgreSQL"
        )
    if not master:
        master = _persisted_secret(settings.data_dir / "secret.key", Secrets.generate_master_key())
    if not admin:
        admin = _persisted_secret(
            settings.data_dir / "admin.token", "mm_admin_" + pysecrets.token_urlsafe(24)
        )
    mask_in_logs(admin, master)
    try:
        return Secrets(master), admin
    except SecretError as e:
        raise ConfigError(str(e)) from None


def open_stores(database_url: str, connections: Connections) -> tuple[MarketApp, Views, bool]:
    """The market and its views, in one connection pool on PostgreSQL (SPEC 8: a bounded
    number of connections per process); and whether the views must be rebuilt beside the
    ones being served (built by a release of another schema)."""
    probe(database_url)
    market = open_market(database_url, connections)
    try:
        env = store_env(database_url, role=VIEWS_NAME, connections=connections)
        shared = None if env["PERSISTENCE_MODULE"] == "eventsourcing.sqlite" else market.datastore
        views = open_views(env, shared)
        built = views.built_version()
        if built is None:
            # Never built here: nobody serves them, so they are built in place.
            views.ensure_schema(market.name)
        return market, views, built is not None and built != views.schema_version
    except BaseException:
        market.close()
        raise


def embedded_sim_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.PORT}/sim/api/v1"


def outbound_policy(settings: Settings, provider_base_url: str) -> OutboundPolicy:
    """SPEC 9. The provider URL the operator configured (or the embedded simulator, which is
    this process) is trusted as given, with the links its answers point under it; everything
    a seller, buyer or provider's answer supplies is held to the policy."""
    try:
        return OutboundPolicy(
            allow_private=settings.OUTBOUND_ALLOW_PRIVATE,
            trusted_prefixes=(provider_base_url.rstrip("/") + "/",),
            allowed_hosts={"venice": parse_allowed_hosts(settings.PROVIDER_ALLOWED_HOSTS_VENICE)},
        )
    except ValueError as e:
        raise ConfigError(f"invalid configuration: PROVIDER_BASE_URL_VENICE: {e}") from None


async def open_artifact_store(settings: Settings) -> ArtifactStore:
    """The one artifact store of this process (SPEC 7), from ``ARTIFACT_STORE``."""
    if not settings.is_s3:
        return LocalArtifactStore(settings.artifact_dir)
    bucket, prefix = parse_s3_store(settings.ARTIFACT_STORE)
    return await S3ArtifactStore(
        bucket,
        prefix,
        settings.data_dir / "incoming",
        endpoint_url=settings.S3_ENDPOINT_URL,
        region=settings.AWS_REGION,
        access_key_id=settings.AWS_ACCESS_KEY_ID,
        secret_access_key=settings.AWS_SECRET_ACCESS_KEY,
    ).open()


@dataclass
class Engine:
    settings: Settings
    secrets: Secrets
    admin_token: str
    market: MarketApp
    views: Views
    runner: ProjectionRunner
    blocking: Blocking
    commands: Commands
    outbound: Outbound
    providers: Providers
    router: Router
    store: ArtifactStore
    fees: FeeSchedule
    connections: Connections
    metrics: Metrics = field(default_factory=Metrics)
    # (pending, claimed) jobs for /metrics, blocking; None reads as (0, 0).
    catalog: Catalog | None = None
    worker: Worker | None = None
    worker_task: asyncio.Task[None] | None = None
    # The work queue and its own runner: opened by the first worker of the process.
    work: WorkStore | None = None
    work_runner: ProjectionRunner | None = None
    _work_lock: threading.Lock = field(default_factory=threading.Lock)
    webhooks: WebhookCommands = field(init=False)
    webhook_sender: WebhookSender | None = None
    webhook_task: asyncio.Task[None] | None = None
    base_urls: dict[str, str] = field(default_factory=dict)
    market_data: Market = field(init=False)
    watchers: JobWatchers = field(init=False)
    # Submits to the thread pool (``SubmitCommands.submit_many``), the routing reads before
    # them and the read-your-writes answers after them, each in batches (api/batching.py).
    submits: Batches[SubmitRequest, Submitted] = field(init=False)
    _routing_reads: Batches[tuple[str, str], RoutingInputs] = field(init=False)
    _rows_after: Batches[tuple[str, int, float], JobRow | None] = field(init=False)
    job_cache: JobCache = field(default_factory=JobCache)
    routing_cache: RoutingCache = field(default_factory=RoutingCache)
    _waiters: list[tuple[int, int, asyncio.Future[None]]] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None

    def __post_init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.market_data = Market(self.read, self.views, self.router)
        self.webhooks = WebhookCommands(self.market, self.secrets)
        self.submits = Batches(
            partial(self.blocking, self.commands.submit_many), max_batch=MAX_SUBMIT_BATCH
        )
        self._routing_reads = Batches(self._read_routing_inputs)
        self._rows_after = Batches(self._read_rows)
        self.views.bind_inline_reader()
        self.runner.on_passed.append(self.job_cache.passed)
        self.runner.on_passed_elsewhere.append(self.job_cache.forget_changed)
        self.runner.on_passed.append(self.routing_cache.passed)
        self.runner.on_topics_elsewhere.append(self.routing_cache.passed_elsewhere)
        self.runner.on_advance.append(self._runner_advanced)
        self.watchers = JobWatchers(self._loop, self._job_versions)
        self.runner.on_advance.append(self.watchers.advanced)

    async def _job_versions(self, job_ids: Sequence[str]) -> dict[str, int]:
        return await self.read(job_versions, self.views, job_ids)

    async def database_problem(self) -> str | None:
        """Why the database can't be used now (None when it can): one cheap read, bounded."""
        try:
            await asyncio.wait_for(
                self.blocking(self.views.position, self.market.name), HEALTH_PROBE_SECONDS
            )
        except TimeoutError:
            return f"the database did not answer within {HEALTH_PROBE_SECONDS:g} s"
        except UNREACHABLE as e:
            return f"the database is unreachable: {e}"
        return None

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """A view query: inline where the view store makes that cheap, else in the pool."""
        if self.views.inline_reads:
            return fn(*args, **kwargs)
        return await self.blocking(fn, *args, **kwargs)

    async def job_row(self, job_id: str) -> JobRow | None:
        """A job's view for a poll: a finished job's from ``job_cache`` while this process's
        runner keeps up with the views (see api/jobcache.py), else from the database."""
        cache = self.job_cache
        if self._caches_fresh():
            row = cache.get(job_id)
            if row is not None:
                return row
        cache.begin(job_id)
        row = None
        try:
            row = await self.read(self.views.get_job, job_id)
        finally:
            cache.end(job_id, row)
        return row

    def _caches_fresh(self) -> bool:
        """Whether the process's caches may be served: the runner, which empties them, has
        looked at the views within ``CACHE_FRESH_SECONDS``."""
        return time.monotonic() - self.runner.fresh_at < CACHE_FRESH_SECONDS

    async def routing_inputs(self, model: str, buyer_id: str) -> RoutingInputs:
        """The model's order book and the buyer's own keys for it: kept in the process
        (api/routingcache.py), else read with those of the submits that arrive meanwhile (on
        PostgreSQL a read was a pool hand-off and two queries per submit, a tenth of its CPU)."""
        cache = self.routing_cache
        if self._caches_fresh():
            found = cache.get(model, buyer_id)
            if found is not None:
                return found
        generation = cache.generation
        inputs = await self._routing_reads((model, buyer_id))
        cache.put(generation, model, buyer_id, inputs)
        return inputs

    async def _read_routing_inputs(self, wanted: Sequence[tuple[str, str]]) -> list[RoutingInputs]:
        return await self.read(self.views.routing_inputs, wanted)

    async def job_row_after(self, job_id: str, position: int, wait_seconds: float) -> JobRow | None:
        """A job's view once the views include ``position`` (read-your-writes); None when it
        is not there within ``wait_seconds``. Asked for together (the answers of submits saved
        in one batch), the views are waited for once and read in one query, not one each (on
        PostgreSQL, one hand-off to the thread pool each)."""
        return await self._rows_after((job_id, position, wait_seconds))

    async def _read_rows(self, wanted: Sequence[tuple[str, int, float]]) -> list[JobRow | None]:
        rows: dict[str, JobRow] = {}
        if await self.caught_up(max(p for _, p, _ in wanted), max(w for _, _, w in wanted)):
            rows = await self.read(self.views.get_jobs, [j for j, _, _ in wanted])
        return [rows.get(j) for j, _, _ in wanted]

    def _runner_advanced(self, position: int) -> None:
        # Called from the runner's thread; only bother the loop when someone is waiting.
        if self._waiters and self._loop is not None:
            self._loop.call_soon_threadsafe(self._release_waiters, position)

    def _release_waiters(self, position: int) -> None:
        while self._waiters and self._waiters[0][0] <= position:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)

    async def caught_up(self, position: int, wait_seconds: float) -> bool:
        """Wait, without holding a thread, until the views include ``position``."""
        if self.runner.position >= position:
            return True
        if self.runner.failure is not None:
            # This process's views stopped at an event they could not apply (see /healthz):
            # waiting could not help; another process's views may still hold the write.
            return await self.blocking(self.runner.wait_for, position, 0.0)
        assert self._loop is not None
        future: asyncio.Future[None] = self._loop.create_future()
        heapq.heappush(self._waiters, (position, id(future), future))
        self.runner.wake()
        if self.runner.position >= position:  # it may have advanced before we registered
            self._release_waiters(self.runner.position)
        try:
            await asyncio.wait_for(future, wait_seconds)
            return True
        except TimeoutError:
            # Maybe another process's runner applied it: ask the database once.
            return await self.blocking(self.runner.wait_for, position, 0.0)

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        role: str,
        sim_url: str | None = None,
        tool: bool = False,
        wait_seconds: float | None = None,
        on_state: Callable[[str], None] | None = None,
    ) -> Engine:
        """The engine of a process in ``role`` (``serve``, ``api``, ``worker``, or a CLI
        command: ``tool``, which needs two connections at most).

        Waits for an unreachable database, trying again with backoff and logging each try
        (forever, or ``wait_seconds``), instead of exiting: SPEC 8."""
        secrets, admin_token = resolve_secrets(settings)
        try:
            fees = FeeSchedule(settings.FEE_MULTIPLIER_BPS, settings.FLAT_FEE_USDC)
        except MoneyError as e:
            raise ConfigError(str(e)) from None
        pool_size = min(2, settings.DATABASE_POOL_SIZE) if tool else settings.DATABASE_POOL_SIZE
        # Threads beyond the pool's connections would only queue for one (PostgreSQL); SQLite
        # files have no pool to outrun.
        blocking = Blocking(max_workers=16 if settings.is_sqlite else pool_size + 2)
        connections = Connections(
            pool_size=pool_size,
            application_name=f"mediamarket-{role}-{os.getpid()}",
            prepared_statements=settings.DATABASE_PREPARED_STATEMENTS,
        )
        deadline = None if wait_seconds is None else time.monotonic() + wait_seconds
        tries = 0
        while True:
            tries += 1
            try:
                market, views, outdated = await blocking(
                    open_stores, settings.DATABASE_URL, connections
                )
                break
            except UNREACHABLE as e:
                delay = min(MAX_RETRY_SECONDS, 0.5 * 2 ** min(tries, 10)) * random.uniform(0.8, 1.2)
                # A SQLite file that can't be opened is a setting to fix, not a server to await.
                if settings.is_sqlite or (
                    deadline is not None and time.monotonic() + delay > deadline
                ):
                    blocking.shutdown()
                    raise ConfigError(f"cannot reach the database at DATABASE_URL: {e}") from None
                log.warning(
                    "database_unreachable", attempt=tries, retry_in=round(delay, 1), error=str(e)
                )
                if on_state is not None:
                    on_state(f"waiting for the database (try {tries}): {e}")
                await asyncio.sleep(delay)
            except Exception as e:
                blocking.shutdown()
                raise ConfigError(f"cannot open the database at DATABASE_URL: {e}") from None
        if tries > 1:
            log.info("database_reached", attempts=tries)
        if outdated:
            # Built beside the tables other processes (of the old version) still serve, and
            # switched in at once; this process serves nothing until then (see Startup).
            log.info("views_rebuilding_for_new_schema")
            if on_state is not None:
                on_state("rebuilding the views for a new schema")
            views_env = store_env(settings.DATABASE_URL, role=VIEWS_NAME, connections=connections)
            try:
                await blocking(rebuild_live, market, views, views_env, only_if_outdated=True)
            except BaseException:
                blocking.shutdown()
                market.close()
                raise
        runner = ProjectionRunner(market, views)
        metrics = Metrics()
        runner.on_applied.append(partial(metrics.count_outcomes, views))
        market.on_recorded.append(runner.reader.remember)
        market.on_saved.append(runner.wake)
        runner.start()
        base_url = settings.PROVIDER_BASE_URL_VENICE or sim_url or embedded_sim_url(settings)
        outbound = Outbound(outbound_policy(settings, base_url))
        providers = Providers(
            outbound,
            {"venice": base_url},
            quote_timeout=settings.PROVIDER_QUOTE_TIMEOUT_SECONDS,
            queue_timeout=settings.PROVIDER_QUEUE_TIMEOUT_SECONDS,
            on_error=metrics.provider_error,
        )
        commands = Commands(market, secrets)
        health = OfferHealth(commands, blocking)
        router = Router(providers, fees, commands.open_key, on_quote_failed=health.quote_failed)
        store = await open_artifact_store(settings)
        return cls(
            settings=settings,
            secrets=secrets,
            admin_token=admin_token,
            market=market,
            views=views,
            runner=runner,
            blocking=blocking,
            commands=commands,
            outbound=outbound,
            providers=providers,
            router=router,
            store=store,
            fees=fees,
            connections=connections,
            metrics=metrics,
            base_urls={"venice": base_url},
        )

    async def load_catalog(self, attempts: int = 20) -> Catalog:
        """Learn the models from each provider's ``/models`` (SPEC 5.1)."""
        client = self.providers.client("venice", None)
        for n in range(attempts):
            try:
                models = parse_venice_models("venice", await client.list_models())
                self.catalog = Catalog(models)
                log.info("catalog_loaded", models=len(models))
                return self.catalog
            except (ProviderError, aiohttp.ClientError, OSError) as e:
                log.warning("catalog_unavailable", attempt=n + 1, error=str(e))
                await asyncio.sleep(min(0.2 * 2**n, 5.0))
        raise ConfigError(f"cannot load the model catalog from {self.base_urls['venice']}")

    async def open_work(self) -> WorkStore:
        """The work queue (SPEC 8: claimed by every worker of every process), kept up to date
        by a runner of its own in this process."""
        if self.work_runner is None:
            if self.work is None:
                env, shared = self.store_env(WORK_NAME), self._shared_datastore()

                def open_it() -> None:
                    with self._work_lock:
                        if self.work is None:
                            work = open_work(env, shared)
                            work.ensure_schema(self.market.name)
                            self.work = work

                await self.blocking(open_it)
            assert self.work is not None
            self.work_runner = ProjectionRunner(self.market, self.work)
            self.market.on_recorded.append(self.work_runner.reader.remember)
            self.market.on_saved.append(self.work_runner.wake)
            self.work_runner.start()
        assert self.work is not None
        return self.work

    def _wake_on_work(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` on the event loop whenever the work queue takes in new work."""
        assert self.work_runner is not None
        loop = asyncio.get_running_loop()

        def advanced(_: int) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
                loop.call_soon_threadsafe(wake)

        self.work_runner.on_advance.append(advanced)

    async def start_worker(self, worker_id: str) -> Worker:
        work = await self.open_work()
        worker = Worker(
            commands=self.commands,
            views=self.views,
            work=work,
            router=self.router,
            store=self.store,
            blocking=self.blocking,
            worker_id=worker_id,
            artifact_ttl_seconds=self.settings.MEDIA_ARTIFACT_TTL_SECONDS,
            concurrency=self.settings.WORKER_CONCURRENCY,
        )
        self._wake_on_work(worker.wake)
        self.worker = worker
        self.worker_task = asyncio.create_task(worker.run())
        self._start_webhook_sender(worker_id, work)
        return worker

    def _start_webhook_sender(self, worker_id: str, work: WorkStore) -> None:
        """SPEC 8: webhook retries run in every process that has a worker."""
        sender = WebhookSender(
            commands=self.webhooks,
            views=self.views,
            work=work,
            outbound=self.outbound,
            blocking=self.blocking,
            worker_id=worker_id,
            schedule=self.settings.webhook_schedule,
        )
        self._wake_on_work(sender.wake)
        self.webhook_sender = sender
        self.webhook_task = asyncio.create_task(sender.run())

    def work_counts(self) -> tuple[int, int]:
        """Blocking: jobs due and waiting for a worker, and jobs a worker holds, across the
        deployment (the work queue's store is opened for it in a process without a worker)."""
        with self._work_lock:
            if self.work is None:
                work = open_work(self.store_env(WORK_NAME), self._shared_datastore())
                work.ensure_schema(self.market.name)
                self.work = work
        return self.work.counts(time.time())[JOB]

    def _shared_datastore(self) -> Any:
        return None if self.settings.is_sqlite else self.market.datastore

    def store_env(self, role: str) -> dict[str, str]:
        """The environment of this process's store for ``role`` (a scratch store is opened
        beside it for rebuilds and replays)."""
        return store_env(self.settings.DATABASE_URL, role=role, connections=self.connections)

    async def close(self) -> None:
        self.watchers.close()
        if self.webhook_sender is not None:
            await self.webhook_sender.stop()
        if self.webhook_task is not None:
            self.webhook_task.cancel()
            await asyncio.gather(self.webhook_task, return_exceptions=True)
        if self.worker is not None:
            await self.worker.stop()
        if self.worker_task is not None:
            self.worker_task.cancel()
            await asyncio.gather(self.worker_task, return_exceptions=True)
        await self.outbound.close()
        await self.store.close()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.runner.stop)
        if self.work_runner is not None:
            await loop.run_in_executor(None, self.work_runner.stop)
        self.blocking.shutdown()
        self.market.close()
        self.views.datastore.close()
        if self.work is not None:
            self.work.datastore.close()
