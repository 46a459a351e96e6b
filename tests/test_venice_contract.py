"""The contract with Venice (SPEC 5.1, 5.2), checked against our fixtures of its OpenAPI.

Both sides over real loopback HTTP: every answer the simulator gives on a Venice path must be
one Venice documents for that path (status, content type, body), and every request the engine's
client sends must validate against Venice's request schemas. The client is driven the way the
engine drives it (a submit body validated against the catalog the client read from ``/models``,
turned into provider parameters by the routing code), for every model and option.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from adapters.media import probe_mp4
from adapters.outbound import Outbound, OutboundPolicy
from adapters.simulator import API_PREFIX, SHARE_PATH, create_simulator_app
from adapters.venice import (
    Completed,
    Finished,
    Processing,
    ProviderContentPolicy,
    ProviderInferenceFailed,
    ProviderRefused,
    ProviderTransient,
    VeniceClient,
    VideoParams,
    parse_venice_models,
)
from api.validation import validate_video_request
from domain.catalog import Catalog
from services.routing import request_data, video_params
from tests.venice_schema import DOCUMENTED, validate_request, validate_response

RENDER = 0.05
Exchange = tuple[str, str, object, int, str, bytes]


class Recorder:
    """Every exchange on a Venice path of the simulator, as the wire carried it."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        # A body beyond the server's limit is the handler's to refuse (413), not ours to read.
        too_large = (request.content_length or 0) > request.client_max_size
        raw = None if too_large else await request.read()
        response = await handler(request)
        path = request.path.removeprefix(API_PREFIX)
        if path.startswith(("/sim/", SHARE_PATH)):
            return response  # the sandbox's own extras, not Venice paths
        assert isinstance(response, web.Response), "Venice paths answer whole bodies"
        body = response.body if isinstance(response.body, bytes) else b""
        sent: object = raw
        if request.method == "GET":
            path = request.path_qs.removeprefix(API_PREFIX)
            sent = None
        self.exchanges.append(
            (request.method, path, sent, response.status, response.content_type, body)
        )
        return response

    def check_answers(self) -> set[tuple[str, int]]:
        for method, path, _, status, content_type, body in self.exchanges:
            validate_response(method, path, status, content_type, body)
        return {(path.partition("?")[0], status) for _, path, _, status, _, _ in self.exchanges}

    def check_requests(self) -> list[dict[str, Any]]:
        bodies = []
        for method, path, sent, *_ in self.exchanges:
            if sent is None and method == "POST":
                continue
            validate_request(method, path, sent)
            if isinstance(sent, bytes) and sent:
                bodies.append({"path": path, **json.loads(sent)})
        return bodies


@pytest.fixture
async def venice(tmp_path: Path) -> AsyncIterator[tuple[TestClient[Any, Any], Recorder]]:
    recorder = Recorder()
    app = create_simulator_app(render_seconds=RENDER, state_path=tmp_path / "sim.db")
    app.middlewares.append(recorder.middleware)
    async with TestClient(TestServer(app)) as client:
        yield client, recorder


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


SEEDANCE = {"model": "seedance-2-fast-t2v", "duration": "4s", "prompt": "a lighthouse"}


async def until_done(client: TestClient[Any, Any], key: str, queue_id: str) -> Any:
    body = {"model": SEEDANCE["model"], "queue_id": queue_id}
    while True:
        r = await client.post(f"{API_PREFIX}/video/retrieve", json=body, headers=auth(key))
        if r.status != 200 or r.content_type != "application/json":
            return r
        if (await r.json())["status"] == "COMPLETED":
            return r
        await asyncio.sleep(RENDER / 2)


