"""The ``mediamarket`` command line."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from adapters.crypto import sha256_hex
from adapters.eventstore import Connections, open_market
from adapters.logs import configure_logging
from adapters.progress import Progress
from adapters.settings import ConfigError, Settings, load_settings
from api import eventloop
from api import finance as finance_api
from api.app import create_app, create_ops_app, is_embedded_simulator
from api.bootstrap import Engine
from api.http import STARTUP, Runner
from projections.views import VIEWS_NAME, scratch_views
from services import exports, finance
from services.audit import job_history, render_text
from services.rebuild import rebuild_live
from services.replay import LogSource, Verification
from services.replay import verify as verify_replay

log = structlog.get_logger("cli")
DEMO_MODELS = {
    "venice-seedance-2-fast-t2v": ["0.80", "0.90"],
    "venice-runway-gen4-5-text": ["0.80"],
    "venice-pixverse-c1-t2v": ["0.80"],
    "venice-wan-2-5-i2v": ["0.80"],
}
DEMO_DEPOSIT_USDC = 100_000_000
# How long a one-off command waits for an unreachable database before it gives up (servers
# and workers wait for ever).
TOOL_WAIT = 60.0
# A full collection of a serving process at most once per this many young-generation
# (gen 1) collections: under submit load that is about every 50 s instead of every 5 s.
SERVING_FULL_COLLECTION_EVERY = 100


def settle_heap() -> None:
    """Before serving: what startup built (modules, the catalog, the views' caches so far) is
    frozen out of the collector, and full collections are made ten times rarer. A full
    collection stops the process for as long as it takes to scan everything tracked (60-80 ms
    measured under submit load on a busy 2-core machine), stalling every request in flight;
    at the default threshold one fell in every 5 s of load, a fair part of a submit's p99.
    Garbage in cycles waits longer to be freed, which the bounded caches keep small. A live
    ``projections rebuild`` ends the freeze (``projections.runner.fewer_collections``
    unfreezes) but keeps the thresholds."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, SERVING_FULL_COLLECTION_EVERY)


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def seed_demo(engine: Engine) -> dict[str, str]:
    """A funded demo buyer and demo offers, once per data directory."""
    marker = engine.settings.data_dir / "demo.json"
    if marker.exists():
        demo = dict(json.loads(marker.read_text()))
        # The marker may belong to another database (a fresh PostgreSQL, say): check it.
        if await engine.read(engine.views.principal, sha256_hex(demo["buyer_api_key"])):
            return demo
        marker.unlink()
    commands = engine.commands
    buyer_id, buyer_key, _ = await engine.blocking(commands.create_buyer, "demo buyer")
    await engine.blocking(commands.deposit, buyer_id, DEMO_DEPOSIT_USDC, "demo-funding")
    seller_id, seller_key, _ = await engine.blocking(commands.create_seller, "demo seller")
    last = 0
    for model, multipliers in DEMO_MODELS.items():
        for multiplier in multipliers:
            _, written = await engine.blocking(
                commands.create_offer,
                seller_id=seller_id,
                model=model,
                provider="venice",
                base_url=None,
                api_key="sim_ok",
                cost_multiplier=multiplier,
                max_concurrent_jobs=None,
            )
            last = written.position
    await engine.blocking(engine.runner.wait_for, last, 10.0)
    demo = {
        "buyer_id": str(buyer_id),
        "buyer_api_key": buyer_key,
        "seller_id": str(seller_id),
        "seller_api_key": seller_key,
    }
    marker.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(demo, f)
    return demo


def demo_banner(settings: Settings, demo: dict[str, str], admin_token: str) -> str:
    base = f"http://127.0.0.1:{settings.PORT}"
    key = demo["buyer_api_key"]
    return f"""
mediamarket is running on {base}

Demo buyer API key:  {key}
Admin token:         {admin_token}

See the market (public):
  curl -s {base}/api/markets/venice-seedance-2-fast-t2v

Submit a job:
  curl -s {base}/v1/video/generations \\
    -H "Authorization: Bearer {key}" -H "Content-Type: application/json" \\
    -d '{{"model": "venice-video-gen", "prompt": "a lighthouse at dusk", "resolution": "720p"}}'

Poll it (status 202 while pending, 200 when done):
  curl -s {base}/v1/video/generations/JOB_ID -H "Authorization: Bearer {key}"

Download the video:
  curl -s -o video.mp4 {base}/v1/media/artifacts/JOB_ID/0 -H "Authorization: Bearer {key}"

Or all at once:
  JOB=$(curl -s {base}/v1/video/generations -H "Authorization: Bearer {key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "venice-video-gen", "prompt": "a lighthouse at dusk", "resolution": "720p"}}' \\
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])') && \\
  until curl -s {base}/v1/video/generations/$JOB -H "Authorization: Bearer {key}" \\
    | grep -q '"status": "succeeded"'; do sleep 1; done && \\
  curl -s -o video.mp4 {base}/v1/media/artifacts/$JOB/0 -H "Authorization: Bearer {key}" \\
  && echo "saved video.mp4"
"""


async def serve(settings: Settings, *, worker: bool) -> None:
    embedded = is_embedded_simulator(settings)
    # Listening before the database is reached: /healthz tells a load balancer (and an
    # operator) what the process waits for, and every other route answers 503 meanwhile.
    app = create_app(None, settings=settings, mount_simulator=embedded)
    startup = app[STARTUP]
    runner = Runner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, settings.HOST, settings.PORT, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise ConfigError(
            f"cannot listen on {settings.HOST}:{settings.PORT}: {e.strerror}"
        ) from None
    try:
        opening = asyncio.ensure_future(
            Engine.open(settings, role="serve" if worker else "api", on_state=startup.set_state)
        )
        stop = asyncio.ensure_future(_wait_for_signal())
        await asyncio.wait({opening, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not opening.done():
            opening.cancel()
            await asyncio.gather(opening, return_exceptions=True)
            return
        stop.cancel()
        engine = opening.result()
    except BaseException:
        await runner.cleanup()
        raise
    try:
        startup.engine = engine
        # Fed in every serving process, not only where a worker runs: /metrics' pending jobs
        # must count what waits even when every worker is down.
        await engine.open_work()
        await engine.load_catalog()
        if settings.MEDIAMARKET_DEMO:
            demo = await seed_demo(engine)
            print(demo_banner(settings, demo, engine.admin_token), flush=True)
        else:
            print(f"mediamarket is running on http://{settings.HOST}:{settings.PORT}", flush=True)
        settle_heap()
        if worker:
            # Unique per process, so no two workers share leases; the one process of an embedded
            # SQLite engine keeps one name, so a restart takes its own jobs back at once.
            solo = embedded and settings.is_sqlite
            await engine.start_worker(
                "embedded" if solo else f"{socket.gethostname()}:{os.getpid()}"
            )
        await _wait_for_signal()
    finally:
        await engine.close()
        await runner.cleanup()


async def run_worker(settings: Settings) -> None:
    engine = await Engine.open(settings, role="worker")
    worker_id = settings.WORKER_ID or f"{socket.gethostname()}:{os.getpid()}"
    ops: web.AppRunner | None = None
    try:
        await engine.start_worker(worker_id)
        if settings.METRICS_PORT is not None:
            ops = Runner(create_ops_app(engine), access_log=None, handle_signals=False)
            await ops.setup()
            try:
                await web.TCPSite(ops, settings.HOST, settings.METRICS_PORT).start()
            except OSError as e:
                raise ConfigError(
                    f"cannot listen on {settings.HOST}:{settings.METRICS_PORT}: {e.strerror}"
                ) from None
        print(f"mediamarket worker {worker_id} running", flush=True)
        await _wait_for_signal()
    finally:
        if ops is not None:
            await ops.cleanup()
        await engine.close()


async def projections(settings: Settings, action: str) -> int:
    engine = await Engine.open(
        settings, role=f"projections-{action}", tool=action != "run", wait_seconds=TOOL_WAIT
    )
    try:
        views, market = engine.views, engine.market
        if action == "digest":
            _print_digest(await engine.blocking(views.digest))
            return 0
        if action == "rebuild":
            # Its connections are few (a tool's two): this one's runner must not hold one
            # waiting on the switch's lock while the switch reads the log with the other.
            await engine.blocking(engine.runner.stop)
            before = await engine.blocking(views.digest)
            env = engine.store_env(VIEWS_NAME)
            source = LogSource(settings.DATABASE_URL, env)
            with Progress(0, "rebuild") as progress:
                position = await engine.blocking(
                    rebuild_live, market, views, env, source=source, on_progress=progress.update
                )
            after = await engine.blocking(views.digest)
            # Served from the old tables until this moment, the new ones from now on.
            print(f"rebuilt the views from the log and switched them in at position {position}")
            _print_digest(after, before)
            return 0
        # run: keep the views up to date until stopped
        print("projection runner running", flush=True)
        await _wait_for_signal()
        return 0
    finally:
        await engine.close()


def _print_digest(after: dict[str, Any], before: dict[str, Any] | None = None) -> None:
    width = max(len(table) for table in after)
    print(f"{'view':<{width}} {'rows':>8}  sha256")
    for table, (rows, digest) in after.items():
        note = ""
        if before is not None:
            note = "  identical" if before.get(table) == (rows, digest) else "  CHANGED"
        print(f"{table:<{width}} {rows:>8}  {digest}{note}")


async def admin(settings: Settings, args: argparse.Namespace) -> None:
    engine = await Engine.open(settings, role="admin", tool=True, wait_seconds=TOOL_WAIT)
    try:
        commands = engine.commands
        if args.admin_command == "create-buyer":
            buyer_id, key, w = await engine.blocking(commands.create_buyer, args.name)
            out: dict[str, Any] = {"buyer_id": str(buyer_id), "api_key": key}
        elif args.admin_command == "create-seller":
            seller_id, key, w = await engine.blocking(commands.create_seller, args.name)
            out = {"seller_id": str(seller_id), "api_key": key}
        else:
            amount = int(args.amount_usdc)
            w = await engine.blocking(commands.deposit, uuid.UUID(args.buyer_id), amount, None)
            out = {"buyer_id": args.buyer_id, "amount_usdc": str(amount)}
        await engine.blocking(engine.runner.wait_for, w.position, 10.0)
        print(json.dumps(out))
    finally:
        await engine.close()


async def audit(settings: Settings, args: argparse.Namespace) -> int:
    """``audit job ID``: one job's whole history from the event log, operator view."""
    try:
        job_id = uuid.UUID(args.job_id)
    except ValueError:
        print(f"mediamarket: {args.job_id!r} is not a job id", file=sys.stderr)
        return 1
    # The event store alone: no projection runner, secrets or provider sessions are needed.
    try:
        connections = Connections(
            pool_size=2,
            application_name=f"mediamarket-audit-{os.getpid()}",
            prepared_statements=settings.DATABASE_PREPARED_STATEMENTS,
        )
        market = await asyncio.to_thread(open_market, settings.DATABASE_URL, connections)
    except Exception as e:
        raise ConfigError(f"cannot open the database at DATABASE_URL: {e}") from None
    try:
        history = await asyncio.to_thread(job_history, market, job_id)
    finally:
        market.close()
    if history is None:
        print(f"mediamarket: no job {job_id}", file=sys.stderr)
        return 1
    print(render_text(history), end="")
    return 0


async def ledger(settings: Settings, args: argparse.Namespace) -> int:
    engine = await Engine.open(settings, role="ledger", tool=True, wait_seconds=TOOL_WAIT)
    try:
        views, name = engine.views, engine.market.name
        if args.ledger_command == "reconcile":
            report = await finance_api.reconcile(engine)
            print(json.dumps(report.as_json(), indent=2) if args.json else report.render())
            return 0 if report.ok else 1
        await finance_api.caught_up_with_log(engine)
        if args.ledger_command == "trial-balance":
            balance = await engine.blocking(finance.trial_balance, views, name)
            print(json.dumps(balance.as_json(), indent=2) if args.json else balance.render())
            return 0 if balance.balanced else 1
        if args.ledger_command == "journal":
            columns = exports.JOURNAL_COLUMNS
            rows = await engine.blocking(exports.journal_rows, views, name, args.first, args.last)
        else:
            columns = exports.SETTLEMENT_EXPORT_COLUMNS
            rows = await engine.blocking(
                exports.settlement_rows, views, name, args.first, args.last
            )
        text = exports.to_csv(columns, rows)
        if args.output:
            await asyncio.to_thread(Path(args.output).write_text, text)
            print(f"wrote {len(rows)} rows to {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0
    finally:
        await engine.close()


async def replay(settings: Settings) -> int:
    engine = await Engine.open(settings, role="replay", tool=True, wait_seconds=TOOL_WAIT)
    try:
        env = engine.store_env(VIEWS_NAME)
        name = engine.market.name

        def verify() -> Verification:
            with scratch_views(env, name) as fresh, Progress(0, "replay") as progress:

                def replayed(done: int, total: int) -> None:
                    progress.update(done, total)
                    if done >= total:
                        progress.close()  # the comparison that follows is not the replay's

                source = LogSource(settings.DATABASE_URL, env)
                return verify_replay(
                    engine.market, engine.views, fresh, source, on_progress=replayed
                )

        result = await engine.blocking(verify)
        print(result.render())
        return 0 if result.ok else 1
    finally:
        await engine.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mediamarket", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="API, worker, projections and (by default) the simulator")
    p.add_argument("--no-worker", action="store_true", help="serve the API only")
    p.add_argument("--port", type=int, help="overrides PORT")
    sub.add_parser("worker", help="run a worker process")
    p = sub.add_parser("projections", help="run, rebuild or digest the read models")
    p.add_argument("action", choices=["run", "rebuild", "digest"])
    p = sub.add_parser("sim", help="run the provider simulator on its own")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--host", default="127.0.0.1")
    p = sub.add_parser("admin", help="operator helpers")
    admin_sub = p.add_subparsers(dest="admin_command", required=True)
    a = admin_sub.add_parser("create-buyer")
    a.add_argument("name")
    a = admin_sub.add_parser("create-seller")
    a.add_argument("name")
    a = admin_sub.add_parser("deposit")
    a.add_argument("buyer_id")
    a.add_argument("amount_usdc", help="integer microdollars")
    p = sub.add_parser("ledger", help="finance: reconciliation, trial balance, CSV exports")
    ledger_sub = p.add_subparsers(dest="ledger_command", required=True)
    a = ledger_sub.add_parser("reconcile", help="check every money invariant; exit 1 on a break")
    a.add_argument("--json", action="store_true", help="the report as JSON")
    a = ledger_sub.add_parser("trial-balance", help="every account's debits, credits, balance")
    a.add_argument("--json", action="store_true", help="as JSON")
    for command, what in (("journal", "posting"), ("settlements", "job creation")):
        a = ledger_sub.add_parser(command, help=f"CSV export, filtered by {what} day (UTC)")
        a.add_argument("--from", dest="first", type=exports.parse_day, help="first day, YYYY-MM-DD")
        a.add_argument("--to", dest="last", type=exports.parse_day, help="last day, YYYY-MM-DD")
        a.add_argument("--output", "-o", help="write to this file instead of stdout")
    p = sub.add_parser("replay", help="rebuild every projection into fresh storage")
    p.add_argument(
        "--verify",
        action="store_true",
        required=True,
        help="compare the rebuilt projections with the live ones; exit 1 on any difference",
    )
    p = sub.add_parser("audit", help="histories from the event log")
    audit_sub = p.add_subparsers(dest="audit_command", required=True)
    a = audit_sub.add_parser("job", help="every event and amount of one job")
    a.add_argument("job_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        overrides: dict[str, Any] = {}
        if getattr(args, "port", None) is not None and args.command == "serve":
            overrides["PORT"] = args.port
        settings = load_settings(**overrides)
        configure_logging(settings.LOG_LEVEL)
        if args.command == "serve":
            eventloop.run(serve(settings, worker=not args.no_worker))
        elif args.command == "worker":
            eventloop.run(run_worker(settings))
        elif args.command == "projections":
            return eventloop.run(projections(settings, args.action))
        elif args.command == "sim":
            from adapters.simulator import run_simulator

            eventloop.run(
                run_simulator(
                    args.host,
                    args.port,
                    render_seconds=settings.SIM_RENDER_SECONDS,
                    state_path=Path(settings.data_dir) / "simulator.db",
                )
            )
        elif args.command == "admin":
            eventloop.run(admin(settings, args))
        elif args.command == "ledger":
            return eventloop.run(ledger(settings, args))
        elif args.command == "replay":
            return eventloop.run(replay(settings))
        elif args.command == "audit":
            return eventloop.run(audit(settings, args))
    except ConfigError as e:
        print(f"mediamarket: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
