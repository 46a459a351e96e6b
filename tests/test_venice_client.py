"""VeniceClient over real loopback HTTP: against the simulator, and against a scripted stub
for the answers the simulator never gives (other statuses, broken bodies, dropped sockets).

Every client goes through a real :class:`Outbound` whose policy trusts only the test server's
``/api/v1/`` prefix, as the operator's configuration would; anything else on 127.0.0.1 is a
loopback address the policy refuses. "No connection" is proved with a counting listener (the
idea of ``tests/test_outbound.py``): after the refusal the test opens a connection of its own and
waits until the listener has accepted it; connections are accepted in arrival order, so one the
client had made would have been counted first.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from adapters.media import probe_mp4
from adapters.outbound import Outbound, OutboundPolicy
from adapters.simulator import create_simulator_app, key_digest, read_billing
from adapters.venice import (
    MAX_DETAIL_CHARS,
    Completed,
    Finished,
    Processing,
    ProviderContentPolicy,
    ProviderError,
    ProviderInferenceFailed,
    ProviderLost,
    ProviderRefused,
    ProviderRejected,
    ProviderTransient,
    ProviderUnknown,
    Queued,
    QuoteFailed,
    VeniceClient,
    VideoParams,
)
from tests.listener import Listener
from tests.venice_schema import validate_request

RENDER = 0.2
RUNWAY = VideoParams(model="runway-gen4-5-text", duration_seconds=5)
SEEDANCE = VideoParams(model="seedance-2-fast-t2v", duration_seconds=4)
PROMPT = "a lighthouse at dawn"
KEY = "sk_live_very_secret_key_42"
MARKER = "SECRET-UPSTREAM-BODY-123"

MakeServer = Callable[..., Awaitable[TestServer]]
StubHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Connect = Callable[..., VeniceClient]


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
async def connect() -> AsyncIterator[Connect]:
    """Clients whose outbound policy trusts their base URL's prefix (or the given policy)."""
    outbounds: list[Outbound] = []

    def make(
        base_url: str,
        policy: OutboundPolicy | None = None,
        on_error: Callable[[str], None] | None = None,
        **timeouts: float,
    ) -> VeniceClient:
        if policy is None:
            policy = OutboundPolicy(trusted_prefixes=(base_url.rstrip("/") + "/",))
        outbound = Outbound(policy)
        outbounds.append(outbound)
        return VeniceClient(outbound, base_url, on_error=on_error, **timeouts)

    yield make
    for outbound in outbounds:
        await outbound.close()


@pytest.fixture
async def sim_url(aiohttp_server: MakeServer) -> str:
    server = await aiohttp_server(create_simulator_app(render_seconds=RENDER))
    return str(server.make_url("/api/v1"))


@pytest.fixture
async def venice(connect: Connect, sim_url: str) -> VeniceClient:
    return connect(sim_url, queue_timeout=2.0, retrieve_timeout=5.0)


async def billed(sim_url: str) -> dict[str, int]:
    async with aiohttp.ClientSession() as http:
        return await read_billing(http, sim_url)


@dataclass
class Seen:
    method: str
    path: str  # with the query string
    headers: dict[str, str]
    body: bytes


@dataclass
class Stub:
    """A provider whose every path under /api/v1/ is answered by ``handler``; ``seen`` records
    each request it received, in order."""

    url: str  # the base URL, ".../api/v1"
    seen: list[Seen] = field(default_factory=list)

    def link(self, path: str) -> str:
        return f"{self.url}{path}"

    @property
    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


async def stub(aiohttp_server: MakeServer, handler: StubHandler) -> Stub:
    holder: list[Stub] = []

    async def record(request: web.Request) -> web.StreamResponse:
        holder[0].seen.append(
            Seen(request.method, request.path_qs, dict(request.headers), await request.read())
        )
        return await handler(request)

    app = web.Application()
    app.router.add_route("*", "/api/v1/{tail:.*}", record)
    server = await aiohttp_server(app)
    holder.append(Stub(str(server.make_url("/api/v1"))))
    return holder[0]


def answer(status: int, body: str = '{"error": "nope"}', content_type: str = "application/json"):
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, text=body, content_type=content_type)

    return handler


