"""Rebuilds without downtime (SPEC 8): ``projections rebuild`` and a start on a new view schema
build fresh tables while the old ones serve, then switch atomically. A poll of an existing job
never answers 404 because a rebuild is running (503 ``engine_starting`` at most, from a process
that is still starting), and nothing the log holds is lost or applied twice.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg

from tests.harness import Client, Server
from tests.test_lifecycle import SEEDANCE, market, submit_ok, wait_until
from tests.test_recovery import all_terminal

ServerFactory = Callable[..., Server]


@contextmanager
def polling(client: Client, buyer_key: str, job_ids: list[str]) -> Iterator[Counter[int]]:
    """Poll every job, round and round, until the block ends; yields the statuses seen."""
    seen: Counter[int] = Counter()
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            for job_id in job_ids:
                try:
                    r = client.get(f"/v1/video/generations/{job_id}", key=buyer_key)
                except Exception:
                    seen[0] += 1  # refused: the process is down (not expected here)
                    continue
                seen[r.status] += 1
                if r.status == 503:
                    assert r.json()["error"]["code"] == "engine_starting", r.body

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join(10)


def jobs_done(c: Client, n: int) -> tuple[str, list[str]]:
    _, buyer_key, seller_key = market(c)
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    job_ids = [submit_ok(c, buyer_key, prompt=f"job {i}")["id"] for i in range(n)]
    wait_until(lambda: all_terminal(c, buyer_key, job_ids), timeout=60, what="the jobs to end")
    return buyer_key, job_ids


def test_projections_rebuild_serves_the_old_views_until_it_switches(
    make_server: ServerFactory,
) -> None:
    server = make_server()
    c = server.client
    buyer_key, job_ids = jobs_done(c, 5)

    with polling(c, buyer_key, job_ids) as seen:
        # Jobs submitted during the rebuild are in the views after it, exactly once.
        during = [submit_ok(c, buyer_key, prompt=f"during {i}")["id"] for i in range(3)]
        rebuilt = server.cli("projections", "rebuild")
        wait_until(lambda: sum(seen.values()) > 3 * len(job_ids), timeout=30, what="polls")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "switched them in" in rebuilt.stdout, rebuilt.stdout
    assert set(seen) == {200}, seen
    wait_until(lambda: all_terminal(c, buyer_key, during), timeout=60, what="the new jobs to end")
    listed = c.get("/v1/video/generations?limit=100", key=buyer_key).json()["data"]
    assert sorted(j["id"] for j in listed) == sorted(job_ids + during)
    verified = server.cli("replay", "--verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


def _outdate_views(database_url: str, server: Server) -> None:
    """As if the views had been built by an older release (another schema version)."""
    if database_url.startswith("sqlite"):
        import sqlite3

        path = server.data_dir / "data" / "views.db"
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE mm_schema SET version = 1")
        return
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE mm_schema SET version = 1")


def test_a_new_schema_is_built_beside_the_old_views_and_never_404s(
    make_server: ServerFactory, database_url: str
) -> None:
    old = make_server()
    c = old.client
    buyer_key, job_ids = jobs_done(c, 5)
    _outdate_views(database_url, old)
    sqlite = database_url.startswith("sqlite")
    if sqlite:
        old.stop()  # one process per SQLite file: the restarted engine is the new release

    with polling(c, buyer_key, job_ids) as seen_old:
        new = make_server(start=False)
        new.start(wait=False)
        with polling(new.client, buyer_key, job_ids) as seen_new:
            new.wait_ready(60)
            wait_until(lambda: seen_new[200] >= len(job_ids), timeout=30, what="polls")
    # Refused before it listens, 503 while it builds, 200 after: never a 404.
    assert set(seen_new) <= {0, 200, 503} and seen_new[200], seen_new
    if not sqlite:
        # A rolling deploy: the old process served throughout, the switch included.
        assert set(seen_old) == {200}, seen_old
    assert "views_rebuilding_for_new_schema" in new.logs()
    verified = new.cli("replay", "--verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
