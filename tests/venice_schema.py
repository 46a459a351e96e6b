"""Hand-written JSON Schema fixtures for the part of Venice's OpenAPI the engine relies on.

Source: the public ``veniceai/api-docs`` repository (``swagger.yaml``, info.version
20260821.193530, plus ``api-reference/error-codes.mdx`` and ``rate-limiting.mdx``). The schemas
below are our own compact restatement of the constraints those documents publish for the video
endpoints and the model list, not a copy of the file. All paths are relative to the server
``https://api.venice.ai/api/v1``.

OpenAPI 3.0 spellings were translated to JSON Schema 2020-12 (e.g. a boolean
``exclusiveMinimum`` became a numeric one). Objects are open (extra keys allowed) unless Venice
declares ``additionalProperties: false``; where it does, so do we.

Deliberate narrowings and omissions, each also noted where it applies:

* ``model_spec.constraints`` of a model whose ``type`` is ``video`` must be the "Video Model
  Constraints" shape (Venice offers an ``anyOf`` of the image/text/video/inpaint shapes for all
  model types); the other model types are not described here.
* The 402 answers accept only StandardError; Venice's alternative ``X402InferencePaymentRequired``
  body (wallet authentication) is omitted because the engine authenticates with API keys.
* 429 and 503 are accepted on every path as StandardError: the error-codes and rate-limiting
  pages document them as answers any endpoint can give, even where a path does not list them.

The helpers (``validate_request``, ``validate_response``) raise :class:`ContractError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

Schema = dict[str, Any]

API_PREFIX: Final = "/api/v1"
JSON: Final = "application/json"
MP4: Final = "video/mp4"


class ContractError(AssertionError):
    """A request or answer that does not match Venice's published contract."""

    def __init__(self, message: str, *, path: str = "", keyword: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.keyword = keyword


# --- small building blocks ----------------------------------------------------------------------


def _obj(
    properties: Mapping[str, Schema],
    required: tuple[str, ...] = (),
    *,
    closed: bool = False,
) -> Schema:
    schema: Schema = {"type": "object", "properties": dict(properties)}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


def _enum(*values: str) -> Schema:
    return {"type": "string", "enum": list(values)}


def _strings(max_items: int | None = None) -> Schema:
    schema: Schema = {"type": "array", "items": STRING}
    if max_items is not None:
        schema["maxItems"] = max_items
    return schema


STRING: Final[Schema] = {"type": "string"}
NUMBER: Final[Schema] = {"type": "number"}
BOOLEAN: Final[Schema] = {"type": "boolean"}

# --- shared enums (QueueVideoRequest / QuoteVideoRequest use the same lists) ---------------------

# "1s".."30s" plus the special literals Venice lists; a bare "5" is not valid.
VIDEO_DURATIONS: Final = (*(f"{n}s" for n in range(1, 31)), "-1", "1 gen", "auto", "Auto")
# Case matters: "4k" is lower case while "2K" and "768P" are upper case.
VIDEO_RESOLUTIONS: Final = (
    "256p",
    "360p",
    "480p",
    "540p",
    "580p",
    "720p",
    "1080p",
    "1440p",
    "2160p",
    "4k",
    "2x",
    "4x",
    "2K",
    "768P",
    "true_1080p",
)
# Strings, never numbers (a YAML 1.1 reader turns an unquoted 16:9 into the integer 969).
VIDEO_ASPECT_RATIOS: Final = (
    "1:1",
    "2:3",
    "3:2",
    "3:4",
    "4:3",
    "4:5",
    "5:4",
    "9:16",
    "9:21",
    "16:9",
    "21:9",
    "adaptive",
    "auto",
)
MODEL_TYPES: Final = (
    "asr",
    "embedding",
    "image",
    "music",
    "text",
    "tts",
    "upscale",
    "inpaint",
    "video",
)
# The `type` query parameter of GET /models (and the list's `type` field) also takes these two.
MODEL_TYPE_FILTERS: Final = (*MODEL_TYPES, "all", "code")
UPSCALE_FACTOR: Final[Schema] = {"type": "integer", "enum": [1, 2, 4]}

# --- error bodies (components/schemas) -----------------------------------------------------------

# components/schemas/StandardError
STANDARD_ERROR: Final[Schema] = _obj({"error": STRING}, ("error",))

# components/schemas/DetailedError (the error-codes page adds an undeclared `issues` array)
DETAILED_ERROR: Final[Schema] = _obj({"details": {"type": "object"}, "error": STRING}, ("error",))

# components/schemas/ContentViolationError (the 422 of /video/queue)
CONTENT_VIOLATION_ERROR: Final[Schema] = _obj(
    {"error": STRING, "suggested_prompt": STRING}, ("error",)
)

# components/schemas/ProviderContentPolicyError (the 422 of /video/retrieve: `error` is an object)
PROVIDER_CONTENT_POLICY_ERROR: Final[Schema] = _obj(
    {
        "error": _obj(
            {
                "message": STRING,
                "type": _enum("provider_content_policy"),
                "recommended_model": STRING,
                "credits_refunded": BOOLEAN,
            },
            ("message", "type", "credits_refunded"),
        )
    },
    ("error",),
)

# components/schemas/PayloadTooLargeError
PAYLOAD_TOO_LARGE_ERROR: Final[Schema] = _obj(
    {"code": _enum("PAYLOAD_TOO_LARGE"), "error": STRING}, ("code", "error")
)

# paths./video/queue.post.responses.409 (inline): the seedance consent requirement
NEEDS_CONSENT: Final[Schema] = _obj(
    {
        "error": _obj(
            {"code": _enum("needs_consent"), "message": STRING},
            ("code", "message"),
            closed=True,
        ),
        "consent_flow": _enum("seedance"),
        "face_media_roles": {
            "type": "array",
            "items": _enum("image", "end_image", "reference_image", "video", "reference_video"),
        },
        "consent": _obj(
            {"consent_version": STRING, "policy_text": STRING},
            ("consent_version", "policy_text"),
            closed=True,
        ),
        "docs_url": STRING,
    },
    ("error", "consent_flow", "face_media_roles", "consent", "docs_url"),
    closed=True,
)

# --- request bodies (components/schemas) ---------------------------------------------------------

_MEDIA_URL: Final = STRING  # "http(s) URL or data: URL" in Venice's prose; not a declared format
_TRUE: Final[Schema] = {"type": "boolean", "enum": [True]}

# components/schemas/QueueVideoRequest (open: Venice does not forbid extra keys)
QUEUE_VIDEO_REQUEST: Final[Schema] = _obj(
    {
        "model": STRING,
        "consents": _obj(
            {
                "seedance": _obj(
                    {
                        "confirmed_terms_and_privacy": _TRUE,
                        "confirmed_legal_right": _TRUE,
                        "confirmed_screening_acknowledged": _TRUE,
                    },
                    (
                        "confirmed_terms_and_privacy",
                        "confirmed_legal_right",
                        "confirmed_screening_acknowledged",
                    ),
                )
            }
        ),
        "prompt": {"type": "string", "minLength": 1, "maxLength": 20000},
        "negative_prompt": {"type": "string", "maxLength": 20000},
        "duration": _enum(*VIDEO_DURATIONS),
        "aspect_ratio": _enum(*VIDEO_ASPECT_RATIOS),
        "omni_reference_task_type": _enum("auto", "reference", "edit", "extend"),
        "resolution": _enum(*VIDEO_RESOLUTIONS),
        "upscale_factor": UPSCALE_FACTOR,
        "audio": BOOLEAN,
        "image_url": _MEDIA_URL,
        "end_image_url": _MEDIA_URL,
        "audio_url": _MEDIA_URL,
        "video_url": _MEDIA_URL,
        "reference_image_urls": _strings(30),
        "reference_video_urls": _strings(10),
        "reference_audio_urls": _strings(10),
        "reference_document_urls": _strings(1),
        "elements": {
            "type": "array",
            "maxItems": 4,
            "items": _obj(
                {
                    "frontal_image_url": STRING,
                    "reference_image_urls": _strings(3),
                    "video_url": STRING,
                }
            ),
        },
        "scene_image_urls": _strings(4),
        "keyframes": {
            "type": "array",
            "maxItems": 10,
            "items": _obj(
                {"image_url": STRING, "frame_index": {"type": "integer", "minimum": 0}},
                ("image_url", "frame_index"),
            ),
        },
    },
    ("model", "prompt", "duration"),
)

# components/schemas/QuoteVideoRequest (open: Venice does not forbid extra keys)
QUOTE_VIDEO_REQUEST: Final[Schema] = _obj(
    {
        "model": STRING,
        "duration": _enum(*VIDEO_DURATIONS),
        "aspect_ratio": _enum(*VIDEO_ASPECT_RATIOS),
        "resolution": _enum(*VIDEO_RESOLUTIONS),
        "upscale_factor": UPSCALE_FACTOR,
        "audio": BOOLEAN,
        "video_url": _MEDIA_URL,
        "reference_video_total_duration": {"type": "number", "minimum": 0},
    },
    ("model", "duration"),
)

# components/schemas/RetrieveVideoRequest
RETRIEVE_VIDEO_REQUEST: Final[Schema] = _obj(
    {"model": STRING, "queue_id": STRING, "delete_media_on_completion": BOOLEAN},
    ("model", "queue_id"),
    closed=True,
)

# components/schemas/CompleteVideoRequest
COMPLETE_VIDEO_REQUEST: Final[Schema] = _obj(
    {"model": STRING, "queue_id": STRING}, ("model", "queue_id"), closed=True
)

# --- success bodies (inline in paths) ------------------------------------------------------------

# paths./video/quote.post.responses.200
QUOTE_VIDEO_RESPONSE: Final[Schema] = _obj({"quote": NUMBER}, ("quote",))

# paths./video/queue.post.responses.200 (download_url only for "VPS-backed" models)
QUEUE_VIDEO_RESPONSE: Final[Schema] = _obj(
    {"model": STRING, "queue_id": STRING, "download_url": STRING},
    ("model", "queue_id"),
    closed=True,
)

# paths./video/retrieve.post.responses.200 application/json (the video/mp4 branch is binary)
RETRIEVE_VIDEO_STATUS: Final[Schema] = _obj(
    {
        "status": _enum("PROCESSING", "COMPLETED"),
        "average_execution_time": NUMBER,  # milliseconds (P80 estimate)
        "execution_duration": NUMBER,  # milliseconds so far
    },
    ("status", "average_execution_time", "execution_duration"),
)

# paths./video/complete.post.responses.200
COMPLETE_VIDEO_RESPONSE: Final[Schema] = _obj({"success": BOOLEAN}, ("success",))

# --- GET /models ---------------------------------------------------------------------------------

# ModelResponse.model_spec.constraints, anyOf branch titled "Video Model Constraints"
VIDEO_MODEL_CONSTRAINTS: Final[Schema] = _obj(
    {
        "aspect_ratios": _strings(),  # e.g. "16:9"; empty = no defined aspect ratio
        "resolutions": _strings(),  # e.g. "720p"; empty = no defined resolution
        "durations": _strings(),  # e.g. "5s"; empty = no defined duration
        "model_type": _enum("image-to-video", "text-to-video", "video"),
        "audio": BOOLEAN,
        "audio_configurable": BOOLEAN,
        "prompt_character_limit": NUMBER,  # default 2500 when absent
    },
    ("aspect_ratios", "resolutions", "durations", "model_type", "audio", "audio_configurable"),
)

# {usd, diem} price pair used throughout ModelResponse.model_spec.pricing
PRICE: Final[Schema] = _obj({"usd": NUMBER, "diem": NUMBER}, ("usd", "diem"))
_PRICE_BY_LABEL: Final[Schema] = {"type": "object", "additionalProperties": PRICE}
_PRICE_BY_QUALITY: Final[Schema] = {
    "type": "object",
    "additionalProperties": _obj({"low": PRICE, "medium": PRICE, "high": PRICE}),
}

# ModelResponse.model_spec.pricing anyOf branch: untitled `durations` tiers (video)
PRICING_DURATION_TIERS: Final[Schema] = _obj(
    {
        "durations": {
            "type": "object",
            "additionalProperties": _obj(
                {"usd": NUMBER, "diem": NUMBER, "min_seconds": NUMBER, "max_seconds": NUMBER},
                ("usd", "diem", "min_seconds", "max_seconds"),
            ),
        }
    },
    ("durations",),
)

# ModelResponse.model_spec.pricing anyOf branch: untitled `per_second` (video)
PRICING_PER_SECOND: Final[Schema] = _obj({"per_second": PRICE}, ("per_second",))

# ModelResponse.model_spec.pricing anyOf branch: untitled `generation`-only (flat per request)
PRICING_GENERATION: Final[Schema] = _obj({"generation": PRICE}, ("generation",))

# ModelResponse.model_spec.pricing anyOf branch: untitled `per_thousand_characters`
PRICING_PER_THOUSAND_CHARACTERS: Final[Schema] = _obj(
    {"per_thousand_characters": PRICE}, ("per_thousand_characters",)
)

# ModelResponse.model_spec.pricing anyOf branch titled "LLM Model Pricing"
PRICING_LLM: Final[Schema] = _obj(
    {
        "input": PRICE,
        "output": PRICE,
        "cache_input": PRICE,
        "cache_write": PRICE,
        "extended": _obj(
            {
                "context_token_threshold": NUMBER,
                "input": PRICE,
                "output": PRICE,
                "cache_input": PRICE,
                "cache_write": PRICE,
            },
            ("context_token_threshold", "input", "output"),
        ),
    },
    ("input", "output"),
)

# ModelResponse.model_spec.pricing anyOf branch titled "Image Model Pricing" (requires `upscale`)
PRICING_IMAGE: Final[Schema] = _obj(
    {
        "generation": PRICE,
        "resolutions": _PRICE_BY_LABEL,
        "quality": _PRICE_BY_QUALITY,
        "upscale": _obj({"2x": PRICE, "4x": PRICE}, ("2x", "4x")),
    },
    ("upscale",),
)

# ModelResponse.model_spec.pricing anyOf branch titled "TTS Model Pricing"
PRICING_TTS: Final[Schema] = _obj({"input": PRICE}, ("input",))

# ModelResponse.model_spec.pricing anyOf branch titled "ASR Model Pricing"
PRICING_ASR: Final[Schema] = _obj({"per_audio_second": PRICE}, ("per_audio_second",))

# ModelResponse.model_spec.pricing anyOf branch titled "Inpaint Model Pricing"
PRICING_INPAINT: Final[Schema] = _obj(
    {
        "inpaint": PRICE,
        "resolutions": _PRICE_BY_LABEL,
        "inputImages": _obj({"included": NUMBER, "additional": PRICE}, ("included", "additional")),
        "quality": _PRICE_BY_QUALITY,
    },
    ("inpaint",),
)

# ModelResponse.model_spec.pricing: any one of Venice's nine shapes (all open objects)
MODEL_PRICING: Final[Schema] = {
    "anyOf": [
        PRICING_DURATION_TIERS,
        PRICING_PER_SECOND,
        PRICING_GENERATION,
        PRICING_PER_THOUSAND_CHARACTERS,
        PRICING_LLM,
        PRICING_IMAGE,
        PRICING_TTS,
        PRICING_ASR,
        PRICING_INPAINT,
    ]
}

# ModelResponse.model_spec.deprecation
MODEL_DEPRECATION: Final[Schema] = _obj(
    {
        "autoRemap": BOOLEAN,
        "date": STRING,
        "removesAt": STRING,
        "replacementModelId": STRING,
        "startsAt": STRING,
    },
    ("autoRemap", "date", "removesAt"),
)

# ModelResponse.model_spec (only the fields a video model may carry are typed here)
MODEL_SPEC: Final[Schema] = _obj(
    {
        "privacy": _enum("private", "anonymized"),
        "beta": BOOLEAN,
        "betaModel": BOOLEAN,
        "regionRestrictions": _strings(),
        "deprecation": MODEL_DEPRECATION,
        "constraints": {"type": "object"},  # narrowed per model type in MODEL_RESPONSE
        "description": STRING,
        "name": STRING,
        "modelSource": STRING,
        "offline": BOOLEAN,
        "pricing": MODEL_PRICING,
        "traits": _strings(),
        "uncensored": BOOLEAN,
        "prompt_character_limit": NUMBER,
    },
    ("privacy",),
)

# components/schemas/ModelResponse (video models: constraints must be the video shape)
MODEL_RESPONSE: Final[Schema] = {
    **_obj(
        {
            "context_length": NUMBER,
            "created": NUMBER,
            "discount_to_user": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "id": STRING,
            "model_spec": MODEL_SPEC,
            "object": _enum("model"),
            "owned_by": _enum("venice.ai"),
            "type": _enum(*MODEL_TYPES),
        },
        ("id", "model_spec", "object", "owned_by", "type"),
    ),
    "if": {"properties": {"type": {"const": "video"}}, "required": ["type"]},
    "then": {
        "properties": {"model_spec": {"properties": {"constraints": VIDEO_MODEL_CONSTRAINTS}}}
    },
}

# paths./models.get.responses.200
MODEL_LIST: Final[Schema] = _obj(
    {
        "data": {"type": "array", "items": MODEL_RESPONSE},
        "object": _enum("list"),
        "type": _enum(*MODEL_TYPE_FILTERS),
    },
    ("data", "object", "type"),
)

# --- the documented answers ----------------------------------------------------------------------


class _Mp4:
    """Marker for a binary ``video/mp4`` body: checked for an ISO-BMFF ``ftyp`` box."""

    def __repr__(self) -> str:
        return "MP4_BINARY"


MP4_BINARY: Final = _Mp4()
Body = Schema | _Mp4
Endpoint = tuple[str, str]

# request schema per (method, path); GET /models has no body (only the `type` query parameter)
REQUESTS: Final[dict[Endpoint, Schema | None]] = {
    ("GET", "/models"): None,
    ("POST", "/video/quote"): QUOTE_VIDEO_REQUEST,
    ("POST", "/video/queue"): QUEUE_VIDEO_REQUEST,
    ("POST", "/video/retrieve"): RETRIEVE_VIDEO_REQUEST,
    ("POST", "/video/complete"): COMPLETE_VIDEO_REQUEST,
}

# (method, path) -> status -> media type -> body, exactly as each path's `responses` lists them
PATH_RESPONSES: Final[dict[Endpoint, dict[int, dict[str, Body]]]] = {
    ("GET", "/models"): {
        200: {JSON: MODEL_LIST},
        500: {JSON: STANDARD_ERROR},
    },
    ("POST", "/video/quote"): {
        200: {JSON: QUOTE_VIDEO_RESPONSE},
        400: {JSON: DETAILED_ERROR},
        403: {JSON: STANDARD_ERROR},
    },
    ("POST", "/video/queue"): {
        200: {JSON: QUEUE_VIDEO_RESPONSE},
        400: {JSON: DETAILED_ERROR},
        401: {JSON: STANDARD_ERROR},
        402: {JSON: STANDARD_ERROR},  # X402InferencePaymentRequired alternative omitted
        403: {JSON: STANDARD_ERROR},
        409: {JSON: NEEDS_CONSENT},
        413: {JSON: PAYLOAD_TOO_LARGE_ERROR},
        422: {JSON: CONTENT_VIOLATION_ERROR},
        500: {JSON: STANDARD_ERROR},
    },
    ("POST", "/video/retrieve"): {
        200: {JSON: RETRIEVE_VIDEO_STATUS, MP4: MP4_BINARY},
        400: {JSON: DETAILED_ERROR},
        401: {JSON: STANDARD_ERROR},
        402: {JSON: STANDARD_ERROR},  # X402InferencePaymentRequired alternative omitted
        403: {JSON: STANDARD_ERROR},
        404: {JSON: STANDARD_ERROR},
        422: {JSON: PROVIDER_CONTENT_POLICY_ERROR},
        500: {JSON: STANDARD_ERROR},
        503: {JSON: STANDARD_ERROR},
    },
    ("POST", "/video/complete"): {
        200: {JSON: COMPLETE_VIDEO_RESPONSE},
        400: {JSON: DETAILED_ERROR},
        401: {JSON: STANDARD_ERROR},
        402: {JSON: STANDARD_ERROR},  # X402InferencePaymentRequired alternative omitted
        500: {JSON: STANDARD_ERROR},
    },
}

# Not from swagger.yaml: api-reference/error-codes.mdx (RATE_LIMIT_EXCEEDED, MODEL_OVERLOADED,
# MODEL_AT_CAPACITY, MODEL_OFFLINE) and rate-limiting.mdx document these for any endpoint.
GLOBAL_RESPONSES: Final[dict[int, dict[str, Body]]] = {
    429: {JSON: STANDARD_ERROR},
    503: {JSON: STANDARD_ERROR},
}

# What validate_response accepts: each path's own answers, plus the global ones it lacks.
RESPONSES: Final[dict[Endpoint, dict[int, dict[str, Body]]]] = {
    endpoint: dict(sorted({**GLOBAL_RESPONSES, **statuses}.items()))
    for endpoint, statuses in PATH_RESPONSES.items()
}

# (method, path) -> status -> allowed content types, globals included (for tests to enumerate).
DOCUMENTED: Final[dict[Endpoint, dict[int, tuple[str, ...]]]] = {
    endpoint: {status: tuple(media) for status, media in statuses.items()}
    for endpoint, statuses in RESPONSES.items()
}

# Every named schema, for self-tests (check_schema) and for contract tests that want one directly.
SCHEMAS: Final[dict[str, Schema]] = {
    "STANDARD_ERROR": STANDARD_ERROR,
    "DETAILED_ERROR": DETAILED_ERROR,
    "CONTENT_VIOLATION_ERROR": CONTENT_VIOLATION_ERROR,
    "PROVIDER_CONTENT_POLICY_ERROR": PROVIDER_CONTENT_POLICY_ERROR,
    "PAYLOAD_TOO_LARGE_ERROR": PAYLOAD_TOO_LARGE_ERROR,
    "NEEDS_CONSENT": NEEDS_CONSENT,
    "QUEUE_VIDEO_REQUEST": QUEUE_VIDEO_REQUEST,
    "QUOTE_VIDEO_REQUEST": QUOTE_VIDEO_REQUEST,
    "RETRIEVE_VIDEO_REQUEST": RETRIEVE_VIDEO_REQUEST,
    "COMPLETE_VIDEO_REQUEST": COMPLETE_VIDEO_REQUEST,
    "QUOTE_VIDEO_RESPONSE": QUOTE_VIDEO_RESPONSE,
    "QUEUE_VIDEO_RESPONSE": QUEUE_VIDEO_RESPONSE,
    "RETRIEVE_VIDEO_STATUS": RETRIEVE_VIDEO_STATUS,
    "COMPLETE_VIDEO_RESPONSE": COMPLETE_VIDEO_RESPONSE,
    "VIDEO_MODEL_CONSTRAINTS": VIDEO_MODEL_CONSTRAINTS,
    "PRICE": PRICE,
    "PRICING_DURATION_TIERS": PRICING_DURATION_TIERS,
    "PRICING_PER_SECOND": PRICING_PER_SECOND,
    "PRICING_GENERATION": PRICING_GENERATION,
    "PRICING_PER_THOUSAND_CHARACTERS": PRICING_PER_THOUSAND_CHARACTERS,
    "PRICING_LLM": PRICING_LLM,
    "PRICING_IMAGE": PRICING_IMAGE,
    "PRICING_TTS": PRICING_TTS,
    "PRICING_ASR": PRICING_ASR,
    "PRICING_INPAINT": PRICING_INPAINT,
    "MODEL_PRICING": MODEL_PRICING,
    "MODEL_DEPRECATION": MODEL_DEPRECATION,
    "MODEL_SPEC": MODEL_SPEC,
    "MODEL_RESPONSE": MODEL_RESPONSE,
    "MODEL_LIST": MODEL_LIST,
}

# --- helpers -------------------------------------------------------------------------------------

_VALIDATORS: dict[int, Draft202012Validator] = {}


def _validator(schema: Schema) -> Draft202012Validator:
    # No format_checker: `format` keywords are not asserted (none are used here anyway).
    validator = _VALIDATORS.get(id(schema))
    if validator is None:
        validator = _VALIDATORS[id(schema)] = Draft202012Validator(schema)
    return validator


def _endpoint(method: str, path: str) -> tuple[Endpoint, dict[str, list[str]]]:
    """``(METHOD, /path)`` without query, scheme, host or ``/api/v1``; and the query."""
    parts = urlsplit(path)
    route = parts.path
    if route.startswith(API_PREFIX + "/"):
        route = route[len(API_PREFIX) :]
    if len(route) > 1:
        route = route.rstrip("/")
    endpoint = (method.upper(), route)
    if endpoint not in REQUESTS:
        known = ", ".join(f"{m} {p}" for m, p in REQUESTS)
        raise ContractError(
            f"{endpoint[0]} {path}: not a documented Venice endpoint (known: {known})",
            path=route,
        )
    return endpoint, parse_qs(parts.query, keep_blank_values=True)


def _where(error: ValidationError) -> str:
    return "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


def _rank(error: ValidationError) -> tuple[int, str]:
    # At one location a wrong JSON type is the root cause; an enum miss on it is a consequence.
    return (0 if error.validator == "type" else 1, str(error.validator))


def _check(schema: Schema, instance: object, what: str, route: str) -> None:
    errors = sorted(
        _validator(schema).iter_errors(instance),
        key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path)), _rank(e)),
    )
    if not errors:
        return
    lines = [f"  {_where(e)}: '{e.validator}' failed: {e.message[:300]}" for e in errors[:10]]
    if len(errors) > 10:
        lines.append(f"  ... and {len(errors) - 10} more")
    keyword = str(errors[0].validator)
    raise ContractError(
        f"{what} violates Venice's contract ('{keyword}'):\n" + "\n".join(lines),
        path=route,
        keyword=keyword,
    )


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(raw: bytes | bytearray | str, what: str, route: str) -> object:
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes | bytearray) else raw
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:  # includes UnicodeDecodeError and JSONDecodeError
        raise ContractError(f"{what} is not valid UTF-8 JSON: {e}", path=route) from e