def redirect(status: int, location: str) -> StubHandler:
    """Redirects the first path it is asked for; answers anything else 200 with an MP4-ish body."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path.endswith(("/share/job", "/video/queue", "/video/quote")):
            return web.Response(status=status, headers={"Location": location}, text=MARKER)
        return web.Response(body=FAKE_MP4, content_type="video/mp4")

    return handler


FAKE_MP4 = b"\0\0\0\x18ftypmp42" + b"\0" * 1000


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def until_done(
    venice: VeniceClient, key: str, queue_id: str, dest: Path, model: str = RUNWAY.model
) -> Completed | Finished:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        result = await venice.retrieve(key, model, queue_id, dest)
        if not isinstance(result, Processing):
            return result
        await asyncio.sleep(RENDER / 4)
    raise AssertionError("never completed")


async def rendered_by_now(venice: VeniceClient, scratch: Path) -> None:
    """Every job queued before this call has finished rendering: a ``sim_never`` job queued now
    reports its full estimate as elapsed once the (shared) render time has passed."""
    marker = await venice.queue("sim_never", RUNWAY, PROMPT, None)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        result = await venice.retrieve("sim_never", RUNWAY.model, marker.queue_id, scratch / "n")
        assert isinstance(result, Processing)
        assert result.execution_duration_ms is not None
        assert result.average_execution_time_ms is not None
        if result.execution_duration_ms >= result.average_execution_time_ms:
            return
        await asyncio.sleep(RENDER / 4)
    raise AssertionError("the render time never passed")


# -- catalog --------------------------------------------------------------------------------


async def test_list_models(venice: VeniceClient) -> None:
    models = await venice.list_models()
    assert {m["id"] for m in models} == {
        "runway-gen4-5-text",
        "seedance-2-fast-t2v",
        "pixverse-c1-t2v",
        "wan-2-5-i2v",
    }
    seedance = next(m for m in models if m["id"] == "seedance-2-fast-t2v")
    assert seedance["model_spec"]["constraints"]["durations"] == ["4s", "6s", "8s", "12s"]


async def test_list_models_asks_for_video_models_without_a_key(
    aiohttp_server: MakeServer, connect: Connect
) -> None:
    body = '{"object": "list", "data": [{"id": "a"}, 7, "x", null, {"id": "b"}]}'
    upstream = await stub(aiohttp_server, answer(200, body))
    assert await connect(upstream.url).list_models() == [{"id": "a"}, {"id": "b"}]
    [seen] = upstream.seen
    assert (seen.method, seen.path, seen.body) == ("GET", "/api/v1/models?type=video", b"")
    assert "Authorization" not in seen.headers
    validate_request("GET", "/models?type=video", None)


@pytest.mark.parametrize(
    ("status", "body"),
    [(500, '{"error": "down"}'), (200, "not json"), (200, "{}"), (200, '{"data": {}}')],
)
async def test_list_models_failures_are_transient(
    aiohttp_server: MakeServer, connect: Connect, status: int, body: str
) -> None:
    client = connect((await stub(aiohttp_server, answer(status, body))).url)
    with pytest.raises(ProviderTransient) as err:
        await client.list_models()
    assert err.value.status == status


async def test_list_models_unreachable(connect: Connect, unused_tcp_port: int) -> None:
    client = connect(f"http://127.0.0.1:{unused_tcp_port}/api/v1")
    with pytest.raises(ProviderTransient) as err:
        await client.list_models()
    assert err.value.status == 0


# -- quotes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "micros"),
    [
        (RUNWAY, 500_000),
        # Audio left out is audio on for a model with audio (Venice's default): x1.25.
        (VideoParams("seedance-2-fast-t2v", 4, resolution="720p"), 300_000),
        (VideoParams("seedance-2-fast-t2v", 4, resolution="720p", audio=False), 240_000),
        (VideoParams("seedance-2-fast-t2v", 12, "1080p", "21:9", audio=True), 1_500_000),
        (VideoParams("pixverse-c1-t2v", 8, "1080p", audio=True), 900_000),
        (VideoParams("pixverse-c1-t2v", 5), 312_500),
        (VideoParams("pixverse-c1-t2v", 5, audio=False), 250_000),
        (VideoParams("wan-2-5-i2v", 10, "1080p"), 850_000),
    ],
)
async def test_quote_in_micros(venice: VeniceClient, params: VideoParams, micros: int) -> None:
    assert await venice.quote("sim_ok", params) == micros


async def test_quote_is_public_so_any_key_gets_a_price(venice: VeniceClient, sim_url: str) -> None:
    assert await venice.quote("vnc_live_not_a_sim_key", RUNWAY) == 500_000
    assert await venice.quote("sim_401", RUNWAY) == 500_000
    assert await billed(sim_url) == {}


async def test_quote_rounds_up_to_the_microdollar(
    aiohttp_server: MakeServer, connect: Connect
) -> None:
    upstream = await stub(aiohttp_server, answer(200, '{"quote": 0.1234561}'))
    assert await connect(upstream.url).quote("k", RUNWAY) == 123_457


async def test_quote_sends_only_the_fields_that_are_set(
    aiohttp_server: MakeServer, connect: Connect
) -> None:
    upstream = await stub(aiohttp_server, answer(200, '{"quote": 1}'))
    client = connect(upstream.url)
    assert await client.quote("k", RUNWAY) == 1_000_000
    await client.quote("k", VideoParams("m", 8, "1080p", "9:16", audio=False))
    sent = [json.loads(s.body) for s in upstream.seen]
    assert sent == [
        {"model": "runway-gen4-5-text", "duration": "5s"},
        {
            "model": "m",
            "duration": "8s",
            "resolution": "1080p",
            "aspect_ratio": "9:16",
            "audio": False,
        },
    ]
    for seen, body in zip(upstream.seen, sent, strict=True):
        assert (seen.method, seen.path) == ("POST", "/api/v1/video/quote")
        assert seen.headers["Authorization"] == "Bearer k"
        validate_request("POST", "/video/quote", body)


@pytest.mark.parametrize(
    "params",
    [
        VideoParams("runway-gen4-5-text", 7),
        VideoParams("nope", 5),
        VideoParams("runway-gen4-5-text", 5, audio=True),
    ],
)
async def test_quote_failures(venice: VeniceClient, params: VideoParams) -> None:
    with pytest.raises(QuoteFailed) as err:
        await venice.quote("sim_ok", params)
    assert err.value.status == 400
    assert err.value.message == "the provider rejected the request as invalid (HTTP 400)"
    assert str(err.value) == "400: the provider rejected the request as invalid (HTTP 400)"
    # What the provider said (a DetailedError) is kept for the logs only.
    assert '"details"' in err.value.detail


@pytest.mark.parametrize("status", [401, 403, 404, 429, 500, 503])
async def test_quote_status_mapping(
    aiohttp_server: MakeServer, connect: Connect, status: int
) -> None:
    client = connect((await stub(aiohttp_server, answer(status))).url)
    with pytest.raises(QuoteFailed) as err:
        await client.quote("k", RUNWAY)
    assert err.value.status == status
    assert err.value.message.endswith(f"(HTTP {status})")


@pytest.mark.parametrize(
    "body", ['{"quote": "abc"}', '{"quote": -1}', "{}", "not json", '{"quote": true}', "[1]"]
)
async def test_quote_rejects_unusable_answers(
    aiohttp_server: MakeServer, connect: Connect, body: str
) -> None:
    client = connect((await stub(aiohttp_server, answer(200, body))).url)
    with pytest.raises(QuoteFailed) as err:
        await client.quote("k", RUNWAY)
    assert err.value.message == "the provider's quote is unusable"


async def test_quote_unreachable(connect: Connect, unused_tcp_port: int) -> None:
    client = connect(f"http://127.0.0.1:{unused_tcp_port}/api/v1")
    with pytest.raises(QuoteFailed) as err:
        await client.quote("k", RUNWAY)
    assert err.value.status == 0


async def test_quote_follows_no_redirect(aiohttp_server: MakeServer, connect: Connect) -> None:
    upstream = await stub(aiohttp_server, redirect(307, "elsewhere"))
    with pytest.raises(QuoteFailed) as err:
        await connect(upstream.url).quote("k", RUNWAY)
    assert err.value.status == 0
    assert "redirect" in err.value.message and MARKER not in str(err.value)
    assert upstream.paths == ["/api/v1/video/quote"]


# -- queue ----------------------------------------------------------------------------------


async def test_queue_then_retrieve_a_real_video(venice: VeniceClient, tmp_path: Path) -> None:
    params = VideoParams("seedance-2-fast-t2v", 6, "720p", "1:1")
    queued = await venice.queue("sim_ok", params, PROMPT, None)
    assert isinstance(queued, Queued) and queued.queue_id
    assert queued.download_url is None
    dest = tmp_path / "v.mp4"
    first = await venice.retrieve("sim_ok", params.model, queued.queue_id, dest)
    assert isinstance(first, Processing)
    assert first.average_execution_time_ms == int(RENDER * 1000)
    assert first.execution_duration_ms is not None
    assert 0 <= first.execution_duration_ms < RENDER * 1000

    result = await until_done(venice, "sim_ok", queued.queue_id, dest, params.model)
    assert isinstance(result, Completed)
    assert result.path == dest and result.bytes == dest.stat().st_size
    info = probe_mp4(dest)
    assert (info.width, info.height, info.duration_seconds) == (720, 720, 6)
    # Audio left out is audio on at Venice and in the sandbox: the MP4 has a real track.
    assert info.audio is True
    assert names(tmp_path) == ["v.mp4"]


@pytest.mark.parametrize(("audio", "heard"), [(None, True), (True, True), (False, False)])
async def test_queue_audio_reaches_the_video(
    venice: VeniceClient, sim_url: str, tmp_path: Path, audio: bool | None, heard: bool
) -> None:
    params = VideoParams("seedance-2-fast-t2v", 4, audio=audio)
    queued = await venice.queue("sim_ok", params, PROMPT, None)
    result = await until_done(venice, "sim_ok", queued.queue_id, tmp_path / "v.mp4", params.model)
    assert isinstance(result, Completed)
    assert probe_mp4(result.path).audio is heard
    assert await billed(sim_url) == {key_digest("sim_ok"): 200_000 if heard else 160_000}


async def test_queue_image_to_video(venice: VeniceClient) -> None:
    params = VideoParams("wan-2-5-i2v", 5)
    queued = await venice.queue("sim_ok", params, PROMPT, "https://example.com/cat.png")
    assert queued.queue_id and queued.download_url is None


async def test_queue_sends_the_documented_body(
    aiohttp_server: MakeServer, connect: Connect
) -> None:
    upstream = await stub(aiohttp_server, answer(200, '{"model": "m", "queue_id": "q1"}'))
    client = connect(upstream.url)
    params = VideoParams("wan-2-5-i2v", 5, "720p", "9:16", audio=False)
    assert await client.queue(KEY, params, PROMPT, "https://example.com/cat.png") == Queued("q1")
    [seen] = upstream.seen
    assert (seen.method, seen.path) == ("POST", "/api/v1/video/queue")
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    body = json.loads(seen.body)
    assert body == {
        "model": "wan-2-5-i2v",
        "duration": "5s",
        "resolution": "720p",
        "aspect_ratio": "9:16",
        "audio": False,
        "prompt": PROMPT,
        "image_url": "https://example.com/cat.png",
    }
    validate_request("POST", "/video/queue", body)


@pytest.mark.parametrize(
    ("key", "status", "code", "message"),
    [
        ("sim_401", 401, "", "the provider rejected the API key (HTTP 401)"),
        ("sim_402", 402, "", "the provider account has insufficient balance (HTTP 402)"),
        ("sim_429", 429, "", "the provider rate-limited the account (HTTP 429)"),
        (
            "sim_consent",
            409,
            "needs_consent",
            "the provider account needs to give consent before this model can be used"
            " (HTTP 409, needs_consent)",
        ),
    ],
)
async def test_queue_refusals_from_magic_keys(
    venice: VeniceClient, sim_url: str, key: str, status: int, code: str, message: str
) -> None:
    with pytest.raises(ProviderRefused) as err:
        await venice.queue(key, SEEDANCE, PROMPT, None)
    assert type(err.value) is ProviderRefused
    assert (err.value.status, err.value.code, err.value.message) == (status, code, message)
    assert await billed(sim_url) == {}


async def test_queue_refuses_a_non_sim_key(venice: VeniceClient) -> None:
    with pytest.raises(ProviderRefused) as err:
        await venice.queue("vnc_live_secret", RUNWAY, PROMPT, None)
    assert err.value.status == 401
    assert err.value.message == "the provider rejected the API key (HTTP 401)"
    assert "vnc_live_secret" not in err.value.message
    assert "vnc_live_secret" not in err.value.detail


async def test_queue_timeout_is_unknown(connect: Connect, sim_url: str) -> None:
    venice = connect(sim_url, queue_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(ProviderUnknown) as err:
        await venice.queue("sim_queue_timeout", RUNWAY, PROMPT, None)
    assert time.monotonic() - started < 3
    assert err.value.status == 0


async def test_every_failed_call_is_reported_once_by_its_kind(
    connect: Connect, sim_url: str, aiohttp_server: MakeServer, tmp_path: Path
) -> None:
    kinds: list[str] = []
    venice = connect(sim_url, on_error=kinds.append, queue_timeout=0.3)
    queued = await venice.queue("sim_ok", RUNWAY, PROMPT, None)
    await venice.quote("sim_ok", RUNWAY)
    assert kinds == []
    with pytest.raises(ProviderUnknown):
        await venice.queue("sim_queue_timeout", RUNWAY, PROMPT, None)
    with pytest.raises(ProviderRefused):
        await venice.queue("sim_429", RUNWAY, PROMPT, None)
    with pytest.raises(ProviderRejected):
        await venice.queue("sim_ok", VideoParams("runway-gen4-5-text", 7), PROMPT, None)
    with pytest.raises(ProviderLost):
        await venice.retrieve("sim_ok", RUNWAY.model, "no-such-job", tmp_path / "v")
    assert kinds == ["timeout", "refused", "rejected", "lost"]

    kinds.clear()
    broken = await stub(aiohttp_server, answer(503))
    venice = connect(broken.url, on_error=kinds.append)
    with pytest.raises(ProviderTransient):
        await venice.retrieve("sim_ok", RUNWAY.model, queued.queue_id, tmp_path / "v")
    with pytest.raises(QuoteFailed):
        await venice.quote("sim_ok", RUNWAY)
    assert kinds == ["transient", "quote_failed"]


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
    venice: VeniceClient, sim_url: str, params: VideoParams, image_url: str | None
) -> None:
    with pytest.raises(ProviderRejected) as err:
        await venice.queue("sim_ok", params, PROMPT, image_url)
    assert err.value.status == 400
    assert err.value.message == "the provider rejected the request as invalid (HTTP 400)"
    assert err.value.code == ""
    assert await billed(sim_url) == {}


async def test_queue_rejects_an_oversized_prompt(venice: VeniceClient) -> None:
    with pytest.raises(ProviderRejected) as err:
        await venice.queue("sim_ok", RUNWAY, "x" * (2 * 1024 * 1024), None)
    assert (err.value.status, err.value.code) == (413, "PAYLOAD_TOO_LARGE")
    assert err.value.message == (
        "the request is too large for the provider (HTTP 413, PAYLOAD_TOO_LARGE)"
    )


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (300, ProviderRefused),
        (302, ProviderRefused),
        (400, ProviderRejected),
        (401, ProviderRefused),
        (402, ProviderRefused),
        (403, ProviderRefused),
        (404, ProviderRejected),
        (405, ProviderRejected),
        (408, ProviderRefused),
        (409, ProviderRefused),
        (410, ProviderRejected),
        (413, ProviderRejected),
        (415, ProviderRejected),
        (418, ProviderRejected),
        (422, ProviderContentPolicy),
        (429, ProviderRefused),
        (500, ProviderRefused),
        (501, ProviderRefused),
        (502, ProviderRefused),
        (503, ProviderRefused),
        (504, ProviderUnknown),
    ],
)
async def test_queue_status_mapping(
    aiohttp_server: MakeServer, connect: Connect, status: int, kind: type[ProviderError]
) -> None:
    # A 3xx here carries no Location: an answer, not a redirect (those are refused, below).
    client = connect((await stub(aiohttp_server, answer(status))).url)
    with pytest.raises(kind) as err:
        await client.queue("k", RUNWAY, PROMPT, None)
    assert type(err.value) is kind
    # The engine's words, never the provider's ("nope"), which stays in the detail.
    assert "nope" not in err.value.message
    assert err.value.detail == '{"error": "nope"}'
    assert err.value.message.endswith(f"(HTTP {status})")
    assert err.value.status == (0 if kind is ProviderUnknown else status)


async def test_queue_content_violation(aiohttp_server: MakeServer, connect: Connect) -> None:
    """Venice's ContentViolationError: the prompt itself, whoever's account would run it."""
    body = json.dumps({"error": "Prompt violates policy", "suggested_prompt": "a calm lighthouse"})
    client = connect((await stub(aiohttp_server, answer(422, body))).url)
    with pytest.raises(ProviderContentPolicy) as err:
        await client.queue("k", RUNWAY, PROMPT, None)
    assert (err.value.status, err.value.code) == (422, "")
    assert err.value.message == "the provider's content policy rejected the request (HTTP 422)"


@pytest.mark.parametrize("status", [200, 201, 202])
async def test_queue_success_statuses(
    aiohttp_server: MakeServer, connect: Connect, status: int
) -> None:
    body = '{"model": "m", "queue_id": "q-1", "download_url": "https://cdn.example/v/q-1"}'
    client = connect((await stub(aiohttp_server, answer(status, body))).url)
    queued = await client.queue("k", RUNWAY, PROMPT, None)
    assert queued == Queued("q-1", "https://cdn.example/v/q-1")


@pytest.mark.parametrize("link", ['""', "7", "null", "{}"])
async def test_queue_ignores_a_download_url_that_is_not_a_url_string(
    aiohttp_server: MakeServer, connect: Connect, link: str
) -> None:
    body = f'{{"model": "m", "queue_id": "q-1", "download_url": {link}}}'
    client = connect((await stub(aiohttp_server, answer(200, body))).url)
    assert await client.queue("k", RUNWAY, PROMPT, None) == Queued("q-1", None)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, "not json"),
        (200, "{}"),
        (200, '{"queue_id": ""}'),
        (200, '{"queue_id": 7}'),
        (200, '["q"]'),
        (200, '"q"'),
        (204, ""),
    ],
)
async def test_queue_unparseable_success_is_unknown(
    aiohttp_server: MakeServer, connect: Connect, status: int, body: str
) -> None:
    client = connect((await stub(aiohttp_server, answer(status, body))).url)
    with pytest.raises(ProviderUnknown) as err:
        await client.queue("k", RUNWAY, PROMPT, None)
    assert f"answered {status}" in err.value.message


async def test_queue_connection_closed_after_sending_is_unknown(
    aiohttp_server: MakeServer, connect: Connect
) -> None:
    async def hang_up(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    upstream = await stub(aiohttp_server, hang_up)
    with pytest.raises(ProviderUnknown):
        await connect(upstream.url).queue("k", RUNWAY, PROMPT, None)
    assert [json.loads(s.body) for s in upstream.seen] == [
        {"model": "runway-gen4-5-text", "duration": "5s", "prompt": PROMPT}
    ]


async def test_queue_unreachable_is_refused(connect: Connect, unused_tcp_port: int) -> None:
    client = connect(f"http://127.0.0.1:{unused_tcp_port}/api/v1")
    with pytest.raises(ProviderRefused) as err:
        await client.queue("k", RUNWAY, PROMPT, None)
    assert err.value.status == 0


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_queue_follows_no_redirect(
    aiohttp_server: MakeServer, connect: Connect, status: int
) -> None:
    """A queue bills: it is never replayed to wherever a Location points, even on the same
    provider, and a redirect is no acceptance, so it is a refusal."""
    upstream = await stub(aiohttp_server, redirect(status, "/api/v1/video/queue-elsewhere"))
    with pytest.raises(ProviderRefused) as err:
        await connect(upstream.url).queue("k", RUNWAY, PROMPT, None)
    assert err.value.status == 0
    assert "too many redirects" in err.value.message
    assert MARKER not in str(err.value)
    assert upstream.paths == ["/api/v1/video/queue"]


# -- an untrusted base URL ------------------------------------------------------------------


async def test_an_untrusted_base_url_is_refused_without_a_connection(
    connect: Connect, listener: Listener, tmp_path: Path
) -> None:
    # The host is even on the provider's allow-list, but it is loopback and not trusted.
    policy = OutboundPolicy(allowed_hosts={"venice": frozenset({"127.0.0.1"})})
    client = connect(listener.url("/api/v1"), policy)
    expected: list[tuple[Awaitable[Any], type[ProviderError]]] = [
        (client.list_models(), ProviderTransient),
        (client.quote(KEY, RUNWAY), QuoteFailed),
        (client.check_key(KEY, RUNWAY.model), ProviderRefused),
        (client.queue(KEY, RUNWAY, PROMPT, None), ProviderRefused),
        (client.retrieve(KEY, RUNWAY.model, "q", tmp_path / "v.mp4"), ProviderTransient),
        (client.complete(KEY, RUNWAY.model, "q"), ProviderTransient),
        (client.download(listener.url("/api/v1/share/q"), tmp_path / "d.mp4"), ProviderLost),
    ]
    for call, kind in expected:
        with pytest.raises(kind) as err:
            await call
        assert type(err.value) is kind
        assert err.value.status == 0
        assert KEY not in str(err.value) and KEY not in err.value.detail
    await client.revoke_download(listener.url("/api/v1/share/q"))
    assert await listener.accepted_before_now() == []
    assert names(tmp_path) == []


# -- what errors say (SPEC 9) ---------------------------------------------------------------


def hostile(status: int) -> StubHandler:
    """An upstream that answers ``status`` in Venice's error shapes, with a marker and the
    caller's own Authorization header in the body."""

    async def handler(request: web.Request) -> web.StreamResponse:
        echoed = f"{MARKER} you sent {request.headers.get('Authorization')}"
        if status == 400:
            body: Any = {"error": echoed, "details": {"prompt": {"_errors": [echoed]}}}
        elif status == 422 and request.path.endswith("/video/retrieve"):
            body = {
                "error": {
                    "message": echoed,
                    "type": "provider_content_policy",
                    "credits_refunded": False,
                }
            }
        else:
            body = {"error": echoed}
        return web.json_response(body, status=status)

    return handler