async def test_every_simulator_answer_is_documented(
    venice: tuple[TestClient[Any, Any], Recorder],
) -> None:
    client, recorder = venice
    api = API_PREFIX
    for kind in ("video", "all", "text", "nonsense"):
        await client.get(f"{api}/models", params={"type": kind})
    await client.get(f"{api}/models")
    # Quotes: good, bad, no key at all (Venice's quote is public), not JSON.
    await client.post(f"{api}/video/quote", json={"model": "seedance-2-fast-t2v", "duration": "4s"})
    await client.post(f"{api}/video/quote", json={"model": "nope", "duration": "4s"})
    await client.post(f"{api}/video/quote", json={**SEEDANCE, "duration": "5s"})
    await client.post(f"{api}/video/quote", data=b"{", headers=auth("sim_ok"))
    await client.post(f"{api}/video/quote", json=[1], headers=auth("sim_ok"))
    # Queue: every magic key, bad keys, bad bodies, a body too large.
    for key in (
        "sim_ok",
        "sim_401",
        "sim_402",
        "sim_429",
        "sim_consent",
        "sim_download_url",
        "sim_fail_inference",
        "sim_content_policy",
        "sim_flaky",
        "sim_never",
        "sim_slow",
        "live_key",
    ):
        await client.post(f"{api}/video/queue", json=SEEDANCE, headers=auth(key))
    await client.post(f"{api}/video/queue", json=SEEDANCE)
    await client.post(f"{api}/video/queue", json={**SEEDANCE, "prompt": ""}, headers=auth("sim_ok"))
    await client.post(
        f"{api}/video/queue", json={**SEEDANCE, "prompt": "x" * 3000}, headers=auth("sim_ok")
    )
    await client.post(
        f"{api}/video/queue", data=b"{" + b" " * (2 << 20) + b"}", headers=auth("sim_ok")
    )
    # Retrieve and complete of every kind of job, to the end.
    for key in ("sim_ok", "sim_download_url", "sim_fail_inference", "sim_content_policy"):
        r = await client.post(f"{api}/video/queue", json=SEEDANCE, headers=auth(key))
        queue_id = (await r.json())["queue_id"]
        await until_done(client, key, queue_id)
        await client.post(
            f"{api}/video/complete",
            json={"model": SEEDANCE["model"], "queue_id": queue_id},
            headers=auth(key),
        )
    r = await client.post(f"{api}/video/queue", json=SEEDANCE, headers=auth("sim_flaky"))
    flaky = {"model": SEEDANCE["model"], "queue_id": (await r.json())["queue_id"]}
    for _ in range(3):
        await client.post(f"{api}/video/retrieve", json=flaky, headers=auth("sim_flaky"))
    unknown = {"model": SEEDANCE["model"], "queue_id": "not-a-job"}
    for path in ("retrieve", "complete"):
        await client.post(f"{api}/video/{path}", json=unknown, headers=auth("sim_ok"))
        await client.post(f"{api}/video/{path}", json=unknown, headers=auth("live_key"))
        await client.post(f"{api}/video/{path}", json={**unknown, "x": 1}, headers=auth("sim_ok"))

    seen = recorder.check_answers()
    # The battery reached every documented answer the simulator has a reason to give.
    for path, status in [
        ("/models", 200),
        ("/video/quote", 200),
        ("/video/quote", 400),
        ("/video/queue", 200),
        ("/video/queue", 400),
        ("/video/queue", 401),
        ("/video/queue", 402),
        ("/video/queue", 409),
        ("/video/queue", 413),
        ("/video/queue", 429),
        ("/video/retrieve", 200),
        ("/video/retrieve", 400),
        ("/video/retrieve", 401),
        ("/video/retrieve", 404),
        ("/video/retrieve", 422),
        ("/video/retrieve", 500),
        ("/video/retrieve", 503),
        ("/video/complete", 200),
        ("/video/complete", 400),
        ("/video/complete", 401),
    ]:
        assert (path, status) in seen, (path, status)
        assert status in DOCUMENTED[("POST" if path != "/models" else "GET", path)]


def all_requests(catalog: Catalog) -> list[dict[str, Any]]:
    """A submit body for every model and every option it lists (each option at least once)."""
    bodies = []
    for model in catalog.models():
        durations, resolutions = model.durations, model.resolutions or (None,)
        ratios = model.aspect_ratios or (None,)
        audios = (False, True) if model.audio and model.audio_configurable else (None,)
        width = max(len(durations), len(resolutions), len(ratios), len(audios))
        for n in range(width):
            body: dict[str, Any] = {
                "model": model.id,
                "prompt": "a lighthouse at dusk",
                "duration_seconds": durations[n % len(durations)],
            }
            for name, options in (
                ("resolution", resolutions),
                ("aspect_ratio", ratios),
                ("audio", audios),
            ):
                if options[n % len(options)] is not None:
                    body[name] = options[n % len(options)]
            if model.image_input:
                body["image_url"] = "https://example.com/frame.png"
            bodies.append(body)
    return bodies


