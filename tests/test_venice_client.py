"""VeniceClient over real loopback HTTP: against the simulator, and against a scripted stub
for the answers the simulator never gives (other statuses, broken bodies, dropped sockets)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from adapters.media import probe_mp4
from adapters.simulator import create_simulator_app
from adapters.venice import (
    Completed,
    Processing,
    ProviderContentPolicy,
    ProviderError,
    ProviderInferenceFailed,
    ProviderLost,
    ProviderRefused,
    ProviderRejected,
    ProviderTransient,
    ProviderUnknown,
    QuoteFailed,
    VeniceClient,
    VideoParams,
)

RENDER = 0.2
RUNWAY = VideoParams(model="runway-gen4-5-text", duration_seconds=5)
PROMPT = "a lighthouse at dawn"

MakeServer = Callable[..., Awaitable[TestServer]]
StubHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def sim_url(aiohttp_server: MakeServer) -> str:
    server = await aiohttp_server(create_simulator_app(render_seconds=RENDER))
    return str(server.make_url("/api/v1"))


@pytest.fixture
def venice(http: aiohttp.ClientSession, sim_url: str) -> VeniceClient:
    return VeniceClient(http, sim_url, queue_timeout=2.0, retrieve_timeout=5.0)


async def stub(aiohttp_server: MakeServer, handler: StubHandler) -> str:
    """A provider that answers every POST with ``handler``; returns its base URL."""
    app = web.Application()
    app.router.add_post("/api/v1/video/{action}", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("/api/v1"))


def answer(status: int, body: str = '{"error": "nope"}', content_type: str = "application/json"):
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=body, content_type=content_type)

    return handler


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def until_done(venice: VeniceClient, key: str, queue_id: str, dest: Path) -> Completed:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        result = await venice.retrieve(key, RUNWAY.model, queue_id, dest)
        if isinstance(result, Completed):
            return result
        await asyncio.sleep(0.05)
    raise AssertionError("never completed")


# -- catalog and quotes ---------------------------------------------------------------------


async def test_list_models(venice: VeniceClient) -> None:
    models = await venice.list_models()
    assert {m["id"] for m in models} == {
        "runway-gen4-5-text",
        "seedance-2-fast-t2v",
        "pixverse-c1-t2v",
        "wan-2-5-i2v",
    }


@pytest.mark.parametrize(
    ("params", "micros"),
    [
        (RUNWAY, 500_000),
        (VideoParams("seedance-2-fast-t2v", 4, resolution="720p"), 240_000),
        (VideoParams("seedance-2-fast-t2v", 12, "1080p", "21:9", audio=True), 1_500_000),
        (VideoParams("pixverse-c1-t2v", 8, "1080p", audio=True), 900_000),
        (VideoParams("pixverse-c1-t2v", 5, audio=False), 250_000),
        (VideoParams("wan-2-5-i2v", 10, "1080p"), 850_000),
    ],
)
async def test_quote_in_micros(venice: VeniceClient, params: VideoParams, micros: int) -> None:
    assert await venice.quote("sim_ok", params) == micros


async def test_quote_rounds_up_to_the_microdollar(
    aiohttp_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    url = await stub(aiohttp_server, answer(200, '{"quote": 0.1234561}'))
    assert await VeniceClient(http, url).quote("k", RUNWAY) == 123_457


async def test_quote_sends_only_the_fields_that_are_set(
    aiohttp_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    seen = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        return web.json_response({"quote": 1})

    client = VeniceClient(http, await stub(aiohttp_server, handler))
    assert await client.quote("k", RUNWAY) == 1_000_000
    await client.quote("k", VideoParams("m", 8, "1080p", "9:16", audio=False))
    assert seen == [
        {"model": "runway-gen4-5-text", "duration": "5s"},
        {
            "model": "m",
            "duration": "8s",
            "resolution": "1080p",
            "aspect_ratio": "9:16",
            "audio": False,
        },
    ]


@pytest.mark.parametrize(
    ("key", "params", "status"),
    [
        ("live_key", RUNWAY, 401),
        ("sim_ok", VideoParams("runway-gen4-5-text", 7), 400),
        ("sim_ok", VideoParams("nope", 5), 400),
    ],
)
async def test_quote_failures(
    venice: VeniceClient, key: str, params: VideoParams, status: int
) -> None:
    with pytest.raises(QuoteFailed) as err:
        await venice.quote(key, params)
    assert err.value.status == status
    assert key not in str(err.value)


@pytest.mark.parametrize(
    "body", ['{"quote": "abc"}', '{"quote": -1}', "{}", "not json", '{"quote": true}']
)
async def test_quote_rejects_unusable_answers(
    aiohttp_server: MakeServer, http: aiohttp.ClientSession, body: str
) -> None:
    client = VeniceClient(http, await stub(aiohttp_server, answer(200, body)))
    with pytest.raises(QuoteFailed):
        await client.quote("k", RUNWAY)


async def test_quote_unreachable(http: aiohttp.ClientSession, unused_tcp_port: int) -> None:
    client = VeniceClient(http, f"http://127.0.0.1:{unused_tcp_port}/api/v1")
    with pytest.raises(QuoteFailed) as err:
        await client.quote("k", RUNWAY)
    assert err.value.status == 0


# -- queue ----------------------------------------------------------------------------------


async def test_queue_then_retrieve_a_real_video(venice: VeniceClient, tmp_path: Path) -> None:
    params = VideoParams("seedance-2-fast-t2v", 6, "720p", "1:1")
    queue_id = await venice.queue("sim_ok", params, PROMPT, None)
    first = await venice.retrieve("sim_ok", params.model, queue_id, tmp_path / "v.mp4")
    assert isinstance(first, Processing)
    assert first.average_execution_time_ms == int(RENDER * 1000)
    assert first.execution_duration_ms is not None

    dest = tmp_path / "v.mp4"
    deadline = time.monotonic() + 10
    result: Processing | Completed = first
    while not isinstance(result, Completed) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        result = await venice.retrieve("sim_ok", params.model, queue_id, dest)
    assert isinstance(result, Completed)
    assert result.path == dest and result.bytes == dest.stat().st_size
    info = probe_mp4(dest)
    assert (info.width, info.height, info.duration_seconds) == (720, 720, 6)
    assert names(tmp_path) == ["v.mp4"]


async def test_queue_image_to_video(venice: VeniceClient) -> None:
    params = VideoParams("wan-2-5-i2v", 5)
    assert await venice.queue("sim_ok", params, PROMPT, "https://example.com/cat.png")


@pytest.mark.parametrize(("key", "status"), [("sim_401", 401), ("sim_402", 402), ("sim_429", 429)])
async def test_queue_refusals_from_magic_keys(venice: VeniceClient, key: str, status: int) -> None:
    with pytest.raises(ProviderRefused) as err:
        await venice.queue(key, RUNWAY, PROMPT, None)
    assert err.value.status == status


async def test_queue_refuses_a_non_sim_key(venice: VeniceClient) -> None:
    with pytest.raises(ProviderRefused) as err:
        await venice.queue("vnc_live_secret", RUNWAY, PROMPT, None)
    assert err.value.status == 401
    assert "vnc_live_secret" not in err.value.message


async def test_queue_timeout_is_unknown(http: aiohttp.ClientSession, sim_url: str) -> None:
    venice = VeniceClient(http, sim_url, queue_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ProviderUnknown) as err:
        await venice.queue("sim_queue_timeout", RUNWAY, PROMPT, None)
    assert time.monotonic() - started < 3
    assert err.value.status == 0


@pytest.mark.parametrize(
    ("params", "image_url"),
    [
        (VideoParams("runway-gen4-5-text", 7), None),
        (RUNWAY, "https://example.com/cat.png"),
        (VideoParams("wan-2-5-i2v", 5), None),
        (VideoParams("runway-gen4-5-text", 5, audio=True), None),
    ],
)
async def test_queue_rejects_bad_requests(
    venice: VeniceClient, params: VideoParams, image_url: str | None
) -> None:
    with pytest.raises(ProviderRejected) as err:
        await venice.queue("sim_ok", params, PROMPT, image_url)
    assert err.value.status == 400


async def test_queue_rejects_an_oversized_prompt(venice: VeniceClient) -> None:
    with pytest.raises(ProviderRejected) as err:
        await venice.queue("sim_ok", RUNWAY, "x" * (2 * 1024 * 1024), None)
    assert err.value.status == 413


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, ProviderRejected),
        (403, ProviderRefused),
        (404, ProviderRejected),
        (413, ProviderRejected),
        (422, ProviderRejected),
        (500, ProviderRefused),
        (502, ProviderRefused),
        (503, ProviderRefused),
        (504, ProviderUnknown),
    ],
)
async def test_queue_status_mapping(
    aiohttp_server: MakeServer, http: aiohttp.ClientSession, status: int, kind: type[ProviderError]
) -> None:
    client = VeniceClient(http, await stub(aiohttp_server, answer(status)))
    with pytest.raises(kind) as err:
        await client.queue("k", RUNWAY, PROMPT, None)
    assert type(err.value) is kind
    if kind is not ProviderUnknown:
        assert err.value.status == status
        assert err.value.message == "nope"


@pytest.mark.parametrize("body", ["not json", "{}", '{"queue_id": ""}', '{"queue_id": 7}'])
async def test_queue_unparseable_success_is_unknown(
    aiohttp_server: MakeServer, http: aiohttp.ClientSession, body: str
) -> None:
    client = VeniceClient(http, await stub(aiohttp_server, answer(200, body)))
    with pytest.raises(ProviderUnknown):
        await client.queue("k", RUNWAY, PROMPT, None)


async def test_queue_connection_closed_after_sending_is_unknown(
    aiohttp_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    received = []

    async def hang_up(request: web.Request) -> web.StreamResponse:
        received.append(await request.json())
        assert request.transport is not None
        request.transport.close()
        await asyncio.sleep(1)
        return web.Response()

    client = VeniceClient(http, await stub(aiohttp_server, hang_up))
    with pytest.raises(ProviderUnknown):
        await client.queue("k", RUNWAY, PROMPT, None)
    assert received == [{"model": "runway-gen4-5-text", "duration": "5s", "prompt": PROMPT}]


async def test_queue_unreachable_is_refused(
    http: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    client = VeniceClient(http, f"http://127.0.0.1:{unused_tcp_port}/api/v1")
    with pytest.raises(ProviderRefused) as err:
        await client.queue("k", RUNWAY, PROMPT, None)
    assert err.value.status == 0


async def test_error_messages_never_carry_the_key(
    aiohttp_server: MakeServer, http: aiohttp.ClientSession
) -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"error": f"bad key {request.headers['Authorization']}"}, status=401
        )

    client = VeniceClient(http, await stub(aiohttp_server, echo))
    with pytest.raises(ProviderRefused) as err:
        await client.queue("sk_very_secret", RUNWAY, PROMPT, None)
    assert "sk_very_secret" not in err.value.message
    assert "sk_very_secret" not in str(err.value)


# -- retrieve: the simulator's failure keys -------------------------------------------------


async def test_retrieve_inference_failure(venice: VeniceClient, tmp_path: Path) -> None:
    queue_id = await venice.queue("sim_fail_inference", RUNWAY, PROMPT, None)
    await asyncio.sleep(RENDER + 0.05)
    with pytest.raises(ProviderInferenceFailed) as err:
        await venice.retrieve("sim_fail_inference", RUNWAY.model, queue_id, tmp_path / "v.mp4")
    assert err.value.status == 500


async def test_retrieve_content_policy(venice: VeniceClient, tmp_path: Path) -> None:
    queue_id = await venice.queue("sim_content_policy", RUNWAY, PROMPT, None)
    with pytest.raises(ProviderContentPolicy) as err:
        await venice.retrieve("sim_content_policy", RUNWAY.model, queue_id, tmp_path / "v.mp4")
    assert err.value.status == 422


async def test_retrieve_flaky_is_transient_then_completes(
    venice: VeniceClient, tmp_path: Path
) -> None:
    queue_id = await venice.queue("sim_flaky", RUNWAY, PROMPT, None)
    await asyncio.sleep(RENDER + 0.05)
    dest = tmp_path / "v.mp4"
    with pytest.raises(ProviderTransient) as err:
        await venice.retrieve("sim_flaky", RUNWAY.model, queue_id, dest)
    assert err.value.status == 503
    assert isinstance(await venice.retrieve("sim_flaky", RUNWAY.model, queue_id, dest), Completed)


async def test_retrieve_never_stays_processing(venice: VeniceClient, tmp_path: Path) -> None:
    queue_id = await venice.queue("sim_never", RUNWAY, PROMPT, None)
    await asyncio.sleep(RENDER + 0.05)
    result = await venice.retrieve("sim_never", RUNWAY.model, queue_id, tmp_path / "v.mp4")
    assert isinstance(result, Processing)


async def test_retrieve_unknown_or_foreign_job_is_lost(
    venice: VeniceClient, tmp_path: Path
) -> None:
    queue_id = await venice.queue("sim_owner", RUNWAY, PROMPT, None)
    for key, qid in [("sim_owner", "no-such-id"), ("sim_someone_else", queue_id)]:
        with pytest.raises(ProviderLost) as err:
            await venice.retrieve(key, RUNWAY.model, qid, tmp_path / "v.mp4")
        assert err.value.status == 404


async def test_complete_deletes_the_provider_copy(venice: VeniceClient, tmp_path: Path) -> None:
    queue_id = await venice.queue("sim_ok", RUNWAY, PROMPT, None)
    await until_done(venice, "sim_ok", queue_id, tmp_path / "v.mp4")
    await venice.complete("sim_ok", RUNWAY.model, queue_id)
    with pytest.raises(ProviderLost):
        await venice.retrieve("sim_ok", RUNWAY.model, queue_id, tmp_path / "again.mp4")
    # Already gone is what complete wants, so repeating it is not an error.
    await venice.complete("sim_ok", RUNWAY.model, queue_id)


# -- retrieve and complete: statuses the simulator never gives ------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, ProviderTransient),
        (401, ProviderTransient),
        (402, ProviderTransient),
        (403, ProviderTransient),
        (404, ProviderLost),
        (409, ProviderTransient),
        (410, ProviderLost),
        (422, ProviderContentPolicy),
        (429, ProviderTransient),
        (500, ProviderInferenceFailed),
        (502, ProviderTransient),
        (503, ProviderTransient),
    ],
)
async def test_retrieve_status_mapping(
    aiohttp_server: MakeServer,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    status: int,
    kind: type[ProviderError],
) -> None:
    client = VeniceClient(http, await stub(aiohttp_server, answer(status)))
    with pytest.raises(kind) as err:
        await client.retrieve("k", "m", "q", tmp_path / "v.mp4")
    assert type(err.value) is kind
    assert err.value.status == status


async def test_retrieve_timeout_is_transient(
    aiohttp_server: MakeServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response()

    client = VeniceClient(http, await stub(aiohttp_server, slow), retrieve_timeout=0.2)
    with pytest.raises(ProviderTransient) as err:
        await client.retrieve("k", "m", "q", tmp_path / "v.mp4")
    assert err.value.status == 0


async def test_retrieve_unreachable_is_transient(
    http: aiohttp.ClientSession, unused_tcp_port: int, tmp_path: Path
) -> None:
    client = VeniceClient(http, f"http://127.0.0.1:{unused_tcp_port}/api/v1")
    with pytest.raises(ProviderTransient):
        await client.retrieve("k", "m", "q", tmp_path / "v.mp4")


async def test_retrieve_cut_short_leaves_no_file(
    aiohttp_server: MakeServer, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async def truncated(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "video/mp4", "Content-Length": "100000"})
        await resp.prepare(request)
        await resp.write(b"\0" * 1000)
        assert request.transport is not None
        request.transport.close()
        return resp

    client = VeniceClient(http, await stub(aiohttp_server, truncated))
    with pytest.raises(ProviderTransient):
        await client.retrieve("k", "m", "q", tmp_path / "v.mp4")
    assert names(tmp_path) == []


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (200, '{"status": "WEIRD"}', "application/json"),
        (200, "not json", "application/json"),
        (200, "<html>", "text/html"),
    ],
)
async def test_retrieve_unexpected_answers_are_transient(
    aiohttp_server: MakeServer,
    http: aiohttp.ClientSession,
    tmp_path: Path,
    status: int,
    body: str,
    content_type: str,
) -> None:
    client = VeniceClient(http, await stub(aiohttp_server, answer(status, body, content_type)))
    with pytest.raises(ProviderTransient):
        await client.retrieve("k", "m", "q", tmp_path / "v.mp4")


@pytest.mark.parametrize("status", [401, 500, 503])
async def test_complete_failures_are_transient(
    aiohttp_server: MakeServer, http: aiohttp.ClientSession, status: int
) -> None:
    client = VeniceClient(http, await stub(aiohttp_server, answer(status)))
    with pytest.raises(ProviderTransient) as err:
        await client.complete("k", "m", "q")
    assert err.value.status == status