def calls(
    client: VeniceClient, upstream: Stub, scratch: Path
) -> dict[str, Callable[[], Awaitable[Any]]]:
    return {
        "list_models": client.list_models,
        "quote": lambda: client.quote(KEY, RUNWAY),
        "check_key": lambda: client.check_key(KEY, RUNWAY.model),
        "queue": lambda: client.queue(KEY, RUNWAY, PROMPT, None),
        "retrieve": lambda: client.retrieve(KEY, RUNWAY.model, "q", scratch / "v.mp4"),
        "complete": lambda: client.complete(KEY, RUNWAY.model, "q"),
        "download": lambda: client.download(upstream.link("/share/q"), scratch / "d.mp4"),
    }


# Statuses every call raises on (complete takes 400/404/410 as done, check_key 404/410 as ok).
ERROR_STATUSES = [401, 402, 403, 409, 413, 422, 429, 500, 502, 503, 504]
CALLS = ["list_models", "quote", "check_key", "queue", "retrieve", "complete", "download"]


@pytest.mark.parametrize(
    ("call", "status"),
    [
        (call, status)
        for call in CALLS
        for status in [400, *ERROR_STATUSES]
        if (call, status) != ("complete", 400)
    ],
)
async def test_messages_never_carry_upstream_text_nor_the_key(
    aiohttp_server: MakeServer, connect: Connect, tmp_path: Path, call: str, status: int
) -> None:
    upstream = await stub(aiohttp_server, hostile(status))
    with pytest.raises(ProviderError) as err:
        await calls(connect(upstream.url), upstream, tmp_path)[call]()
    error = err.value
    # Shown to people: the engine's words only.
    assert MARKER not in error.message and MARKER not in str(error)
    assert "you sent" not in error.message
    # Kept for the operator's logs: what the provider said, without the key.
    assert MARKER in error.detail
    for text in (error.message, str(error), error.detail, error.code):
        assert KEY not in text
    if call not in ("download", "list_models"):  # the two calls that send no key
        assert "Bearer [redacted]" in error.detail
    assert len(error.detail) <= MAX_DETAIL_CHARS + 1
    assert names(tmp_path) == []


