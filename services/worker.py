"""The worker: drives queued jobs through dispatch, polling, storage and settlement.

Every step is recorded before the next one starts, so a worker that dies anywhere can be replaced
by one that reads the job's events and carries on. The one unknowable step (a queue call sent
with no answer) is recorded as ``DispatchStarted`` without ``Dispatched`` and ends the job as
``upstream_unknown`` with nothing charged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from operator import methodcaller
from typing import Any, TypeVar
from uuid import UUID

import structlog

from adapters.artifacts import LocalArtifactStore
from adapters.media import MediaError, probe_mp4
from adapters.venice import (
    Completed,
    ProviderContentPolicy,
    ProviderError,
    ProviderInferenceFailed,
    ProviderLost,
    ProviderRefused,
    ProviderRejected,
    ProviderTransient,
    ProviderUnknown,
    VeniceClient,
)
from domain.aggregates import IllegalTransition, Job
from projections.views import OfferRow, Views
from services.commands import Commands
from services.routing import Router, is_available, video_params

log = structlog.get_logger("worker")
T = TypeVar("T")

LEASE_SECONDS = 60.0
# Refusals that say the seller's key itself is bad: the offer is switched off until a new key.
DEACTIVATING_STATUSES = frozenset({401, 403})


class Blocking:
    """The bounded thread pool for every eventsourcing and view call."""

    def __init__(self, max_workers: int = 16) -> None:
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="es")

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class Worker:
    def __init__(
        self,
        *,
        commands: Commands,
        views: Views,
        router: Router,
        store: LocalArtifactStore,
        blocking: Blocking,
        worker_id: str,
        artifact_ttl_seconds: int,
        concurrency: int = 64,
        poll_interval: float = 0.25,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.commands = commands
        self.views = views
        self.router = router
        self.store = store
        self.blocking = blocking
        self.worker_id = worker_id
        self.artifact_ttl_seconds = artifact_ttl_seconds
        self.poll_interval = poll_interval
        self.clock = clock
        self._slots = asyncio.Semaphore(concurrency)
        self._active: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        log.info("worker_started", worker_id=self.worker_id)
        last_sweep = 0.0
        while not self._stopping:
            try:
                await self._schedule()
                if time.monotonic() - last_sweep > 5.0:
                    last_sweep = time.monotonic()
                    await self._purge_artifacts()
            except Exception:
                log.exception("worker_tick_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            self._wake.clear()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in list(self._active.values()):
            task.cancel()
        await asyncio.gather(*self._active.values(), return_exceptions=True)

    async def _schedule(self) -> None:
        pending = await self.blocking(self.views.pending_job_ids, 1000)
        for job_id in pending:
            if job_id in self._active:
                continue
            task = asyncio.create_task(self._drive_guarded(job_id))
            self._active[job_id] = task
            task.add_done_callback(partial(self._forget, job_id))

    def _forget(self, job_id: str, _: object) -> None:
        self._active.pop(job_id, None)

    async def _drive_guarded(self, job_id: str) -> None:
        async with self._slots:
            try:
                await self.drive(UUID(job_id))
            except asyncio.CancelledError:
                raise
            except Exception:
                # The job stays pending; the next tick picks it up again.
                log.exception("job_drive_failed", job_id=job_id)
                await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ one job

    async def drive(self, job_id: UUID) -> None:
        job = await self.blocking(self.commands.claim, job_id, self.worker_id, LEASE_SECONDS)
        if job is None:
            return
        lease_until = time.monotonic() + LEASE_SECONDS
        poll_delay = 0.25
        while True:
            job = await self.blocking(self.commands.job, job_id)
            if job.is_terminal:
                # A cancel or expiry recorded elsewhere (the API) ended a dispatched job: the
                # provider's copy is still ours to delete.
                if job.dispatch is not None and not job.upstream_deleted:
                    await self._delete_upstream(job)
                return
            if self.clock() >= job.expires_at:
                await self._expire(job)
                return
            if time.monotonic() > lease_until - LEASE_SECONDS / 2:
                claimed = await self.blocking(
                    self.commands.claim, job_id, self.worker_id, LEASE_SECONDS
                )
                if claimed is None:
                    return
                lease_until = time.monotonic() + LEASE_SECONDS
            if job.dispatching is not None:
                # We (or a dead worker) sent a queue call whose answer was never recorded.
                await self._fail(
                    job_id,
                    "upstream_unknown",
                    "it is unknown whether the provider accepted the job",
                    False,
                )
                return
            if job.cancel_requested:
                await self._cancel(job)
                return
            if not job.is_dispatched:
                await self._dispatch(job)
                continue
            poll_delay = await self._poll(job, poll_delay)
            if poll_delay <= 0:
                continue
            await asyncio.sleep(poll_delay)

    async def _dispatch(self, job: Job) -> None:
        tried = {a["offer_id"] for a in job.attempts}
        price_changed = False
        params = video_params(job.request)
        for entry in job.route:
            offer_id = entry["offer_id"]
            if offer_id in tried:
                continue
            offer = await self.blocking(self.views.offer, offer_id)
            if offer is None or not is_available(offer, self.clock()):
                await self._update(job.id, methodcaller("skipped", offer_id, "unavailable"))
                continue
            candidate = await self.router.price(offer, params)
            if candidate is None:
                await self._update(job.id, methodcaller("skipped", offer_id, "quote_failed"))
                continue
            price = candidate.price
            if price.buyer_cost > job.max_cost:
                price_changed = True
                await self._update(job.id, methodcaller("skipped", offer_id, "price_changed"))
                continue
            attempt = {
                "offer_id": offer_id,
                "seller_id": offer.seller_id,
                "provider": offer.provider,
                "key_sha256": offer.key_sha256,
                "list_price": price.list_price,
                "seller_cost": price.seller_cost,
                "buyer_cost": price.buyer_cost,
            }
            await self._update(job.id, methodcaller("start_dispatch", attempt))
            client, api_key = self._client_for(offer)
            try:
                queue_id = await client.queue(
                    api_key, params, job.request["prompt"], job.request.get("image_url")
                )
            except ProviderRefused as e:
                await self._update(job.id, methodcaller("refused", offer_id, e.status, e.message))
                await self.blocking(
                    self.commands.offer_refused,
                    UUID(offer_id),
                    f"provider refused the job ({e.status}): {e.message}",
                    e.status in DEACTIVATING_STATUSES,
                )
                # A cancel that arrived during the refused call is a cancel before dispatch:
                # stop here and let the drive loop cancel it, free, instead of trying on.
                if (await self.blocking(self.commands.job, job.id)).cancel_requested:
                    return
                continue
            except ProviderRejected as e:
                await self._fail(job.id, "upstream_rejected", e.message, False)
                return
            except ProviderUnknown as e:
                await self._fail(job.id, "upstream_unknown", e.message, False)
                return
            await self._update(job.id, methodcaller("dispatched", queue_id))
            await self.blocking(self.commands.offer_succeeded, UUID(offer_id))
            return
        if price_changed:
            await self._fail(
                job.id,
                "price_changed",
                "every offer now costs more than the amount held for this job",
                True,
            )
        else:
            await self._fail(job.id, "no_sellers_available", "no seller could accept the job", True)

    async def _poll(self, job: Job, delay: float) -> float:
        """One retrieve call; returns how long to wait before the next (0: look again now)."""
        dispatch = job.dispatch
        assert dispatch is not None
        offer = await self.blocking(self.views.offer, dispatch["offer_id"])
        if offer is None:
            await self._fail(job.id, "inference_failed", "the seller's offer disappeared", True)
            return 0
        client, api_key = self._client_for(offer)
        scratch = self.store.scratch(str(job.id))
        try:
            outcome = await client.retrieve(
                api_key, job.request["provider_model"], dispatch["queue_id"], scratch
            )
        except ProviderTransient:
            return min(delay * 2, 10.0)
        except ProviderContentPolicy as e:
            await self._fail(job.id, "content_policy", e.message, False)
            return 0
        except ProviderInferenceFailed as e:
            await self._fail(job.id, "inference_failed", e.message, True)
            return 0
        except ProviderLost as e:
            await self._fail(
                job.id,
                "inference_failed",
                f"the provider no longer has this job: {e.message}",
                True,
            )
            return 0
        if isinstance(outcome, Completed):
            await self._store(job, outcome.path)
            with contextlib.suppress(ProviderError):
                await client.complete(api_key, job.request["provider_model"], dispatch["queue_id"])
                await self._update(job.id, methodcaller("upstream_media_deleted"), terminal_ok=True)
            return 0
        average, elapsed = outcome.average_execution_time_ms, outcome.execution_duration_ms
        if average and elapsed is not None:
            progress = elapsed / average
            if progress - job.progress >= 0.05 or job.status != "running":
                await self._update(job.id, methodcaller("progressed", progress))
            # Come back around when the provider expects to be done, never hammering it.
            return max(0.25, min((average - elapsed) / 1000, 5.0))
        if job.status != "running":
            await self._update(job.id, methodcaller("progressed", 0.0))
        return min(max(delay * 1.5, 0.25), 5.0)

    async def _store(self, job: Job, downloaded: Any) -> None:
        try:
            info = await self.blocking(probe_mp4, downloaded)
        except MediaError as e:
            await self._fail(
                job.id, "inference_failed", f"the provider returned no video: {e}", True
            )
            return
        path = await self.blocking(self.store.put, str(job.id), 0, downloaded)
        artifact = {
            "index": 0,
            "path": str(path),
            "content_type": info.content_type,
            "width": info.width,
            "height": info.height,
            "duration_seconds": info.duration_seconds,
            "bytes": info.bytes,
            "stored_at": int(self.clock()),
        }
        now = int(self.clock())

        def succeed(j: Job) -> None:
            j.artifact_stored(artifact)
            j.succeed(now)

        await self.blocking(self.commands.terminate, job.id, succeed)
        log.info("job_succeeded", job_id=str(job.id))

    async def _fail(self, job_id: UUID, code: str, message: str, retryable: bool) -> None:
        now = int(self.clock())
        await self.blocking(
            self.commands.terminate,
            job_id,
            methodcaller("fail", code=code, message=message, retryable=retryable, now=now),
        )
        log.info("job_failed", job_id=str(job_id), code=code)

    async def _cancel(self, job: Job) -> None:
        now = int(self.clock())
        await self.blocking(self.commands.terminate, job.id, methodcaller("cancel", now))
        if job.dispatch is not None:
            await self._delete_upstream(job)

    async def _expire(self, job: Job) -> None:
        expired = await self.blocking(self.commands.expire_due, job.id)
        if expired is not None and job.dispatch is not None:
            await self._delete_upstream(job)

    async def _delete_upstream(self, job: Job) -> None:
        """Best effort: the provider has no cancel, but its copy should not linger."""
        dispatch = job.dispatch
        assert dispatch is not None
        offer = await self.blocking(self.views.offer, dispatch["offer_id"])
        if offer is None:
            return
        client, api_key = self._client_for(offer)
        with contextlib.suppress(ProviderError):
            await client.complete(api_key, job.request["provider_model"], dispatch["queue_id"])
            await self._update(job.id, methodcaller("upstream_media_deleted"), terminal_ok=True)

    def _client_for(self, offer: OfferRow) -> tuple[VeniceClient, str]:
        """The provider client and the opened seller key for calls on behalf of ``offer``."""
        api_key = self.commands.open_offer_key(offer.offer_id, offer.sealed_key)
        return self.router.providers.client(offer.provider, offer.base_url), api_key

    async def _update(
        self, job_id: UUID, change: Callable[[Job], Any], *, terminal_ok: bool = False
    ) -> None:
        try:
            await self.blocking(self.commands.update_job, job_id, change)
        except IllegalTransition:
            if not terminal_ok:
                raise

    async def _purge_artifacts(self) -> None:
        cutoff = int(self.clock()) - self.artifact_ttl_seconds
        for job_id in await self.blocking(self.views.artifacts_stored_before, cutoff, 100):
            await self.blocking(self.store.delete, job_id)
            now = int(self.clock())
            await self._update(UUID(job_id), methodcaller("purge_artifacts", now), terminal_ok=True)
