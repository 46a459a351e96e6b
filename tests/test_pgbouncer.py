"""Behind PgBouncer in transaction mode (SPEC 8, issue 13): every server connection is lent for
one transaction at a time, so nothing may outlive a transaction on it: no prepared statement
(``DATABASE_PREPARED_STATEMENTS=false``), no session advisory lock, no LISTEN. A real PgBouncer
(Debian's package) in front of the real PostgreSQL; skipped, with the reason, where it is not
installed.

One-off commands that build scratch views (``projections rebuild``, ``replay --verify``) set a
``search_path`` at connect time, which PgBouncer refuses: they connect to PostgreSQL directly
(the README says so).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import psycopg
import pytest

from tests.conftest import _require_postgres
from tests.harness import BIN, Server, base_env, free_port, postgres_database
from tests.test_lifecycle import SEEDANCE, market, submit_ok

PGBOUNCER = shutil.which("pgbouncer") or (
    "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
)


@pytest.fixture
def bouncer() -> Iterator[tuple[str, str]]:
    """(the database's URL through PgBouncer, its direct URL)."""
    if PGBOUNCER is None:
        pytest.skip("PgBouncer is not installed here (Debian: apt-get install pgbouncer)")
    _require_postgres()
    with postgres_database() as direct:
        target = urlparse(direct)
        port = free_port()
        # Open to the user PgBouncer drops to (it refuses to run as root): it writes its log
        # and pid file here.
        directory = Path(tempfile.mkdtemp(prefix="mm-pgbouncer-"))
        directory.chmod(0o777)
        (directory / "users.txt").write_text('"postgres" ""\n')
        (directory / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host={target.hostname} port={target.port or 5432}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {directory}/users.txt\n"
            "pool_mode = transaction\nmax_client_conn = 500\ndefault_pool_size = 20\n"
            f"logfile = {directory}/pgbouncer.log\npidfile = {directory}/pgbouncer.pid\n"
            "admin_users = postgres\n"
        )
        for f in directory.iterdir():
            f.chmod(0o644)
        user = ["-u", "postgres"] if os.geteuid() == 0 else []
        proc = subprocess.Popen(
            [PGBOUNCER, *user, str(directory / "pgbouncer.ini")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            via = f"postgresql://postgres@127.0.0.1:{port}{target.path}"
            deadline = time.monotonic() + 10
            while True:
                try:
                    psycopg.connect(via, connect_timeout=2, prepare_threshold=None).close()
                    break
                except psycopg.OperationalError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log = directory / "pgbouncer.log"
                        said = log.read_text() if log.exists() else ""
                        pytest.fail(f"PgBouncer did not start: {said}")
                    time.sleep(0.1)
            yield via, direct
        finally:
            proc.terminate()
            proc.wait(10)
            shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.postgres
def test_the_engine_runs_behind_pgbouncer_in_transaction_mode(
    bouncer: tuple[str, str], tmp_path: Path
) -> None:
    via, direct = bouncer
    port = free_port()
    env = base_env(via, port, DATABASE_PREPARED_STATEMENTS="false", DATABASE_POOL_SIZE="4")
    server = Server(tmp_path, env, port, [])
    try:
        server.start()
        c = server.client
        _, buyer_key, seller_key = market(c)
        c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
        jobs = [submit_ok(c, buyer_key, prompt=f"job {n}")["id"] for n in range(6)]
        for job_id in jobs:
            assert c.wait_terminal(job_id, buyer_key, timeout=60)["status"] == "succeeded"
        reconciled = server.cli("ledger", "reconcile")
        assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
        assert "prepared statement" not in server.logs()
    finally:
        server.kill()
    # The work went through PgBouncer: the engine's connections were PgBouncer's, and the
    # replay (run directly, as documented) agrees with what was built through it.
    replayed = subprocess.run(
        [str(BIN), "replay", "--verify"],
        env={**env, "DATABASE_URL": direct},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
