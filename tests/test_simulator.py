"""The sandbox provider over real loopback HTTP, one test per magic key (SPEC 5.2).

Every answer on a Venice path is checked against our fixtures of Venice's OpenAPI
(``tests/venice_schema.py``) by the request helpers below, so each test also checks that the
simulator answered in a documented shape: status, content type and body.

Tests never sleep for a render: they poll what the simulator shows (``rendered_by_now`` queues a
``sim_never`` job and waits until its reported progress is complete, which means every job queued
before it has finished rendering too).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from yarl import URL

from adapters.media import probe_mp4
from adapters.simulator import create_simulator_app
from tests.venice_schema import validate_response

RENDER = 0.2
# SPEC 5.2: sim_slow runs four times the render time.
SLOW_FACTOR = 4
API = "/api/v1"
RUNWAY_ID = "runway-gen4-5-text"

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


T2V = {"model": "runway-gen4-5-text", "duration": "5s", "prompt": "a lighthouse at dawn"}
SEEDANCE = {"model": "seedance-2-fast-t2v", "duration": "4s", "prompt": "a lighthouse at dawn"}


@pytest.fixture
async def sim(aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(create_simulator_app(render_seconds=RENDER))


async def documented(resp: aiohttp.ClientResponse) -> bytes:
    """The answer's body, once checked to be one Venice documents for its path."""
    raw = await resp.read()
    path = resp.url.path
    # Mounted under a prefix (/sim/api/v1/...) or standing alone, the Venice path is the same.
    path = path[path.index(API) :]
    validate_response(resp.method, path, resp.status, resp.content_type, raw)
    return raw


async def post(client: Client, path: str, key: str | None, **kw: Any) -> aiohttp.ClientResponse:
    headers = auth(key) if key is not None else {}
    resp = await client.post(f"{API}{path}", headers=headers, **kw)
    await documented(resp)
    return resp


async def queue(client: Client, key: str, **body: Any) -> aiohttp.ClientResponse:
    return await post(client, "/video/queue", key, json={**T2V, **body})


async def queued(client: Client, key: str, **body: Any) -> str:
    resp = await queue(client, key, **body)
    assert resp.status == 200, await resp.text()
    payload = await resp.json()
    assert payload == {"model": {**T2V, **body}["model"], "queue_id": payload["queue_id"]}
    return str(payload["queue_id"])


async def retrieve(
    client: Client, key: str, queue_id: str, model: str = "runway-gen4-5-text", **extra: Any
) -> aiohttp.ClientResponse:
    body = {"model": model, "queue_id": queue_id, **extra}
    return await post(client, "/video/retrieve", key, json=body)


async def complete(
    client: Client, key: str, queue_id: str, model: str = "runway-gen4-5-text", **extra: Any
) -> aiohttp.ClientResponse:
    body = {"model": model, "queue_id": queue_id, **extra}
    return await post(client, "/video/complete", key, json=body)


async def quote(client: Client, key: str | None = "sim_ok", **body: Any) -> aiohttp.ClientResponse:
    return await post(client, "/video/quote", key, json=body)


async def models(client: Client, **params: str) -> aiohttp.ClientResponse:
    resp = await client.get(f"{API}/models", params=params)
    await documented(resp)
    return resp


async def billing(client: Client) -> dict[str, Any]:
    resp = await client.get(f"{API}/sim/billing")
    assert resp.status == 200
    keys: dict[str, Any] = (await resp.json())["keys"]
    return keys


def error_field(payload: dict[str, Any]) -> list[str]:
    """The fields a ``DetailedError`` names as at fault."""
    return sorted(k for k in payload["details"] if k != "_errors")


async def rendered_by_now(client: Client) -> None:
    """Wait until every job queued before this call has finished rendering: a ``sim_never`` job
    queued now reports ``execution_duration == average_execution_time`` once its render time
    (the same as every ``sim_`` job's but sim_slow's) has passed."""
    marker = await queued(client, "sim_never")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        payload = await (await retrieve(client, "sim_never", marker)).json()
        if payload["execution_duration"] >= payload["average_execution_time"]:
            return
        await asyncio.sleep(RENDER / 4)
    raise AssertionError("the render time never passed")


async def wait_for_video(
    client: Client, key: str, queue_id: str, model: str = "runway-gen4-5-text", **extra: Any
) -> bytes:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        resp = await retrieve(client, key, queue_id, model, **extra)
        assert resp.status == 200, await resp.text()
        if resp.content_type == "video/mp4":
            return await resp.read()
        assert (await resp.json())["status"] == "PROCESSING"
        await asyncio.sleep(RENDER / 4)
    raise AssertionError("the video never finished")


def probe(video: bytes, tmp_path: Path, name: str = "v.mp4") -> Any:
    path = tmp_path / name
    path.write_bytes(video)
    return probe_mp4(path)