async def test_detail_is_a_short_single_line_excerpt(
    aiohttp_server: MakeServer, connect: Connect
) -> None:
    body = f"{MARKER}\n\n\t line two   {KEY} " + "z" * 5000
    client = connect((await stub(aiohttp_server, answer(503, body, "text/plain"))).url)
    with pytest.raises(ProviderRefused) as err:
        await client.queue(KEY, RUNWAY, PROMPT, None)
    detail = err.value.detail
    assert detail.startswith(f"{MARKER} line two [redacted] zzz")
    assert detail.endswith("…") and len(detail) == MAX_DETAIL_CHARS + 1
    assert err.value.message == "the provider is at capacity (HTTP 503)"


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"code": f"{MARKER} {{key}}", "message": "x"}},
        {"error": {"type": f"{MARKER} {{key}}", "message": "x"}},
        {"code": f"{MARKER} {{key}}", "error": "x"},
    ],
)
async def test_an_upstream_code_field_is_not_echoed(
    aiohttp_server: MakeServer, connect: Connect, body: dict[str, Any]
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        key = request.headers["Authorization"].removeprefix("Bearer ")
        return web.Response(
            status=409, text=json.dumps(body).replace("{key}", key), content_type="application/json"
        )

    client = connect((await stub(aiohttp_server, handler)).url)
    with pytest.raises(ProviderRefused) as err:
        await client.queue(KEY, RUNWAY, PROMPT, None)
    assert KEY not in err.value.message and KEY not in err.value.code
    assert MARKER not in err.value.message


async def test_an_upstream_content_type_is_not_echoed(
    aiohttp_server: MakeServer, connect: Connect, tmp_path: Path
) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x", headers={"Content-Type": f"text/{MARKER}-visit-evil"})

    client = connect((await stub(aiohttp_server, handler)).url)
    with pytest.raises(ProviderTransient) as err:
        await client.retrieve(KEY, RUNWAY.model, "q", tmp_path / "v.mp4")
    assert MARKER.lower() not in err.value.message.lower()


# -- retrieve: the simulator's failure keys -------------------------------------------------


async def test_retrieve_inference_failure(venice: VeniceClient, tmp_path: Path) -> None:
    queued = await venice.queue("sim_fail_inference", RUNWAY, PROMPT, None)
    dest = tmp_path / "v.mp4"
    assert isinstance(
        await venice.retrieve("sim_fail_inference", RUNWAY.model, queued.queue_id, dest),
        Processing,
    )
    await rendered_by_now(venice, tmp_path)
    with pytest.raises(ProviderInferenceFailed) as err:
        await venice.retrieve("sim_fail_inference", RUNWAY.model, queued.queue_id, dest)
    assert err.value.status == 500
    assert err.value.message == "the provider failed to process the request (HTTP 500)"
    assert not dest.exists()


async def test_retrieve_content_policy(venice: VeniceClient, tmp_path: Path) -> None:
    queued = await venice.queue("sim_content_policy", RUNWAY, PROMPT, None)
    with pytest.raises(ProviderContentPolicy) as err:
        await venice.retrieve("sim_content_policy", RUNWAY.model, queued.queue_id, tmp_path / "v")
    assert (err.value.status, err.value.code) == (422, "provider_content_policy")
    assert err.value.message == (
        "the provider's content policy rejected the request (HTTP 422, provider_content_policy)"
    )
    assert "content policies" in err.value.detail


async def test_retrieve_flaky_is_transient_then_completes(
    venice: VeniceClient, tmp_path: Path
) -> None:
    queued = await venice.queue("sim_flaky", RUNWAY, PROMPT, None)
    await rendered_by_now(venice, tmp_path)
    dest = tmp_path / "v.mp4"
    with pytest.raises(ProviderTransient) as err:
        await venice.retrieve("sim_flaky", RUNWAY.model, queued.queue_id, dest)
    assert err.value.status == 503
    assert err.value.message == "the provider is at capacity (HTTP 503)"
    done = await venice.retrieve("sim_flaky", RUNWAY.model, queued.queue_id, dest)
    assert isinstance(done, Completed)


async def test_retrieve_never_stays_processing(venice: VeniceClient, tmp_path: Path) -> None:
    queued = await venice.queue("sim_never", RUNWAY, PROMPT, None)
    await rendered_by_now(venice, tmp_path)
    result = await venice.retrieve("sim_never", RUNWAY.model, queued.queue_id, tmp_path / "v")
    assert result == Processing(int(RENDER * 1000), int(RENDER * 1000))


async def test_retrieve_slow_reports_its_longer_estimate(
    venice: VeniceClient, tmp_path: Path
) -> None:
    queued = await venice.queue("sim_slow", RUNWAY, PROMPT, None)
    result = await venice.retrieve("sim_slow", RUNWAY.model, queued.queue_id, tmp_path / "v")
    assert isinstance(result, Processing)
    assert result.average_execution_time_ms == int(4 * RENDER * 1000)
    assert result.execution_duration_ms is not None
    assert result.execution_duration_ms < result.average_execution_time_ms


async def test_retrieve_unknown_or_foreign_job_is_lost(
    venice: VeniceClient, tmp_path: Path
) -> None:
    queued = await venice.queue("sim_owner", RUNWAY, PROMPT, None)
    for key, qid in [("sim_owner", "no-such-id"), ("sim_someone_else", queued.queue_id)]:
        with pytest.raises(ProviderLost) as err:
            await venice.retrieve(key, RUNWAY.model, qid, tmp_path / "v.mp4")
        assert err.value.status == 404
        assert err.value.message == "the provider has no such job (HTTP 404)"


async def test_complete_deletes_the_provider_copy(venice: VeniceClient, tmp_path: Path) -> None:
    queued = await venice.queue("sim_ok", RUNWAY, PROMPT, None)
    await until_done(venice, "sim_ok", queued.queue_id, tmp_path / "v.mp4")
    await venice.complete("sim_ok", RUNWAY.model, queued.queue_id)
    with pytest.raises(ProviderLost):
        await venice.retrieve("sim_ok", RUNWAY.model, queued.queue_id, tmp_path / "again.mp4")
    # Already gone is what complete wants (the sandbox, like Venice, answers 400 for it).
    await venice.complete("sim_ok", RUNWAY.model, queued.queue_id)
    await venice.complete("sim_ok", RUNWAY.model, "never-existed")


# -- a pre-signed download link -------------------------------------------------------------


async def test_download_url_job_finishes_then_downloads(
    venice: VeniceClient, sim_url: str, tmp_path: Path
) -> None:
    queued = await venice.queue("sim_download_url", SEEDANCE, PROMPT, None)
    assert queued.download_url == f"{sim_url}/share/{queued.queue_id}"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    first = await venice.retrieve(
        "sim_download_url", SEEDANCE.model, queued.queue_id, scratch / "v"
    )
    assert isinstance(first, Processing)
    finished = await until_done(
        venice, "sim_download_url", queued.queue_id, scratch / "v", SEEDANCE.model
    )
    assert finished == Finished()
    # Retrieve wrote nothing: the video is at the link.
    assert names(scratch) == []

    dest = tmp_path / "v.mp4"
    result = await venice.download(queued.download_url, dest)
    assert result == Completed(dest, dest.stat().st_size)
    info = probe_mp4(dest)
    assert (info.width, info.height, info.duration_seconds, info.audio) == (854, 480, 4, True)
    assert await billed(sim_url) == {key_digest("sim_download_url"): 200_000}

    await venice.revoke_download(queued.download_url)
    with pytest.raises(ProviderLost) as err:
        await venice.download(queued.download_url, tmp_path / "again.mp4")
    assert err.value.status == 404
    with pytest.raises(ProviderLost):
        await venice.retrieve("sim_download_url", SEEDANCE.model, queued.queue_id, scratch / "v")
    # Revoking again is harmless, and complete of the revoked job counts as done.
    await venice.revoke_download(queued.download_url)
    await venice.complete("sim_download_url", SEEDANCE.model, queued.queue_id)
    assert names(tmp_path) == ["scratch", "v.mp4"]


async def test_download_fetches_the_link_without_the_api_key(
    aiohttp_server: MakeServer, connect: Connect, tmp_path: Path
) -> None:
    async def video(request: web.Request) -> web.StreamResponse:
        return web.Response(body=FAKE_MP4, content_type="video/mp4")

    upstream = await stub(aiohttp_server, video)
    dest = tmp_path / "v.mp4"
    result = await connect(upstream.url).download(upstream.link("/share/job?sig=abc"), dest)
    assert result == Completed(dest, len(FAKE_MP4))
    assert dest.read_bytes() == FAKE_MP4
    [seen] = upstream.seen
    assert (seen.method, seen.path) == ("GET", "/api/v1/share/job?sig=abc")
    # The URL is the credential: no key goes with it.
    assert "Authorization" not in seen.headers
    assert seen.headers["Accept"] == "video/mp4"


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (404, ProviderLost),
        (410, ProviderLost),
        (400, ProviderTransient),
        (401, ProviderTransient),
        (403, ProviderTransient),
        (429, ProviderTransient),
        (500, ProviderTransient),
        (503, ProviderTransient),
        (204, ProviderTransient),
        (300, ProviderTransient),
    ],
)
async def test_download_status_mapping(
    aiohttp_server: MakeServer,
    connect: Connect,
    tmp_path: Path,
    status: int,
    kind: type[ProviderError],
) -> None:
    upstream = await stub(aiohttp_server, answer(status, f'{{"error": "{MARKER}"}}'))
    with pytest.raises(kind) as err:
        await connect(upstream.url).download(upstream.link("/share/job"), tmp_path / "v.mp4")
    assert type(err.value) is kind
    assert err.value.status == status
    assert MARKER not in err.value.message
    assert names(tmp_path) == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("location", ["/api/v1/files/job", "../files/job"])
