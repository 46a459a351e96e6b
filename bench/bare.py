"""The baseline: a bare aiohttp server with the same runner settings and event loop as
``mediamarket serve``.

``GET /json`` answers what the engine's poll of a finished job answers: 200 and a document of
the same shape and size (a canceled job's, 532 bytes of compact JSON; ``bench.servers`` checks
the engine's against it), with an ``X-Request-Id`` as the engine sends. ``POST /json`` reads a
JSON body and answers 202 with a similar document. Run as its own process:
``python -m bench.bare --port N``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import time
import uuid

from aiohttp import web

from api import eventloop
from api.responses import compact_json

JOB_ID = str(uuid.UUID(int=1))
# A canceled job's poll document as the engine serves it (projections/jobdoc.py), key for key.
JOB = {
    "id": JOB_ID,
    "object": "media.job",
    "kind": "video",
    "status": "canceled",
    "created": 1_795_666_551,
    "expires_at": 1_795_668_351,
    "model": "venice-seedance-2-fast-t2v",
    "estimated_cost_usdc": "128000",
    "max_cost_usdc": "140800",
    "poll_url": f"/v1/video/generations/{JOB_ID}",
    "cancel_url": f"/v1/video/generations/{JOB_ID}",
    "metadata": {},
    "progress": 0.0,
    "eta_seconds": None,
    "results": [],
    "usage": {"seller_cost_usdc": "0", "buyer_cost_usdc": "0", "settlement_status": "released"},
}
# What ``POST /json`` answers (with a fresh id), as before: the submit rows' baseline.
SUBMITTED = {
    "id": JOB_ID,
    "object": "video.generation",
    "model": "venice-seedance-2-fast-t2v",
    "status": "queued",
    "prompt": "bench",
    "created_at": 1_700_000_000,
    "duration_seconds": 5,
    "resolution": "720p",
    "aspect_ratio": "16:9",
    "estimated_cost_usdc": "1200000",
    "results": [],
    "error": None,
}
REQUEST_IDS = itertools.count()


async def get_json(request: web.Request) -> web.Response:
    response = web.json_response(JOB, dumps=compact_json)
    response.headers["X-Request-Id"] = f"req_000000000000{next(REQUEST_IDS):010x}"
    return response


async def post_json(request: web.Request) -> web.Response:
    body = json.loads(await request.read())
    if not isinstance(body, dict):
        return web.json_response({"error": "body must be an object"}, status=400)
    return web.json_response(
        {
            **SUBMITTED,
            "id": str(uuid.uuid4()),
            "prompt": body.get("prompt"),
            "created_at": time.time(),
        },
        status=202,
        dumps=compact_json,
    )


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/json", get_json)
    app.router.add_post("/json", post_json)
    app.router.add_get("/healthz", healthz)
    return app


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "catalog": True})


async def serve(host: str, port: int) -> None:
    # The same runner options as ``api.cli.serve``: no access log, our own signal handling.
    runner = web.AppRunner(create_app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"bare aiohttp on http://{host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    eventloop.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