# -- catalog --------------------------------------------------------------------------------


async def test_catalog_shape(sim: Client) -> None:
    resp = await models(sim, type="video")
    assert resp.status == 200
    catalog = await resp.json()
    assert catalog["object"] == "list" and catalog["type"] == "video"
    by_id = {m["id"]: m for m in catalog["data"]}
    assert set(by_id) == {
        "runway-gen4-5-text",
        "seedance-2-fast-t2v",
        "pixverse-c1-t2v",
        "wan-2-5-i2v",
    }
    runway = by_id["runway-gen4-5-text"]
    assert isinstance(runway.pop("created"), int)
    assert runway == {
        "id": "runway-gen4-5-text",
        "object": "model",
        "type": "video",
        "owned_by": "venice.ai",
        "model_spec": {
            "name": "Runway Gen-4.5",
            "privacy": "anonymized",
            "traits": [],
            "constraints": {
                "model_type": "text-to-video",
                "durations": ["5s", "10s"],
                "resolutions": ["720p", "1080p"],
                "aspect_ratios": ["16:9", "9:16", "1:1"],
                "audio": False,
                "audio_configurable": False,
                "prompt_character_limit": 2500,
            },
        },
    }
    seedance = by_id["seedance-2-fast-t2v"]["model_spec"]["constraints"]
    assert seedance["durations"] == ["4s", "6s", "8s", "12s"]
    assert seedance["resolutions"] == ["480p", "720p", "1080p"]
    assert seedance["aspect_ratios"] == ["16:9", "9:16", "1:1", "4:3", "3:4", "21:9"]
    assert (seedance["audio"], seedance["audio_configurable"]) == (True, True)
    pixverse = by_id["pixverse-c1-t2v"]["model_spec"]["constraints"]
    assert (pixverse["audio"], pixverse["audio_configurable"]) == (True, True)
    assert pixverse["durations"] == ["5s", "8s"]
    wan = by_id["wan-2-5-i2v"]["model_spec"]["constraints"]
    assert wan["model_type"] == "image-to-video"
    assert wan["resolutions"] == ["480p", "720p", "1080p"]
    assert (wan["audio"], wan["audio_configurable"]) == (False, False)
    for model in by_id.values():
        spec = model["model_spec"]
        # Venice lists no video prices (they come from /video/quote) and none of these fields.
        assert "pricing" not in spec
        assert not {"image_input", "default_resolution", "default_aspect_ratio"} & set(
            spec["constraints"]
        )


@pytest.mark.parametrize(
    ("params", "listed_type", "count"),
    [
        ({"type": "video"}, "video", 4),
        ({"type": "all"}, "all", 4),
        ({"type": "text"}, "text", 0),
        ({"type": "image"}, "image", 0),
        ({}, "all", 4),
        ({"type": "nonsense"}, "all", 4),
    ],
)
async def test_catalog_by_type(
    sim: Client, params: dict[str, str], listed_type: str, count: int
) -> None:
    resp = await models(sim, **params)
    assert resp.status == 200
    catalog = await resp.json()
    assert (catalog["type"], len(catalog["data"])) == (listed_type, count)


async def test_catalog_is_public(sim: Client) -> None:
    resp = await sim.get(f"{API}/models", params={"type": "video"}, headers=auth("not-a-sim-key"))
    assert resp.status == 200
    assert (await sim.get(f"{API}/models", params={"type": "video"})).status == 200


