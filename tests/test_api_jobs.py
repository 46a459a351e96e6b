"""SPEC 4.1 to 4.4 end to end: idempotency, listing, polling, cancelling, job tokens, logs."""

from __future__ import annotations

import threading
from typing import Any

from tests.conftest import ServerFactory
from tests.harness import ADMIN_TOKEN, Response, Server
from tests.test_api_contract import (
    RUNWAY,
    SEEDANCE,
    SUBMIT,
    assert_error,
    balance,
    job_ids,
    submit,
    submitted,
)

# seedance defaults (4 s, 480p, no audio): 160000 list, 128000 at 0.80, held up to 140800
HOLD = 140_800


def test_idempotency_keys(make_server: ServerFactory) -> None:
    server = make_server("--no-worker")  # jobs stay queued, so holds stay put
    c = server.client
    _, buyer_key = c.create_buyer(deposit_usdc=10_000_000)
    _, seller_key = c.create_seller()
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")

    first = submit(c, buyer_key, headers={"Idempotency-Key": "order-1"})
    job = submitted(first)
    assert first.headers.get("idempotent-replayed") != "true"
    assert job["max_cost_usdc"] == str(HOLD)
    for _ in range(2):
        again = c.post(
            SUBMIT,
            key=buyer_key,
            headers={"Idempotency-Key": "order-1"},
            json_body={"model": "venice-video-gen", "prompt": "a lighthouse at dusk"},
        )
        replay = submitted(again)
        assert again.headers.get("idempotent-replayed") == "true"
        assert (replay["id"], replay["job_token"]) == (job["id"], job["job_token"])

    # Same key, different body: 422, and nothing more is held.
    for changed in (
        {"prompt": "a lighthouse at dawn"},
        {"duration_seconds": 8},
        {"metadata": {"a": 1}},
    ):
        r = submit(c, buyer_key, headers={"Idempotency-Key": "order-1"}, **changed)
        assert_error(r, 422, "idempotency_key_reused")
    assert balance(c, buyer_key)["held_usdc"] == str(HOLD)

    # Keys are per buyer: another buyer's "order-1" is a job of its own.
    _, other_key = c.create_buyer(deposit_usdc=1_000_000, name="other")
    theirs = submitted(submit(c, other_key, headers={"Idempotency-Key": "order-1"}))
    assert theirs["id"] != job["id"]

    # 1..255 characters.
    for bad in ("k" * 256, ""):
        assert_error(submit(c, buyer_key, headers={"Idempotency-Key": bad}), 400, "invalid_request")
    submitted(submit(c, buyer_key, headers={"Idempotency-Key": "k" * 255}))
    assert len(job_ids(c, buyer_key)) == 2
    assert balance(c, buyer_key)["held_usdc"] == str(2 * HOLD)

    # 20 concurrent duplicates create exactly one job and one hold.
    _, racer_key = c.create_buyer(deposit_usdc=10_000_000, name="racer")
    barrier = threading.Barrier(20)
    answers: list[Response] = []
    lock = threading.Lock()

    def race() -> None:
        barrier.wait()
        r = submit(c, racer_key, headers={"Idempotency-Key": "race"})
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=race) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(answers) == 20
    assert all(r.status == 202 for r in answers), [(r.status, r.body) for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert len({r.json()["job_token"] for r in answers}) == 1
    assert sum(r.headers.get("idempotent-replayed") != "true" for r in answers) == 1
    assert job_ids(c, racer_key) == [answers[0].json()["id"]]
    assert balance(c, racer_key) == {
        "available_usdc": str(10_000_000 - HOLD),
        "held_usdc": str(HOLD),
        "spent_usdc": "0",
        "deposited_usdc": "10000000",
    }


def test_list_poll_and_cancel_before_dispatch(make_server: ServerFactory) -> None:
    server = make_server("--no-worker")  # nothing is dispatched: every job stays queued
    c = server.client
    _, buyer_key = c.create_buyer(deposit_usdc=10_000_000)
    _, seller_key = c.create_seller()
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    _, other_key = c.create_buyer(deposit_usdc=1_000_000, name="other")
    submitted(c.submit(other_key))

    jobs = [submitted(c.submit(buyer_key, metadata={"n": n})) for n in range(5)]
    newest_first = [j["id"] for j in reversed(jobs)]
    assert balance(c, buyer_key)["held_usdc"] == str(5 * HOLD)

    # Newest first, only your own; cursor pagination with has_more.
    r = c.get(SUBMIT, key=buyer_key)
    assert r.status == 200, r.body
    page = r.json()
    assert page["object"] == "list" and page["has_more"] is False
    assert [j["id"] for j in page["data"]] == newest_first
    assert all(j["status"] == "queued" and "job_token" not in j for j in page["data"])
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        query = f"limit=2&after={after}" if after else "limit=2"
        page = c.get(f"{SUBMIT}?{query}", key=buyer_key).json()
        pages += 1
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        assert len(page["data"]) == 2
        after = page["data"][-1]["id"]
        assert page.get("next_after", after) == after
    assert seen == newest_first and pages == 3
    assert job_ids(c, buyer_key, "limit=1") == newest_first[:1]
    assert job_ids(c, buyer_key, "limit=100") == newest_first
    for bad in (
        "limit=0",
        "limit=101",
        "limit=x",
        "limit=-1",
        "limit=",
        "status=done",
        "status=QUEUED",
        "after=not-a-uuid",
    ):
        assert_error(c.get(f"{SUBMIT}?{bad}", key=buyer_key), 400, "invalid_request")

    # Poll while pending: 202 with Retry-After; by buyer key or job token.
    target = jobs[1]
    for headers, key in (({}, buyer_key), ({"X-Job-Token": target["job_token"]}, None)):
        r = c.get(f"{SUBMIT}/{target['id']}", key=key, headers=headers)
        assert r.status == 202, r.body
        assert int(r.headers["retry-after"]) >= 1
        view = r.json()
        assert view["status"] == "queued" and view["metadata"] == {"n": 1}
        assert view["usage"]["settlement_status"] == "pending"
        for field in (
            "id",
            "object",
            "kind",
            "created",
            "expires_at",
            "model",
            "estimated_cost_usdc",
            "max_cost_usdc",
            "poll_url",
            "cancel_url",
            "progress",
            "results",
            "usage",
        ):
            assert field in view, field

    # Cancel before dispatch: 200 canceled, nothing charged, the hold released.
    r = c.delete(f"{SUBMIT}/{target['id']}", key=buyer_key)
    assert r.status == 200, r.body
    canceled = r.json()
    assert canceled["status"] == "canceled"
    assert canceled["usage"] == {
        "seller_cost_usdc": "0",
        "buyer_cost_usdc": "0",
        "settlement_status": "released",
    }
    assert "retry-after" not in r.headers
    assert balance(c, buyer_key)["held_usdc"] == str(4 * HOLD)
    # Again: a no-op that reports the same state; polling it is now 200.
    again = c.delete(f"{SUBMIT}/{target['id']}", key=buyer_key)
    assert again.status == 200 and again.json() == canceled
    polled = c.get(f"{SUBMIT}/{target['id']}", key=buyer_key)
    assert polled.status == 200 and polled.json() == canceled
    assert "retry-after" not in polled.headers
    # by job token too
    by_token = c.delete(f"{SUBMIT}/{jobs[3]['id']}", headers={"X-Job-Token": jobs[3]["job_token"]})
    assert by_token.status == 200 and by_token.json()["status"] == "canceled"

    # The status filter.
    canceled_ids = [jobs[3]["id"], jobs[1]["id"]]
    assert job_ids(c, buyer_key, "status=canceled") == canceled_ids
    assert job_ids(c, buyer_key, "status=queued") == [
        i for i in newest_first if i not in canceled_ids
    ]
    assert job_ids(c, buyer_key, "status=succeeded") == []
    page = c.get(f"{SUBMIT}?status=queued&limit=2", key=buyer_key).json()
    assert page["has_more"] is True
    rest = job_ids(c, buyer_key, f"status=queued&after={page['data'][-1]['id']}")
    assert [j["id"] for j in page["data"]] + rest == job_ids(c, buyer_key, "status=queued")

    # Cancel the rest: the whole balance is back.
    for j in jobs:
        assert c.delete(f"{SUBMIT}/{j['id']}", key=buyer_key).json()["status"] == "canceled"
    assert balance(c, buyer_key) == {
        "available_usdc": "10000000",
        "held_usdc": "0",
        "spent_usdc": "0",
        "deposited_usdc": "10000000",
    }
    me = c.get("/v1/buyer/me", key=buyer_key).json()
    assert me["usage"]["spent_usdc"] == "0"


def _download(c: Any, job: dict[str, Any], **kw: Any) -> Response:
    return c.get(f"/v1/media/artifacts/{job['id']}/0", **kw)


def test_job_tokens_cancel_after_success_and_clean_logs(make_server: ServerFactory) -> None:
    server: Server = make_server(LOG_LEVEL="debug")
    c = server.client
    _, buyer_key = c.create_buyer(deposit_usdc=10_000_000)
    _, seller_key = c.create_seller()
    c.create_offer(seller_key, RUNWAY, "sim_ok", "0.80")
    _, other_key = c.create_buyer(deposit_usdc=1_000_000, name="other")

    a = submitted(c.submit(buyer_key, model=RUNWAY))
    b = submitted(c.submit(buyer_key, model=RUNWAY))
    token_a, token_b = a["job_token"], b["job_token"]
    assert token_a != token_b
    for job in (a, b):
        assert c.wait_terminal(job["id"], buyer_key)["status"] == "succeeded"

    # A job token opens its own job: poll, cancel (a no-op now) and the artifact.
    as_a = {"X-Job-Token": token_a}
    r = c.get(f"{SUBMIT}/{a['id']}", headers=as_a)
    assert r.status == 200 and r.json()["status"] == "succeeded", r.body
    assert "job_token" not in r.json()
    video = _download(c, a, headers=as_a)
    assert video.status == 200 and video.headers["content-type"] == "video/mp4"
    assert video.body == _download(c, a, key=buyer_key).body

    # ... and nothing else: not another job, not the list, not the account, not a submit.
    for r in (
        c.get(f"{SUBMIT}/{b['id']}", headers=as_a),
        c.delete(f"{SUBMIT}/{b['id']}", headers=as_a),
        _download(c, b, headers=as_a),
        c.get(f"{SUBMIT}/{a['id']}", headers={"X-Job-Token": "mjt_forged"}),
        c.get(f"{SUBMIT}/{a['id']}", headers={"X-Job-Token": ""}),
    ):
        assert r.status in (401, 404), (r.status, r.body)
        assert_error(r, r.status, "invalid_api_key" if r.status == 401 else "not_found")
    for r in (
        c.get(SUBMIT, headers=as_a),
        c.get("/v1/buyer/me", headers=as_a),
        c.get("/v1/buyer/me", key=token_a),
        c.get(f"{SUBMIT}/{a['id']}", key=token_a),
        c.post(SUBMIT, headers=as_a, json_body={"model": RUNWAY, "prompt": "x"}),
        c.get("/v1/seller/offers", headers=as_a),
        c.post("/admin/buyers", headers=as_a, json_body={"name": "x"}),
    ):
        assert_error(r, 401, "invalid_api_key")
    # Another buyer's key sees nothing, even with the right id.
    assert_error(c.get(f"{SUBMIT}/{a['id']}", key=other_key), 404, "not_found")
    assert_error(c.delete(f"{SUBMIT}/{a['id']}", key=other_key), 404, "not_found")
    assert_error(_download(c, a, key=other_key), 404, "not_found")

    # Cancelling a succeeded job leaves it succeeded and charged.
    done = c.get(f"{SUBMIT}/{b['id']}", key=buyer_key).json()
    for r in (
        c.delete(f"{SUBMIT}/{b['id']}", key=buyer_key),
        c.delete(f"{SUBMIT}/{a['id']}", headers=as_a),
    ):
        assert r.status == 200, r.body
        assert r.json()["status"] == "succeeded"
        assert r.json()["usage"]["settlement_status"] == "confirmed"
    assert c.get(f"{SUBMIT}/{b['id']}", key=buyer_key).json()["usage"] == done["usage"]
    # runway 5 s 720p: 500000 list, 400000 at 0.80, twice
    assert balance(c, buyer_key) == {
        "available_usdc": "9200000",
        "held_usdc": "0",
        "spent_usdc": "800000",
        "deposited_usdc": "10000000",
    }

    # Secrets never reach the log, at debug level, after all of that.
    logs = server.logs()
    assert f'"path": "{SUBMIT}/{a["id"]}"' in logs  # the requests really were logged
    for secret in (buyer_key, other_key, seller_key, ADMIN_TOKEN, token_a, token_b, "sim_ok"):
        assert secret not in logs, f"a secret ({secret[:8]}...) is in the server log"


def _stored_doc(server: Server, job_id: str) -> str:
    """A job view's document as the views hold it, read straight from the database."""
    url = server.env["DATABASE_URL"]
    statement = f"SELECT doc FROM mm_job_views WHERE job_id = '{job_id}'"
    if url.startswith("sqlite"):
        import sqlite3
        from pathlib import Path

        with sqlite3.connect(Path(url.removeprefix("sqlite:///")) / "views.db") as db:
            (doc,) = db.execute(statement).fetchone()
            return str(doc)
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        found = conn.execute(statement).fetchone()
        assert found is not None
        return str(found[0])


def test_a_finished_job_is_answered_with_the_document_the_views_stored(
    make_server: ServerFactory,
) -> None:
    """Every JSON answer is compact, the form the views store job documents in: a poll of a
    job with nothing added at answer time (no result URLs) sends that text byte for byte,
    from the database or from the cache of finished jobs; a submit's answer, which adds the
    job token, is the same document plus it."""
    server = make_server("--no-worker")
    c = server.client
    _, buyer_key = c.create_buyer(deposit_usdc=10_000_000)
    _, seller_key = c.create_seller()
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    answer = submit(c, buyer_key)
    job = submitted(answer)
    assert answer.body.startswith(b'{"id":"') and b'", "' not in answer.body
    r = c.delete(f"{SUBMIT}/{job['id']}", key=buyer_key)
    assert r.status == 200 and r.json()["status"] == "canceled", r.body
    stored = _stored_doc(server, job["id"])
    for _ in range(3):  # the first read from the views, the next ones from the cache
        polled = c.get(f"{SUBMIT}/{job['id']}", key=buyer_key)
        assert polled.status == 200
        assert polled.headers["content-type"] == "application/json; charset=utf-8"
        assert polled.body == stored.encode()
    token = job.pop("job_token")
    assert {**polled.json(), "status": "queued"}.keys() == job.keys() and token.startswith("mjt_")
    listed = c.get(SUBMIT, key=buyer_key)
    assert b'", "' not in listed.body and listed.json()["data"][0] == polled.json()
    error = c.get(f"{SUBMIT}/{job['id']}", key=None)
    assert error.status == 401 and error.body.startswith(b'{"error":{"message":"')
