"""Self-tests of the Venice contract fixtures in ``tests/venice_schema.py`` (fast, no network).

The last test compares the fixtures with Venice's ``swagger.yaml`` when a copy is available
(``VENICE_OPENAPI`` or ``/tmp/venice.yaml``) and PyYAML is installed; otherwise it is skipped.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests import venice_schema as vs
from tests.venice_schema import (
    DOCUMENTED,
    ContractError,
    validate_request,
    validate_response,
)

JSON = "application/json"
MP4_BYTES = b"\x00\x00\x00\x20ftypisom\x00\x00\x02\x00isomiso2avc1mp41" + b"\x00" * 32


def dump(value: object) -> bytes:
    return json.dumps(value).encode()


def video_model(**spec_overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "Wan 2.5",
        "privacy": "anonymized",
        "offline": False,
        "traits": [],
        "constraints": {
            "aspect_ratios": ["16:9", "9:16", "1:1"],
            "resolutions": ["720p", "1080p"],
            "durations": ["5s", "10s"],
            "model_type": "image-to-video",
            "audio": True,
            "audio_configurable": True,
            "prompt_character_limit": 2500,
        },
        "pricing": {"per_second": {"usd": 0.05, "diem": 0.05}},
    }
    spec.update(spec_overrides)
    return {
        "id": "wan-2-5-i2v",
        "object": "model",
        "owned_by": "venice.ai",
        "type": "video",
        "created": 1760000000,
        "model_spec": spec,
    }


def model_list(*models: dict[str, Any]) -> bytes:
    return dump({"data": list(models), "object": "list", "type": "video"})


QUEUE_OK: dict[str, Any] = {
    "model": "wan-2-5-i2v",
    "prompt": "a cat",
    "duration": "5s",
    "resolution": "720p",
    "aspect_ratio": "16:9",
    "audio": True,
    "image_url": "https://example.com/cat.png",
}
NEEDS_CONSENT_OK: dict[str, Any] = {
    "error": {"code": "needs_consent", "message": "consent required"},
    "consent_flow": "seedance",
    "face_media_roles": ["image", "reference_video"],
    "consent": {"consent_version": "2026-01", "policy_text": "..."},
    "docs_url": "https://docs.venice.ai/consent",
}
POLICY_OK: dict[str, Any] = {
    "error": {
        "message": "The provider rejected this request. Credits have been refunded.",
        "type": "provider_content_policy",
        "recommended_model": "wan-2-7-text-to-video",
        "credits_refunded": True,
    }
}


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(base)
    out.update(changes)
    return out


def without(base: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in copy.deepcopy(base).items() if k not in keys}


# --- the fixtures themselves ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(vs.SCHEMAS))
def test_every_schema_is_valid_draft_2020_12(name: str) -> None:
    Draft202012Validator.check_schema(vs.SCHEMAS[name])


def test_documented_statuses() -> None:
    common: dict[int, tuple[str, ...]] = {429: (JSON,), 503: (JSON,)}
    expected: dict[tuple[str, str], dict[int, tuple[str, ...]]] = {
        ("GET", "/models"): {200: (JSON,), 500: (JSON,)},
        ("POST", "/video/quote"): {200: (JSON,), 400: (JSON,), 403: (JSON,)},
        ("POST", "/video/queue"): {
            s: (JSON,) for s in (200, 400, 401, 402, 403, 409, 413, 422, 500)
        },
        ("POST", "/video/retrieve"): {
            200: (JSON, "video/mp4"),
            **{s: (JSON,) for s in (400, 401, 402, 403, 404, 422, 500, 503)},
        },
        ("POST", "/video/complete"): {s: (JSON,) for s in (200, 400, 401, 402, 500)},
    }
    assert {k: {**common, **v} for k, v in expected.items()} == DOCUMENTED
    # The globals come from the docs pages, not from the paths (retrieve alone lists 503).
    assert set(vs.GLOBAL_RESPONSES) == {429, 503}
    assert 503 in vs.PATH_RESPONSES[("POST", "/video/retrieve")]
    assert 503 not in vs.PATH_RESPONSES[("POST", "/video/queue")]


def test_aspect_ratios_and_durations_are_strings() -> None:
    assert "16:9" in vs.VIDEO_ASPECT_RATIOS and "9:16" in vs.VIDEO_ASPECT_RATIOS
    assert all(isinstance(a, str) for a in vs.VIDEO_ASPECT_RATIOS)
    assert vs.VIDEO_DURATIONS[:3] == ("1s", "2s", "3s") and "30s" in vs.VIDEO_DURATIONS
    assert "31s" not in vs.VIDEO_DURATIONS


# --- requests ------------------------------------------------------------------------------------

VALID_REQUESTS: list[tuple[str, str, object]] = [
    ("GET", "/models?type=video", None),
    ("GET", "/models", None),
    ("POST", "/video/quote", {"model": "m", "duration": "5s"}),
    (
        "POST",
        "/video/quote",
        {"model": "m", "duration": "10s", "resolution": "1080p", "aspect_ratio": "9:16"},
    ),
    ("POST", "/video/quote", {"model": "m", "duration": "auto", "audio": False, "x": 1}),
    ("POST", "/video/queue", QUEUE_OK),
    ("POST", "/api/v1/video/queue", QUEUE_OK),
    ("POST", "/video/queue", dump(QUEUE_OK)),
    ("POST", "/video/queue", {"model": "m", "prompt": "p", "duration": "30s"}),
    ("POST", "/video/queue", with_(QUEUE_OK, prompt="x" * 20000, aspect_ratio="21:9")),
    ("POST", "/video/queue", with_(QUEUE_OK, resolution="4k")),
    (
        "POST",
        "/video/queue",
        with_(
            QUEUE_OK,
            consents={
                "seedance": {
                    "confirmed_terms_and_privacy": True,
                    "confirmed_legal_right": True,
                    "confirmed_screening_acknowledged": True,
                }
            },
            keyframes=[{"image_url": "https://e.com/a.png", "frame_index": 0}],
        ),
    ),
    ("POST", "/video/retrieve", {"model": "m", "queue_id": "q"}),
    (
        "POST",
        "/video/retrieve",
        {"model": "m", "queue_id": "q", "delete_media_on_completion": True},
    ),
    ("POST", "/video/complete", {"model": "m", "queue_id": "q"}),
]


@pytest.mark.parametrize(("method", "path", "body"), VALID_REQUESTS)
def test_valid_requests(method: str, path: str, body: object) -> None:
    validate_request(method, path, body)


INVALID_REQUESTS: list[tuple[str, str, object, str]] = [
    # (method, path, body, the keyword the error must name)
    ("POST", "/video/queue", with_(QUEUE_OK, audio="true"), "type"),
    ("POST", "/video/queue", with_(QUEUE_OK, duration="5"), "enum"),
    ("POST", "/video/queue", with_(QUEUE_OK, duration=5), "type"),
    ("POST", "/video/quote", {"model": "m", "duration": "5"}, "enum"),
    ("POST", "/video/quote", {"model": "m", "duration": "31s"}, "enum"),
    ("POST", "/video/quote", {"model": "m"}, "required"),
    ("POST", "/video/quote", {"model": "m", "duration": "5s", "aspect_ratio": 969}, "type"),
    ("POST", "/video/quote", {"model": "m", "duration": "5s", "resolution": "1080P"}, "enum"),
    ("POST", "/video/queue", with_(QUEUE_OK, aspect_ratio="16x9"), "enum"),
    ("POST", "/video/queue", with_(QUEUE_OK, prompt=""), "minLength"),
    ("POST", "/video/queue", with_(QUEUE_OK, prompt="x" * 20001), "maxLength"),
    ("POST", "/video/queue", without(QUEUE_OK, "prompt"), "required"),
    ("POST", "/video/queue", without(QUEUE_OK, "duration"), "required"),
    ("POST", "/video/queue", with_(QUEUE_OK, image_url=None), "type"),
    ("POST", "/video/queue", with_(QUEUE_OK, upscale_factor=3), "enum"),
    ("POST", "/video/queue", with_(QUEUE_OK, reference_image_urls=["u"] * 31), "maxItems"),
    (
        "POST",
        "/video/queue",
        with_(QUEUE_OK, keyframes=[{"image_url": "u", "frame_index": -1}]),
        "minimum",
    ),
    (
        "POST",
        "/video/queue",
        with_(
            QUEUE_OK,
            consents={
                "seedance": {
                    "confirmed_terms_and_privacy": False,
                    "confirmed_legal_right": True,
                    "confirmed_screening_acknowledged": True,
                }
            },
        ),
        "enum",
    ),
    ("POST", "/video/queue", [QUEUE_OK], "type"),
    ("POST", "/video/queue", None, "type"),
    ("POST", "/video/retrieve", {"model": "m"}, "required"),
    (
        "POST",
        "/video/retrieve",
        {"model": "m", "queue_id": "q", "extra": 1},
        "additionalProperties",
    ),
    (
        "POST",
        "/video/retrieve",
        {"model": "m", "queue_id": "q", "delete_media_on_completion": "yes"},
        "type",
    ),
    ("POST", "/video/complete", {"model": "m", "queue_id": 7}, "type"),
    ("POST", "/video/complete", {"model": "m", "queue_id": "q", "x": 1}, "additionalProperties"),
    ("GET", "/models?type=videos", None, "enum"),
]


@pytest.mark.parametrize(("method", "path", "body", "keyword"), INVALID_REQUESTS)
def test_invalid_requests(method: str, path: str, body: object, keyword: str) -> None:
    with pytest.raises(ContractError) as caught:
        validate_request(method, path, body)
    route = path.split("?")[0].removeprefix("/api/v1")
    assert caught.value.keyword == keyword, str(caught.value)
    assert route in str(caught.value) and f"'{keyword}'" in str(caught.value)
    assert caught.value.path == route


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/video/generate", {}),
        ("GET", "/video/queue", None),
        ("GET", "/models", {"type": "video"}),
        ("GET", "/models?limit=1", None),
        ("POST", "/video/queue?x=1", QUEUE_OK),
        ("POST", "/video/queue", b"{not json"),
    ],
)
def test_requests_outside_the_contract(method: str, path: str, body: object) -> None:
    with pytest.raises(ContractError):
        validate_request(method, path, body)


# --- responses -----------------------------------------------------------------------------------

VALID_RESPONSES: list[tuple[str, str, int, str, bytes]] = [
    ("GET", "/models?type=video", 200, JSON, model_list(video_model())),
    ("GET", "/models", 200, "application/json; charset=utf-8", model_list()),
    (
        "GET",
        "/models",
        200,
        JSON,
        model_list(
            video_model(
                pricing={
                    "durations": {
                        "5s": {"usd": 0.5, "diem": 0.5, "min_seconds": 0, "max_seconds": 5}
                    }
                }
            ),
            video_model(pricing={"generation": {"usd": 1, "diem": 1}}),
            without(video_model(), "created"),
        ),
    ),
    # constraints and pricing are optional in Venice's ModelResponse.model_spec
    (
        "GET",
        "/models",
        200,
        JSON,
        model_list(video_model() | {"model_spec": {"privacy": "private"}}),
    ),
    (
        "GET",
        "/models",
        200,
        JSON,
        model_list(
            {
                "id": "llama-3.2-3b",
                "object": "model",
                "owned_by": "venice.ai",
                "type": "text",
                "model_spec": {
                    "privacy": "private",
                    "constraints": {"temperature": {"default": 0.8}, "top_p": {"default": 0.9}},
                    "pricing": {
                        "input": {"usd": 0.15, "diem": 0.15},
                        "output": {"usd": 0.6, "diem": 0.6},
                    },
                },
            }
        ),
    ),
    ("GET", "/models", 500, JSON, dump({"error": "An unknown error occurred"})),
    ("POST", "/video/quote", 200, JSON, dump({"quote": 0.42})),
    ("POST", "/video/quote", 200, JSON, dump({"quote": 1})),
    ("POST", "/video/quote", 400, JSON, dump({"error": "bad", "details": {"_errors": []}})),
    ("POST", "/video/quote", 403, JSON, dump({"error": "unavailable in your region"})),
    ("POST", "/video/queue", 200, JSON, dump({"model": "m", "queue_id": "q"})),
    (
        "POST",
        "/video/queue",
        200,
        JSON,
        dump({"model": "m", "queue_id": "q", "download_url": "https://x/v.mp4"}),
    ),
    ("POST", "/video/queue", 400, JSON, dump({"error": "bad", "issues": []})),
    ("POST", "/video/queue", 401, JSON, dump({"error": "Authentication failed"})),
    ("POST", "/video/queue", 402, JSON, dump({"error": "Insufficient USD or Diem balance"})),
    ("POST", "/video/queue", 409, JSON, dump(NEEDS_CONSENT_OK)),
    (
        "POST",
        "/video/queue",
        413,
        JSON,
        dump({"code": "PAYLOAD_TOO_LARGE", "error": "too large"}),
    ),
    ("POST", "/video/queue", 422, JSON, dump({"error": "text"})),
    ("POST", "/video/queue", 422, JSON, dump({"error": "text", "suggested_prompt": "a dog"})),
    ("POST", "/video/queue", 500, JSON, dump({"error": "Inference processing failed"})),
    ("POST", "/video/queue", 503, JSON, dump({"error": "The model is at capacity."})),
    (
        "POST",
        "/video/retrieve",
        200,
        JSON,
        dump({"status": "PROCESSING", "average_execution_time": 145000, "execution_duration": 0}),
    ),
    (
        "POST",
        "/video/retrieve",
        200,
        JSON,
        dump({"status": "COMPLETED", "average_execution_time": 1.5, "execution_duration": 2.5}),
    ),
    ("POST", "/video/retrieve", 200, "video/mp4", MP4_BYTES),
    ("POST", "/video/retrieve", 200, "Video/MP4", MP4_BYTES),
    ("POST", "/video/retrieve", 404, JSON, dump({"error": "Media could not be found."})),
    ("POST", "/video/retrieve", 422, JSON, dump(POLICY_OK)),
    (
        "POST",
        "/video/retrieve",
        422,
        JSON,
        dump({"error": without(POLICY_OK["error"], "recommended_model")}),
    ),
    ("POST", "/video/retrieve", 503, JSON, dump({"error": "The model is at capacity."})),
    ("POST", "/video/complete", 200, JSON, dump({"success": True})),
    ("POST", "/video/complete", 402, JSON, dump({"error": "Insufficient balance"})),
]


@pytest.mark.parametrize(("method", "path", "status", "content_type", "body"), VALID_RESPONSES)
def test_valid_responses(
    method: str, path: str, status: int, content_type: str, body: bytes
) -> None:
    validate_response(method, path, status, content_type, body)


@pytest.mark.parametrize(("method", "path"), sorted(DOCUMENTED))
@pytest.mark.parametrize("status", [429, 503])
def test_rate_limit_and_capacity_are_accepted_everywhere(
    method: str, path: str, status: int
) -> None:
    validate_response(method, path, status, JSON, dump({"error": "Rate limit exceeded"}))
    with pytest.raises(ContractError):
        validate_response(method, path, status, JSON, dump({"message": "Rate limit exceeded"}))


def bad_constraints() -> dict[str, Any]:
    """The simulator's old catalog shape: its own key names, lacking two of Venice's."""
    return {
        "durations": ["5s", "10s"],
        "resolutions": ["720p"],
        "aspect_ratios": ["16:9"],
        "audio": False,
        "default_resolution": "720p",
        "image_input": True,
    }


INVALID_RESPONSES: list[tuple[str, str, int, str, bytes, str]] = [
    # (method, path, status, content type, body, a fragment the error must contain)
    ("POST", "/video/queue", 418, JSON, dump({"error": "teapot"}), "status 418"),
    ("POST", "/video/quote", 401, JSON, dump({"error": "auth"}), "status 401"),
    ("POST", "/video/complete", 404, JSON, dump({"error": "gone"}), "status 404"),
    ("POST", "/video/complete", 403, JSON, dump({"error": "region"}), "status 403"),
    ("POST", "/video/queue", 504, JSON, dump({"error": "timeout"}), "status 504"),
    ("GET", "/models", 401, JSON, dump({"error": "auth"}), "status 401"),
    ("POST", "/video/retrieve", 422, JSON, dump({"error": "text"}), "'type'"),
    (
        "POST",
        "/video/retrieve",
        422,
        JSON,
        dump({"error": without(POLICY_OK["error"], "credits_refunded")}),
        "'required'",
    ),
    (
        "POST",
        "/video/retrieve",
        422,
        JSON,
        dump({"error": with_(POLICY_OK["error"], type="content_policy")}),
        "'enum'",
    ),
    ("POST", "/video/queue", 422, JSON, dump({"error": {"message": "x"}}), "'type'"),
    ("POST", "/video/retrieve", 200, JSON, dump({"status": "COMPLETED"}), "'required'"),
    (
        "POST",
        "/video/retrieve",
        200,
        JSON,
        dump({"status": "DONE", "average_execution_time": 1, "execution_duration": 1}),
        "'enum'",
    ),
    (
        "POST",
        "/video/retrieve",
        200,
        JSON,
        dump({"status": "PROCESSING", "average_execution_time": "1", "execution_duration": 1}),
        "'type'",
    ),
    ("POST", "/video/retrieve", 200, "video/mp4", b"<html>not a video</html>", "ftyp"),
    ("POST", "/video/retrieve", 200, "video/mp4", b"", "ftyp"),
    ("POST", "/video/retrieve", 200, "application/octet-stream", MP4_BYTES, "content type"),
    ("POST", "/video/retrieve", 200, "video/webm", MP4_BYTES, "content type"),
    ("POST", "/video/queue", 200, "video/mp4", MP4_BYTES, "content type"),
    ("POST", "/video/queue", 200, "text/plain", dump({"model": "m", "queue_id": "q"}), "type"),
    ("POST", "/video/queue", 200, "", dump({"model": "m", "queue_id": "q"}), "content type"),
    (
        "POST",
        "/video/queue",
        200,
        JSON,
        dump({"model": "m", "queue_id": "q", "status": "QUEUED"}),
        "'additionalProperties'",
    ),
    ("POST", "/video/queue", 200, JSON, dump({"queue_id": "q"}), "'required'"),
    ("POST", "/video/queue", 200, JSON, b"{", "not valid UTF-8 JSON"),
    ("POST", "/video/queue", 200, JSON, b"\xff\xfe", "not valid UTF-8 JSON"),
    (
        "POST",
        "/video/queue",
        409,
        JSON,
        dump(with_(NEEDS_CONSENT_OK, retry=True)),
        "'additionalProperties'",
    ),
    (
        "POST",
        "/video/queue",
        409,
        JSON,
        dump(with_(NEEDS_CONSENT_OK, error={"code": "needs_consent", "message": "m", "x": 1})),
        "'additionalProperties'",
    ),
    (
        "POST",
        "/video/queue",
        409,
        JSON,
        dump(with_(NEEDS_CONSENT_OK, consent={"consent_version": "1", "policy_text": "t", "x": 1})),
        "'additionalProperties'",
    ),
    ("POST", "/video/queue", 409, JSON, dump(without(NEEDS_CONSENT_OK, "docs_url")), "'required'"),
    (
        "POST",
        "/video/queue",
        409,
        JSON,
        dump(with_(NEEDS_CONSENT_OK, face_media_roles=["face"])),
        "'enum'",
    ),
    ("POST", "/video/queue", 409, JSON, dump({"error": "needs consent"}), "'type'"),
    ("POST", "/video/queue", 413, JSON, dump({"error": "too large"}), "'required'"),
    ("POST", "/video/queue", 400, JSON, dump({"detail": "bad"}), "'required'"),
    ("POST", "/video/queue", 401, JSON, dump({"error": 401}), "'type'"),
    ("POST", "/video/quote", 200, JSON, dump({"quote": "0.42"}), "'type'"),
    ("POST", "/video/quote", 200, JSON, b'{"quote": NaN}', "not valid UTF-8 JSON"),
    ("POST", "/video/complete", 200, JSON, dump({"success": "true"}), "'type'"),
    ("POST", "/video/complete", 200, JSON, dump({}), "'required'"),
    (
        "GET",
        "/models",
        200,
        JSON,
        model_list(video_model(constraints=bad_constraints())),
        "'required'",
    ),
    ("GET", "/models", 200, JSON, model_list(video_model(privacy="public")), "'enum'"),
    (
        "GET",
        "/models",
        200,
        JSON,
        model_list(without(video_model(), "owned_by")),
        "'required'",
    ),
    (
        "GET",
        "/models",
        200,
        JSON,
        model_list(video_model() | {"object": "video-model"}),
        "'enum'",
    ),
    (
        "GET",
        "/models",
        200,
        JSON,
        model_list(
            video_model(
                constraints=video_model()["model_spec"]["constraints"] | {"durations": [5, 10]}
            )
        ),
        "'type'",
    ),
    (
        "GET",
        "/models",
        200,
        JSON,
        model_list(
            video_model(
                constraints=video_model()["model_spec"]["constraints"] | {"model_type": "t2v"}
            )
        ),
        "'enum'",
    ),
    # the simulator's old pricing shape matches none of Venice's pricing shapes
    (
        "GET",
        "/models",
        200,
        JSON,
        model_list(
            video_model(pricing={"usd_per_second": {"720p": "0.05"}, "audio_multiplier": None})
        ),
        "'anyOf'",
    ),
    (
        "GET",
        "/models",
        200,
        JSON,
        model_list(video_model(pricing={"durations": {"5s": {"usd": 0.5, "diem": 0.5}}})),
        "'anyOf'",
    ),
    (
        "GET",
        "/models",
        200,
        JSON,
        model_list(video_model(pricing={"per_second": {"usd": "0.05", "diem": 0.05}})),
        "'anyOf'",
    ),
    ("GET", "/models", 200, JSON, dump({"data": [], "object": "list"}), "'required'"),
    ("GET", "/models", 200, JSON, dump({"data": {}, "object": "list", "type": "video"}), "'type'"),
]


@pytest.mark.parametrize(
    ("method", "path", "status", "content_type", "body", "fragment"), INVALID_RESPONSES
)
def test_invalid_responses(
    method: str, path: str, status: int, content_type: str, body: bytes, fragment: str
) -> None:
    with pytest.raises(ContractError) as caught:
        validate_response(method, path, status, content_type, body)
    message = str(caught.value)
    assert fragment in message, message
    assert path.split("?")[0] in message, message


def test_error_names_the_path_keyword_and_location() -> None:
    with pytest.raises(ContractError) as caught:
        validate_request("POST", "/video/queue", with_(QUEUE_OK, audio="yes"))
    error = caught.value
    assert isinstance(error, AssertionError)
    assert error.path == "/video/queue" and error.keyword == "type"
    assert "POST /video/queue request" in str(error) and "$.audio" in str(error)


def test_video_narrowing_applies_only_to_video_models() -> None:
    """Non-video entries keep Venice's looser anyOf; only `type: video` gets the video shape."""
    entry = video_model(constraints=bad_constraints())
    entry["type"] = "image"
    validate_response("GET", "/models", 200, JSON, model_list(entry))