# -- quotes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "usd"),
    [
        ({"model": "runway-gen4-5-text", "duration": "5s"}, "0.5"),
        ({"model": "runway-gen4-5-text", "duration": "10s", "resolution": "1080p"}, "1.5"),
        ({"model": "runway-gen4-5-text", "duration": "5s", "audio": False}, "0.5"),
        # Omitted audio is audio on for a model with audio (Venice's default), billed x1.25.
        ({"model": "seedance-2-fast-t2v", "duration": "4s"}, "0.2"),
        ({"model": "seedance-2-fast-t2v", "duration": "4s", "audio": False}, "0.16"),
        ({"model": "seedance-2-fast-t2v", "duration": "4s", "resolution": "720p"}, "0.3"),
        (
            {
                "model": "seedance-2-fast-t2v",
                "duration": "4s",
                "resolution": "720p",
                "audio": False,
            },
            "0.24",
        ),
        (
            {
                "model": "seedance-2-fast-t2v",
                "duration": "12s",
                "resolution": "1080p",
                "audio": True,
            },
            "1.5",
        ),
        ({"model": "seedance-2-fast-t2v", "duration": "6s", "audio": True}, "0.3"),
        ({"model": "seedance-2-fast-t2v", "duration": "8s", "aspect_ratio": "21:9"}, "0.4"),
        (
            {
                "model": "seedance-2-fast-t2v",
                "duration": "8s",
                "aspect_ratio": "21:9",
                "audio": False,
            },
            "0.32",
        ),
        ({"model": "pixverse-c1-t2v", "duration": "5s"}, "0.3125"),
        ({"model": "pixverse-c1-t2v", "duration": "8s", "resolution": "1080p"}, "0.9"),
        (
            {"model": "pixverse-c1-t2v", "duration": "8s", "resolution": "1080p", "audio": True},
            "0.9",
        ),
        (
            {"model": "pixverse-c1-t2v", "duration": "8s", "resolution": "1080p", "audio": False},
            "0.72",
        ),
        ({"model": "pixverse-c1-t2v", "duration": "5s", "audio": False}, "0.25"),
        ({"model": "wan-2-5-i2v", "duration": "5s"}, "0.15"),
        ({"model": "wan-2-5-i2v", "duration": "10s", "resolution": "1080p"}, "0.85"),
        ({"model": "wan-2-5-i2v", "duration": "10s", "resolution": "720p"}, "0.5"),
    ],
)
async def test_quote_amounts(sim: Client, body: dict[str, Any], usd: str) -> None:
    resp = await quote(sim, **body)
    assert resp.status == 200
    text = await resp.text()
    # The wire text itself is the exact decimal, not a float's binary neighbour.
    assert text == f'{{"quote": {usd}}}'
    assert json.loads(text, parse_float=Decimal)["quote"] == Decimal(usd)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "no-such-model", "duration": "5s"}, "model"),
        ({"model": "runway-gen4-5-text", "duration": "6s"}, "duration"),
        ({"model": "runway-gen4-5-text", "duration": 5}, "duration"),
        ({"model": "runway-gen4-5-text", "duration": "5"}, "duration"),
        ({"model": "runway-gen4-5-text"}, "duration"),
        ({"model": "runway-gen4-5-text", "duration": "5s", "resolution": "480p"}, "resolution"),
        ({"model": "runway-gen4-5-text", "duration": "5s", "aspect_ratio": "4:3"}, "aspect_ratio"),
        ({"model": "runway-gen4-5-text", "duration": "5s", "audio": True}, "audio"),
        ({"model": "seedance-2-fast-t2v", "duration": "4s", "audio": "yes"}, "audio"),
        ({"duration": "5s"}, "model"),
    ],
)
async def test_quote_rejects_malformed_requests(
    sim: Client, body: dict[str, Any], field: str
) -> None:
    resp = await quote(sim, **body)
    assert resp.status == 400
    payload = await resp.json()
    assert isinstance(payload["error"], str) and payload["error"]
    assert error_field(payload) == [field]


@pytest.mark.parametrize("raw", [b"{nope", b"[1, 2]", b'"a string"', b""])
async def test_quote_rejects_a_body_that_is_not_a_json_object(sim: Client, raw: bytes) -> None:
    resp = await post(sim, "/video/quote", "sim_ok", data=raw)
    assert resp.status == 400
    assert (await resp.json())["details"] == {"_errors": [(await resp.json())["error"]]}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        auth("live_abc123"),
        {"Authorization": "Basic sim_ok"},
        *(auth(k) for k in ["sim_401", "sim_402", "sim_429", "sim_queue_timeout", "sim_consent"]),
    ],
)
async def test_quote_is_public(sim: Client, headers: dict[str, str]) -> None:
    """Venice's quote needs no key, so every caller gets a price, and nobody is billed for it."""
    resp = await sim.post(
        f"{API}/video/quote",
        json={"model": "runway-gen4-5-text", "duration": "5s"},
        headers=headers,
    )
    await documented(resp)
    assert resp.status == 200
    assert await resp.json() == {"quote": 0.5}
    assert await billing(sim) == {}


# -- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/video/queue", T2V),
        ("/video/retrieve", {"model": "runway-gen4-5-text", "queue_id": "x"}),
        ("/video/complete", {"model": "runway-gen4-5-text", "queue_id": "x"}),
    ],
)
@pytest.mark.parametrize(
    "headers",
    [{}, auth("live_abc123"), {"Authorization": "Basic sim_ok"}, {"Authorization": "Bearer "}],
)
async def test_non_sim_keys_get_401(
    sim: Client, path: str, body: dict[str, Any], headers: dict[str, str]
) -> None:
    resp = await sim.post(f"{API}{path}", json=body, headers=headers)
    await documented(resp)
    assert resp.status == 401
    assert await resp.json() == {"error": "Authentication failed"}


async def test_a_non_sim_key_is_refused_everywhere_but_the_catalog_and_quote(sim: Client) -> None:
    assert (await queue(sim, "vnc_live_123")).status == 401
    assert (await retrieve(sim, "vnc_live_123", "x")).status == 401
    assert (await complete(sim, "vnc_live_123", "x")).status == 401
    resp = await quote(sim, "vnc_live_123", model="runway-gen4-5-text", duration="5s")
    assert resp.status == 200
    assert (await models(sim)).status == 200
    assert await billing(sim) == {}


