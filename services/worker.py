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
from projections.work import EXPIRE, JOB, PURGE, WorkStore
from services.commands import Commands
from services.routing import DEACTIVATING_STATUSES, KeyRow, Router, video_params
from services.tasks import TasksByKey

log = structlog.get_logger("worker")
T = TypeVar("T")

# The lease the job's log records (who drove it, and a fence for drives outside the queue).
LEASE_SECONDS = 60.0
# The work queue's lease: renewed by heartbeat, so a dead worker's jobs come free this long
# after its last heartbeat (SPEC 8: taken over within 15 s, with a claim look every second).
WORK_LEASE_SECONDS = 10.0
HEARTBEAT_SECONDS = 3.0
# A drive stops this long before its lease would run out unrenewed (a database outage, a
# stalled process): another worker may take the job then.
LEASE_MARGIN_SECONDS = 2.0
# How often claims are looked for without a wake-up, and when a job waiting for an offer's
# capacity is due again.
CLAIM_INTERVAL_SECONDS = 1.0
CAPACITY_RETRY_SECONDS = 1.0
ENDED, WAITING, LOST = "ended", "waiting", "lost"


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
        work: WorkStore,
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
        self.work = work
        self.router = router
        self.store = store
        self.blocking = blocking
        self.worker_id = worker_id
        self.artifact_ttl_seconds = artifact_ttl_seconds
        self.poll_interval = poll_interval
        self.clock = clock
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._active = TasksByKey()
        self._timers = TasksByKey()
        self._wake = asyncio.Event()
        self._stopping = False
        # When our leases were last renewed by heartbeat (monotonic); the job rows we hold and
        # when each was claimed; the held jobs a heartbeat found taken by another worker.
        self._renewed_at = 0.0
        self._holding: dict[str, float] = {}
        self._lost: set[str] = set()

    @property
    def active_jobs(self) -> int:
        """How many jobs this worker is driving now (a gauge for /metrics)."""
        return len(self._active)

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        log.info("worker_started", worker_id=self.worker_id)
        # What a previous life under this id held is free at once, not after its leases.
        await self.blocking(self.work.release_all, self.worker_id)
        last_beat = last_claim = last_timers = 0.0
        while not self._stopping:
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                now = time.monotonic()
                if now - last_beat >= HEARTBEAT_SECONDS:
                    await self._heartbeat()
                    last_beat = now
                if woken or now - last_claim >= CLAIM_INTERVAL_SECONDS:
                    last_claim = now
                    await self._schedule()
                if now - last_timers >= CLAIM_INTERVAL_SECONDS:
                    last_timers = now
                    await self._run_timers()
            except Exception:
                log.exception("worker_tick_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        await self._active.cancel_all()
        await self._timers.cancel_all()
        # Hand back what we held, so other workers need not wait for the leases to run out.
        with contextlib.suppress(Exception):
            await self.blocking(self.work.release_all, self.worker_id)

    async def _heartbeat(self) -> None:
        started = time.monotonic()
        held = await self.blocking(
            self.work.heartbeat, self.worker_id, self.clock(), WORK_LEASE_SECONDS
        )
        self._renewed_at = started
        jobs = {subject for kind, subject in held if kind == JOB}
        for job_id, claimed_at in list(self._holding.items()):
            if job_id not in jobs and job_id not in self._lost and claimed_at < started:
                # Our lease ran out (a stall longer than the lease) and another worker took the
                # job: stop driving it at the next step.
                log.warning("job_lease_lost", job_id=job_id, worker_id=self.worker_id)
                self._lost.add(job_id)

    def _lease_lapsed(self, job_id: str) -> bool:
        """Whether our work-queue lease on the job may have run out: taken by another worker,
        or not renewed for nearly its whole length (the database unreachable, say)."""
        renewed = max(self._renewed_at, self._holding.get(job_id, 0.0))
        return job_id in self._lost or (
            time.monotonic() - renewed > WORK_LEASE_SECONDS - LEASE_MARGIN_SECONDS
        )

    async def _schedule(self) -> None:
        free = self.concurrency - len(self._active)
        if free <= 0:
            return
        now = self.clock()
        started = time.monotonic()
        claimed = await self.blocking(
            self.work.claim, JOB, self.worker_id, now, WORK_LEASE_SECONDS, min(free, 100), now
        )
        for job_id in claimed:
            # A fresh claim is a fresh lease for this job, as good as a heartbeat.
            self._holding[job_id] = started
            self._lost.discard(job_id)
            self._active.start(job_id, partial(self._drive_claimed, job_id))

    async def _drive_claimed(self, job_id: str) -> None:
        outcome = LOST
        try:
            async with self._slots:
                outcome = await self.drive(UUID(job_id), claimed=True)
        except asyncio.CancelledError:
            raise
        except IllegalTransition as e:
            # Usually a buyer's cancel (or an expiry) that ended the job mid-step: done.
            job = await self.blocking(self.commands.job, UUID(job_id))
            if job.is_terminal:
                log.info("job_ended_while_driven", job_id=job_id, status=job.status)
                outcome = ENDED
            else:
                log.error("job_drive_failed", job_id=job_id, error=str(e))
                outcome = WAITING
        except Exception:
            # The job stays in the queue and comes round again shortly.
            log.exception("job_drive_failed", job_id=job_id)
            outcome = WAITING
        finally:
            # Handed back or finished below: a heartbeat must not take it for lost.
            self._holding.pop(job_id, None)
            self._lost.discard(job_id)
        if outcome == ENDED:
            await self.blocking(self.work.done, JOB, job_id, self.worker_id)
            # It may have freed an offer's slot that handed-back jobs are waiting for.
            await self.blocking(self.work.hurry, JOB, self.clock(), CAPACITY_RETRY_SECONDS)
            self._wake.set()
        elif outcome == WAITING:
            due = self.clock() + CAPACITY_RETRY_SECONDS
            await self.blocking(self.work.release, JOB, job_id, self.worker_id, due)

    async def _run_timers(self) -> None:
        """Expiries and retention that are due, each run once across every worker (the row's
        claim), in tasks of their own."""
        now = self.clock()
        for kind, due_by, run in (
            (EXPIRE, now, self._expire_timer),
            (PURGE, now - self.artifact_ttl_seconds, self._purge_timer),
        ):
            subjects = await self.blocking(
                self.work.claim, kind, self.worker_id, now, WORK_LEASE_SECONDS, 100, due_by
            )
            for job_id in subjects:
                self._timers.start(
                    f"{kind}:{job_id}", partial(self._timer_guarded, kind, job_id, run)
                )

    async def _timer_guarded(self, kind: str, job_id: str, run: Callable[[UUID], Any]) -> None:
        try:
            await run(UUID(job_id))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("timer_failed", kind=kind, job_id=job_id)
            # Its lease runs out and it is tried again.
            return
        await self.blocking(self.work.done, kind, job_id, self.worker_id)

    async def _expire_timer(self, job_id: UUID) -> None:
        job = await self.blocking(self.commands.job, job_id)
        if job.is_terminal or self.clock() < job.expires_at:
            return  # ended already; or this clock is behind the one that made it due
        await self._expire(job)

    async def _purge_timer(self, job_id: UUID) -> None:
        await self.store.delete(str(job_id))
        now = int(self.clock())
        await self._update(job_id, methodcaller("purge_artifacts", now), terminal_ok=True)

    # ------------------------------------------------------------------ one job

    async def drive(self, job_id: UUID, *, claimed: bool = False) -> str:
        """Drive the job until it ends (``ENDED``), must wait for an offer's capacity
        (``WAITING``) or is another worker's (``LOST``). ``claimed``: the work queue gave it to
        us (its lease, renewed by heartbeat, says who drives), so the log's lease is taken over
        and the drive stops when the queue's lease lapses."""
        job = await self.blocking(
            self.commands.claim, job_id, self.worker_id, LEASE_SECONDS, claimed
        )
        if job is None:
            ended = await self.blocking(self.commands.job, job_id)
            return ENDED if ended.is_terminal else LOST
        lease_until = self._lease_until(job)
        poll_delay = 0.25
        key = str(job_id)
        while True:
            if claimed and self._lease_lapsed(key):
                log.info("job_drive_stopped", job_id=key, reason="lease lapsed")
                return LOST
            job = await self.blocking(self.commands.job, job_id)
            if job.is_terminal:
                # A cancel or expiry recorded elsewhere (the API) ended a dispatched job: the
                # provider's copy is still ours to delete.
                if job.dispatch is not None and not job.upstream_deleted:
                    await self._delete_upstream(job)
                return ENDED
            if self.clock() >= job.expires_at:
                await self._expire(job)
                return ENDED
            if time.monotonic() > lease_until - LEASE_SECONDS / 2:
                renewed = await self.blocking(
                    self.commands.claim, job_id, self.worker_id, LEASE_SECONDS, claimed
                )
                if renewed is None:
                    return LOST
                lease_until = self._lease_until(renewed)
            if job.dispatching is not None:
                # We (or a dead worker) sent a queue call whose answer was never recorded.
                await self._fail(
                    job_id,
                    "upstream_unknown",
                    "it is unknown whether the provider accepted the job",
                    False,
                )
                return ENDED
            if job.cancel_requested:
                await self._cancel(job)
                return ENDED
            if not job.is_dispatched:
                if await self._dispatch(job):
                    # Every offer that could take it is at capacity: give the worker slot
                    # back; the queue brings the job round again shortly.
                    return WAITING
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