async def test_every_client_request_is_valid_and_every_answer_handled(
    venice: tuple[TestClient[Any, Any], Recorder], tmp_path: Path
) -> None:
    client, recorder = venice
    base = str(client.make_url(API_PREFIX))
    outbound = Outbound(OutboundPolicy(trusted_prefixes=(base + "/",)))
    try:
        venice_client = VeniceClient(outbound, base, retrieve_timeout=10)
        # The catalog as the engine learns it: Venice's /models through the real parser.
        catalog = Catalog(parse_venice_models("venice", await venice_client.list_models()))
        assert len(catalog.models()) == 4
        requests = all_requests(catalog)
        for body in requests:
            video = validate_video_request(
                body, catalog, allow_http_webhooks=False, allow_private_webhooks=False
            )
            data = request_data(video)
            params = video_params(data)
            assert await venice_client.quote("sim_ok", params) > 0
            await venice_client.check_key("sim_ok", params.model)
            queued = await venice_client.queue(
                "sim_ok", params, data["prompt"], data.get("image_url")
            )
            video_file = await run_to_completion(venice_client, params, queued.queue_id, tmp_path)
            info = probe_mp4(video_file.path)
            assert info.audio is bool(video.audio), body
            await venice_client.complete("sim_ok", params.model, queued.queue_id)

        # The answers that are not videos, each mapped to what the engine must do.
        seedance = VideoParams("seedance-2-fast-t2v", 4, "480p", "16:9", False)
        with pytest.raises(ProviderRefused) as refused:
            await venice_client.queue("sim_consent", seedance, "p", None)
        assert (refused.value.status, refused.value.code) == (409, "needs_consent")
        for key, status in (("sim_401", 401), ("sim_402", 402), ("sim_429", 429)):
            with pytest.raises(ProviderRefused) as refused:
                await venice_client.queue(key, seedance, "p", None)
            assert refused.value.status == status
        with pytest.raises(ProviderRefused):
            await venice_client.check_key("live_key", seedance.model)
        # A pre-signed download link: retrieve says COMPLETED, the video is at the link.
        queued = await venice_client.queue("sim_download_url", seedance, "p", None)
        assert queued.download_url is not None
        finished = await until_finished(
            venice_client, "sim_download_url", seedance, queued, tmp_path
        )
        assert isinstance(finished, Finished)
        fetched = await venice_client.download(queued.download_url, tmp_path / "link.mp4")
        assert probe_mp4(fetched.path).width == 854
        await venice_client.revoke_download(queued.download_url)
        for key, error in (
            ("sim_content_policy", ProviderContentPolicy),
            ("sim_fail_inference", ProviderInferenceFailed),
        ):
            job = await venice_client.queue(key, seedance, "p", None)
            with pytest.raises(error) as failed:
                await until_finished(venice_client, key, seedance, job, tmp_path)
            assert failed.value.status in (422, 500)
        flaky = await venice_client.queue("sim_flaky", seedance, "p", None)
        with pytest.raises(ProviderTransient):
            await venice_client.retrieve(
                "sim_flaky", seedance.model, flaky.queue_id, tmp_path / "f"
            )
    finally:
        await outbound.close()

    bodies = recorder.check_requests()
    recorder.check_answers()
    # Venice defaults audio to on: for a model with audio, every quote and queue says which.
    audio_models = {m.provider_model for m in catalog.models() if m.audio}
    priced = [b for b in bodies if b["path"] in ("/video/quote", "/video/queue")]
    assert priced
    for body in priced:
        assert ("audio" in body) is (body["model"] in audio_models), body


async def run_to_completion(
    client: VeniceClient, params: VideoParams, queue_id: str, tmp_path: Path
) -> Completed:
    dest = tmp_path / f"{queue_id}.mp4"
    for _ in itertools.count():
        outcome = await client.retrieve("sim_ok", params.model, queue_id, dest)
        if isinstance(outcome, Completed):
            return outcome
        assert isinstance(outcome, Processing)
        await asyncio.sleep(RENDER / 2)
    raise AssertionError("unreachable")


async def until_finished(
    client: VeniceClient, key: str, params: VideoParams, queued: Any, scratch: Path
) -> Any:
    """Poll a job that ends without a video in the answer (a link, or a failure)."""
    while True:
        outcome = await client.retrieve(key, params.model, queued.queue_id, scratch / "unused")
        if not isinstance(outcome, Processing):
            return outcome
        await asyncio.sleep(RENDER / 2)


async def test_omitted_audio_is_billed_as_audio_on(
    venice: tuple[TestClient[Any, Any], Recorder],
) -> None:
    """Venice defaults audio to true, and so does the simulator: silence costs an explicit no."""
    client, _ = venice
    prices = []
    for extra in ({}, {"audio": True}, {"audio": False}):
        body = {"model": "seedance-2-fast-t2v", "duration": "4s", **extra}
        r = await client.post(f"{API_PREFIX}/video/quote", json=body, headers=auth("sim_ok"))
        prices.append((await r.json())["quote"])
    assert prices == [0.2, 0.2, 0.16]