# -- one test per magic key -----------------------------------------------------------------


async def test_sim_ok_processes_then_returns_a_real_mp4(sim: Client, tmp_path: Path) -> None:
    queue_id = await queued(sim, "sim_ok", resolution="1080p", aspect_ratio="9:16", duration="10s")
    resp = await retrieve(sim, "sim_ok", queue_id)
    assert resp.status == 200
    processing = await resp.json()
    assert processing["status"] == "PROCESSING"
    assert processing["average_execution_time"] == int(RENDER * 1000)
    assert 0 <= processing["execution_duration"] < RENDER * 1000

    info = probe(await wait_for_video(sim, "sim_ok", queue_id), tmp_path)
    assert (info.width, info.height, info.duration_seconds) == (1080, 1920, 10)
    assert info.audio is False
    # Until completed, the video can be retrieved again.
    again = await retrieve(sim, "sim_ok", queue_id)
    assert again.status == 200 and again.content_type == "video/mp4"


async def test_any_other_sim_key_behaves_like_sim_ok(sim: Client) -> None:
    queue_id = await queued(sim, "sim_my_test_seller")
    assert (await wait_for_video(sim, "sim_my_test_seller", queue_id))[4:8] == b"ftyp"


async def test_sim_ok_defaults_to_lowest_resolution_16_9_and_audio(
    sim: Client, tmp_path: Path
) -> None:
    queue_id = await queued(sim, "sim_ok", **SEEDANCE)
    info = probe(await wait_for_video(sim, "sim_ok", queue_id, SEEDANCE["model"]), tmp_path)
    assert (info.width, info.height, info.duration_seconds) == (854, 480, 4)
    # Omitted audio is audio on, as at Venice: the MP4 carries a real, decodable audio track.
    assert info.audio is True


@pytest.mark.parametrize(
    ("body", "audio"),
    [
        ({**SEEDANCE, "audio": True}, True),
        ({**SEEDANCE, "audio": False}, False),
        ({"model": "pixverse-c1-t2v", "duration": "5s"}, True),
        ({"model": "pixverse-c1-t2v", "duration": "5s", "audio": False}, False),
        ({"model": "runway-gen4-5-text", "duration": "5s"}, False),
    ],
)
async def test_the_mp4_has_an_audio_track_exactly_when_audio_is_on(
    sim: Client, tmp_path: Path, body: dict[str, Any], audio: bool
) -> None:
    queue_id = await queued(sim, "sim_ok", **body)
    info = probe(await wait_for_video(sim, "sim_ok", queue_id, body["model"]), tmp_path)
    assert info.audio is audio
    assert info.duration_seconds == int(body["duration"].removesuffix("s"))


async def test_sim_401_refuses_the_queue(sim: Client) -> None:
    resp = await queue(sim, "sim_401")
    assert resp.status == 401
    assert await resp.json() == {"error": "Authentication failed"}
    assert await billing(sim) == {}


async def test_sim_402_refuses_the_queue(sim: Client) -> None:
    resp = await queue(sim, "sim_402")
    assert resp.status == 402
    assert "balance" in (await resp.json())["error"]
    assert await billing(sim) == {}


async def test_sim_429_refuses_the_queue(sim: Client) -> None:
    resp = await queue(sim, "sim_429")
    assert resp.status == 429
    assert isinstance((await resp.json())["error"], str)
    assert await billing(sim) == {}


async def test_sim_consent_answers_409_needs_consent(sim: Client) -> None:
    resp = await queue(sim, "sim_consent", **SEEDANCE)
    assert resp.status == 409
    payload = await resp.json()
    assert payload["error"]["code"] == "needs_consent"
    assert payload["consent_flow"] == "seedance"
    assert await billing(sim) == {}
    # The request is still validated first: a bad one is a 400, not a consent question.
    assert (await queue(sim, "sim_consent", **{**SEEDANCE, "duration": "5s"})).status == 400


async def test_sim_queue_timeout_never_answers(sim: Client) -> None:
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await sim.post(
            f"{API}/video/queue",
            json=T2V,
            headers=auth("sim_queue_timeout"),
            timeout=aiohttp.ClientTimeout(total=0.2),
        )
    assert time.monotonic() - started < 5
    # The server is still healthy for everyone else.
    assert (await quote(sim, model="runway-gen4-5-text", duration="5s")).status == 200
    assert await billing(sim) == {}