def validate_request(method: str, path: str, body: object) -> None:
    """Check a request our client sends: ``body`` is the decoded JSON (bytes/str are parsed).

    ``path`` is relative to ``/api/v1`` (a query string is allowed, e.g. ``/models?type=video``).
    GET /models must have no body, and its ``type`` parameter must be one Venice lists.
    """
    endpoint, query = _endpoint(method, path)
    route = endpoint[1]
    what = f"{endpoint[0]} {route} request"
    schema = REQUESTS[endpoint]
    if schema is None:
        if body not in (None, b"", ""):
            raise ContractError(f"{what} must not have a body, got {body!r:.100}", path=route)
        for name, values in query.items():
            if name != "type":
                raise ContractError(f"{what}: undocumented query parameter {name!r}", path=route)
            for value in values:
                if value not in MODEL_TYPE_FILTERS:
                    raise ContractError(
                        f"{what}: 'enum' failed: query type={value!r} is not one of "
                        f"{list(MODEL_TYPE_FILTERS)}",
                        path=route,
                        keyword="enum",
                    )
        return
    if query:
        raise ContractError(f"{what}: Venice documents no query parameters here", path=route)
    if isinstance(body, bytes | bytearray | str):
        body = _parse_json(body, f"{what} body", route)
    _check(schema, body, f"{what} body", route)


