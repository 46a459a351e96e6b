"""The built-in sandbox provider: a real HTTP server speaking the Venice video protocol.

SPEC 5.1 is the wire contract and 5.2 the catalog and the magic keys. The engine talks to this
exactly as it talks to Venice, so everything it learns here (prices, failures, timeouts) is
exercised over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import re
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from adapters.media import pixel_size, render_mp4
from domain.money import usd_to_micros

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
DEFAULT_ASPECT_RATIO = "16:9"
BASE_ASPECT_RATIOS = ("16:9", "9:16", "1:1")
ALL_ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4", "21:9")
AUDIO_MULTIPLIER = "1.25"


@dataclass(frozen=True)
class SimModel:
    id: str
    name: str
    model_type: str
    durations: tuple[int, ...]
    # Resolution -> USD per second as a decimal string, lowest resolution first (the default).
    usd_per_second: tuple[tuple[str, str], ...]
    aspect_ratios: tuple[str, ...]
    audio_multiplier: str | None
    image_input: bool

    @property
    def audio(self) -> bool:
        return self.audio_multiplier is not None

    @property
    def default_resolution(self) -> str:
        return self.usd_per_second[0][0]

    def rate(self, resolution: str) -> Decimal | None:
        for name, usd in self.usd_per_second:
            if name == resolution:
                return Decimal(usd)
        return None


# The single source of truth for both the /models catalog and every quote (SPEC 5.2).
CATALOG: tuple[SimModel, ...] = (
    SimModel(
        id="runway-gen4-5-text",
        name="Runway Gen-4.5",
        model_type="text-to-video",
        durations=(5, 10),
        usd_per_second=(("720p", "0.10"), ("1080p", "0.15")),
        aspect_ratios=BASE_ASPECT_RATIOS,
        audio_multiplier=None,
        image_input=False,
    ),
    SimModel(
        id="seedance-2-fast-t2v",
        name="Seedance 2 Fast",
        model_type="text-to-video",
        durations=(4, 6, 8, 12),
        usd_per_second=(("480p", "0.04"), ("720p", "0.06"), ("1080p", "0.10")),
        aspect_ratios=ALL_ASPECT_RATIOS,
        audio_multiplier=AUDIO_MULTIPLIER,
        image_input=False,
    ),
    SimModel(
        id="pixverse-c1-t2v",
        name="PixVerse C1",
        model_type="text-to-video",
        durations=(5, 8),
        usd_per_second=(("720p", "0.05"), ("1080p", "0.09")),
        aspect_ratios=BASE_ASPECT_RATIOS,
        audio_multiplier=AUDIO_MULTIPLIER,
        image_input=False,
    ),
    SimModel(
        id="wan-2-5-i2v",
        name="Wan 2.5 Image-to-Video",
        model_type="image-to-video",
        durations=(5, 10),
        usd_per_second=(("480p", "0.03"), ("720p", "0.05"), ("1080p", "0.085")),
        aspect_ratios=BASE_ASPECT_RATIOS,
        audio_multiplier=None,
        image_input=True,
    ),
)
MODELS = {m.id: m for m in CATALOG}


def catalog_entry(model: SimModel) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "type": "video",
        "owned_by": "venice.ai",
        "model_spec": {
            "name": model.name,
            "constraints": {
                "model_type": model.model_type,
                "durations": [f"{d}s" for d in model.durations],
                "resolutions": [r for r, _ in model.usd_per_second],
                "aspect_ratios": list(model.aspect_ratios),
                "audio": model.audio,
                "image_input": model.image_input,
                "default_resolution": model.default_resolution,
                "default_aspect_ratio": DEFAULT_ASPECT_RATIO,
            },
            "pricing": {
                "usd_per_second": dict(model.usd_per_second),
                "audio_multiplier": model.audio_multiplier,
            },
        },
    }


# Keys that act at queue time; the rest act on retrieve.
GATEWAY_REFUSALS = {"sim_401": (401, "invalid API key"), "sim_429": (429, "rate limit exceeded")}
INSUFFICIENT_BALANCE_KEY = "sim_402"
QUEUE_TIMEOUT_KEY = "sim_queue_timeout"
BEHAVIOURS = {
    "sim_fail_inference": "fail_inference",
    "sim_content_policy": "content_policy",
    "sim_flaky": "flaky",
    "sim_never": "never",
}
OK = "ok"
# Bounds a hanging queue request when the host server doesn't cancel handlers on disconnect.
QUEUE_HANG_LIMIT_SECONDS = 3600.0

_DURATION = re.compile(r"^([1-9][0-9]{0,3})s$")


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class BadRequest(Exception):
    pass


class NotFound(Exception):
    pass


@dataclass(frozen=True)
class VideoRequest:
    model: SimModel
    seconds: int
    resolution: str
    aspect_ratio: str
    audio: bool

    def quote(self) -> Decimal:
        rate = self.model.rate(self.resolution)
        assert rate is not None  # validated when parsed
        amount = rate * self.seconds
        if self.audio and self.model.audio_multiplier is not None:
            amount *= Decimal(self.model.audio_multiplier)
        return amount


def parse_video_request(body: dict[str, Any]) -> VideoRequest:
    model_id = body.get("model")
    model = MODELS.get(model_id) if isinstance(model_id, str) else None
    if model is None:
        raise BadRequest(f"unknown model: {model_id!r}")
    duration = body.get("duration")
    match = _DURATION.match(duration) if isinstance(duration, str) else None
    if match is None or int(match.group(1)) not in model.durations:
        allowed = ", ".join(f"{d}s" for d in model.durations)
        raise BadRequest(f"duration must be one of {allowed} for {model.id}")
    resolution = body.get("resolution")
    if resolution is None:
        resolution = model.default_resolution
    if not isinstance(resolution, str) or model.rate(resolution) is None:
        allowed = ", ".join(r for r, _ in model.usd_per_second)
        raise BadRequest(f"resolution must be one of {allowed} for {model.id}")
    aspect_ratio = body.get("aspect_ratio")
    if aspect_ratio is None:
        aspect_ratio = DEFAULT_ASPECT_RATIO
    if not isinstance(aspect_ratio, str) or aspect_ratio not in model.aspect_ratios:
        allowed = ", ".join(model.aspect_ratios)
        raise BadRequest(f"aspect_ratio must be one of {allowed} for {model.id}")
    audio = body.get("audio")
    if audio is None:
        audio = False
    if not isinstance(audio, bool):
        raise BadRequest("audio must be a boolean")
    if audio and not model.audio:
        raise BadRequest(f"{model.id} does not support audio")
    return VideoRequest(model, int(match.group(1)), resolution, aspect_ratio, audio)


def decimal_json(amount: Decimal) -> str:
    """A JSON number naming ``amount`` exactly: ``0.24``, never ``0.24000000000000002``."""
    return format(amount.normalize(), "f")


@dataclass
class SimJob:
    queue_id: str
    key_hash: str
    behaviour: str
    model: str
    seconds: int
    resolution: str
    aspect_ratio: str
    audio: bool
    queued_at: float  # wall clock, so the render finishes on time across a restart
    retrieve_calls: int = 0


@dataclass
class KeyBilling:
    billed_micros: int = 0
    jobs: int = 0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS sim_jobs (
    queue_id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL,
    behaviour TEXT NOT NULL,
    model TEXT NOT NULL,
    seconds INTEGER NOT NULL,
    resolution TEXT NOT NULL,
    aspect_ratio TEXT NOT NULL,
    audio INTEGER NOT NULL,
    queued_at REAL NOT NULL,
    retrieve_calls INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sim_billing (
    key_hash TEXT PRIMARY KEY,
    billed_micros INTEGER NOT NULL,
    jobs INTEGER NOT NULL
);
"""