async def test_sim_queue_timeout_answers_500_when_the_sim_shuts_down(tmp_path: Path) -> None:
    entered = asyncio.Event()

    @web.middleware
    async def spy(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if request.path.endswith("/video/queue"):
            entered.set()
        return await handler(request)

    state = tmp_path / "sim.db"
    app = create_simulator_app(render_seconds=RENDER, state_path=state)
    app.middlewares.append(spy)
    server = TestServer(app)
    await server.start_server()
    async with aiohttp.ClientSession() as http:
        pending = asyncio.ensure_future(
            http.post(
                server.make_url(f"{API}/video/queue"),
                json=T2V,
                headers=auth("sim_queue_timeout"),
                timeout=aiohttp.ClientTimeout(total=10),
            )
        )
        await entered.wait()
        closing = asyncio.ensure_future(server.close())
        started = time.monotonic()
        resp = await pending
        await documented(resp)
        await closing
    # Released at once by the shutdown, with a documented queue error (not 504).
    assert time.monotonic() - started < 5
    assert resp.status == 500
    assert isinstance((await resp.json())["error"], str)

    # Nothing was recorded or billed.
    again = TestServer(create_simulator_app(render_seconds=RENDER, state_path=state))
    await again.start_server()
    try:
        async with aiohttp.ClientSession(base_url=again.make_url("/")) as http:
            bill = await (await http.get(f"{API}/sim/billing")).json()
    finally:
        await again.close()
    assert bill == {"keys": {}}


async def test_sim_fail_inference_fails_once_done(sim: Client) -> None:
    queue_id = await queued(sim, "sim_fail_inference")
    first = await retrieve(sim, "sim_fail_inference", queue_id)
    assert first.status == 200 and (await first.json())["status"] == "PROCESSING"
    await rendered_by_now(sim)
    resp = await retrieve(sim, "sim_fail_inference", queue_id)
    assert resp.status == 500
    assert isinstance((await resp.json())["error"], str)
    # Accepted, so billed.
    assert (await billing(sim))[digest("sim_fail_inference")]["jobs"] == 1


async def test_sim_content_policy_rejects_on_retrieve(sim: Client) -> None:
    queue_id = await queued(sim, "sim_content_policy")
    resp = await retrieve(sim, "sim_content_policy", queue_id)
    assert resp.status == 422
    error = (await resp.json())["error"]
    assert error["type"] == "provider_content_policy"
    assert error["credits_refunded"] is False
    assert isinstance(error["message"], str) and error["message"]
    # It was accepted, so it was billed (and not refunded).
    assert (await billing(sim))[digest("sim_content_policy")]["jobs"] == 1


async def test_sim_flaky_answers_503_on_every_other_call(sim: Client) -> None:
    queue_id = await queued(sim, "sim_flaky")
    statuses = []
    for _ in range(4):
        resp = await retrieve(sim, "sim_flaky", queue_id)
        statuses.append(resp.status)
        if resp.status == 503:
            assert isinstance((await resp.json())["error"], str)
    assert statuses == [503, 200, 503, 200]
    # Odd calls keep failing after the render; the even call after it is the video.
    await rendered_by_now(sim)
    assert (await retrieve(sim, "sim_flaky", queue_id)).status == 503
    done = await retrieve(sim, "sim_flaky", queue_id)
    assert done.status == 200 and done.content_type == "video/mp4"


async def test_sim_never_stays_processing(sim: Client) -> None:
    queue_id = await queued(sim, "sim_never")
    # Poll until its own progress says the render time has passed...
    deadline = time.monotonic() + 10
    while True:
        payload = await (await retrieve(sim, "sim_never", queue_id)).json()
        assert payload["status"] == "PROCESSING"
        if payload["execution_duration"] >= payload["average_execution_time"]:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(RENDER / 4)
    # ...then it still never finishes, its progress capped at the estimate.
    for _ in range(3):
        resp = await retrieve(sim, "sim_never", queue_id)
        assert resp.status == 200 and resp.content_type == "application/json"
        payload = await resp.json()
        assert payload == {
            "status": "PROCESSING",
            "average_execution_time": int(RENDER * 1000),
            "execution_duration": int(RENDER * 1000),
        }


async def test_sim_slow_reports_rising_progress_for_four_render_times(sim: Client) -> None:
    before = time.time()
    slow_id = await queued(sim, "sim_slow")
    progress = []
    deadline = time.monotonic() + 10
    while True:
        resp = await retrieve(sim, "sim_slow", slow_id)
        assert resp.status == 200
        if resp.content_type == "video/mp4":
            break
        payload = await resp.json()
        assert payload["status"] == "PROCESSING"
        # The estimate says four normal render times from the start, so an ETA is right.
        assert payload["average_execution_time"] == int(SLOW_FACTOR * RENDER * 1000)
        progress.append(payload["execution_duration"])
        assert time.monotonic() < deadline
        await asyncio.sleep(RENDER / 4)
    # Not a moment before four render times (a normal job takes one).
    assert time.time() - before >= SLOW_FACTOR * RENDER
    assert len(progress) >= 2
    assert progress == sorted(progress) and progress[0] < progress[-1]
    assert progress[0] < int(RENDER * 1000) and progress[-1] <= int(SLOW_FACTOR * RENDER * 1000)


async def test_sim_download_url_serves_the_video_at_its_link(sim: Client, tmp_path: Path) -> None:
    resp = await queue(sim, "sim_download_url", **SEEDANCE)
    assert resp.status == 200
    answer = await resp.json()
    queue_id = answer["queue_id"]
    assert answer == {
        "model": SEEDANCE["model"],
        "queue_id": queue_id,
        "download_url": str(sim.make_url(f"{API}/share/{queue_id}")),
    }
    link = answer["download_url"]

    first = await retrieve(sim, "sim_download_url", queue_id, SEEDANCE["model"])
    assert (await first.json())["status"] == "PROCESSING"
    # The link has nothing to serve before the render is done.
    assert (await sim.session.get(link)).status == 404

    await rendered_by_now(sim)
    for _ in range(2):
        # Retrieve only says it is done, in JSON, however often it is asked.
        resp = await retrieve(sim, "sim_download_url", queue_id, SEEDANCE["model"])
        assert resp.status == 200 and resp.content_type == "application/json"
        payload = await resp.json()
        assert payload["status"] == "COMPLETED"
        assert payload["average_execution_time"] == payload["execution_duration"]

    # The link needs no key: the URL is the credential.
    video = await sim.session.get(link)
    assert video.status == 200 and video.content_type == "video/mp4"
    info = probe(await video.read(), tmp_path)
    assert (info.width, info.height, info.duration_seconds, info.audio) == (854, 480, 4, True)
    assert (await billing(sim))[digest("sim_download_url")] == {
        "billed_micros": "200000",
        "jobs": 1,
    }

    # DELETE revokes the link, and the job with it.
    assert (await sim.session.delete(link)).status == 204
    assert (await sim.session.get(link)).status == 404
    assert (await retrieve(sim, "sim_download_url", queue_id, SEEDANCE["model"])).status == 404
    assert (await sim.session.delete(link)).status == 404


async def test_only_download_url_jobs_have_a_link(sim: Client) -> None:
    queue_id = await queued(sim, "sim_ok")
    await wait_for_video(sim, "sim_ok", queue_id)
    # A normal job's queue id opens nothing without the key, and can't be revoked that way.
    assert (await sim.get(f"{API}/share/{queue_id}")).status == 404
    assert (await sim.delete(f"{API}/share/{queue_id}")).status == 404
    assert (await sim.get(f"{API}/share/no-such-job")).status == 404
    assert (await retrieve(sim, "sim_ok", queue_id)).content_type == "video/mp4"


# -- queue validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "x" * 2501}, "prompt"),
        ({"duration": "7s"}, "duration"),
        ({"image_url": "https://example.com/cat.png"}, "image_url"),
        ({"model": "wan-2-5-i2v"}, "image_url"),
        ({"model": "nope"}, "model"),
        ({"audio": True}, "audio"),
        ({"resolution": "4k"}, "resolution"),
    ],
)
async def test_queue_rejects_malformed_requests(
    sim: Client, body: dict[str, Any], field: str
) -> None:
    resp = await queue(sim, "sim_ok", **body)
    assert resp.status == 400
    assert error_field(await resp.json()) == [field]
    assert await billing(sim) == {}


