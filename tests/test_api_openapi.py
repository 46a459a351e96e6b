"""``/openapi.json`` and ``/docs`` (SPEC 4.4, issue 11).

The document is checked for what SPEC asks of it (bodies, parameters, headers, every status with
its schema, per-route security); then a client generated from the live document by
openapi-python-client, unedited, runs a whole job: accounts, offer, submit, poll, download.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from api.app import OPENAPI, ROUTES
from api.schemas.jobs import JobList, JobView
from tests.harness import ADMIN_TOKEN, Server, base_env, free_port

GENERATOR = Path(sys.executable).parent / "openapi-python-client"
ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}


def operation(method: str, path: str) -> dict[str, Any]:
    op: dict[str, Any] = OPENAPI["paths"][path][method]
    return op


def schema_of(answer: dict[str, Any], media_type: str = "application/json") -> Any:
    return answer["content"][media_type]["schema"]


# ---------------------------------------------------------------------- the document


def test_every_schema_is_json_schema_2020_12() -> None:
    assert OPENAPI["openapi"] == "3.1.0"
    for name, schema in OPENAPI["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema), name
    ids = [op["operationId"] for ops in OPENAPI["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))


def test_submit_is_described_completely() -> None:
    op = operation("post", "/v1/video/generations")
    body = schema_of(op["requestBody"])
    assert body == {"$ref": "#/components/schemas/SubmitBody"}
    submit = OPENAPI["components"]["schemas"]["SubmitBody"]
    assert submit["additionalProperties"] is False
    assert submit["required"] == ["model", "prompt"]
    assert submit["properties"]["prompt"]["maxLength"] == 2000
    assert set(submit["properties"]) == {
        "model",
        "prompt",
        "duration_seconds",
        "image_url",
        "resolution",
        "aspect_ratio",
        "audio",
        "webhook_url",
        "metadata",
        "max_cost_usdc",
    }
    responses = op["responses"]
    assert set(responses) == {"202", "400", "401", "402", "404", "413", "415", "422", "500", "503"}
    assert schema_of(responses["202"]) == {"$ref": "#/components/schemas/SubmittedJob"}
    for status, answer in responses.items():
        if status != "202":
            assert schema_of(answer) == ERROR_REF, status
        assert answer["headers"]["X-Request-Id"]["required"] is True
    assert {"Retry-After", "Idempotent-Replayed"} <= set(responses["202"]["headers"])
    headers = {p["name"]: p for p in op["parameters"] if p["in"] == "header"}
    assert headers["Idempotency-Key"]["schema"]["maxLength"] == 255
    assert op["security"] == [{"buyerKey": []}]


def test_every_answer_has_its_schema_and_request_id() -> None:
    for path, ops in OPENAPI["paths"].items():
        for method, op in ops.items():
            assert "500" in op["responses"], (method, path)
            for status, answer in op["responses"].items():
                assert "X-Request-Id" in answer["headers"], (method, path, status)
                # 204 (a finished job's stream, resumed past its end) has no body by definition.
                assert answer.get("content") or status == "204", (method, path, status)
                # A readiness probe's 503 is its health document (what it waits for), as
                # load balancers and operators read it; every other failure is an error.
                if status >= "400" and (path, status) != ("/healthz", "503"):
                    assert schema_of(answer) == ERROR_REF, (method, path, status)
            names = {p["name"] for p in op["parameters"] if p["in"] == "path"}
            assert names == set(re.findall(r"{(\w+)}", path)), (method, path)


def test_security_per_route() -> None:
    public = {
        ("get", "/healthz"),
        ("get", "/metrics"),
        ("get", "/openapi.json"),
        ("get", "/docs"),
        ("get", "/docs/{asset}"),
        ("get", "/v1/models"),
        ("get", "/api/markets"),
        ("get", "/api/markets/{model}"),
    }
    for path, ops in OPENAPI["paths"].items():
        for method, op in ops.items():
            schemes = {name for requirement in op["security"] for name in requirement}
            if (method, path) in public:
                assert op["security"] == [] and "401" not in op["responses"], path
            elif path.startswith("/admin/"):
                assert schemes == {"adminToken"}, path
            elif path.startswith("/v1/seller/"):
                assert schemes == {"sellerKey"}, path
            else:
                assert schemes and schemes <= {"buyerKey", "jobToken"}, path
                assert "401" in op["responses"], path
    poll = operation("get", "/v1/video/generations/{job_id}")
    assert poll["security"] == [{"buyerKey": []}, {"jobToken": []}]
    assert set(poll["responses"]) == {"200", "202", "401", "404", "500"}
    assert OPENAPI["components"]["securitySchemes"]["jobToken"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-Job-Token",
        "description": "The job_token a submit returned: this one job only",
    }


def test_downloads_and_queries() -> None:
    op = operation("get", "/v1/media/artifacts/{job_id}/{index}")
    assert {p["name"] for p in op["parameters"]} >= {"job_id", "index", "Range"}
    assert set(op["responses"]) >= {"200", "206", "404", "410", "416"}
    assert "video/mp4" in op["responses"]["206"]["content"]
    listing = operation("get", "/v1/video/generations")
    query = {p["name"]: p["schema"] for p in listing["parameters"] if p["in"] == "query"}
    assert query["limit"] == {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}
    assert query["after"]["format"] == "uuid"
    assert "succeeded" in query["status"]["enum"]
    prefixed = operation("post", "/min{min_discount}/v1/video/generations")
    [discount] = [p for p in prefixed["parameters"] if p["name"] == "min_discount"]
    assert discount["schema"] == {"type": "integer", "minimum": 0, "maximum": 100}


def test_the_routes_served_are_the_routes_documented() -> None:
    documented = {(m, p) for p, ops in OPENAPI["paths"].items() for m in ops}
    declared = {(r.method.lower(), r.path) for r in ROUTES}
    declared |= {(r.method.lower(), "/min{min_discount}" + r.path) for r in ROUTES if r.min_prefix}
    assert documented == declared


# ---------------------------------------------------------------------- live


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp: Path = tmp_path_factory.mktemp("openapi")
    port = free_port()
    server = Server(tmp, base_env(f"sqlite:///{tmp}/data", port), port, [])
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="module")
def generated(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """``mediamarket_client``, generated from the live document and imported as it is."""
    out = tmp_path_factory.mktemp("client")
    document = out / "openapi.json"
    document.write_bytes(server.client.get("/openapi.json").body)
    # The generator's own option for a binary media type it does not know by name.
    config = out / "generator.yml"
    config.write_text("content_type_overrides:\n  video/mp4: application/octet-stream\n")
    env = {**os.environ, "PATH": f"{GENERATOR.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(
        [
            str(GENERATOR),
            "generate",
            "--path",
            str(document),
            "--output-path",
            str(out / "mediamarket_client"),
            "--meta",
            "none",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout, done.stdout
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("mediamarket_client")
    finally:
        sys.path.remove(str(out))
        for name in [n for n in sys.modules if n.startswith("mediamarket_client")]:
            del sys.modules[name]


def test_a_generated_client_runs_a_job_unedited(server: Server, generated: Any) -> None:
    models = importlib.import_module("mediamarket_client.models")

    def endpoint(tag: str, name: str) -> Any:
        return importlib.import_module(f"mediamarket_client.api.{tag}.{name}")

    base = server.client.base

    def as_(token: str, **kw: Any) -> Any:
        return generated.AuthenticatedClient(base_url=base, token=token, **kw)

    admin = as_(ADMIN_TOKEN)
    buyer = endpoint("operator", "create_buyer").sync(
        client=admin, body=models.NameBody(name="gen")
    )
    assert isinstance(buyer, models.BuyerCreated), buyer
    deposit = endpoint("operator", "create_deposit").sync(
        buyer_id=buyer.buyer_id, client=admin, body=models.DepositBody(amount_usdc="5000000")
    )
    assert isinstance(deposit, models.Deposit) and deposit.balance.available_usdc == "5000000"
    seller = endpoint("operator", "create_seller").sync(
        client=admin, body=models.NameBody(name="gen")
    )
    offer = endpoint("sellers", "create_offer").sync(
        client=as_(seller.api_key),
        body=models.OfferBody(
            model="venice-runway-gen4-5-text",
            provider="venice",
            api_key="sim_ok",
            cost_multiplier="0.80",
        ),
    )
    assert isinstance(offer, models.Offer) and offer.cost_multiplier == "0.80", offer

    client = as_(buyer.api_key)
    job = endpoint("jobs", "submit_video").sync(
        client=client,
        body=models.SubmitRequest(model="venice-runway-gen4-5-text", prompt="a lighthouse"),
        idempotency_key="gen-1",
    )
    assert isinstance(job, models.SubmittedJob), job
    assert job.estimated_cost_usdc == "400000" and job.max_cost_usdc == "440000"

    # Poll with the job's own token, as the generated client's apiKey scheme sends it.
    by_token = as_(job.job_token, prefix="", auth_header_name="X-Job-Token")
    deadline = time.monotonic() + 60
    while True:
        answer = endpoint("jobs", "get_job").sync_detailed(job_id=job.id, client=by_token)
        assert answer.status_code in (200, 202), answer.content
        view = answer.parsed
        assert isinstance(view, models.JobView)
        JobView.model_validate_json(answer.content)
        if answer.status_code == 200:
            break
        assert time.monotonic() < deadline, view.status
        time.sleep(0.1)
    assert view.status == "succeeded" and view.usage.settlement_status == "confirmed"
    [result] = view.results
    assert result.content_type == "video/mp4" and result.bytes_ > 0

    video = endpoint("jobs", "download_artifact").sync(job_id=job.id, index=0, client=client)
    data = video.payload.read()
    assert len(data) == result.bytes_ and data[4:8] == b"ftyp"
    part = endpoint("jobs", "download_artifact").sync_detailed(
        job_id=job.id, index=0, client=by_token, range_="bytes=0-99"
    )
    assert part.status_code == 206 and part.content == data[:100]

    listed = endpoint("jobs", "list_jobs").sync(client=client, limit=10)
    assert isinstance(listed, models.JobList) and [j.id for j in listed.data] == [job.id]
    JobList.model_validate_json(server.client.get("/v1/video/generations", key=buyer.api_key).body)


def test_docs_are_served_from_the_engine(server: Server) -> None:
    c = server.client
    page = c.get("/docs")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    html = page.body.decode()
    assert "://" not in html, "the page must load nothing from another host"
    assets = re.findall(r'(?:src|href)="(/[^"]+)"', html)
    assert {"/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/docs/init.js"} <= set(assets)
    for asset in assets:
        r = c.get(asset)
        assert r.status == 200 and len(r.body) > 10, asset
        assert r.headers["x-request-id"]
    init = c.get("/docs/init.js").body.decode()
    assert '"/openapi.json"' in init and "://" not in init
    assert c.get("/docs/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
    assert c.get("/docs/swagger-ui.css").headers["content-type"].startswith("text/css")
    r = c.get("/docs/../openapi.json")
    assert r.status in (200, 404)
    for missing in ("/docs/nope.js", "/docs/swagger-editor-bundle.js", "/docs/%2e%2e%2fsecret"):
        r = c.get(missing)
        assert r.status == 404 and r.json()["error"]["code"] == "not_found", missing
