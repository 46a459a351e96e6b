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


# Venice answers /models with a release date per model; a fixed one keeps the catalog stable.
CREATED = 1_760_000_000
# Venice's default prompt limit for a video model (its ModelResponse documentation).
PROMPT_CHARACTER_LIMIT = 2500


def catalog_entry(model: SimModel) -> dict[str, Any]:
    """A ``ModelResponse`` of Venice's ``GET /models?type=video``, video constraints and all.

    Venice lists no prices for video models (they come from ``/video/quote``), so neither does
    the simulator; and no default resolution or aspect ratio, which SPEC 5.2 fixes instead.
    """
    return {
        "id": model.id,
        "object": "model",
        "type": "video",
        "owned_by": "venice.ai",
        "created": CREATED,
        "model_spec": {
            "name": model.name,
            "privacy": "anonymized",
            "traits": [],
            "constraints": {
                "model_type": model.model_type,
                "durations": [f"{d}s" for d in model.durations],
                "resolutions": [r for r, _ in model.usd_per_second],
                "aspect_ratios": list(model.aspect_ratios),
                "audio": model.audio,
                "audio_configurable": model.audio,
                "prompt_character_limit": PROMPT_CHARACTER_LIMIT,
            },
        },
    }


MODEL_TYPES = frozenset(
    {
        "asr",
        "embedding",
        "image",
        "music",
        "text",
        "tts",
        "upscale",
        "inpaint",
        "video",
        "all",
        "code",
    }
)


def models_payload(kind: str | None = "video") -> dict[str, Any]:
    """The whole ``/models`` answer: video models for ``type=video`` or ``all``."""
    if kind not in MODEL_TYPES:
        kind = "all"
    data = [catalog_entry(m) for m in CATALOG] if kind in ("video", "all") else []
    return {"object": "list", "type": kind, "data": data}


# Keys that act at queue time, in Venice's own words (its error-codes page); the rest act later.
GATEWAY_REFUSALS = {
    "sim_401": (401, "Authentication failed"),
    "sim_429": (429, "Rate limit exceeded"),
}
INSUFFICIENT_BALANCE = (
    402,
    "Insufficient USD or Diem balance to complete request. "
    "Visit https://venice.ai/settings/api to add credits.",
)
INSUFFICIENT_BALANCE_KEY = "sim_402"
CONSENT_KEY = "sim_consent"
QUEUE_TIMEOUT_KEY = "sim_queue_timeout"
BEHAVIOURS = {
    "sim_fail_inference": "fail_inference",
    "sim_content_policy": "content_policy",
    "sim_flaky": "flaky",
    "sim_never": "never",
    "sim_download_url": "download_url",
    "sim_slow": "slow",
}
OK = "ok"
# sim_slow runs this many times SIM_RENDER_SECONDS, reporting its progress all along.
SLOW_FACTOR = 4
# Bounds a hanging queue request when the host server doesn't cancel handlers on disconnect.
QUEUE_HANG_LIMIT_SECONDS = 3600.0
# Where a sim_download_url job's video is served, below the API prefix: like Venice's
# pre-signed links, the URL itself is the credential (the queue id is random).
SHARE_PATH = "/share/"

_DURATION = re.compile(r"^([1-9][0-9]{0,3})s$")


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class BadRequest(Exception):
    """A request Venice would answer 400 (``DetailedError``), naming the field at fault."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


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
        raise BadRequest(f"Invalid model specified: {model_id!r}", "model")
    duration = body.get("duration")
    match = _DURATION.match(duration) if isinstance(duration, str) else None
    if match is None or int(match.group(1)) not in model.durations:
        allowed = ", ".join(f"{d}s" for d in model.durations)
        raise BadRequest(f"duration must be one of {allowed} for {model.id}", "duration")
    resolution = body.get("resolution")
    if resolution is None:
        resolution = model.default_resolution
    if not isinstance(resolution, str) or model.rate(resolution) is None:
        allowed = ", ".join(r for r, _ in model.usd_per_second)
        raise BadRequest(f"resolution must be one of {allowed} for {model.id}", "resolution")
    aspect_ratio = body.get("aspect_ratio")
    if aspect_ratio is None:
        aspect_ratio = DEFAULT_ASPECT_RATIO
    if not isinstance(aspect_ratio, str) or aspect_ratio not in model.aspect_ratios:
        allowed = ", ".join(model.aspect_ratios)
        raise BadRequest(f"aspect_ratio must be one of {allowed} for {model.id}", "aspect_ratio")
    audio = body.get("audio")
    if audio is None:
        # Venice: "Defaults to true" for models with audio, so an omitted field is billed.
        audio = model.audio
    if not isinstance(audio, bool):
        raise BadRequest("audio must be a boolean", "audio")
    if audio and not model.audio:
        raise BadRequest(f"{model.id} does not support audio", "audio")
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
    """Finished videos per (width, height, seconds, audio), rendered once off the event loop."""

    def __init__(self) -> None:
        self._done: dict[RenderKey, bytes] = {}
        self._pending: dict[RenderKey, asyncio.Future[bytes]] = {}

    async def get(self, width: int, height: int, seconds: int, audio: bool = False) -> bytes:
        key = (width, height, seconds, audio)
        cached = self._done.get(key)
        if cached is not None:
            return cached
        pending = self._pending.get(key)
        if pending is None:
            loop = asyncio.get_running_loop()
            render = functools.partial(render_mp4, width, height, seconds, audio=audio)
            pending = loop.run_in_executor(None, render)
            self._pending[key] = pending
            pending.add_done_callback(functools.partial(self._settle, key))
        # Shielded so a waiter whose client went away doesn't cancel the render for the others.
        return await asyncio.shield(pending)

    def _settle(self, key: RenderKey, future: asyncio.Future[bytes]) -> None:
        del self._pending[key]
        # Reading the exception also marks it retrieved when every waiter has gone.
        if not future.cancelled() and future.exception() is None:
            self._done[key] = future.result()


RenderKey = tuple[int, int, int, bool]


# -- Venice's error bodies (its OpenAPI components), so the engine meets the real shapes here.


def _standard_error(status: int, message: str) -> web.Response:
    """``StandardError``: ``{"error": "<message>"}``."""
    return web.json_response({"error": message}, status=status)


def _detailed_error(message: str, field: str | None = None) -> web.Response:
    """``DetailedError`` (400): the message plus per-field details, as Venice's validation."""
    details: dict[str, Any] = {"_errors": []}
    if field is None:
        details["_errors"].append(message)
    else:
        details[field] = {"_errors": [message]}
    return web.json_response({"error": message, "details": details}, status=400)