async def test_queue_takes_a_prompt_at_the_character_limit(sim: Client) -> None:
    assert await queued(sim, "sim_ok", prompt="x" * 2500)


async def test_queue_image_to_video_needs_an_image(sim: Client) -> None:
    queue_id = await queued(
        sim, "sim_ok", model="wan-2-5-i2v", image_url="https://example.com/cat.png"
    )
    assert queue_id


async def test_queue_rejects_an_oversized_body_with_413(sim: Client) -> None:
    resp = await queue(sim, "sim_ok", prompt="x" * (2 * 1024 * 1024))
    assert resp.status == 413
    payload = await resp.json()
    assert payload["code"] == "PAYLOAD_TOO_LARGE"
    assert await billing(sim) == {}


@pytest.mark.parametrize("path", ["/video/quote", "/video/retrieve", "/video/complete"])
async def test_an_oversized_body_elsewhere_is_a_400(sim: Client, path: str) -> None:
    """Venice documents 413 only on queue; elsewhere a body too large is a DetailedError."""
    body = {"model": "runway-gen4-5-text", "duration": "5s", "queue_id": "x" * (2 << 20)}
    resp = await post(sim, path, "sim_ok", json=body)
    assert resp.status == 400


# -- billing, retrieve ownership, complete ---------------------------------------------------


