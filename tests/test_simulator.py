"""The sandbox provider over real loopback HTTP, one test per magic key (SPEC 5.2)."""

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

from adapters.media import probe_mp4
from adapters.simulator import create_simulator_app

RENDER = 0.2
API = "/api/v1"

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


T2V = {"model": "runway-gen4-5-text", "duration": "5s", "prompt": "a lighthouse at dawn"}


@pytest.fixture
async def sim(aiohttp_client: MakeClient) -> Client:
    return await aiohttp_client(create_simulator_app(render_seconds=RENDER))


async def queue(client: Client, key: str, **body: Any) -> aiohttp.ClientResponse:
    return await client.post(f"{API}/video/queue", json={**T2V, **body}, headers=auth(key))


async def queued(client: Client, key: str, **body: Any) -> str:
    resp = await queue(client, key, **body)
    assert resp.status == 200, await resp.text()
    payload = await resp.json()
    assert payload["model"] == {**T2V, **body}["model"]
    return str(payload["queue_id"])


async def retrieve(
    client: Client, key: str, queue_id: str, model: str = "runway-gen4-5-text", **extra: Any
) -> aiohttp.ClientResponse:
    return await client.post(
        f"{API}/video/retrieve",
        json={"model": model, "queue_id": queue_id, **extra},
        headers=auth(key),
    )


async def quote(client: Client, key: str = "sim_ok", **body: Any) -> aiohttp.ClientResponse:
    return await client.post(f"{API}/video/quote", json=body, headers=auth(key))


async def billing(client: Client) -> dict[str, Any]:
    resp = await client.get(f"{API}/sim/billing")
    assert resp.status == 200
    keys: dict[str, Any] = (await resp.json())["keys"]
    return keys


# -- catalog --------------------------------------------------------------------------------


async def test_catalog_shape(sim: Client) -> None:
    resp = await sim.get(f"{API}/models", params={"type": "video"})
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
    assert by_id["runway-gen4-5-text"] == {
        "id": "runway-gen4-5-text",
        "object": "model",
        "type": "video",
        "owned_by": "venice.ai",
        "model_spec": {
            "name": "Runway Gen-4.5",
            "constraints": {
                "model_type": "text-to-video",
                "durations": ["5s", "10s"],
                "resolutions": ["720p", "1080p"],
                "aspect_ratios": ["16:9", "9:16", "1:1"],
                "audio": False,
                "image_input": False,
                "default_resolution": "720p",
                "default_aspect_ratio": "16:9",
            },
            "pricing": {
                "usd_per_second": {"720p": "0.10", "1080p": "0.15"},
                "audio_multiplier": None,
            },
        },
    }
    seedance = by_id["seedance-2-fast-t2v"]["model_spec"]
    assert seedance["constraints"]["durations"] == ["4s", "6s", "8s", "12s"]
    assert seedance["constraints"]["aspect_ratios"] == ["16:9", "9:16", "1:1", "4:3", "3:4", "21:9"]
    assert seedance["constraints"]["audio"] is True
    assert seedance["constraints"]["default_resolution"] == "480p"
    assert seedance["pricing"] == {
        "usd_per_second": {"480p": "0.04", "720p": "0.06", "1080p": "0.10"},
        "audio_multiplier": "1.25",
    }
    pixverse = by_id["pixverse-c1-t2v"]["model_spec"]
    assert pixverse["constraints"]["audio"] is True
    assert pixverse["pricing"]["audio_multiplier"] == "1.25"
    wan = by_id["wan-2-5-i2v"]["model_spec"]
    assert wan["constraints"]["model_type"] == "image-to-video"
    assert wan["constraints"]["image_input"] is True
    assert wan["pricing"]["usd_per_second"] == {"480p": "0.03", "720p": "0.05", "1080p": "0.085"}


async def test_catalog_is_public(sim: Client) -> None:
    resp = await sim.get(f"{API}/models", params={"type": "video"}, headers=auth("not-a-sim-key"))
    assert resp.status == 200


