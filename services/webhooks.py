"""Webhook delivery (SPEC 7): the commands on deliveries and signing secrets, and the sender
loop that every process with a worker runs.

The sender finds due deliveries in the read model, claims each with a lease event, fixes the
payload on the first try (the job's poll document, as stored), signs it with the buyer's
secrets and POSTs it through the outbound policy (SPEC 9: the name is resolved and checked at
send time). The try's outcome is an event; a crash before it leaves only a lease, which runs
out, so the try is made again: at least once, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from functools import partial
from typing import Any
from uuid import UUID

import aiohttp
import structlog

from adapters.outbound import Outbound, OutboundRefused
from adapters.webhooks import new_secret, signed_headers
from domain.aggregates import TERMINAL
from domain.webhooks import WebhookDelivery, WebhookSecret, secret_id
from domain.webhooks import delivery_id as delivery_id_of
from projections.views import Views
from projections.work import WEBHOOK, WorkStore
from services.commands.base import CommandBase, NotFound, Written, position_of
from services.tasks import TasksByKey
from services.worker import WORK_LEASE_SECONDS, RunsBlocking

log = structlog.get_logger("webhooks")

SEND_TIMEOUT_SECONDS = 15.0
# Long enough for one try (the timeout) and its bookkeeping; a sender that died mid-try holds
# the delivery no longer than this.
LEASE_SECONDS = 30.0
MIN_TICK_SECONDS = 0.05


def _context(buyer_id: str) -> str:
    return f"webhook-secret:{buyer_id}"


def payload(doc: dict[str, Any]) -> str:
    """The body every try of a job's webhook sends: its poll document as the projection stored
    it. The short-lived direct ``url`` of a result is left null (a payload retried for days
    would carry a dead link); ``download_url`` with the buyer's key always works."""
    results = []
    for result in doc.get("results", []):
        result = dict(result)
        result.pop("expired", None)
        result["url"] = None
        results.append(result)
    return json.dumps({**doc, "results": results}, separators=(",", ":"), sort_keys=True)


class WebhookCommands(CommandBase):
    def delivery(self, job_id: UUID | str) -> WebhookDelivery:
        return self._get(WebhookDelivery, delivery_id_of(job_id))

    def delivery_by_id(self, delivery_id: UUID) -> WebhookDelivery | None:
        try:
            return self._get(WebhookDelivery, delivery_id)
        except NotFound:
            return None

    def claim(
        self, delivery_id: UUID, worker_id: str, takeover: bool = False
    ) -> WebhookDelivery | None:
        def attempt() -> WebhookDelivery | None:
            d = self._get(WebhookDelivery, delivery_id)
            if not d.claim(
                worker_id, now=self.clock(), lease_seconds=LEASE_SECONDS, takeover=takeover
            ):
                return None
            self.app.save(d)
            return d

        return self._retrying(attempt)

    def fix_payload(self, delivery_id: UUID, body: str) -> WebhookDelivery:
        def attempt() -> WebhookDelivery:
            d = self._get(WebhookDelivery, delivery_id)
            d.fix_payload(body)
            self.app.save(d)
            return d

        return self._retrying(attempt)

    def record_attempt(
        self,
        delivery_id: UUID,
        *,
        at: float,
        status_code: int | None,
        latency_ms: int | None,
        error: str | None,
        schedule: tuple[float, ...],
    ) -> WebhookDelivery:
        jitter = random.uniform(-1.0, 1.0)

        def attempt() -> WebhookDelivery:
            d = self._get(WebhookDelivery, delivery_id)
            d.attempted(
                at=at,
                status_code=status_code,
                latency_ms=latency_ms,
                error=error,
                schedule=schedule,
                jitter=jitter,
            )
            self.app.save(d)
            return d

        return self._retrying(attempt)

    def redeliver(self, job_id: UUID) -> Written:
        def attempt() -> Written:
            d = self._get(WebhookDelivery, delivery_id_of(job_id))
            d.redeliver(now=self.clock())
            return Written(position_of(self.app.save(d)))

        return self._retrying(attempt)

    # ------------------------------------------------------------------ signing secrets

    def rotate_secret(self, buyer_id: str) -> tuple[str, Written, float, float | None]:
        """A new secret for the buyer, returned once, with when it was made and when the one it
        replaces stops signing (24 h later), or None when it replaces none."""
        secret = new_secret()
        sealed = self.secrets.seal(secret, context=_context(buyer_id))

        def attempt() -> tuple[Written, float, float | None]:
            now = self.clock()
            try:
                current = self._get(WebhookSecret, secret_id(buyer_id))
            except NotFound:
                created = WebhookSecret(
                    id=secret_id(buyer_id), buyer_id=buyer_id, sealed=sealed, at=now
                )
                return Written(position_of(self.app.save(created))), now, None
            current.rotate(sealed, now=now)
            return Written(position_of(self.app.save(current))), now, current.previous_until

        written, at, previous_until = self._retrying(attempt)
        return secret, written, at, previous_until

    def signing_secrets(self, buyer_id: str) -> list[str]:
        """The secrets that sign the buyer's webhooks now. A buyer who never asked for one gets
        one made here (as Svix gives every endpoint a secret from the start): their webhooks
        are signed from the first; they learn a secret with ``POST /v1/buyer/webhook-secret``,
        after which the one made here still signs for the 24 h overlap."""

        def attempt() -> WebhookSecret:
            try:
                return self._get(WebhookSecret, secret_id(buyer_id))
            except NotFound:
                sealed = self.secrets.seal(new_secret(), context=_context(buyer_id))
                made = WebhookSecret(
                    id=secret_id(buyer_id), buyer_id=buyer_id, sealed=sealed, at=self.clock()
                )
                self.app.save(made)
                return made

        holder = self._retrying(attempt)
        return [self.secrets.open(s, _context(buyer_id)) for s in holder.signing(self.clock())]