class SimStore:
    """Jobs and billing: in memory, written through to SQLite when a path is given.

    Reads are served from memory. Writes are applied in memory first (so concurrent handlers
    on the loop see them at once) and then persisted on one dedicated thread, which keeps
    SQLite's single-connection rule and the order of writes.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.jobs: dict[str, SimJob] = {}
        self.billing: dict[str, KeyBilling] = {}
        self._db: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def open(self) -> None:
        if self.path is None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim-sqlite")
        await self._run(self._open_sync)

    async def close(self) -> None:
        if self._executor is None:
            return
        await self._run(self._close_sync)
        self._executor.shutdown(wait=True)
        self._executor = None

    async def _run(self, fn: Callable[[], None]) -> None:
        if self._executor is not None:
            await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def _open_sync(self) -> None:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(_SCHEMA)
        for row in db.execute(
            "SELECT queue_id, key_hash, behaviour, model, seconds, resolution, aspect_ratio,"
            " audio, queued_at, retrieve_calls FROM sim_jobs"
        ):
            job = SimJob(*row)
            job.audio = bool(job.audio)
            self.jobs[job.queue_id] = job
        for key_hash, micros, jobs in db.execute(
            "SELECT key_hash, billed_micros, jobs FROM sim_billing"
        ):
            self.billing[key_hash] = KeyBilling(micros, jobs)
        self._db = db

    def _close_sync(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> Callable[[], None]:
        def run() -> None:
            assert self._db is not None
            with contextlib.closing(self._db.cursor()) as cur:
                cur.execute("BEGIN IMMEDIATE")
                try:
                    for sql, args in statements:
                        cur.execute(sql, args)
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                cur.execute("COMMIT")

        return run

    async def add_job(self, job: SimJob, micros: int) -> None:
        """Record an accepted job and bill its key, atomically on disk."""
        self.jobs[job.queue_id] = job
        billing = self.billing.setdefault(job.key_hash, KeyBilling())
        billing.billed_micros += micros
        billing.jobs += 1
        await self._run(
            self._write(
                [
                    (
                        "INSERT INTO sim_jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            job.queue_id,
                            job.key_hash,
                            job.behaviour,
                            job.model,
                            job.seconds,
                            job.resolution,
                            job.aspect_ratio,
                            int(job.audio),
                            job.queued_at,
                            job.retrieve_calls,
                        ),
                    ),
                    (
                        "INSERT INTO sim_billing VALUES (?, ?, ?) ON CONFLICT(key_hash) DO"
                        " UPDATE SET billed_micros = excluded.billed_micros, jobs = excluded.jobs",
                        (job.key_hash, billing.billed_micros, billing.jobs),
                    ),
                ]
            )
        )

    async def count_retrieve(self, job: SimJob) -> int:
        job.retrieve_calls += 1
        calls = job.retrieve_calls
        await self._run(
            self._write(
                [
                    (
                        "UPDATE sim_jobs SET retrieve_calls = ? WHERE queue_id = ?",
                        (calls, job.queue_id),
                    )
                ]
            )
        )
        return calls

    async def delete_job(self, queue_id: str) -> None:
        self.jobs.pop(queue_id, None)
        await self._run(self._write([("DELETE FROM sim_jobs WHERE queue_id = ?", (queue_id,))]))


class RenderCache:
    """Finished videos per (width, height, seconds), rendered once off the event loop."""

    def __init__(self) -> None:
        self._done: dict[tuple[int, int, int], bytes] = {}
        self._pending: dict[tuple[int, int, int], asyncio.Future[bytes]] = {}

    async def get(self, width: int, height: int, seconds: int) -> bytes:
        key = (width, height, seconds)
        cached = self._done.get(key)
        if cached is not None:
            return cached
        pending = self._pending.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(None, render_mp4, width, height, seconds)
            self._pending[key] = pending
            pending.add_done_callback(functools.partial(self._settle, key))
        # Shielded so a waiter whose client went away doesn't cancel the render for the others.
        return await asyncio.shield(pending)

    def _settle(self, key: tuple[int, int, int], future: asyncio.Future[bytes]) -> None:
        del self._pending[key]
        # Reading the exception also marks it retrieved when every waiter has gone.
        if not future.cancelled() and future.exception() is None:
            self._done[key] = future.result()


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Simulator:
    def __init__(self, render_seconds: float, state_path: Path | None) -> None:
        self.render_seconds = render_seconds
        self.store = SimStore(state_path)
        self.renders = RenderCache()
        self.stopping = asyncio.Event()

    async def lifecycle(self, app: web.Application) -> AsyncIterator[None]:
        await self.store.open()
        yield
        await self.store.close()

    async def on_shutdown(self, app: web.Application) -> None:
        # Releases hanging queue requests so the server's graceful shutdown doesn't wait on them.
        self.stopping.set()

    # -- endpoints ------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        kind = request.query.get("type", "video")
        data = [catalog_entry(m) for m in CATALOG] if kind == "video" else []
        return web.json_response({"object": "list", "type": kind, "data": data})

    async def billing(self, request: web.Request) -> web.Response:
        keys = {
            key_hash: {"billed_micros": str(b.billed_micros), "jobs": b.jobs}
            for key_hash, b in self.store.billing.items()
        }
        return web.json_response({"keys": keys})

    async def quote(self, request: web.Request, api_key: str, body: dict[str, Any]) -> web.Response:
        video = parse_video_request(body)
        return web.Response(
            text=f'{{"quote": {decimal_json(video.quote())}}}', content_type="application/json"
        )

    async def queue(self, request: web.Request, api_key: str, body: dict[str, Any]) -> web.Response:
        # A gateway turns away bad keys and rate-limited callers before reading the request.
        refusal = GATEWAY_REFUSALS.get(api_key)
        if refusal is not None:
            return _error(*refusal)
        video = parse_video_request(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("prompt is required")
        image_url = body.get("image_url")
        if video.model.image_input:
            if not isinstance(image_url, str) or not image_url.strip():
                raise BadRequest(f"{video.model.id} needs image_url")
        elif image_url is not None:
            raise BadRequest(f"{video.model.id} does not take image_url")
        if api_key == INSUFFICIENT_BALANCE_KEY:
            return _error(402, "insufficient balance")
        if api_key == QUEUE_TIMEOUT_KEY:
            # Nothing is recorded or billed: this models a provider that hangs before accepting.
            await self._hang(request)
            raise web.HTTPGatewayTimeout()
        job = SimJob(
            queue_id=str(uuid.uuid4()),
            key_hash=key_digest(api_key),
            behaviour=BEHAVIOURS.get(api_key, OK),
            model=video.model.id,
            seconds=video.seconds,
            resolution=video.resolution,
            aspect_ratio=video.aspect_ratio,
            audio=video.audio,
            queued_at=time.time(),
        )
        await self.store.add_job(job, usd_to_micros(video.quote()))
        return web.json_response({"model": job.model, "queue_id": job.queue_id})

    async def _hang(self, request: web.Request) -> None:
        deadline = time.monotonic() + QUEUE_HANG_LIMIT_SECONDS
        while time.monotonic() < deadline and not self.stopping.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=0.5)

    def _owned_job(self, api_key: str, body: dict[str, Any]) -> SimJob:
        queue_id, model = body.get("queue_id"), body.get("model")
        if not isinstance(queue_id, str) or not isinstance(model, str):
            raise BadRequest("model and queue_id are required")
        job = self.store.jobs.get(queue_id)
        # Another key's job is reported as missing, so queue ids don't leak across accounts.
        if job is None or job.key_hash != key_digest(api_key) or job.model != model:
            raise NotFound("queue_id not found")
        return job

    async def retrieve(
        self, request: web.Request, api_key: str, body: dict[str, Any]
    ) -> web.StreamResponse:
        job = self._owned_job(api_key, body)
        delete_media = body.get("delete_media_on_completion", False)
        if not isinstance(delete_media, bool):
            raise BadRequest("delete_media_on_completion must be a boolean")
        if job.behaviour == "flaky":
            calls = await self.store.count_retrieve(job)
            if calls % 2 == 1:
                return _error(503, "capacity exhausted, retry later")
        if job.behaviour == "content_policy":
            return _error(422, "the prompt was rejected by the content policy")
        elapsed = max(0.0, time.time() - job.queued_at)
        if job.behaviour == "never" or elapsed < self.render_seconds:
            return web.json_response(
                {
                    "status": "PROCESSING",
                    "average_execution_time": int(self.render_seconds * 1000),
                    "execution_duration": int(elapsed * 1000),
                }
            )
        if job.behaviour == "fail_inference":
            return _error(500, "inference failed")
        width, height = pixel_size(job.resolution, job.aspect_ratio)
        video = await self.renders.get(width, height, job.seconds)
        if delete_media:
            await self.store.delete_job(job.queue_id)
        return web.Response(body=video, content_type="video/mp4")

    async def complete(
        self, request: web.Request, api_key: str, body: dict[str, Any]
    ) -> web.Response:
        job = self._owned_job(api_key, body)
        await self.store.delete_job(job.queue_id)
        return web.json_response({"success": True})


AuthedHandler = Callable[[web.Request, str, dict[str, Any]], Awaitable[web.StreamResponse]]


def _authed(handler: AuthedHandler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        api_key = _bearer(request)
        if api_key is None or not api_key.startswith("sim_"):
            return _error(401, "invalid API key")
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "the request body is too large")
        except ValueError:
            return _error(400, "the body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        try:
            return await handler(request, api_key, body)
        except BadRequest as e:
            return _error(400, str(e))
        except NotFound as e:
            return _error(404, str(e))

    return wrapped


def create_simulator_app(
    *, render_seconds: float = 3.0, state_path: Path | None = None
) -> web.Application:
    sim = Simulator(render_seconds, state_path)
    app = web.Application()
    app.cleanup_ctx.append(sim.lifecycle)
    app.on_shutdown.append(sim.on_shutdown)
    app.router.add_get(f"{API_PREFIX}/models", sim.models)
    app.router.add_get(f"{API_PREFIX}/sim/billing", sim.billing)
    app.router.add_post(f"{API_PREFIX}/video/quote", _authed(sim.quote))
    app.router.add_post(f"{API_PREFIX}/video/queue", _authed(sim.queue))
    app.router.add_post(f"{API_PREFIX}/video/retrieve", _authed(sim.retrieve))
    app.router.add_post(f"{API_PREFIX}/video/complete", _authed(sim.complete))
    return app


async def run_simulator(
    host: str, port: int, *, render_seconds: float, state_path: Path | None
) -> None:
    """Serve the simulator until cancelled (``mediamarket sim``)."""
    app = create_simulator_app(render_seconds=render_seconds, state_path=state_path)
    # Cancelling handlers on disconnect ends a sim_queue_timeout hang as soon as the client quits.
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("simulator listening on http://%s:%d%s", host, port, API_PREFIX)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


class BillingUnavailable(Exception):
    """The provider at a base URL publishes no bill we can read."""


async def read_billing(session: aiohttp.ClientSession, base_url: str) -> dict[str, int]:
    """What the simulator behind ``base_url`` (``.../api/v1``) billed, per key hash."""
    url = f"{base_url.rstrip('/')}/sim/billing"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
            if r.status != 200:
                raise BillingUnavailable(f"{url} answered {r.status}: not the simulator")
            body = await r.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:
        raise BillingUnavailable(f"cannot read {url}: {e or type(e).__name__}") from None
    return {key: int(entry["billed_micros"]) for key, entry in body["keys"].items()}