# -- quotes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "usd"),
    [
        ({"model": "runway-gen4-5-text", "duration": "5s"}, "0.5"),
        ({"model": "runway-gen4-5-text", "duration": "10s", "resolution": "1080p"}, "1.5"),
        ({"model": "seedance-2-fast-t2v", "duration": "4s"}, "0.16"),
        ({"model": "seedance-2-fast-t2v", "duration": "4s", "resolution": "720p"}, "0.24"),
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
        ({"model": "seedance-2-fast-t2v", "duration": "8s", "aspect_ratio": "21:9"}, "0.32"),
        ({"model": "pixverse-c1-t2v", "duration": "5s"}, "0.25"),
        ({"model": "pixverse-c1-t2v", "duration": "8s", "resolution": "1080p"}, "0.72"),
        (
            {"model": "pixverse-c1-t2v", "duration": "8s", "resolution": "1080p", "audio": True},
            "0.9",
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
    "body",
    [
        {"model": "no-such-model", "duration": "5s"},
        {"model": "runway-gen4-5-text", "duration": "6s"},
        {"model": "runway-gen4-5-text", "duration": 5},
        {"model": "runway-gen4-5-text", "duration": "5"},
        {"model": "runway-gen4-5-text", "duration": "5s", "resolution": "480p"},
        {"model": "runway-gen4-5-text", "duration": "5s", "aspect_ratio": "4:3"},
        {"model": "runway-gen4-5-text", "duration": "5s", "audio": True},
        {"model": "seedance-2-fast-t2v", "duration": "4s", "audio": "yes"},
        {"duration": "5s"},
    ],
)
async def test_quote_rejects_malformed_requests(sim: Client, body: dict[str, Any]) -> None:
    resp = await quote(sim, **body)
    assert resp.status == 400
    assert "error" in await resp.json()


async def test_quote_rejects_a_body_that_is_not_json(sim: Client) -> None:
    resp = await sim.post(f"{API}/video/quote", data=b"{nope", headers=auth("sim_ok"))
    assert resp.status == 400


@pytest.mark.parametrize("key", ["sim_401", "sim_402", "sim_429", "sim_queue_timeout", "sim_never"])
async def test_quote_works_for_every_sim_key(sim: Client, key: str) -> None:
    resp = await quote(sim, key, model="runway-gen4-5-text", duration="5s")
    assert resp.status == 200


# -- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/video/quote", {"model": "runway-gen4-5-text", "duration": "5s"}),
        ("/video/queue", T2V),
        ("/video/retrieve", {"model": "runway-gen4-5-text", "queue_id": "x"}),
        ("/video/complete", {"model": "runway-gen4-5-text", "queue_id": "x"}),
    ],
)
@pytest.mark.parametrize("headers", [{}, auth("live_abc123"), {"Authorization": "Basic sim_ok"}])
async def test_non_sim_keys_get_401(
    sim: Client, path: str, body: dict[str, Any], headers: dict[str, str]
) -> None:
    resp = await sim.post(f"{API}{path}", json=body, headers=headers)
    assert resp.status == 401
    assert "error" in await resp.json()


# -- one test per magic key -----------------------------------------------------------------


async def wait_for_video(client: Client, key: str, queue_id: str, **extra: Any) -> bytes:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        resp = await retrieve(client, key, queue_id, **extra)
        assert resp.status == 200, await resp.text()
        if resp.content_type == "video/mp4":
            return await resp.read()
        await asyncio.sleep(0.05)
    raise AssertionError("the video never finished")


async def test_sim_ok_processes_then_returns_a_real_mp4(sim: Client, tmp_path: Path) -> None:
    queue_id = await queued(sim, "sim_ok", resolution="1080p", aspect_ratio="9:16", duration="10s")
    resp = await retrieve(sim, "sim_ok", queue_id)
    assert resp.status == 200
    processing = await resp.json()
    assert processing["status"] == "PROCESSING"
    assert processing["average_execution_time"] == int(RENDER * 1000)
    assert 0 <= processing["execution_duration"] < RENDER * 1000

    video = await wait_for_video(sim, "sim_ok", queue_id)
    path = tmp_path / "v.mp4"
    path.write_bytes(video)
    info = probe_mp4(path)
    assert (info.width, info.height, info.duration_seconds) == (1080, 1920, 10)


async def test_any_other_sim_key_behaves_like_sim_ok(sim: Client) -> None:
    queue_id = await queued(sim, "sim_my_test_seller")
    assert (await wait_for_video(sim, "sim_my_test_seller", queue_id))[4:8] == b"ftyp"


