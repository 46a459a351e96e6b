"""The webhook aggregate's rules and the retry schedule, in process (no I/O)."""

from __future__ import annotations

import uuid

import pytest

from adapters.settings import ConfigError, load_settings
from domain.webhooks import (
    DEFAULT_SCHEDULE,
    DELIVERED,
    EXHAUSTED,
    JITTER,
    PENDING,
    WebhookDelivery,
    WebhookSecret,
    parse_schedule,
    retry_delay,
    webhook_id,
)


def test_default_schedule_retries_for_at_least_72_hours() -> None:
    assert DEFAULT_SCHEDULE[:5] == (5, 300, 1800, 7200, 18000)
    assert sum(DEFAULT_SCHEDULE) * (1 - JITTER) >= 72 * 3600


def test_retry_delay_follows_the_schedule_with_bounded_jitter() -> None:
    schedule = (5.0, 300.0)
    assert retry_delay(1, schedule, 0.0) == 5.0
    assert retry_delay(2, schedule, 1.0) == pytest.approx(330.0)
    assert retry_delay(2, schedule, -1.0) == pytest.approx(270.0)
    assert retry_delay(1, schedule, 7.0) == pytest.approx(5.5)  # jitter is clamped
    assert retry_delay(3, schedule, 0.0) is None
    assert retry_delay(0, schedule, 0.0) is None


@pytest.mark.parametrize("text", ["", "a", "1,,2", "0", "-1", "nan", "inf"])
def test_bad_schedules_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_schedule(text)


def test_schedule_setting() -> None:
    assert load_settings(WEBHOOK_RETRY_SCHEDULE="0.2, 1,30").webhook_schedule == (0.2, 1.0, 30.0)
    assert load_settings(WEBHOOK_RETRY_SCHEDULE="").webhook_schedule == DEFAULT_SCHEDULE
    with pytest.raises(ConfigError, match="WEBHOOK_RETRY_SCHEDULE"):
        load_settings(WEBHOOK_RETRY_SCHEDULE="soon")


def _delivery(now: float = 100.0) -> WebhookDelivery:
    return WebhookDelivery.for_job(uuid.uuid4(), "buyer", "https://example.com/hook", now)


def test_failed_tries_follow_the_schedule_then_exhaust() -> None:
    d = _delivery()
    assert d.webhook_id == webhook_id(d.job_id)
    kw = {"latency_ms": 3, "schedule": (5.0, 10.0), "jitter": 0.0}
    d.attempted(at=100.0, status_code=500, error="HTTP 500", **kw)
    assert (d.state, d.due_at) == (PENDING, 105.0)
    d.attempted(at=105.0, status_code=None, error="connection failed", **kw)
    assert (d.state, d.due_at) == (PENDING, 115.0)
    d.attempted(at=115.0, status_code=302, error="HTTP 302", **kw)
    assert (d.state, d.due_at) == (EXHAUSTED, None)
    assert [a["next_attempt_at"] for a in d.attempts] == [105.0, 115.0, None]

    d.redeliver(now=200.0)
    assert (d.state, d.due_at, d.failures) == (PENDING, 200.0, 0)
    d.attempted(at=200.0, status_code=204, error=None, **kw)
    assert (d.state, d.due_at) == (DELIVERED, None)
    names = [type(e).__name__ for e in d.collect_events()]
    assert names.count("Attempted") == 4
    assert names[-2:] == ["Attempted", "Delivered"]
    assert "Exhausted" in names and "RedeliveryRequested" in names


def test_a_live_lease_keeps_other_senders_out() -> None:
    d = _delivery(now=100.0)
    assert not d.claim("a", now=99.0, lease_seconds=30)  # not due yet
    assert d.claim("a", now=100.0, lease_seconds=30)
    assert not d.claim("b", now=110.0, lease_seconds=30)
    assert d.claim("b", now=131.0, lease_seconds=30)  # a's lease ran out: a died mid-try
    d.attempted(at=132.0, status_code=200, latency_ms=1, error=None, schedule=(1.0,), jitter=0.0)
    assert d.lease is None
    assert not d.claim("a", now=200.0, lease_seconds=30)  # delivered: nothing to claim


def test_the_payload_is_fixed_once() -> None:
    d = _delivery()
    d.fix_payload('{"a":1}')
    d.fix_payload('{"a":2}')
    assert d.body == '{"a":1}'


def test_rotation_signs_with_both_secrets_for_a_day() -> None:
    s = WebhookSecret(id=uuid.uuid4(), buyer_id="b", sealed={"ct": "one"}, at=0.0)
    assert s.signing(10.0) == [{"ct": "one"}]
    s.rotate({"ct": "two"}, now=100.0)
    assert s.signing(100.0 + 24 * 3600 - 1) == [{"ct": "two"}, {"ct": "one"}]
    assert s.signing(100.0 + 24 * 3600) == [{"ct": "two"}]
