"""The worker: drives queued jobs through dispatch, polling, storage and settlement.

Every step is recorded before the next one starts, so a worker that dies anywhere can be replaced
by one that reads the job's events and carries on. The one unknowable step (a queue call sent
with no answer) is recorded as ``DispatchStarted`` without ``Dispatched`` and ends the job as
``upstream_unknown`` with nothing charged.

(Over 400 lines on purpose: dispatch, polling, storing and ending are the steps of one drive
loop over one lease, each reading what the previous recorded; split apart they would pass that
state around instead of sharing it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from functools import partial
from operator import methodcaller
from typing import Any, Protocol, TypeVar
from uuid import UUID

import structlog

from adapters.artifacts import ArtifactStore
from adapters.media import MediaError, probe_mp4
from adapters.venice import (
    Completed,
    Finished,
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
from domain.routing import route_exhausted
from domain.rules import AT_CAPACITY, DELETED
from projections.views import OfferRow, Views
from services.commands import Commands
from services.routing import DEACTIVATING_STATUSES, KeyRow, Router, video_params
from services.tasks import TasksByKey

log = structlog.get_logger("worker")
T = TypeVar("T")

LEASE_SECONDS = 60.0


class RunsBlocking(Protocol):
    """The composition root's bounded thread pool, where every eventsourcing and view call runs
    (the library has no asyncio API)."""

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...


class Worker:
    def __init__(
        self,
        *,
        commands: Commands,
        views: Views,
        router: Router,
        store: ArtifactStore,
        blocking: RunsBlocking,
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
        self._active = TasksByKey()
        self._wake = asyncio.Event()
        self._stopping = False

    @property
    def active_jobs(self) -> int:
        """How many jobs this worker is driving now (a gauge for /metrics)."""
        return len(self._active)

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
        await self._active.cancel_all()

    async def _schedule(self) -> None:
        pending = await self.blocking(self.views.pending_job_ids, 1000)
        for job_id in pending:
            self._active.start(job_id, partial(self._drive_guarded, job_id))

    async def _drive_guarded(self, job_id: str) -> None:
        async with self._slots:
            try:
                await self.drive(UUID(job_id))
            except asyncio.CancelledError:
                raise
            except IllegalTransition as e:
                # Usually a buyer's cancel (or an expiry) that ended the job mid-step: done.
                job = await self.blocking(self.commands.job, UUID(job_id))
                if job.is_terminal:
                    log.info("job_ended_while_driven", job_id=job_id, status=job.status)
                    return
                log.error("job_drive_failed", job_id=job_id, error=str(e))
                await asyncio.sleep(1.0)
            except Exception:
                # The job stays pending; the next tick picks it up again.
                log.exception("job_drive_failed", job_id=job_id)
                await asyncio.sleep(1.0)

    # ------------------------------------------------------------------ one job

    async def drive(self, job_id: UUID) -> None:
        job = await self.blocking(self.commands.claim, job_id, self.worker_id, LEASE_SECONDS)
        if job is None:
            return
        lease_until = self._lease_until(job)
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
                lease_until = self._lease_until(claimed)
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
                if await self._dispatch(job):
                    # Every offer that could take it is at capacity: give the worker slot
                    # back; the scheduler brings the job round again (woken when a job ends).
                    return
                continue
            poll_delay = await self._poll(job, poll_delay)
            if poll_delay <= 0:
                continue
            await asyncio.sleep(poll_delay)

    def _lease_until(self, job: Job) -> float:
        """When our lease on the job runs out, on the monotonic clock."""
        assert job.lease is not None
        return time.monotonic() + job.lease["until"] - self.clock()

    async def _dispatch(self, job: Job) -> bool:
        """Try the job's route in order; True when it must wait for an offer's capacity."""
        tried = {a["offer_id"] for a in job.attempts}
        # Offers skipped because they now cost more than the hold, on this pass or an earlier
        # one (a worker that took over), for the failure's code and message.
        over_hold = [a["offer_id"] for a in job.attempts if a.get("skipped") == "price_changed"]
        waiting = False
        params = video_params(job.request)
        for entry in job.route:
            offer_id = entry["offer_id"]
            if offer_id in tried:
                continue
            row = await self._key_row(job, offer_id, entry["seller_id"])
            reason = "unavailable" if row is None else self._unavailable(row)
            if reason == AT_CAPACITY:
                waiting = True
                continue
            if reason is not None or row is None:
                await self._update(job.id, methodcaller("skipped", offer_id, reason))
                continue
            candidate = await self.router.price(row, params)
            if candidate is None:
                await self._update(job.id, methodcaller("skipped", offer_id, "quote_failed"))
                continue
            price = candidate.price
            if price.buyer_cost > job.max_cost:
                over_hold.append(offer_id)
                await self._update(job.id, methodcaller("skipped", offer_id, "price_changed"))
                continue
            attempt = {
                "offer_id": offer_id,
                "seller_id": candidate.seller_id,
                "provider": row.provider,
                "key_sha256": row.key_sha256,
                "list_price": price.list_price,
                "seller_cost": price.seller_cost,
                "buyer_cost": price.buyer_cost,
            }
            reason = await self.blocking(self.commands.start_dispatch, job.id, attempt)
            if reason == AT_CAPACITY:
                waiting = True
                continue
            if reason is not None:
                continue
            client = self.router.providers.client(row.provider, row.base_url)
            try:
                queued = await client.queue(
                    self.router.api_key(row),
                    params,
                    job.request["prompt"],
                    job.request.get("image_url"),
                )
            except ProviderRefused as e:
                log.info(
                    "queue_refused",
                    job_id=str(job.id),
                    offer_id=offer_id,
                    status=e.status,
                    code=e.code,
                    detail=e.detail,
                )
                refused = await self.blocking(
                    self.commands.queue_refused,
                    job.id,
                    offer_id,
                    e.status,
                    e.message,
                    deactivate=e.status in DEACTIVATING_STATUSES,
                )
                # A cancel that arrived during the refused call is a cancel before dispatch:
                # stop here and let the drive loop cancel it, free, instead of trying on.
                if refused.cancel_requested:
                    return False
                continue
            except ProviderContentPolicy as e:
                # The prompt itself: another seller's account would be refused the same way.
                await self._fail(job.id, "content_policy", e.message, False, e.detail)
                return False
            except ProviderRejected as e:
                await self._fail(job.id, "upstream_rejected", e.message, False, e.detail)
                return False
            except ProviderUnknown as e:
                log.info("queue_outcome_unknown", job_id=str(job.id), detail=e.detail)
                await self.blocking(
                    self.commands.unknown_outcome, job.id, e.message, now=int(self.clock())
                )
                return False
            await self.blocking(
                self.commands.dispatched, job.id, queued.queue_id, queued.download_url
            )
            return False
        if waiting:
            return True
        chosen = job.route[0]["offer_id"] if job.route else ""
        exhausted = route_exhausted(chosen, over_hold, job.max_cost)
        await self._fail(job.id, exhausted.code, exhausted.message, exhausted.retryable)
        return False

    def _unavailable(self, row: KeyRow) -> str | None:
        if isinstance(row, OfferRow):
            return row.unavailable_because(self.clock())
        return DELETED if row.deleted else None

    async def _key_row(self, job: Job, key_id: str, seller_id: str | None) -> KeyRow | None:
        """The offer, or the buyer's own provider key, that a route entry or dispatch names."""
        if seller_id is not None:
            return await self.blocking(self.views.offer, key_id)
        own = await self.blocking(self.views.buyer_provider, key_id)
        return own if own is not None and own.buyer_id == job.buyer_id else None

    async def _dispatch_row(self, job: Job) -> KeyRow | None:
        dispatch = job.dispatch
        assert dispatch is not None
        return await self._key_row(job, dispatch["offer_id"], dispatch["seller_id"])

    async def _poll(self, job: Job, delay: float) -> float:
        """One retrieve call; returns how long to wait before the next (0: look again now)."""
        dispatch = job.dispatch
        assert dispatch is not None
        row = await self._dispatch_row(job)
        if row is None:
            await self._fail(job.id, "inference_failed", "the provider key disappeared", True)
            return 0
        client, api_key = self._client_for(row)
        scratch = self.store.scratch(str(job.id))
        link = None
        try:
            outcome = await client.retrieve(
                api_key, job.request["provider_model"], dispatch["queue_id"], scratch
            )
            if isinstance(outcome, Finished):
                link = await self.blocking(self.commands.download_url, job)
                if link is None:
                    raise ProviderLost(200, "the provider finished the job but gave no link")
                outcome = await client.download(link, scratch)
        except ProviderTransient:
            return min(delay * 2, 10.0)
        except ProviderContentPolicy as e:
            await self._fail(job.id, "content_policy", e.message, False, e.detail)
            return 0
        except ProviderInferenceFailed as e:
            await self._fail(job.id, "inference_failed", e.message, True, e.detail)
            return 0
        except ProviderLost as e:
            await self._fail(
                job.id,
                "inference_failed",
                f"the provider no longer has this job's video: {e.message}",
                True,
                e.detail,
            )
            return 0
        if isinstance(outcome, Completed):
            await self._store(job, outcome.path)
            if link is not None:
                # Venice's advice for private links: revoke once the file is safe elsewhere.
                await client.revoke_download(link)
            with contextlib.suppress(ProviderError):
                await client.complete(api_key, job.request["provider_model"], dispatch["queue_id"])
                await self._update(job.id, methodcaller("upstream_media_deleted"), terminal_ok=True)
            return 0
        average, elapsed = outcome.average_execution_time_ms, outcome.execution_duration_ms
        if average and elapsed is not None:
            progress = elapsed / average
            if progress - job.progress >= 0.05 or job.status != "running":
                # What the provider expects still to take, rounded up: 0 only when it is due.
                eta = max(0, -((elapsed - average) // 1000))
                # A cancel or expiry may have ended the job during the call: the drive loop's
                # next look finds it terminal and deletes the provider's copy.
                await self._update(
                    job.id, methodcaller("progressed", progress, eta), terminal_ok=True
                )
            # Often enough for the progress a buyer sees to move (an eighth of the provider's
            # expected run), never past when it expects to be done, never hammering it.
            return max(0.25, min((average - elapsed) / 1000, average / 8000, 5.0))
        if job.status != "running":
            await self._update(job.id, methodcaller("progressed", 0.0), terminal_ok=True)
        return min(max(delay * 1.5, 0.25), 5.0)

    async def _store(self, job: Job, downloaded: Any) -> None:
        try:
            info = await self.blocking(probe_mp4, downloaded)
        except MediaError as e:
            await self.store.discard_scratch(str(job.id))
            # What the probe says names the scratch file's path on this server: log it only.
            await self._fail(
                job.id, "inference_failed", "the provider returned no video", True, str(e)
            )
            return
        # Where the store put it (a path, or a bucket and key): what retention needs to find it.
        location = await self.store.put(str(job.id), 0, downloaded)
        artifact = {
            "index": 0,
            **location,
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

        ended = await self.blocking(self.commands.terminate, job.id, succeed)
        if ended.status != "succeeded":
            # A cancel or expiry got there first: the job has no artifact, so neither may the
            # store (nothing would ever purge it).
            await self.store.delete(str(job.id))
            log.info("job_ended_while_stored", job_id=str(job.id), status=ended.status)
            return
        log.info("job_succeeded", job_id=str(job.id))

    async def _fail(
        self, job_id: UUID, code: str, message: str, retryable: bool, detail: str = ""
    ) -> None:
        """End the job as failed; ``detail`` (what the provider said) goes to the log only."""
        now = int(self.clock())
        await self.blocking(
            self.commands.terminate,
            job_id,
            methodcaller("fail", code=code, message=message, retryable=retryable, now=now),
        )
        log.info("job_failed", job_id=str(job_id), code=code, detail=detail or None)

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
        row = await self._dispatch_row(job)
        if row is None:
            return
        client, api_key = self._client_for(row)
        with contextlib.suppress(ProviderError):
            await client.complete(api_key, job.request["provider_model"], dispatch["queue_id"])
            await self._update(job.id, methodcaller("upstream_media_deleted"), terminal_ok=True)

    def _client_for(self, row: KeyRow) -> tuple[VeniceClient, str]:
        """The provider client and the opened key for calls on behalf of an offer or buyer."""
        return self.router.providers.client(row.provider, row.base_url), self.router.api_key(row)

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
            await self.store.delete(job_id)
            now = int(self.clock())
            await self._update(UUID(job_id), methodcaller("purge_artifacts", now), terminal_ok=True)
