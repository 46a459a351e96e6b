"""The whole path a user takes, through real processes and real HTTP, on both backends."""

from __future__ import annotations

from pathlib import Path

from adapters.crypto import sha256_hex
from adapters.media import probe_mp4
from tests.harness import Server


def test_submit_poll_download_and_settle(server: Server, tmp_path: Path) -> None:
    c = server.client
    _, buyer_key = c.create_buyer(deposit_usdc=5_000_000)
    _, seller_key = c.create_seller()
    c.create_offer(seller_key, "venice-runway-gen4-5-text", "sim_ok", "0.80")

    r = c.submit(
        buyer_key,
        model="venice-runway-gen4-5-text",
        duration_seconds=5,
        resolution="1080p",
        metadata={"order": "42"},
    )
    assert r.status == 202, r.body
    job = r.json()
    # runway 1080p: 0.15 USD/s * 5 s = 750000 list; seller 0.80 -> 600000; no fee
    assert job["status"] == "queued"
    assert job["estimated_cost_usdc"] == "600000"
    assert job["max_cost_usdc"] == "660000"
    assert job["metadata"] == {"order": "42"}
    assert job["job_token"].startswith("mjt_")
    assert "x-request-id" in r.headers

    me = c.get("/v1/buyer/me", key=buyer_key).json()
    assert me["balance"]["held_usdc"] in ("660000", "0")

    done = c.wait_terminal(job["id"], buyer_key)
    assert done["status"] == "succeeded", done
    assert done["usage"] == {
        "seller_cost_usdc": "600000",
        "buyer_cost_usdc": "600000",
        "settlement_status": "confirmed",
    }
    [result] = done["results"]
    assert (result["width"], result["height"], result["duration_seconds"]) == (1920, 1080, 5)

    video = c.get(result["download_url"], key=buyer_key)
    assert video.status == 200
    assert video.headers["content-type"] == "video/mp4"
    assert int(video.headers["content-length"]) == result["bytes"] == len(video.body)
    path = tmp_path / "out.mp4"
    path.write_bytes(video.body)
    info = probe_mp4(path)
    assert (info.width, info.height, info.duration_seconds) == (1920, 1080, 5)

    ranged = c.get(result["download_url"], key=buyer_key, headers={"Range": "bytes=0-99"})
    assert ranged.status == 206 and ranged.body == video.body[:100]
    by_token = c.get(result["download_url"], headers={"X-Job-Token": job["job_token"]})
    assert by_token.status == 200 and by_token.body == video.body

    me = c.get("/v1/buyer/me", key=buyer_key).json()
    assert me["balance"] == {
        "available_usdc": "4400000",
        "held_usdc": "0",
        "spent_usdc": "600000",
        "deposited_usdc": "5000000",
    }
    billed = c.billing()[sha256_hex("sim_ok")]
    assert billed["billed_micros"] == "750000"