# --- drift check against Venice's swagger.yaml (optional) ----------------------------------------

SWAGGER = Path(os.environ.get("VENICE_OPENAPI", "/tmp/venice.yaml"))
# Keywords compared; descriptions, examples, defaults and formats are documentation only.
_COMPARED = ("type", "enum", "required", "minLength", "maxLength", "maxItems", "minimum")


def _yaml_text(value: object) -> str:
    """How yaml.BaseLoader (every scalar a string, so 16:9 stays "16:9") spells a value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class _Drift:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.problems: list[str] = []

    def resolve(self, theirs: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in theirs:
            node: Any = self.spec
            for part in theirs["$ref"].removeprefix("#/").split("/"):
                node = node[part]
            theirs = node
        return theirs

    def compare(self, ours: dict[str, Any], theirs: dict[str, Any], where: str) -> None:
        theirs = self.resolve(theirs)
        branches = theirs.get("anyOf") or theirs.get("oneOf")
        if branches and all("enum" in b for b in branches) and "enum" in ours:
            theirs = {"type": "string", "enum": [v for b in branches for v in b["enum"]]}
        elif branches and "anyOf" in ours:
            self.compare_branches(ours["anyOf"], branches, where)
            return
        elif branches:
            return  # a narrowing of ours (constraints, the 402 x402 alternative): checked apart
        for key in _COMPARED:
            mine = ours.get(key)
            if key == "minimum" and mine is None and theirs.get("exclusiveMinimum") == "true":
                mine = ours.get("exclusiveMinimum")
            if mine is None and key not in theirs:
                continue
            a = sorted(map(_yaml_text, mine)) if isinstance(mine, list) else _yaml_text(mine)
            b = sorted(theirs.get(key, [])) if key in ("enum", "required") else theirs.get(key)
            if a != (b if b is not None else "None"):
                self.problems.append(f"{where}: {key} ours={a} venice={b}")
        closed_ours = ours.get("additionalProperties") is False
        if closed_ours != (theirs.get("additionalProperties") == "false"):
            self.problems.append(f"{where}: additionalProperties differ")
        mine_props, their_props = ours.get("properties", {}), theirs.get("properties", {})
        extra = set(mine_props) - set(their_props)
        missing = set(their_props) - set(mine_props)
        if extra:
            self.problems.append(f"{where}: properties Venice lacks: {sorted(extra)}")
        if missing and not where.endswith(".model_spec") and their_props:
            self.problems.append(f"{where}: properties we lack: {sorted(missing)}")
        for name in set(mine_props) & set(their_props):
            self.compare(mine_props[name], their_props[name], f"{where}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(ours.get(key), dict) and isinstance(theirs.get(key), dict):
                self.compare(ours[key], theirs[key], f"{where}.{key}")

    def compare_branches(self, ours: list[Any], theirs: list[Any], where: str) -> None:
        theirs = [self.resolve(b) for b in theirs]
        by_required = {tuple(sorted(b.get("required", []))): b for b in theirs}
        if len(by_required) != len(theirs) or len(ours) != len(theirs):
            self.problems.append(f"{where}: {len(ours)} branches, Venice has {len(theirs)}")
        for branch in ours:
            match = by_required.get(tuple(sorted(branch.get("required", []))))
            if match is None:
                self.problems.append(f"{where}: no Venice branch requires {branch.get('required')}")
            else:
                self.compare(branch, match, f"{where}[{','.join(branch.get('required', []))}]")


def test_fixtures_match_venice_swagger() -> None:
    yaml = pytest.importorskip("yaml")
    if not SWAGGER.is_file():
        pytest.skip(f"no copy of Venice's swagger.yaml at {SWAGGER} (set VENICE_OPENAPI)")
    spec = yaml.load(SWAGGER.read_text(), Loader=yaml.BaseLoader)
    drift = _Drift(spec)
    for (method, path), statuses in vs.PATH_RESPONSES.items():
        operation = spec["paths"][path][method.lower()]
        responses = operation["responses"]
        if set(map(int, responses)) != set(statuses):
            drift.problems.append(f"{method} {path}: statuses {sorted(map(int, responses))}")
        request = vs.REQUESTS[(method, path)]
        if request is not None:
            their_request = operation["requestBody"]["content"]["application/json"]["schema"]
            drift.compare(request, their_request, f"{method} {path} request")
        for status, bodies in statuses.items():
            content = responses[str(status)]["content"]
            if set(content) != set(bodies):
                drift.problems.append(f"{method} {path} {status}: media {sorted(content)}")
            for media, ours in bodies.items():
                if isinstance(ours, dict) and media in content:
                    theirs = content[media]["schema"]
                    if status == 402:  # oneOf [StandardError, X402InferencePaymentRequired]
                        theirs = theirs["oneOf"][0]
                    drift.compare(ours, theirs, f"{method} {path} {status}")
    model_spec = spec["components"]["schemas"]["ModelResponse"]["properties"]["model_spec"]
    video = [
        b
        for b in model_spec["properties"]["constraints"]["anyOf"]
        if b.get("title") == "Video Model Constraints"
    ]
    assert len(video) == 1
    drift.compare(vs.VIDEO_MODEL_CONSTRAINTS, video[0], "Video Model Constraints")
    assert drift.problems == [], "\n".join(drift.problems)
