"""Where finished videos live (SPEC 7): a local folder (the embedded default) or an S3 bucket.

Both stores have one interface, ``ArtifactStore``. The worker downloads the provider's video to
a local scratch file (``scratch``), probes it, then hands it over (``put``); the store answers
what the job's ``artifact_stored`` event keeps to find the object again. Serving reads the size
(``size``) and byte ranges (``read``); ``direct_url`` is the short-lived URL a client can fetch
without the engine (S3: a pre-signed GET; a local folder has none, the engine signs its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

# S3 needs parts of at least 5 MiB (but the last); above one part, the file goes in parts, read
# one at a time from the scratch file, so a video is never held in memory whole.
MULTIPART_THRESHOLD = 8 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024
READ_CHUNK = 256 * 1024
PRESIGNED_SECONDS = 900


class ArtifactGone(Exception):
    """The object went away between its size and its bytes (retention ran meanwhile)."""


class ArtifactStore(Protocol):
    def scratch(self, job_id: str) -> Path:
        """A local download target outside what is served, so half a file is never served."""
        ...

    async def discard_scratch(self, job_id: str) -> None:
        """Drop a download that will not be kept (not a video, or the job ended meanwhile)."""
        ...

    async def put(self, job_id: str, index: int, source: Path) -> dict[str, str]:
        """Keep ``source`` (a scratch file, consumed) as the job's artifact ``index``; returns
        where it went, for the artifact record."""
        ...

    async def size(self, job_id: str, index: int) -> int | None:
        """The stored artifact's length in bytes, or None when there is none (purged)."""
        ...

    def read(self, job_id: str, index: int, first: int, last: int) -> AsyncGenerator[bytes, None]:
        """Bytes ``first`` to ``last`` (inclusive) of the artifact, in chunks; ``ArtifactGone``
        (before the first chunk) when it no longer exists."""
        ...

    def direct_url(self, job_id: str, index: int) -> str | None:
        """A URL to the object that needs no engine credentials, or None (the engine signs)."""
        ...

    async def delete(self, job_id: str) -> None:
        """Remove every artifact of the job (retention, or a job that ended meanwhile)."""
        ...

    async def close(self) -> None: ...


class LocalArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.incoming = root / ".incoming"
        self.incoming.mkdir(exist_ok=True)

    def path(self, job_id: str, index: int) -> Path:
        return self.root / job_id / f"{index}.mp4"

    def scratch(self, job_id: str) -> Path:
        return self.incoming / f"{job_id}.mp4"

    async def discard_scratch(self, job_id: str) -> None:
        self.scratch(job_id).unlink(missing_ok=True)

    async def put(self, job_id: str, index: int, source: Path) -> dict[str, str]:
        target = self.path(job_id, index)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        return {"path": str(target)}

    def exists(self, job_id: str, index: int) -> bool:
        return self.path(job_id, index).is_file()

    async def size(self, job_id: str, index: int) -> int | None:
        try:
            return self.path(job_id, index).stat().st_size
        except FileNotFoundError:
            return None

    async def read(
        self, job_id: str, index: int, first: int, last: int
    ) -> AsyncGenerator[bytes, None]:
        f = await asyncio.to_thread(open, self.path(job_id, index), "rb")
        try:
            f.seek(first)
            left = last - first + 1
            while left > 0:
                chunk = await asyncio.to_thread(f.read, min(READ_CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk
        finally:
            f.close()

    def direct_url(self, job_id: str, index: int) -> str | None:
        return None

    async def delete(self, job_id: str) -> None:
        await asyncio.to_thread(shutil.rmtree, self.root / job_id, ignore_errors=True)

    async def close(self) -> None:
        return None


class S3ArtifactStore:
    """Objects ``{prefix}/{job_id}/{index}.mp4`` in a bucket of any S3-compatible service,
    written and read with aioboto3. Call ``open`` before use and ``close`` after."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        scratch_dir: Path,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.incoming = scratch_dir
        self.incoming.mkdir(parents=True, exist_ok=True)
        self._client_args: dict[str, Any] = {
            "endpoint_url": endpoint_url,
            "region_name": region,
            "aws_access_key_id": access_key_id,
            "aws_secret_access_key": secret_access_key,
        }
        self._client: Any = None
        self._exit = contextlib.AsyncExitStack()
        self._presigner: Any = None

    def _config(self) -> Any:
        from botocore.config import Config

        # SigV4 (``X-Amz-Expires``) everywhere; a custom endpoint (SeaweedFS, MinIO) is
        # addressed by path, since its buckets are not DNS names.
        addressing = "path" if self._client_args["endpoint_url"] else "auto"
        return Config(signature_version="s3v4", s3={"addressing_style": addressing})

    async def open(self) -> S3ArtifactStore:
        import aioboto3
        import botocore.session

        session = aioboto3.Session()
        self._client = await self._exit.enter_async_context(
            session.client("s3", config=self._config(), **self._client_args)
        )
        # Pre-signing is local computation: a plain botocore client does it synchronously, so a
        # poll's URL costs no network call and no await.
        self._presigner = botocore.session.get_session().create_client(
            "s3", config=self._config(), **self._client_args
        )
        return self

    async def close(self) -> None:
        await self._exit.aclose()
        if self._presigner is not None:
            self._presigner.close()

    def key(self, job_id: str, index: int) -> str:
        name = f"{job_id}/{index}.mp4"
        return f"{self.prefix}/{name}" if self.prefix else name

    def _job_prefix(self, job_id: str) -> str:
        return f"{self.prefix}/{job_id}/" if self.prefix else f"{job_id}/"

    def scratch(self, job_id: str) -> Path:
        return self.incoming / f"{job_id}.mp4"

    async def discard_scratch(self, job_id: str) -> None:
        self.scratch(job_id).unlink(missing_ok=True)

    async def put(self, job_id: str, index: int, source: Path) -> dict[str, str]:
        key = self.key(job_id, index)
        f = await asyncio.to_thread(open, source, "rb")
        try:
            size = os.fstat(f.fileno()).st_size
            if size <= MULTIPART_THRESHOLD:
                body = await asyncio.to_thread(f.read)
                await self._client.put_object(
                    Bucket=self.bucket, Key=key, Body=body, ContentType="video/mp4"
                )
            else:
                await self._put_parts(key, f)
        finally:
            f.close()
        await asyncio.to_thread(source.unlink, missing_ok=True)
        return {"bucket": self.bucket, "object_key": key}

    async def _put_parts(self, key: str, f: Any) -> None:
        started = await self._client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType="video/mp4"
        )
        upload_id = started["UploadId"]
        parts = []
        try:
            number = 1
            while chunk := await asyncio.to_thread(f.read, PART_SIZE):
                answer = await self._client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                )
                parts.append({"ETag": answer["ETag"], "PartNumber": number})
                number += 1
            await self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # An abandoned upload's parts would be kept (and billed) by the service.
            with contextlib.suppress(Exception):
                await self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id
                )
            raise

    async def size(self, job_id: str, index: int) -> int | None:
        from botocore.exceptions import ClientError

        try:
            head = await self._client.head_object(Bucket=self.bucket, Key=self.key(job_id, index))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(head["ContentLength"])

    async def read(
        self, job_id: str, index: int, first: int, last: int
    ) -> AsyncGenerator[bytes, None]:
        from botocore.exceptions import ClientError

        try:
            answer = await self._client.get_object(
                Bucket=self.bucket, Key=self.key(job_id, index), Range=f"bytes={first}-{last}"
            )
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise ArtifactGone(job_id) from None
            raise
        body = answer["Body"]
        try:
            while chunk := await body.read(READ_CHUNK):
                yield chunk
        finally:
            body.close()

    def direct_url(self, job_id: str, index: int) -> str | None:
        return str(
            self._presigner.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self.key(job_id, index)},
                ExpiresIn=PRESIGNED_SECONDS,
            )
        )

    async def delete(self, job_id: str) -> None:
        listed = await self._client.list_objects_v2(
            Bucket=self.bucket, Prefix=self._job_prefix(job_id)
        )
        for item in listed.get("Contents", []):
            await self._client.delete_object(Bucket=self.bucket, Key=item["Key"])


def parse_s3_store(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix); ValueError with the reason."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError("must look like s3://bucket/prefix")
    if parsed.query or parsed.fragment or "@" in parsed.netloc:
        raise ValueError("must look like s3://bucket/prefix (no credentials, query or fragment)")
    return parsed.netloc, unquote(parsed.path).strip("/")