async def test_sim_ok_defaults_to_lowest_resolution_and_16_9(sim: Client, tmp_path: Path) -> None:
    queue_id = await queued(sim, "sim_ok", model="seedance-2-fast-t2v", duration="4s")
    video = await wait_for_video(sim, "sim_ok", queue_id, model="seedance-2-fast-t2v")
    path = tmp_path / "v.mp4"
    path.write_bytes(video)
    info = probe_mp4(path)
    assert (info.width, info.height, info.duration_seconds) == (854, 480, 4)


async def test_sim_401_refuses_the_queue(sim: Client) -> None:
    resp = await queue(sim, "sim_401")
    assert resp.status == 401
    assert await billing(sim) == {}


async def test_sim_402_refuses_the_queue(sim: Client) -> None:
    resp = await queue(sim, "sim_402")
    assert resp.status == 402
    assert "balance" in (await resp.json())["error"]
    assert await billing(sim) == {}


async def test_sim_429_refuses_the_queue(sim: Client) -> None:
    resp = await queue(sim, "sim_429")
    assert resp.status == 429
    assert await billing(sim) == {}


async def test_sim_queue_timeout_never_answers(sim: Client) -> None:
    started = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        await sim.post(
            f"{API}/video/queue",
            json=T2V,
            headers=auth("sim_queue_timeout"),
            timeout=aiohttp.ClientTimeout(total=0.3),
        )
    assert time.monotonic() - started < 5
    # The server is still healthy for everyone else.
    assert (await quote(sim, model="runway-gen4-5-text", duration="5s")).status == 200
    assert await billing(sim) == {}


async def test_sim_fail_inference_fails_once_done(sim: Client) -> None:
    queue_id = await queued(sim, "sim_fail_inference")
    first = await retrieve(sim, "sim_fail_inference", queue_id)
    assert first.status == 200 and (await first.json())["status"] == "PROCESSING"
    await asyncio.sleep(RENDER + 0.05)
    resp = await retrieve(sim, "sim_fail_inference", queue_id)
    assert resp.status == 500
    assert "error" in await resp.json()


async def test_sim_content_policy_rejects_on_retrieve(sim: Client) -> None:
    queue_id = await queued(sim, "sim_content_policy")
    resp = await retrieve(sim, "sim_content_policy", queue_id)
    assert resp.status == 422
    assert "error" in await resp.json()
    # It was accepted, so it was billed.
    assert (await billing(sim))[digest("sim_content_policy")]["jobs"] == 1


async def test_sim_flaky_answers_503_on_every_other_call(sim: Client) -> None:
    queue_id = await queued(sim, "sim_flaky")
    statuses = []
    for _ in range(4):
        resp = await retrieve(sim, "sim_flaky", queue_id)
        statuses.append(resp.status)
        if resp.status == 200:
            assert (await resp.json())["status"] == "PROCESSING"
    assert statuses == [503, 200, 503, 200]
    await asyncio.sleep(RENDER + 0.05)
    assert (await retrieve(sim, "sim_flaky", queue_id)).status == 503
    done = await retrieve(sim, "sim_flaky", queue_id)
    assert done.status == 200 and done.content_type == "video/mp4"


async def test_sim_never_stays_processing(sim: Client) -> None:
    queue_id = await queued(sim, "sim_never")
    await asyncio.sleep(RENDER * 2)
    for _ in range(3):
        resp = await retrieve(sim, "sim_never", queue_id)
        assert resp.status == 200
        payload = await resp.json()
        assert payload["status"] == "PROCESSING"
        assert payload["execution_duration"] >= RENDER * 1000


async def test_a_non_sim_key_is_refused_everywhere_but_the_catalog(sim: Client) -> None:
    assert (await queue(sim, "vnc_live_123")).status == 401
    assert (
        await quote(sim, "vnc_live_123", model="runway-gen4-5-text", duration="5s")
    ).status == 401
    assert (await sim.get(f"{API}/models")).status == 200
    assert await billing(sim) == {}


# -- queue validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": ""},
        {"prompt": None},
        {"duration": "7s"},
        {"image_url": "https://example.com/cat.png"},
        {"model": "wan-2-5-i2v"},
        {"model": "nope"},
    ],
)
async def test_queue_rejects_malformed_requests(sim: Client, body: dict[str, Any]) -> None:
    resp = await queue(sim, "sim_ok", **body)
    assert resp.status == 400
    assert await billing(sim) == {}


