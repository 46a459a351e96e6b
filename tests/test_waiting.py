"""Waiting without polling and progress with ETA (SPEC 7), through real processes.

Two ``serve`` processes share one database: the client waits on one, the change is made
through the other (a cancel there, or its worker running the job). The waits are given a
client read timeout shorter than the ``Prefer: wait`` asked for, so a waiter that is not woken
by the change fails the test instead of being rescued by its own deadline.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from adapters.eventstore import open_market
from api.stream import preferred_wait
from projections.jobdoc import JOB_HANDLERS, new_doc
from tests.harness import Response, Server
from tests.test_aggregates import attempt, new_job
from tests.test_lifecycle import SEEDANCE, market, poll, submit_ok

ServerFactory = Callable[..., Server]
SUBMIT = "/v1/video/generations"
# Less than the 60 s wait asked for: only a wake-up by the change answers in time.
CLIENT_TIMEOUT = 40.0


@dataclass
class Event:
    id: int
    event: str
    data: dict[str, Any]


class Stream:
    """A Server-Sent Events reader over one HTTP connection."""

    def __init__(self, server: Server, path: str, headers: dict[str, str]) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=CLIENT_TIMEOUT)
        self.conn.request("GET", path, headers=headers)
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = {k.lower(): v for k, v in self.response.getheaders()}

    def events(self) -> Iterator[Event]:
        fields: dict[str, str] = {}
        while True:
            line = self.response.readline()
            if not line:
                assert not fields, f"the stream ended inside an event: {fields}"
                return
            text = line.decode().rstrip("\r\n")
            if text == "":
                if fields:
                    yield Event(int(fields["id"]), fields["event"], json.loads(fields["data"]))
                fields = {}
            elif not text.startswith(":"):
                name, _, value = text.partition(":")
                fields[name] = value.removeprefix(" ")

    def close(self) -> None:
        self.conn.close()


def long_poll(server: Server, job_id: str, key: str, prefer: str) -> Response:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=CLIENT_TIMEOUT)
    try:
        conn.request(
            "GET",
            f"{SUBMIT}/{job_id}",
            headers={"Authorization": f"Bearer {key}", "Prefer": prefer},
        )
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


class InThread:
    """Run ``fn`` in a thread; ``result()`` joins it and returns (or raises) its outcome."""

    def __init__(self, fn: Callable[[], Response]) -> None:
        self._out: list[Response] = []
        self._err: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Response]) -> None:
        try:
            self._out.append(fn())
        except BaseException as e:
            self._err.append(e)

    def result(self) -> Response:
        self._thread.join(CLIENT_TIMEOUT + 5)
        if self._err:
            raise self._err[0]
        return self._out[0]


def test_wait_and_stream_see_a_cancel_made_through_another_process(
    make_server: ServerFactory,
) -> None:
    # No worker anywhere: the job stays queued until the cancel through B.
    a = make_server("--no-worker")
    b = make_server("--no-worker")
    _, buyer_key, seller_key = market(a.client)
    a.client.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    job = submit_ok(a.client, buyer_key)
    auth = {"Authorization": f"Bearer {buyer_key}"}

    stream = Stream(a, f"{SUBMIT}/{job['id']}/stream", auth)
    assert stream.status == 200 and stream.headers["content-type"].startswith("text/event-stream")
    events = stream.events()
    first = next(events)
    assert first.event == "job" and first.data["status"] == "queued"
    assert first.data["id"] == job["id"] and first.data["eta_seconds"] is None

    waiting = InThread(lambda: long_poll(a, job["id"], buyer_key, "wait=60"))
    # Short polls and a zero wait answer at once, with the preference applied as asked.
    r = a.client.get(f"{SUBMIT}/{job['id']}", key=buyer_key, headers={"Prefer": "wait=0"})
    assert r.status == 202 and r.headers["preference-applied"] == "wait=0"
    assert 1 <= int(r.headers["retry-after"]) <= 30

    canceled = b.client.delete(f"{SUBMIT}/{job['id']}", key=buyer_key)
    assert canceled.status == 200 and canceled.json()["status"] == "canceled", canceled.body

    rest = list(events)  # the stream ends after the terminal event
    stream.close()
    assert [e.data["status"] for e in rest] == ["canceled"], rest
    [last] = rest
    assert last.id > first.id and last.data["usage"] == canceled.json()["usage"]

    answer = waiting.result()
    assert answer.status == 200, answer.body
    assert answer.json()["status"] == "canceled"
    assert answer.headers["preference-applied"] == "wait=60"
    assert "retry-after" not in answer.headers

    # Resumed on the other process from the first event: only what came after it.
    resumed = Stream(b, f"{SUBMIT}/{job['id']}/stream", {**auth, "Last-Event-ID": str(first.id)})
    assert [(e.id, e.data["status"]) for e in resumed.events()] == [(last.id, "canceled")]
    resumed.close()
    # Resumed after the final event: nothing left, and 204 tells an EventSource to stop.
    done = Stream(
        a,
        f"{SUBMIT}/{job['id']}/stream",
        {"X-Job-Token": job["job_token"], "Last-Event-ID": str(last.id)},
    )
    assert done.status == 204
    done.close()
    # Without Last-Event-ID a finished job's stream is its final view, then the end.
    whole = Stream(b, f"{SUBMIT}/{job['id']}/stream", {"X-Job-Token": job["job_token"]})
    assert [e.data["status"] for e in whole.events()] == ["canceled"]
    whole.close()

    # A terminal job answers a wait at once; a wait over 60 is cut to 60; a malformed
    # preference is ignored (RFC 7240), not refused.
    r = a.client.get(f"{SUBMIT}/{job['id']}", key=buyer_key, headers={"Prefer": "wait=600"})
    assert r.status == 200 and r.headers["preference-applied"] == "wait=60"
    r = a.client.get(f"{SUBMIT}/{job['id']}", key=buyer_key, headers={"Prefer": "wait=soon"})
    assert r.status == 200 and "preference-applied" not in r.headers

    # The stream is as private as the poll.
    _, other_key, _ = market(a.client)
    assert a.client.get(f"{SUBMIT}/{job['id']}/stream", key=other_key).status == 404
    assert a.client.get(f"{SUBMIT}/{job['id']}/stream").status == 401


def test_sim_slow_streams_rising_progress_from_a_worker_in_another_process(
    make_server: ServerFactory,
) -> None:
    # The client talks to A only; B's worker runs the job (SIM_RENDER_SECONDS=1: sim_slow
    # reports PROCESSING for 4 s).
    a = make_server("--no-worker", SIM_RENDER_SECONDS="1")
    make_server(SIM_RENDER_SECONDS="1")  # B: its worker runs the job
    _, buyer_key, seller_key = market(a.client)
    a.client.create_offer(seller_key, SEEDANCE, "sim_slow", "0.80")
    job = submit_ok(a.client, buyer_key)

    stream = Stream(a, f"{SUBMIT}/{job['id']}/stream", {"Authorization": f"Bearer {buyer_key}"})
    events = stream.events()
    first = next(events)
    # A long poll on A learns of B's worker moving the job on.
    answer = long_poll(a, job["id"], buyer_key, "wait=60")
    assert answer.headers["preference-applied"] == "wait=60"
    assert answer.json()["status"] != first.data["status"], (first.data, answer.body)
    if answer.status == 202:
        retry = int(answer.headers["retry-after"])
        eta = answer.json()["eta_seconds"]
        assert 1 <= retry <= 30 and (eta is None or retry == max(1, min(eta, 30)))

    seen = [first, *events]
    stream.close()
    ids = [e.id for e in seen]
    assert ids == sorted(set(ids)), ids
    assert seen[-1].data["status"] == "succeeded", seen[-1].data
    assert seen[-1].data["progress"] == 1.0 and seen[-1].data["eta_seconds"] == 0
    running = [e.data for e in seen if e.data["status"] == "running"]
    progress = [d["progress"] for d in running]
    etas = [d["eta_seconds"] for d in running]
    assert len(set(progress)) >= 3 and progress == sorted(progress), progress
    assert all(0 < p < 1 for p in progress[1:]), progress
    assert all(isinstance(e, int) for e in etas) and etas == sorted(etas, reverse=True), etas
    assert etas[0] > etas[-1], etas
    # The poll shows the same final view as the stream's last event (bar the signed URLs).
    final = poll(a.client, job["id"], buyer_key)
    assert {k: v for k, v in final.items() if k != "results"} == {
        k: v for k, v in seen[-1].data.items() if k != "results"
    }


def test_retry_after_follows_the_eta(make_server: ServerFactory) -> None:
    srv = make_server(SIM_RENDER_SECONDS="3")
    c = srv.client
    _, buyer_key, seller_key = market(c)
    c.create_offer(seller_key, SEEDANCE, "sim_slow", "0.80")
    job = submit_ok(c, buyer_key)
    stream = Stream(srv, f"{SUBMIT}/{job['id']}/stream", {"Authorization": f"Bearer {buyer_key}"})
    for event in stream.events():
        if event.data["status"] == "running" and event.data["eta_seconds"] is not None:
            break
    stream.close()
    # sim_slow runs 12 s here: the job is still running, with an ETA.
    r = c.get(f"{SUBMIT}/{job['id']}", key=buyer_key)
    assert r.status == 202, r.body
    eta = r.json()["eta_seconds"]
    assert eta is not None and int(r.headers["retry-after"]) == max(1, min(eta, 30))


def test_a_progressed_event_stored_before_eta_reads_as_unknown(tmp_path: Path) -> None:
    """Old logs stay readable: ``eta_seconds`` came later, with a default."""
    job = new_job()
    job.start_dispatch(attempt())
    job.dispatched("q1")
    job.progressed(0.4, 7)
    events = job.collect_events()
    app = open_market(f"sqlite:///{tmp_path}/data")
    try:
        stored = [app.mapper.to_stored_event(e) for e in events]
        state = json.loads(stored[-1].state)
        assert state["eta_seconds"] == 7
        del state["eta_seconds"]
        stored[-1] = replace(stored[-1], state=json.dumps(state).encode())
        read = [app.mapper.to_domain_event(s) for s in stored]
    finally:
        app.close()
    old = read[-1]
    assert not hasattr(old, "eta_seconds") or old.eta_seconds is None
    rebuilt: Any = None
    for event in read:
        rebuilt = event.mutate(rebuilt)
    assert rebuilt.status == "running" and rebuilt.progress == 0.4
    doc = new_doc(str(job.id), read[0])
    for event in read[1:]:
        handler = JOB_HANDLERS.get(type(event))
        if handler is not None:
            handler(doc, event)
    assert doc["status"] == "running" and doc["progress"] == 0.4 and doc["eta_seconds"] is None


def test_the_wait_preference_is_read_as_rfc_7240_has_it() -> None:
    assert preferred_wait(None) is None and preferred_wait("") is None
    assert preferred_wait("wait=5") == 5
    assert preferred_wait("respond-async, wait = 100") == 60  # capped at 60
    assert preferred_wait('handling=lenient, wait="7"') == 7
    assert preferred_wait("WAIT=0") == 0
    # Not a wait: ignored, never an error.
    for header in ("wait=soon", "wait=-1", "maxwait=5", "wait", "wait=1.5"):
        assert preferred_wait(header) is None, header