def validate_response(method: str, path: str, status: int, content_type: str, body: bytes) -> None:
    """Check an answer Venice (or our simulator) gives.

    The status must be documented for the path or globally (429, 503), the media type (compared
    without parameters such as ``charset``) documented for that status, a JSON body must parse
    and match its schema, and a ``video/mp4`` body must begin with an ``ftyp`` box.
    """
    endpoint, _ = _endpoint(method, path)
    route = endpoint[1]
    what = f"{endpoint[0]} {route} answer {status}"
    statuses = RESPONSES[endpoint]
    if status not in statuses:
        raise ContractError(
            f"{what}: status {status} is not documented for {route} "
            f"(documented: {sorted(statuses)})",
            path=route,
            keyword="status",
        )
    media = (content_type or "").split(";", 1)[0].strip().lower()
    bodies = statuses[status]
    if media not in bodies:
        raise ContractError(
            f"{what}: content type {content_type!r} is not documented (documented: {list(bodies)})",
            path=route,
            keyword="content-type",
        )
    schema = bodies[media]
    raw = body.encode() if isinstance(body, str) else bytes(body)
    if isinstance(schema, _Mp4):
        if len(raw) < 8 or raw[4:8] != b"ftyp":
            raise ContractError(
                f"{what}: {media} body does not start with an MP4 ftyp box "
                f"(first bytes {raw[:12]!r})",
                path=route,
                keyword="ftyp",
            )
        return
    _check(schema, _parse_json(raw, f"{what} body", route), f"{what} body", route)
