"""Artifacts on S3 (SPEC 7), against a real S3 server the tests start (SeaweedFS, conftest.py).

End to end through a real ``mediamarket serve``: the job's video lands in the bucket, the
poll's ``url`` is a pre-signed GET (900 s) that downloads the MP4 straight from the S3 server
with no engine credentials, ``download_url`` is proxied with byte ranges, and retention deletes
the object (then 410). Beside it, the store itself: a file above the multipart threshold goes
up in parts and comes back identical. And the local store's signed ``url`` starts with
``PUBLIC_BASE_URL``, whatever Host a request names.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import urllib3
from botocore.exceptions import ClientError

from adapters import artifacts
from adapters.artifacts import PART_SIZE, ArtifactGone, S3ArtifactStore, parse_s3_store
from adapters.media import probe_mp4
from adapters.settings import ConfigError, load_settings
from tests.harness import Server
from tests.s3server import S3Server
from tests.test_lifecycle import SEEDANCE, market, poll, submit_ok, wait_until


def _finished_job(srv: Server) -> tuple[dict[str, Any], str]:
    c = srv.client
    _, buyer_key, seller_key = market(c)
    c.create_offer(seller_key, SEEDANCE, "sim_ok", "0.80")
    job = submit_ok(c, buyer_key)
    done = c.wait_terminal(job["id"], buyer_key)
    assert done["status"] == "succeeded", done
    return done, buyer_key


def _object_exists(s3_server: S3Server, bucket: str, key: str) -> bool:
    try:
        s3_server.client().head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        assert e.response["Error"]["Code"] in ("404", "NoSuchKey", "NotFound"), e.response
        return False


def test_a_video_on_s3_is_served_presigned_and_proxied_then_purged(
    make_server: Any, s3_server: S3Server, s3_bucket: str, s3_prefix: str, tmp_path: Path
) -> None:
    srv = make_server(**s3_server.env(s3_bucket, s3_prefix))
    c = srv.client
    done, buyer_key = _finished_job(srv)
    [result] = done["results"]
    key = f"{s3_prefix}/{done['id']}/0.mp4"
    assert _object_exists(s3_server, s3_bucket, key)
    # The engine kept no copy of its own: the scratch download is gone too.
    assert not list((tmp_path / "data").rglob("*.mp4"))

    # The url: a SigV4 pre-signed GET on the S3 server, valid 900 s, fetched with no engine
    # credentials at all (a fresh HTTP client, no Authorization header).
    url = urlparse(result["url"])
    assert f"{url.scheme}://{url.netloc}" == s3_server.endpoint
    assert url.path == f"/{s3_bucket}/{key}"
    assert parse_qs(url.query)["X-Amz-Expires"] == ["900"]
    direct = urllib3.PoolManager(retries=False).request("GET", result["url"])
    assert direct.status == 200, direct.data[:300]
    assert len(direct.data) == result["bytes"]
    video = tmp_path / "direct.mp4"
    video.write_bytes(direct.data)
    info = probe_mp4(video)
    assert (info.width, info.height, info.duration_seconds) == (
        result["width"],
        result["height"],
        result["duration_seconds"],
    )

    # download_url: proxied by the engine, whole or by range, the same bytes as S3 holds.
    whole = c.get(result["download_url"], key=buyer_key)
    assert whole.status == 200 and whole.body == direct.data
    assert whole.headers["content-type"] == "video/mp4"
    assert whole.headers["accept-ranges"] == "bytes"
    part = c.get(result["download_url"], key=buyer_key, headers={"Range": "bytes=100-1123"})
    assert part.status == 206, part.body[:300]
    assert part.body == direct.data[100:1124]
    assert part.headers["content-range"] == f"bytes 100-1123/{result['bytes']}"
    tail = c.get(result["download_url"], key=buyer_key, headers={"Range": "bytes=-10"})
    assert tail.status == 206 and tail.body == direct.data[-10:]
    bad = c.get(result["download_url"], key=buyer_key, headers={"Range": "bytes=9-1"})
    assert bad.status == 416 and bad.json()["error"]["code"] == "range_not_satisfiable"
    assert bad.headers["content-range"] == f"bytes */{result['bytes']}"
    past = c.get(result["download_url"], key=buyer_key, headers={"Range": "bytes=999999999-"})
    assert past.status == 416

    # Retention: the same engine restarted with a short TTL purges the object from S3.
    srv.stop()
    srv.env["MEDIA_ARTIFACT_TTL_SECONDS"] = "1"
    srv.start()
    c = srv.client

    def purged() -> bool:
        return c.get(result["download_url"], key=buyer_key).status == 410

    wait_until(purged, timeout=20.0, what="the artifact purge", interval=0.25)
    gone = c.get(result["download_url"], key=buyer_key)
    assert gone.json()["error"]["code"] == "artifact_expired"
    assert not _object_exists(s3_server, s3_bucket, key)
    assert urllib3.PoolManager(retries=False).request("GET", result["url"]).status == 404

    # The purge deletes the object before it records the purge (a crash between the two is
    # then retried, not an object kept forever), so the poll follows the 410 by a moment.
    def url_gone() -> bool:
        return poll(c, done["id"], buyer_key)["results"][0]["url"] is None

    wait_until(url_gone, timeout=10.0, what="the poll's url to go", interval=0.05)


async def test_a_large_file_goes_up_in_parts_and_comes_back_identical(
    s3_server: S3Server, s3_bucket: str, s3_prefix: str, tmp_path: Path
) -> None:
    store = await S3ArtifactStore(
        s3_bucket,
        s3_prefix,
        tmp_path / "incoming",
        endpoint_url=s3_server.endpoint,
        region=s3_server.region,
        access_key_id=s3_server.access_key,
        secret_access_key=s3_server.secret_key,
    ).open()
    try:
        sent: list[int] = []
        upload_part = store._client.upload_part

        async def counting_upload_part(**kw: Any) -> Any:
            sent.append(len(kw["Body"]))
            return await upload_part(**kw)

        store._client.upload_part = counting_upload_part
        size = 2 * PART_SIZE + 12345
        assert size > artifacts.MULTIPART_THRESHOLD
        source = store.scratch("job-big")
        data = os.urandom(size)
        source.write_bytes(data)

        location = await store.put("job-big", 0, source)

        assert location == {"bucket": s3_bucket, "object_key": f"{s3_prefix}/job-big/0.mp4"}
        assert sent == [PART_SIZE, PART_SIZE, 12345]
        assert not source.exists()
        assert await store.size("job-big", 0) == size
        back = hashlib.sha256()
        async for chunk in store.read("job-big", 0, 0, size - 1):
            assert len(chunk) <= artifacts.READ_CHUNK
            back.update(chunk)
        assert back.hexdigest() == hashlib.sha256(data).hexdigest()
        middle = b"".join([c async for c in store.read("job-big", 0, PART_SIZE - 5, PART_SIZE + 4)])
        assert middle == data[PART_SIZE - 5 : PART_SIZE + 5]

        await store.delete("job-big")
        assert await store.size("job-big", 0) is None
        # Purged between a download's size and its bytes: told apart, so the answer is a 410.
        with pytest.raises(ArtifactGone):
            await anext(store.read("job-big", 0, 0, 9))
    finally:
        await store.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_local_signed_url_uses_public_base_url_not_the_host_header(make_server: Any) -> None:
    public = "https://media.example.test:8443"
    srv = make_server(PUBLIC_BASE_URL=public)
    done, buyer_key = _finished_job(srv)
    seen = srv.client.get(
        f"/v1/video/generations/{done['id']}",
        key=buyer_key,
        headers={"Host": "attacker.example:666"},
    )
    assert seen.status == 200, seen.body
    [result] = seen.json()["results"]
    assert result["url"].startswith(f"{public}/v1/media/artifacts/{done['id']}/0?expires=")
    # The signature is the engine's: the same path and query fetch the video without a key.
    signed = result["url"][len(public) :]
    video = srv.client.get(signed)
    assert video.status == 200 and len(video.body) == result["bytes"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_local_signed_url_defaults_to_host_and_port(make_server: Any) -> None:
    srv = make_server()
    done, buyer_key = _finished_job(srv)
    seen = srv.client.get(
        f"/v1/video/generations/{done['id']}",
        key=buyer_key,
        headers={"Host": "attacker.example:666"},
    )
    [result] = seen.json()["results"]
    assert result["url"].startswith(f"http://127.0.0.1:{srv.port}/v1/media/artifacts/")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ARTIFACT_STORE", "s3://"),
        ("ARTIFACT_STORE", "s3://key:secret@bucket/prefix"),
        ("ARTIFACT_STORE", "ftp://bucket/prefix"),
        ("S3_ENDPOINT_URL", "127.0.0.1:8333"),
        ("PUBLIC_BASE_URL", "media.example.test"),
        ("PUBLIC_BASE_URL", "https://media.example.test/?x=1"),
    ],
)
def test_store_settings_are_checked_at_start(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(**{name: value})


def test_store_settings_parse() -> None:
    settings = load_settings(
        ARTIFACT_STORE="s3://videos/a/b/", PUBLIC_BASE_URL="https://media.example.test/"
    )
    assert settings.is_s3 and parse_s3_store(settings.ARTIFACT_STORE) == ("videos", "a/b")
    assert settings.public_base_url == "https://media.example.test"
    assert load_settings(HOST="10.0.0.5", PORT=9000).public_base_url == "http://10.0.0.5:9000"