def _payload_too_large() -> web.Response:
    """``PayloadTooLargeError`` (413 on queue)."""
    return web.json_response(
        {
            "code": "PAYLOAD_TOO_LARGE",
            "error": "The request payload is too large. Please reduce the size of your request.",
        },
        status=413,
    )


def _needs_consent() -> web.Response:
    """The 409 of ``/video/queue`` for an account that has not given a model's consent."""
    return web.json_response(
        {
            "error": {
                "code": "needs_consent",
                "message": "Additional consent is required before this request can be queued",
            },
            "consent_flow": "seedance",
            "face_media_roles": ["image"],
            "consent": {"consent_version": "2026-01", "policy_text": "Sandbox consent policy."},
            "docs_url": "https://docs.venice.ai/guides/media/seedance-face-consent",
        },
        status=409,
    )


def _content_policy() -> web.Response:
    """``ProviderContentPolicyError`` (422 on retrieve). The sandbox keeps what it billed."""
    return web.json_response(
        {
            "error": {
                "message": "The selected model provider rejected this request due to its "
                "content policies.",
                "type": "provider_content_policy",
                "credits_refunded": False,
            }
        },
        status=422,
    )


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
        return web.json_response(models_payload(request.query.get("type")))

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
            return _standard_error(*refusal)
        video = parse_video_request(body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("prompt is required", "prompt")
        if len(prompt) > PROMPT_CHARACTER_LIMIT:
            raise BadRequest(
                f"prompt must be at most {PROMPT_CHARACTER_LIMIT} characters", "prompt"
            )
        image_url = body.get("image_url")
        if video.model.image_input:
            if not isinstance(image_url, str) or not image_url.strip():
                raise BadRequest(f"{video.model.id} needs image_url", "image_url")
        elif image_url is not None:
            raise BadRequest(f"{video.model.id} does not take image_url", "image_url")
        if api_key == INSUFFICIENT_BALANCE_KEY:
            return _standard_error(*INSUFFICIENT_BALANCE)
        if api_key == CONSENT_KEY:
            return _needs_consent()
        if api_key == QUEUE_TIMEOUT_KEY:
            # Nothing is recorded or billed: this models a provider that hangs before accepting.
            await self._hang(request)
            return _standard_error(500, "Inference processing failed")
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
        answer = {"model": job.model, "queue_id": job.queue_id}
        if job.behaviour == "download_url":
            answer["download_url"] = self._share_url(request, job.queue_id)
        return web.json_response(answer)

    @staticmethod
    def _share_url(request: web.Request, queue_id: str) -> str:
        # Built from the URL the caller used, so it works mounted under /sim or standing alone.
        prefix = request.path[: -len("/video/queue")]
        return str(request.url.with_path(f"{prefix}{SHARE_PATH}{queue_id}", encoded=False))

    async def _hang(self, request: web.Request) -> None:
        deadline = time.monotonic() + QUEUE_HANG_LIMIT_SECONDS
        while time.monotonic() < deadline and not self.stopping.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=0.5)

    def _owned_job(self, api_key: str, body: dict[str, Any], allowed: frozenset[str]) -> SimJob:
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise BadRequest(f"unrecognized key {unknown[0]!r}", unknown[0])
        queue_id, model = body.get("queue_id"), body.get("model")
        if not isinstance(model, str):
            raise BadRequest("model is required", "model")
        if not isinstance(queue_id, str):
            raise BadRequest("queue_id is required", "queue_id")
        job = self.store.jobs.get(queue_id)
        # Another key's job is reported as missing, so queue ids don't leak across accounts.
        if job is None or job.key_hash != key_digest(api_key) or job.model != model:
            raise NotFound("Media could not be found. Request may be invalid, expired, or deleted.")
        return job

    def _run_seconds(self, job: SimJob) -> float:
        return self.render_seconds * (SLOW_FACTOR if job.behaviour == "slow" else 1)

    async def retrieve(
        self, request: web.Request, api_key: str, body: dict[str, Any]
    ) -> web.StreamResponse:
        job = self._owned_job(api_key, body, RETRIEVE_FIELDS)
        delete_media = body.get("delete_media_on_completion", False)
        if not isinstance(delete_media, bool):
            raise BadRequest(
                "delete_media_on_completion must be a boolean", "delete_media_on_completion"
            )
        if job.behaviour == "flaky":
            calls = await self.store.count_retrieve(job)
            if calls % 2 == 1:
                return _standard_error(503, "The model is at capacity. Please try again later.")
        if job.behaviour == "content_policy":
            return _content_policy()
        run_seconds = self._run_seconds(job)
        elapsed = max(0.0, time.time() - job.queued_at)
        timing = {
            "average_execution_time": int(run_seconds * 1000),
            "execution_duration": int(min(elapsed, run_seconds) * 1000),
        }
        if job.behaviour == "never" or elapsed < run_seconds:
            return web.json_response({"status": "PROCESSING", **timing})
        if job.behaviour == "fail_inference":
            return _standard_error(500, "Inference processing failed")
        if job.behaviour == "download_url":
            # The video is at the queue answer's download_url; retrieve only says it is ready.
            return web.json_response({"status": "COMPLETED", **timing})
        video = await self._video(job)
        if delete_media:
            await self.store.delete_job(job.queue_id)
        return web.Response(body=video, content_type="video/mp4")

    async def _video(self, job: SimJob) -> bytes:
        width, height = pixel_size(job.resolution, job.aspect_ratio)
        return await self.renders.get(width, height, job.seconds, job.audio)

    async def share(self, request: web.Request) -> web.StreamResponse:
        """A pre-signed link's video (no API key: the link is the credential); DELETE revokes it,
        as Venice's private download links allow."""
        job = self.store.jobs.get(request.match_info["queue_id"])
        if job is None or job.behaviour != "download_url":
            return _standard_error(404, "Not found")
        if request.method == "DELETE":
            await self.store.delete_job(job.queue_id)
            return web.Response(status=204)
        if time.time() - job.queued_at < self._run_seconds(job):
            return _standard_error(404, "Not ready")
        return web.Response(body=await self._video(job), content_type="video/mp4")

    async def complete(
        self, request: web.Request, api_key: str, body: dict[str, Any]
    ) -> web.Response:
        try:
            job = self._owned_job(api_key, body, COMPLETE_FIELDS)
        except NotFound:
            # Venice documents no 404 here; an unknown request id is its REQUEST_ID_NOT_FOUND.
            raise BadRequest("Request ID is invalid.", "queue_id") from None
        await self.store.delete_job(job.queue_id)
        return web.json_response({"success": True})