async def test_download_follows_a_redirect_within_the_trusted_prefix(
    aiohttp_server: MakeServer, connect: Connect, tmp_path: Path, status: int, location: str
) -> None:
    upstream = await stub(aiohttp_server, redirect(status, location))
    dest = tmp_path / "v.mp4"
    result = await connect(upstream.url).download(upstream.link("/share/job"), dest)
    assert result.bytes == len(FAKE_MP4) and dest.read_bytes() == FAKE_MP4
    assert upstream.paths == ["/api/v1/share/job", "/api/v1/files/job"]


async def test_download_refuses_a_redirect_outside_the_trusted_prefix(
    aiohttp_server: MakeServer, connect: Connect, tmp_path: Path
) -> None:
    # The same loopback server, but a path the operator did not trust.
    upstream = await stub(aiohttp_server, redirect(302, "/internal/admin"))
    with pytest.raises(ProviderLost) as err:
        await connect(upstream.url).download(upstream.link("/share/job"), tmp_path / "v.mp4")
    assert err.value.status == 0
    assert "loopback" in err.value.message and MARKER not in str(err.value)
    assert upstream.paths == ["/api/v1/share/job"]
    assert names(tmp_path) == []


@pytest.mark.parametrize("status", [302, 307])
async def test_download_refuses_a_redirect_to_an_untrusted_server_without_connecting(
    aiohttp_server: MakeServer,
    connect: Connect,
    listener: Listener,
    tmp_path: Path,
    status: int,
) -> None:
    upstream = await stub(aiohttp_server, redirect(status, listener.url("/api/v1/files/job")))
    with pytest.raises(ProviderLost) as err:
        await connect(upstream.url).download(upstream.link("/share/job"), tmp_path / "v.mp4")
    assert err.value.status == 0
    assert "loopback" in err.value.message
    assert MARKER not in str(err.value) and str(listener.port) not in str(err.value)
    assert upstream.paths == ["/api/v1/share/job"]
    assert await listener.accepted_before_now() == []
    assert names(tmp_path) == []


