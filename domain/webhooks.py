"""Webhook deliveries and buyers' signing secrets (SPEC 7), and the retry schedule's rules.

A ``WebhookDelivery`` is created in the same save as its job's terminal event, so a job that
ended always has its delivery on record, whatever happens to the process next. Every try is an
``Attempted`` event; the outcome (``Delivered`` or ``Exhausted``) is an event of its own, saved
with the try that decided it. A sender claims a delivery with a lease (``Claimed``) as a worker
claims a job, so two processes do not send the same try at once; a sender that dies mid-try
leaves a lease that runs out, and the try is made again (at least once).
"""

from __future__ import annotations

from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

PENDING = "pending"
DELIVERED = "delivered"
EXHAUSTED = "failed"

# Svix's schedule, which SPEC 7 quotes: the first try at once, then these delays, summing to
# 87.6 hours; 78.8 even if the jitter shortened every one (SPEC: at least 72).
DEFAULT_SCHEDULE: tuple[float, ...] = (5, 300, 1800, 7200, 18000, *(36000,) * 8)
# Each delay is moved by up to this fraction either way, so receivers that came back after an
# outage are not hit by every sender in lockstep.
JITTER = 0.1
ROTATION_OVERLAP_SECONDS = 24 * 3600


def parse_schedule(text: str) -> tuple[float, ...]:
    """``WEBHOOK_RETRY_SCHEDULE``: comma-separated seconds (fractions allowed), each > 0."""
    try:
        delays = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ValueError("must be a comma-separated list of seconds") from None
    if not delays or any(not d > 0 or d != d or d == float("inf") for d in delays):
        raise ValueError("every delay must be a positive number of seconds")
    return delays


def retry_delay(failures: int, schedule: tuple[float, ...], jitter: float) -> float | None:
    """Seconds until the next try after ``failures`` failed tries in a row, or None once the
    schedule is used up. ``jitter`` is in [-1, 1] (the caller's randomness, so this stays
    pure)."""
    if failures < 1 or failures > len(schedule):
        return None
    return schedule[failures - 1] * (1 + JITTER * max(-1.0, min(jitter, 1.0)))


def delivery_id(job_id: UUID | str) -> UUID:
    return uuid5(NAMESPACE_URL, f"/mediamarket/webhook/{job_id}")


def webhook_id(job_id: UUID | str) -> str:
    """The ``webhook-id`` of every try and redelivery of one job's webhook."""
    return f"msg_{delivery_id(job_id).hex}"


def secret_id(buyer_id: UUID | str) -> UUID:
    return uuid5(NAMESPACE_URL, f"/mediamarket/webhook-secret/{buyer_id}")