async def test_billing_records_each_key_at_queue_time(sim: Client) -> None:
    await queued(sim, "sim_seller_a", model="seedance-2-fast-t2v", duration="4s", resolution="720p")
    await queued(sim, "sim_seller_a", model="pixverse-c1-t2v", duration="8s", audio=True)
    await queued(sim, "sim_seller_a", model="pixverse-c1-t2v", duration="8s", audio=False)
    await queued(sim, "sim_seller_b")
    await quote(sim, "sim_seller_c", model="runway-gen4-5-text", duration="5s")
    await quote(sim, None, model="runway-gen4-5-text", duration="5s")

    keys = await billing(sim)
    assert keys == {
        # 720p seedance with audio left out is billed with audio: 0.24 x 1.25.
        digest("sim_seller_a"): {"billed_micros": str(300_000 + 500_000 + 400_000), "jobs": 3},
        digest("sim_seller_b"): {"billed_micros": "500000", "jobs": 1},
    }
    assert all("sim_" not in k for k in keys)


async def test_retrieve_of_an_unknown_or_foreign_job_is_404(sim: Client) -> None:
    queue_id = await queued(sim, "sim_owner")
    for resp in [
        await retrieve(sim, "sim_owner", "does-not-exist"),
        await retrieve(sim, "sim_thief", queue_id),
        await retrieve(sim, "sim_owner", queue_id, model="pixverse-c1-t2v"),
    ]:
        assert resp.status == 404
        assert isinstance((await resp.json())["error"], str)
    assert (await retrieve(sim, "sim_owner", queue_id)).status == 200


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/video/retrieve", {"model": RUNWAY_ID, "queue_id": "q", "extra": 1}, "extra"),
        ("/video/retrieve", {"model": RUNWAY_ID}, "queue_id"),
        ("/video/retrieve", {"queue_id": "q"}, "model"),
        ("/video/retrieve", {"model": RUNWAY_ID, "queue_id": 7}, "queue_id"),
        (
            "/video/retrieve",
            {"model": RUNWAY_ID, "queue_id": "q", "delete_media_on_completion": "yes"},
            "delete_media_on_completion",
        ),
        ("/video/complete", {"model": RUNWAY_ID, "queue_id": "q", "extra": 1}, "extra"),
        (
            "/video/complete",
            {"model": RUNWAY_ID, "queue_id": "q", "delete_media_on_completion": True},
            "delete_media_on_completion",
        ),
        ("/video/complete", {"model": RUNWAY_ID}, "queue_id"),
    ],
)
async def test_retrieve_and_complete_reject_malformed_requests(
    sim: Client, path: str, body: dict[str, Any], field: str
) -> None:
    queue_id = await queued(sim, "sim_ok")
    if body.get("queue_id") == "q":
        body = {**body, "queue_id": queue_id}
    resp = await post(sim, path, "sim_ok", json=body)
    assert resp.status == 400
    assert error_field(await resp.json()) == [field]
    # Nothing happened to the job.
    assert (await retrieve(sim, "sim_ok", queue_id)).status == 200


@pytest.mark.parametrize("raw", [b"{nope", b"[]"])
@pytest.mark.parametrize("path", ["/video/queue", "/video/retrieve", "/video/complete"])
async def test_bodies_that_are_not_json_objects_are_400(sim: Client, path: str, raw: bytes) -> None:
    resp = await post(sim, path, "sim_ok", data=raw)
    assert resp.status == 400


async def test_complete_deletes_the_sims_copy(sim: Client) -> None:
    queue_id = await queued(sim, "sim_ok")
    await wait_for_video(sim, "sim_ok", queue_id)
    # Another key's job is unknown to it; Venice documents no 404 here, so it's a 400.
    foreign = await complete(sim, "sim_other", queue_id)
    assert foreign.status == 400
    assert (await foreign.json())["error"] == "Request ID is invalid."
    assert (await retrieve(sim, "sim_ok", queue_id)).status == 200

    resp = await complete(sim, "sim_ok", queue_id)
    assert resp.status == 200
    assert await resp.json() == {"success": True}
    assert (await retrieve(sim, "sim_ok", queue_id)).status == 404
    # Completing again (or an id that never existed) is the same 400.
    for qid in (queue_id, "does-not-exist"):
        again = await complete(sim, "sim_ok", qid)
        assert again.status == 400
        assert error_field(await again.json()) == ["queue_id"]


async def test_delete_media_on_completion_forgets_the_video_once_returned(sim: Client) -> None:
    queue_id = await queued(sim, "sim_ok")
    # While processing nothing is deleted.
    assert (await retrieve(sim, "sim_ok", queue_id, delete_media_on_completion=True)).status == 200
    assert (await retrieve(sim, "sim_ok", queue_id)).status == 200
    await wait_for_video(sim, "sim_ok", queue_id, delete_media_on_completion=True)
    assert (await retrieve(sim, "sim_ok", queue_id)).status == 404