async def test_download_refuses_endless_redirects(
    aiohttp_server: MakeServer, connect: Connect, tmp_path: Path
) -> None:
    async def loop(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": "/api/v1/share/job"})

    upstream = await stub(aiohttp_server, loop)
    with pytest.raises(ProviderLost) as err:
        await connect(upstream.url).download(upstream.link("/share/job"), tmp_path / "v.mp4")
    assert "too many redirects" in err.value.message
    assert len(upstream.seen) == 4  # the link and three redirects, no more


async def test_download_cut_short_leaves_no_file(
    aiohttp_server: MakeServer, connect: Connect, tmp_path: Path
) -> None:
    upstream = await stub(aiohttp_server, truncated)
    with pytest.raises(ProviderTransient) as err:
        await connect(upstream.url).download(upstream.link("/share/job"), tmp_path / "v.mp4")
    assert err.value.status == 0
    assert names(tmp_path) == []


async def test_download_unreachable_is_transient(
    connect: Connect, unused_tcp_port: int, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{unused_tcp_port}/api/v1"
    with pytest.raises(ProviderTransient) as err:
        await connect(base).download(f"{base}/share/job", tmp_path / "v.mp4")
    assert err.value.status == 0


async def test_revoke_download_sends_delete(aiohttp_server: MakeServer, connect: Connect) -> None:
    upstream = await stub(aiohttp_server, answer(204, ""))
    await connect(upstream.url).revoke_download(upstream.link("/share/job?sig=abc"))
    [seen] = upstream.seen
    assert (seen.method, seen.path) == ("DELETE", "/api/v1/share/job?sig=abc")
    assert "Authorization" not in seen.headers


@pytest.mark.parametrize("status", [404, 500, 503])
async def test_revoke_download_is_best_effort(
    aiohttp_server: MakeServer, connect: Connect, unused_tcp_port: int, status: int
) -> None:
    upstream = await stub(aiohttp_server, answer(status))
    client = connect(upstream.url)
    await client.revoke_download(upstream.link("/share/job"))
    await client.revoke_download(f"http://127.0.0.1:{unused_tcp_port}/api/v1/share/job")
    assert upstream.paths == ["/api/v1/share/job"]


# -- check_key ------------------------------------------------------------------------------


async def test_check_key_against_the_sandbox(venice: VeniceClient, sim_url: str) -> None:
    await venice.check_key("sim_ok", RUNWAY.model)
    # Magic keys act at queue time: sim_401's key itself is a valid sandbox key.
    await venice.check_key("sim_401", SEEDANCE.model)
    with pytest.raises(ProviderRefused) as err:
        await venice.check_key("vnc_live_secret", RUNWAY.model)
    assert err.value.status == 401
    assert err.value.message == "the provider rejected the API key (HTTP 401)"
    assert "vnc_live_secret" not in err.value.detail
    # The probe is free.
    assert await billed(sim_url) == {}


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (404, None),
        (410, None),
        (401, ProviderRefused),
        (402, ProviderRefused),
        (403, ProviderRefused),
        (200, ProviderTransient),
        (400, ProviderTransient),
        (409, ProviderTransient),
        (422, ProviderTransient),
        (429, ProviderTransient),
        (500, ProviderTransient),
        (503, ProviderTransient),
    ],
)
async def test_check_key_outcomes(
    aiohttp_server: MakeServer,
    connect: Connect,
    status: int,
    kind: type[ProviderError] | None,
) -> None:
    upstream = await stub(aiohttp_server, answer(status))
    client = connect(upstream.url)
    if kind is None:
        await client.check_key(KEY, "m")
    else:
        with pytest.raises(kind) as err:
            await client.check_key(KEY, "m")
        assert type(err.value) is kind
        assert err.value.status == status
        assert "nope" not in err.value.message