class WebhookDelivery(Aggregate):
    """One job's webhook: its tries, retries, redeliveries and outcome."""

    TOPIC = "mediamarket.webhook"

    @event("Created", topic="mediamarket.webhook.scheduled.v1")
    def __init__(
        self, id: UUID, job_id: str, buyer_id: str, url: str, webhook_id: str, due_at: float
    ) -> None:
        self.job_id = job_id
        self.buyer_id = buyer_id
        self.url = url
        self.webhook_id = webhook_id
        self.due_at: float | None = due_at
        self.state = PENDING
        # Failed tries since the last success or redelivery: where the schedule is.
        self.failures = 0
        self.attempts: list[dict[str, Any]] = []
        self.lease: dict[str, Any] | None = None
        # The exact bytes every try sends (a text), fixed by the first try.
        self.body: str | None = None

    @classmethod
    def for_job(cls, job_id: UUID, buyer_id: str, url: str, now: float) -> WebhookDelivery:
        return cls(
            id=delivery_id(job_id),
            job_id=str(job_id),
            buyer_id=buyer_id,
            url=url,
            webhook_id=webhook_id(job_id),
            due_at=now,
        )

    def is_due(self, now: float) -> bool:
        return self.state == PENDING and self.due_at is not None and self.due_at <= now

    def claim(
        self, worker_id: str, now: float, lease_seconds: float, takeover: bool = False
    ) -> bool:
        """Take the lease for one try; False when not due or another sender holds it (unless
        ``takeover``: the work queue's claim decided the holder is dead)."""
        if not self.is_due(now):
            return False
        lease = self.lease
        if lease and lease["worker_id"] != worker_id and lease["until"] > now and not takeover:
            return False
        self._claimed(worker_id=worker_id, until=now + lease_seconds)
        return True

    @event("Claimed", topic="mediamarket.webhook.claimed.v1")
    def _claimed(self, worker_id: str, until: float) -> None:
        self.lease = {"worker_id": worker_id, "until": until}

    def fix_payload(self, body: str) -> None:
        if self.body is None:
            self._payload_fixed(body=body)

    @event("PayloadFixed", topic="mediamarket.webhook.payload-fixed.v1")
    def _payload_fixed(self, body: str) -> None:
        self.body = body

    def attempted(
        self,
        *,
        at: float,
        status_code: int | None,
        latency_ms: int | None,
        error: str | None,
        schedule: tuple[float, ...],
        jitter: float,
    ) -> None:
        """Record one try; a 2xx delivers, anything else is retried until the schedule ends."""
        ok = status_code is not None and 200 <= status_code < 300
        delay = None if ok else retry_delay(self.failures + 1, schedule, jitter)
        next_at = None if delay is None else at + delay
        self._attempted(
            at=at,
            status_code=status_code,
            latency_ms=latency_ms,
            error=error,
            next_attempt_at=next_at,
        )
        if ok:
            self._delivered(at=at)
        elif next_at is None:
            self._exhausted(at=at)

    @event("Attempted", topic="mediamarket.webhook.attempted.v1")
    def _attempted(
        self,
        at: float,
        status_code: int | None,
        latency_ms: int | None,
        error: str | None,
        next_attempt_at: float | None,
    ) -> None:
        ok = status_code is not None and 200 <= status_code < 300
        self.attempts.append(
            {
                "at": at,
                "status_code": status_code,
                "latency_ms": latency_ms,
                "error": error,
                "next_attempt_at": next_attempt_at,
            }
        )
        self.failures = 0 if ok else self.failures + 1
        self.due_at = next_attempt_at
        self.lease = None

    @event("Delivered", topic="mediamarket.webhook.delivered.v1")
    def _delivered(self, at: float) -> None:
        self.state = DELIVERED
        self.due_at = None

    @event("Exhausted", topic="mediamarket.webhook.exhausted.v1")
    def _exhausted(self, at: float) -> None:
        self.state = EXHAUSTED
        self.due_at = None

    def redeliver(self, now: float) -> None:
        """The buyer asked for another try of the same payload (same ``webhook-id``), now, with
        a fresh retry schedule behind it."""
        self._redelivery_requested(at=now)

    @event("RedeliveryRequested", topic="mediamarket.webhook.redelivery-requested.v1")
    def _redelivery_requested(self, at: float) -> None:
        self.state = PENDING
        self.due_at = at
        self.failures = 0


class WebhookSecret(Aggregate):
    """A buyer's signing secrets, sealed: the current one and, for a day after a rotation, the
    one before it (both sign meanwhile, SPEC 7)."""

    TOPIC = "mediamarket.webhook-secret"

    @event("Created", topic="mediamarket.webhook-secret.created.v1")
    def __init__(self, id: UUID, buyer_id: str, sealed: dict[str, str], at: float) -> None:
        self.buyer_id = buyer_id
        self.sealed = sealed
        self.previous: dict[str, str] | None = None
        self.previous_until = 0.0
        self.rotated_at = at

    def rotate(self, sealed: dict[str, str], now: float) -> None:
        self._rotated(sealed=sealed, at=now, previous_until=now + ROTATION_OVERLAP_SECONDS)

    @event("Rotated", topic="mediamarket.webhook-secret.rotated.v1")
    def _rotated(self, sealed: dict[str, str], at: float, previous_until: float) -> None:
        self.previous = self.sealed
        self.previous_until = previous_until
        self.sealed = sealed
        self.rotated_at = at

    def signing(self, now: float) -> list[dict[str, str]]:
        """The sealed secrets that sign now, newest first."""
        if self.previous is not None and now < self.previous_until:
            return [self.sealed, self.previous]
        return [self.sealed]