async def test_queue_image_to_video_needs_an_image(sim: Client) -> None:
    queue_id = await queued(
        sim, "sim_ok", model="wan-2-5-i2v", image_url="https://example.com/cat.png"
    )
    assert queue_id


async def test_queue_rejects_an_oversized_body_with_413(sim: Client) -> None:
    resp = await queue(sim, "sim_ok", prompt="x" * (2 * 1024 * 1024))
    assert resp.status == 413


# -- billing, retrieve ownership, complete ---------------------------------------------------


async def test_billing_records_each_key_at_queue_time(sim: Client) -> None:
    await queued(sim, "sim_seller_a", model="seedance-2-fast-t2v", duration="4s", resolution="720p")
    await queued(sim, "sim_seller_a", model="pixverse-c1-t2v", duration="8s", audio=True)
    await queued(sim, "sim_seller_b")
    await quote(sim, "sim_seller_c", model="runway-gen4-5-text", duration="5s")

    keys = await billing(sim)
    assert keys == {
        digest("sim_seller_a"): {"billed_micros": str(240_000 + 500_000), "jobs": 2},
        digest("sim_seller_b"): {"billed_micros": "500000", "jobs": 1},
    }
    assert all("sim_" not in k for k in keys)


async def test_retrieve_of_an_unknown_or_foreign_job_is_404(sim: Client) -> None:
    queue_id = await queued(sim, "sim_owner")
    assert (await retrieve(sim, "sim_owner", "does-not-exist")).status == 404
    assert (await retrieve(sim, "sim_thief", queue_id)).status == 404
    assert (await retrieve(sim, "sim_owner", queue_id, model="pixverse-c1-t2v")).status == 404
    assert (await retrieve(sim, "sim_owner", queue_id)).status == 200


async def test_complete_deletes_the_sims_copy(sim: Client) -> None:
    queue_id = await queued(sim, "sim_ok")
    await wait_for_video(sim, "sim_ok", queue_id)
    body = {"model": "runway-gen4-5-text", "queue_id": queue_id}
    assert (
        await sim.post(f"{API}/video/complete", json=body, headers=auth("sim_other"))
    ).status == 404
    resp = await sim.post(f"{API}/video/complete", json=body, headers=auth("sim_ok"))
    assert resp.status == 200
    assert await resp.json() == {"success": True}
    assert (await retrieve(sim, "sim_ok", queue_id)).status == 404


async def test_delete_media_on_completion_forgets_the_video_once_returned(sim: Client) -> None:
    queue_id = await queued(sim, "sim_ok")
    # While processing nothing is deleted.
    assert (await retrieve(sim, "sim_ok", queue_id, delete_media_on_completion=True)).status == 200
    await wait_for_video(sim, "sim_ok", queue_id, delete_media_on_completion=True)
    assert (await retrieve(sim, "sim_ok", queue_id)).status == 404


async def test_concurrent_retrieves_render_each_video_once(sim: Client) -> None:
    ids = [await queued(sim, "sim_ok") for _ in range(5)]
    await asyncio.sleep(RENDER + 0.05)
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
    assert (await client.get("/sim/api/v1/models", params={"type": "video"})).status == 200
    resp = await client.post("/sim/api/v1/video/queue", json=T2V, headers=auth("sim_ok"))
    assert resp.status == 200
    assert (tmp_path / "s.db").exists()


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
    await first.close()
    await asyncio.sleep(RENDER + 0.05)

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
        keys = (await (await http.get(f"{API}/sim/billing")).json())["keys"]
        assert keys[digest("sim_durable")] == {"billed_micros": "500000", "jobs": 1}
        assert keys[digest("sim_flaky")]["jobs"] == 1
        # A completed job stays gone after another restart.
        await http.post(f"{API}/video/complete", json=body, headers=auth("sim_durable"))
    await second.close()

    third = await started()
    async with aiohttp.ClientSession(base_url=third.make_url("/")) as http:
        body = {"model": T2V["model"], "queue_id": queue_id}
        resp = await http.post(f"{API}/video/retrieve", json=body, headers=auth("sim_durable"))
        assert resp.status == 404
    await third.close()