async def test_check_key_probes_a_job_that_cannot_exist(
    aiohttp_server: MakeServer, connect: Connect
) -> None:
    upstream = await stub(aiohttp_server, answer(404))
    client = connect(upstream.url)
    await client.check_key(KEY, "seedance-2-fast-t2v")
    await client.check_key(KEY, "seedance-2-fast-t2v")
    bodies = [json.loads(s.body) for s in upstream.seen]
    for seen, body in zip(upstream.seen, bodies, strict=True):
        # A retrieve, which costs nothing: never a quote or a queue.
        assert (seen.method, seen.path) == ("POST", "/api/v1/video/retrieve")
        assert seen.headers["Authorization"] == f"Bearer {KEY}"
        assert set(body) == {"model", "queue_id"} and body["model"] == "seedance-2-fast-t2v"
        validate_request("POST", "/video/retrieve", body)
    assert bodies[0]["queue_id"] != bodies[1]["queue_id"]


async def test_check_key_unreachable_is_transient(connect: Connect, unused_tcp_port: int) -> None:
    client = connect(f"http://127.0.0.1:{unused_tcp_port}/api/v1")
    with pytest.raises(ProviderTransient) as err:
        await client.check_key(KEY, "m")
    assert err.value.status == 0


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
        (418, ProviderTransient),
        (422, ProviderContentPolicy),
        (429, ProviderTransient),
        (500, ProviderInferenceFailed),
        (502, ProviderTransient),
        (503, ProviderTransient),
        (504, ProviderTransient),
    ],
)
async def test_retrieve_status_mapping(
    aiohttp_server: MakeServer,
    connect: Connect,
    tmp_path: Path,
    status: int,
    kind: type[ProviderError],
) -> None:
    client = connect((await stub(aiohttp_server, answer(status))).url)
    with pytest.raises(kind) as err:
        await client.retrieve("k", "m", "q", tmp_path / "v.mp4")
    assert type(err.value) is kind
    assert err.value.status == status
    assert err.value.message.endswith(f"(HTTP {status})")
    assert err.value.detail == '{"error": "nope"}'


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (
            '{"status": "PROCESSING", "average_execution_time": 9000, "execution_duration": 1500}',
            "application/json",
            Processing(9000, 1500),
        ),
        ('{"status": "PROCESSING"}', "application/json", Processing(None, None)),
        (
            '{"status": "PROCESSING", "average_execution_time": true, "execution_duration": "1"}',
            "application/json",
            Processing(None, None),
        ),
        (
            '{"status": "PROCESSING", "average_execution_time": 12.7, "execution_duration": 3}',
            "application/json",
            Processing(12, 3),
        ),
        (
            '{"status": "COMPLETED", "average_execution_time": 1, "execution_duration": 1}',
            "application/json",
            Finished(),
        ),
    ],
)
async def test_retrieve_status_answers(
    aiohttp_server: MakeServer,
    connect: Connect,
    tmp_path: Path,
    body: str,
    content_type: str,
    expected: Processing | Finished,
) -> None:
    client = connect((await stub(aiohttp_server, answer(200, body, content_type))).url)
    assert await client.retrieve("k", "m", "q", tmp_path / "v.mp4") == expected
    assert names(tmp_path) == []