class WebhookSender:
    """The loop that sends due deliveries, one task per delivery being tried."""

    def __init__(
        self,
        *,
        commands: WebhookCommands,
        views: Views,
        work: WorkStore,
        outbound: Outbound,
        blocking: RunsBlocking,
        worker_id: str,
        schedule: tuple[float, ...],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.commands = commands
        self.views = views
        self.work = work
        self.outbound = outbound
        self.blocking = blocking
        self.worker_id = worker_id
        self.schedule = schedule
        self.clock = clock
        # Look again at least this often: the shortest retry (tests use fractions of a second)
        # or a second, whichever is shorter. Wake-ups from the projection cover new deliveries.
        self.poll_interval = max(0.05, min(1.0, min(schedule) / 2))
        self._active = TasksByKey()
        self._wake = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        # The rows of tries in flight (a slow receiver takes up to 15 s) are kept by the
        # heartbeat of the worker beside it, which renews every row held under this id.
        log.info("webhook_sender_started", worker_id=self.worker_id)
        while not self._stopping:
            self._wake.clear()
            try:
                await self._schedule()
            except Exception:
                log.exception("webhook_tick_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            # Wake-ups come with every advance of the work queue: under load, one look per
            # pause covers them all.
            await asyncio.sleep(MIN_TICK_SECONDS)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        await self._active.cancel_all()

    async def _schedule(self) -> None:
        now = self.clock()
        due = await self.blocking(
            self.work.claim, WEBHOOK, self.worker_id, now, WORK_LEASE_SECONDS, 100, now
        )
        for delivery_id in due:
            self._active.start(delivery_id, partial(self._try_guarded, delivery_id))

    async def _try_guarded(self, delivery_id: str) -> None:
        next_due: float | None = None
        try:
            next_due = await self.try_once(UUID(delivery_id), takeover=True)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The row's lease runs out and the try is made again.
            log.exception("webhook_try_failed", delivery_id=delivery_id)
            return
        if next_due is None:
            await self.blocking(self.work.done, WEBHOOK, delivery_id, self.worker_id)
        else:
            await self.blocking(self.work.release, WEBHOOK, delivery_id, self.worker_id, next_due)

    async def try_once(self, delivery_id: UUID, takeover: bool = False) -> float | None:
        """One try of a due delivery; returns when the next is due (None: no more, it was
        delivered or given up, or is not due)."""
        d = await self.blocking(self.commands.claim, delivery_id, self.worker_id, takeover)
        if d is None:
            current = await self.blocking(self.commands.delivery_by_id, delivery_id)
            return current.due_at if current is not None else None
        if d.body is None:
            row = await self.blocking(self.views.get_job, d.job_id)
            if row is None or row.status not in TERMINAL:
                # The delivery is saved with the job's end, so the view has both or neither;
                # a reader behind it is only behind: it comes round again in a moment.
                log.warning("webhook_job_view_behind", job_id=d.job_id)
                return self.clock() + 1.0
            d = await self.blocking(self.commands.fix_payload, delivery_id, payload(row.doc))
        assert d.body is not None
        secrets = await self.blocking(self.commands.signing_secrets, d.buyer_id)
        status, latency_ms, error = await self._send(d, d.body.encode(), secrets)
        done = await self.blocking(
            self.commands.record_attempt,
            delivery_id,
            at=self.clock(),
            status_code=status,
            latency_ms=latency_ms,
            error=error,
            schedule=self.schedule,
        )
        log.info(
            "webhook_attempted",
            job_id=d.job_id,
            webhook_id=d.webhook_id,
            status_code=status,
            error=error,
            outcome=done.state,
        )
        return done.due_at

    async def _send(
        self, d: WebhookDelivery, body: bytes, secrets: list[str]
    ) -> tuple[int | None, int | None, str | None]:
        """One POST: (status code, latency in ms, a short error of our own words). The
        receiver's body is never read, so nothing of it can reach the buyer."""
        headers = signed_headers(secrets, d.webhook_id, int(self.clock()), body)
        started = time.monotonic()
        try:
            async with self.outbound.request(
                "POST",
                d.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT_SECONDS),
                max_redirects=0,
                fresh=True,
            ) as response:
                status = response.status
        except OutboundRefused as e:
            if str(e) == "too many redirects":
                # With none allowed: a receiver must answer itself (as Svix, no redirect is
                # followed, so a signed body is never replayed to another host).
                return None, _ms(started), "redirected: webhooks follow no redirect"
            # Fixed phrases of the policy, never the URL or upstream content.
            return None, None, f"refused by the outbound policy: {e}"
        except TimeoutError:
            return None, _ms(started), f"no answer within {SEND_TIMEOUT_SECONDS:g} s"
        except aiohttp.InvalidURL:
            return None, None, "invalid URL"
        except (aiohttp.ClientError, OSError):
            return None, _ms(started), "connection failed"
        error = None if 200 <= status < 300 else f"HTTP {status}"
        return status, _ms(started), error


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
