"""The deployment files: Dockerfile, compose.yaml and .env.example (SPEC 8, production).

No image is built here (that needs a Docker daemon); what can be checked without one is: the
compose file is valid for Docker Compose (``config`` needs no daemon), runs the topology the
cluster test proves (tests/test_cluster.py), names only settings the engine reads and holds no
secret; the image's healthcheck command works against a real server; the bucket one-off creates
its bucket on a real S3 server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.settings import Settings
from tests.harness import Server, base_env, free_port
from tests.s3server import S3Server

ROOT = Path(__file__).resolve().parent.parent
# .env.example's names that compose.yaml uses to wire the services rather than the engine.
COMPOSE_ONLY = {"POSTGRES_PASSWORD", "S3_BUCKET", "MEDIAMARKET_IMAGE_TAG", "SEAWEEDFS_IMAGE_TAG"}
SECRETS = (
    "POSTGRES_PASSWORD",
    "MEDIAMARKET_ADMIN_TOKEN",
    "MEDIAMARKET_SECRET_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)
ENGINE_SERVICES = ("api-1", "api-2", "worker-1", "worker-2", "admin")


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((ROOT / "compose.yaml").read_text()))


def env_example() -> dict[str, str]:
    """The names and values .env.example sets (commented-out lines are documentation)."""
    values = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def filled_env() -> str:
    """.env.example with every secret filled in, as an operator leaves it."""
    example = env_example()
    lines = [f"{name}={value}" for name, value in example.items() if name not in SECRETS]
    lines += [f"{name}=test-{name.lower().replace('_', '-')}-0123456789" for name in SECRETS]
    return "\n".join(lines) + "\n"


def compose_command() -> list[str] | None:
    """Docker Compose v2 (the docker CLI's plugin), else the standalone docker-compose."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_file_is_valid_and_refuses_to_run_without_secrets(tmp_path: Path) -> None:
    command = compose_command()
    if command is None:
        pytest.skip(
            "no Docker Compose here: neither the docker CLI's compose plugin (`docker compose`)"
            " nor `docker-compose` is installed, so compose.yaml is not validated by Compose"
        )
    for name in ("compose.yaml", "Dockerfile", ".dockerignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    # Only what the operator puts in .env may reach Compose's interpolation.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_CONFIG")}

    def config(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*command, "--profile", "admin", "--profile", "sim", "config", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    refused = config("-q")
    assert refused.returncode != 0, "compose accepted a .env with no secrets"
    assert "in .env" in refused.stderr, refused.stderr

    (tmp_path / ".env").write_text(filled_env())
    valid = config("-q")
    assert valid.returncode == 0, valid.stderr


def test_compose_runs_the_tested_topology() -> None:
    services = compose()["services"]
    commands = {name: s.get("command") for name, s in services.items()}
    assert [n for n, c in commands.items() if c == ["serve", "--no-worker"]] == ["api-1", "api-2"]
    workers = [n for n, c in commands.items() if c == ["worker"]]
    assert workers == ["worker-1", "worker-2"]
    assert len({services[n]["environment"]["WORKER_ID"] for n in workers}) == 2
    assert "admin" in services["admin"]["profiles"]
    assert "sim" in services["sim"]["profiles"]
    assert {"postgres", "seaweedfs", "s3-bucket"} <= set(services)
    for name in ENGINE_SERVICES:
        env = services[name]["environment"]
        assert env["MEDIAMARKET_DEMO"] == "false", name
        assert env["DATABASE_URL"].startswith("postgresql://"), name
        assert env["ARTIFACT_STORE"].startswith("s3://"), name
        assert env["HOST"] == "0.0.0.0", name  # reachable from outside its container
        unknown = set(env) - set(Settings.model_fields)
        assert not unknown, f"{name} sets what the engine does not read: {unknown}"
        for secret in SECRETS[1:]:
            if secret in env:
                # Interpolated from .env, required: never a value written in the file.
                assert env[secret] == f"${{{secret}:?set {secret} in .env}}", (name, secret)
    for name in ("api-1", "api-2"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("admin", "s3-bucket", "sim"):
        assert services[name]["healthcheck"] == {"disable": True}, name
    for name in workers:
        # A worker's health is on its METRICS_PORT, the only HTTP it serves.
        assert services[name]["environment"]["METRICS_PORT"] == "9100", name
        assert "METRICS_PORT" in " ".join(services[name]["healthcheck"]["test"]), name


def test_env_example_names_only_settings_and_holds_no_secret() -> None:
    example = env_example()
    unknown = set(example) - set(Settings.model_fields) - COMPOSE_ONLY
    assert not unknown, unknown
    for secret in SECRETS:
        assert example[secret] == "", f"{secret} has a value in .env.example"
    # The documented defaults, commented out, are real settings too.
    text = (ROOT / ".env.example").read_text()
    for line in text.splitlines():
        if line.startswith("# ") and "=" in line and line[2:].split("=")[0].isupper():
            name = line[2:].split("=")[0]
            assert name in Settings.model_fields or name in COMPOSE_ONLY, name


def dockerfile_healthcheck() -> str:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    [line] = [ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK")]
    return line.split(" CMD ", 1)[1].strip()


def test_dockerfile_runs_as_a_user_on_python_3_11_slim() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert [ln for ln in lines if ln.startswith("FROM ")][-1] == "FROM python:3.11-slim"
    [user] = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert user not in ("root", "0")
    assert 'ENTRYPOINT ["mediamarket"]' in lines


def test_the_images_healthcheck_passes_on_a_serving_engine(tmp_path: Path) -> None:
    check = dockerfile_healthcheck()
    # The image's `python` is the engine's virtualenv, as here.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    port = free_port()
    server = Server(tmp_path, base_env(f"sqlite:///{tmp_path}/data", port), port, ["--no-worker"])
    server.start()
    try:
        ok = subprocess.run(
            ["sh", "-c", check],
            env={"PATH": path, "PORT": str(server.port)},
            capture_output=True,
            timeout=30,
        )
        assert ok.returncode == 0, ok.stderr
    finally:
        server.kill()
    down = subprocess.run(
        ["sh", "-c", check], env={"PATH": path, "PORT": str(port)}, capture_output=True, timeout=30
    )
    assert down.returncode != 0


def test_the_bucket_one_off_creates_the_bucket_once(s3_server: S3Server) -> None:
    script = compose()["services"]["s3-bucket"]["command"][0]
    bucket = f"mm-compose-{os.getpid()}"
    env = {
        **os.environ,
        **s3_server.env(bucket, "videos"),
        "AWS_REGION": s3_server.region,
    }
    for said in ("created bucket", "exists"):
        run = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        assert said in run.stdout, run.stdout
    names = [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    assert bucket in names