@pytest.mark.parametrize("content_type", ["video/mp4", "application/octet-stream"])
async def test_retrieve_streams_the_video_to_dest(
    aiohttp_server: MakeServer, connect: Connect, tmp_path: Path, content_type: str
) -> None:
    async def video(request: web.Request) -> web.StreamResponse:
        return web.Response(body=FAKE_MP4, headers={"Content-Type": content_type})

    upstream = await stub(aiohttp_server, video)
    dest = tmp_path / "v.mp4"
    assert await connect(upstream.url).retrieve("k", "m", "q", dest) == Completed(
        dest, len(FAKE_MP4)
    )
    assert dest.read_bytes() == FAKE_MP4
    assert names(tmp_path) == ["v.mp4"]
    [seen] = upstream.seen
    validate_request("POST", "/video/retrieve", json.loads(seen.body))


async def test_retrieve_timeout_is_transient(
    aiohttp_server: MakeServer, connect: Connect, tmp_path: Path
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response()

    client = connect((await stub(aiohttp_server, slow)).url, retrieve_timeout=0.2)
    try:
        with pytest.raises(ProviderTransient) as err:
            await client.retrieve("k", "m", "q", tmp_path / "v.mp4")
    finally:
        release.set()
    assert err.value.status == 0


async def test_retrieve_unreachable_is_transient(
    connect: Connect, unused_tcp_port: int, tmp_path: Path
) -> None:
    client = connect(f"http://127.0.0.1:{unused_tcp_port}/api/v1")
    with pytest.raises(ProviderTransient):
        await client.retrieve("k", "m", "q", tmp_path / "v.mp4")


async def truncated(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "video/mp4", "Content-Length": "100000"})
    await resp.prepare(request)
    await resp.write(b"\0" * 1000)
    assert request.transport is not None
    request.transport.close()
    return resp


async def test_retrieve_cut_short_leaves_no_file(
    aiohttp_server: MakeServer, connect: Connect, tmp_path: Path
) -> None:
    client = connect((await stub(aiohttp_server, truncated)).url)
    with pytest.raises(ProviderTransient):
        await client.retrieve("k", "m", "q", tmp_path / "v.mp4")
    assert names(tmp_path) == []


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (200, '{"status": "WEIRD"}', "application/json"),
        (200, '["PROCESSING"]', "application/json"),
        (200, "not json", "application/json"),
        (200, "<html>", "text/html"),
    ],
)
async def test_retrieve_unexpected_answers_are_transient(
    aiohttp_server: MakeServer,
    connect: Connect,
    tmp_path: Path,
    status: int,
    body: str,
    content_type: str,
) -> None:
    client = connect((await stub(aiohttp_server, answer(status, body, content_type))).url)
    with pytest.raises(ProviderTransient):
        await client.retrieve("k", "m", "q", tmp_path / "v.mp4")
    assert names(tmp_path) == []


async def test_retrieve_follows_no_redirect(
    aiohttp_server: MakeServer, connect: Connect, tmp_path: Path
) -> None:
    async def moved(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/video/retrieve"):
            return web.Response(status=307, headers={"Location": "/api/v1/other"})
        return web.Response(body=FAKE_MP4, content_type="video/mp4")

    upstream = await stub(aiohttp_server, moved)
    with pytest.raises(ProviderTransient) as err:
        await connect(upstream.url).retrieve("k", "m", "q", tmp_path / "v.mp4")
    assert err.value.status == 0
    assert upstream.paths == ["/api/v1/video/retrieve"]


@pytest.mark.parametrize("call", ["retrieve", "download"])
async def test_a_lost_job_is_lost_whatever_its_body_bytes(
    aiohttp_server: MakeServer, connect: Connect, tmp_path: Path, call: str
) -> None:
    async def gone(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404, body=b"\xff\xfe not utf-8", content_type="text/plain")

    upstream = await stub(aiohttp_server, gone)
    client = connect(upstream.url)
    with pytest.raises(ProviderLost) as err:
        if call == "retrieve":
            await client.retrieve("k", "m", "q", tmp_path / "v.mp4")
        else:
            await client.download(upstream.link("/share/job"), tmp_path / "v.mp4")
    assert err.value.status == 404


@pytest.mark.parametrize("status", [200, 204, 400, 404, 410])
async def test_complete_done(aiohttp_server: MakeServer, connect: Connect, status: int) -> None:
    upstream = await stub(aiohttp_server, answer(status, "" if status == 204 else '{"x": 1}'))
    await connect(upstream.url).complete(KEY, "m", "q")
    [seen] = upstream.seen
    assert (seen.method, seen.path) == ("POST", "/api/v1/video/complete")
    validate_request("POST", "/video/complete", json.loads(seen.body))


@pytest.mark.parametrize("status", [401, 402, 403, 409, 429, 500, 503])
async def test_complete_failures_are_transient(
    aiohttp_server: MakeServer, connect: Connect, status: int
) -> None:
    client = connect((await stub(aiohttp_server, answer(status))).url)
    with pytest.raises(ProviderTransient) as err:
        await client.complete("k", "m", "q")
    assert err.value.status == status
    assert "nope" not in err.value.message


async def test_complete_follows_no_redirect(aiohttp_server: MakeServer, connect: Connect) -> None:
    async def moved(request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/video/complete"):
            return web.Response(status=308, headers={"Location": "/api/v1/other"})
        return web.json_response({"success": True})

    upstream = await stub(aiohttp_server, moved)
    with pytest.raises(ProviderTransient) as err:
        await connect(upstream.url).complete("k", "m", "q")
    assert err.value.status == 0
    assert upstream.paths == ["/api/v1/video/complete"]


async def test_complete_unreachable_is_transient(connect: Connect, unused_tcp_port: int) -> None:
    client = connect(f"http://127.0.0.1:{unused_tcp_port}/api/v1")
    with pytest.raises(ProviderTransient) as err:
        await client.complete("k", "m", "q")
    assert err.value.status == 0