async def test_concurrent_retrieves_render_each_video_once(sim: Client) -> None:
    ids = [await queued(sim, "sim_ok") for _ in range(5)]
    await rendered_by_now(sim)
    results = await asyncio.gather(*(retrieve(sim, "sim_ok", q) for q in ids))
    bodies = [await r.read() for r in results]
    assert all(r.content_type == "video/mp4" for r in results)
    assert len(set(bodies)) == 1


# -- mounting and persistence ---------------------------------------------------------------


async def test_mounts_as_a_sub_app(aiohttp_client: MakeClient, tmp_path: Path) -> None:
    parent = web.Application()
    parent.add_subapp(
        "/sim", create_simulator_app(render_seconds=RENDER, state_path=tmp_path / "s.db")
    )
    client = await aiohttp_client(parent)
    resp = await client.get("/sim/api/v1/models", params={"type": "video"})
    await documented(resp)
    assert resp.status == 200
    resp = await client.post("/sim/api/v1/video/queue", json=T2V, headers=auth("sim_ok"))
    await documented(resp)
    assert resp.status == 200
    assert (tmp_path / "s.db").exists()

    # A download link is built from the URL the caller used, prefix and all.
    resp = await client.post("/sim/api/v1/video/queue", json=T2V, headers=auth("sim_download_url"))
    await documented(resp)
    answer = await resp.json()
    link = answer["download_url"]
    assert link == str(client.make_url(f"/sim/api/v1/share/{answer['queue_id']}"))
    body = {"model": T2V["model"], "queue_id": answer["queue_id"]}
    deadline = time.monotonic() + 10
    while True:
        resp = await client.post(
            "/sim/api/v1/video/retrieve", json=body, headers=auth("sim_download_url")
        )
        await documented(resp)
        if (await resp.json())["status"] == "COMPLETED":
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(RENDER / 4)
    video = await client.session.get(link)
    assert video.status == 200 and (await video.read())[4:8] == b"ftyp"


async def until_wall_clock(moment: float) -> None:
    """Wait for the wall clock (which the simulator's render clock is) to reach ``moment``."""
    # One sleep of at most the render time (plus a hair, for the clocks' granularity).
    await asyncio.sleep(max(0.0, moment - time.time()) + 0.01)
    assert time.time() >= moment


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "sim" / "state.db"

    async def started() -> TestServer:
        server = TestServer(create_simulator_app(render_seconds=RENDER, state_path=state))
        await server.start_server()
        return server

    first = await started()
    async with aiohttp.ClientSession(base_url=first.make_url("/")) as http:
        resp = await http.post(f"{API}/video/queue", json=T2V, headers=auth("sim_durable"))
        queue_id = (await resp.json())["queue_id"]
        flaky_resp = await http.post(f"{API}/video/queue", json=T2V, headers=auth("sim_flaky"))
        flaky_id = (await flaky_resp.json())["queue_id"]
        flaky_body = {"model": T2V["model"], "queue_id": flaky_id}
        first_call = await http.post(
            f"{API}/video/retrieve", json=flaky_body, headers=auth("sim_flaky")
        )
        assert first_call.status == 503
        link_resp = await http.post(
            f"{API}/video/queue", json=T2V, headers=auth("sim_download_url")
        )
        link_answer = await link_resp.json()
        queued_by = time.time()
    await first.close()
    # The render clock is the wall clock: let the renders finish while the sim is down.
    await until_wall_clock(queued_by + RENDER)

    second = await started()
    async with aiohttp.ClientSession(base_url=second.make_url("/")) as http:
        body = {"model": T2V["model"], "queue_id": queue_id}
        resp = await http.post(f"{API}/video/retrieve", json=body, headers=auth("sim_durable"))
        assert resp.status == 200
        # The render finished while the sim was down, so the first answer is the video.
        assert resp.content_type == "video/mp4"
        # The flaky counter survived too: this is its second call, which answers normally.
        resp = await http.post(f"{API}/video/retrieve", json=flaky_body, headers=auth("sim_flaky"))
        assert resp.status == 200
        # So did the download link's job (the link names the old port; its path still works).
        link_path = URL(link_answer["download_url"]).path
        shared = await http.get(link_path)
        assert shared.status == 200 and shared.content_type == "video/mp4"
        keys = (await (await http.get(f"{API}/sim/billing")).json())["keys"]
        assert keys[digest("sim_durable")] == {"billed_micros": "500000", "jobs": 1}
        assert keys[digest("sim_flaky")]["jobs"] == 1
        assert keys[digest("sim_download_url")]["jobs"] == 1
        # A completed job stays gone after another restart.
        await http.post(f"{API}/video/complete", json=body, headers=auth("sim_durable"))
    await second.close()

    third = await started()
    async with aiohttp.ClientSession(base_url=third.make_url("/")) as http:
        body = {"model": T2V["model"], "queue_id": queue_id}
        resp = await http.post(f"{API}/video/retrieve", json=body, headers=auth("sim_durable"))
        assert resp.status == 404
    await third.close()