RETRIEVE_FIELDS = frozenset({"model", "queue_id", "delete_media_on_completion"})
COMPLETE_FIELDS = frozenset({"model", "queue_id"})
AuthedHandler = Callable[[web.Request, str, dict[str, Any]], Awaitable[web.StreamResponse]]


def _endpoint(handler: AuthedHandler, *, auth: bool = True, path: str = "") -> Handler:
    """Venice's gateway around one endpoint: the API key (where the path needs one), a JSON
    object body, and its documented error shapes for what goes wrong there."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        api_key = _bearer(request) or ""
        if auth and not api_key.startswith("sim_"):
            return _standard_error(401, "Authentication failed")
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            if path == "queue":
                return _payload_too_large()
            return _detailed_error("The request payload is too large.")
        except ValueError:
            return _detailed_error("Invalid request parameters: the body must be JSON")
        if not isinstance(body, dict):
            return _detailed_error("Invalid request parameters: the body must be a JSON object")
        try:
            return await handler(request, api_key, body)
        except BadRequest as e:
            return _detailed_error(str(e), e.field)
        except NotFound as e:
            return _standard_error(404, str(e))

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
    # Venice's quote is public (no security in its OpenAPI): any caller gets a price.
    app.router.add_post(f"{API_PREFIX}/video/quote", _endpoint(sim.quote, auth=False))
    app.router.add_post(f"{API_PREFIX}/video/queue", _endpoint(sim.queue, path="queue"))
    app.router.add_post(f"{API_PREFIX}/video/retrieve", _endpoint(sim.retrieve))
    app.router.add_post(f"{API_PREFIX}/video/complete", _endpoint(sim.complete))
    app.router.add_get(f"{API_PREFIX}{SHARE_PATH}{{queue_id}}", sim.share)
    app.router.add_delete(f"{API_PREFIX}{SHARE_PATH}{{queue_id}}", sim.share)
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
