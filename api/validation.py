"""The submit body (SPEC 4.1) at the API edge: its pydantic model, and its errors in SPEC's codes.

``SubmitBody`` is both the validator and, through its JSON schema, the request body of
``POST /v1/video/generations`` in ``/openapi.json``. What it checks is the shape of the request
and every rule that needs no catalog (types, unknown fields, URL forms, metadata limits, the
ceiling's spelling); the model's own constraints are the domain's (``VideoRequest.on_model``),
and this module only names the error code each broken rule answers with.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from api.errors import ApiError
from domain.catalog import (
    MAX_PROMPT_CHARS,
    Catalog,
    MissingParameter,
    ModelConstraintError,
    PromptTooLong,
    VideoRequest,
)

MAX_URL_CHARS = 2048
MAX_METADATA_KEYS = 16
MAX_METADATA_KEY_CHARS = 40
MAX_METADATA_VALUE_CHARS = 500
# Integers beyond 2**53 lose precision in JavaScript clients, so they could not be echoed intact.
MAX_METADATA_INT = 2**53 - 1
# A buyer's own ceiling (max_cost_usdc): as large as any deposit may be.
MAX_CEILING_USDC = 10**15
# Canonical ASCII decimals from 0 to 10**15: no sign, no leading zero, no other digits.
CEILING_PATTERN = r"^(0|[1-9][0-9]{0,14}|1000000000000000)$"

_DATA_IMAGE_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+(;[^,]*)?,.+", re.ASCII | re.DOTALL)
# Hosts such as "127.1", "2130706433" or "0x7f.0.0.1" are not DNS names (no TLD is numeric),
# yet many resolvers read them as IPv4 addresses; they are refused rather than guessed at.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*", re.ASCII | re.IGNORECASE)


class RequestError(ApiError):
    """A submit SPEC 4.1 refuses: 404 for a model that does not exist, 400 for the rest."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(404 if code == "model_not_found" else 400, code, message, param)

    def __repr__(self) -> str:
        return f"RequestError(code={self.code!r}, param={self.param!r}, message={self.message!r})"


def _invalid(param: str | None, message: str) -> RequestError:
    return RequestError("invalid_request", message, param)


def _refuse(message: str) -> PydanticCustomError:
    """A rule of this module broken: the message is the one the client sees."""
    return PydanticCustomError("request", "{message}", {"message": message})


# ---------------------------------------------------------------------- URL forms


def check_image_url(url: str) -> None:
    if url[:5].lower() == "data:":
        if not _DATA_IMAGE_URL.fullmatch(url):
            raise _refuse("image_url must be a data:image/...;base64,... URL")
        return
    if len(url) > MAX_URL_CHARS:
        raise _refuse(f"image_url must be at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (urlsplit only checks the port when it is read)
    except ValueError:
        raise _refuse("image_url is not a valid URL") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _refuse("image_url must be an http(s) or data: URL")


def _host_is_private(host: str) -> bool:
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_global or address.is_multicast


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return False
    return True


def check_webhook_url(url: str, *, allow_http: bool, allow_private: bool) -> None:
    """The URL as written. Its name is resolved and its addresses checked at send time, by the
    outbound policy (SPEC 9): a name can change what it points to after the submit."""
    if len(url) > MAX_URL_CHARS:
        raise _refuse(f"webhook_url must be at most {MAX_URL_CHARS} characters")
    try:
        parts: SplitResult = urlsplit(url)
        parts.port  # noqa: B018  (urlsplit only checks the port when it is read)
    except ValueError:
        raise _refuse("webhook_url is not a valid URL") from None
    allowed = ("https", "http") if allow_http else ("https",)
    if parts.scheme.lower() not in allowed:
        raise _refuse(
            "webhook_url must be an http(s) URL" if allow_http else "webhook_url must be https"
        )
    host = parts.hostname
    if not host:
        raise _refuse("webhook_url must name a host")
    last_label = host.rstrip(".").rsplit(".", 1)[-1]
    if not _is_ip_literal(host) and _NUMERIC_LABEL.fullmatch(last_label):
        raise _refuse("webhook_url host must be a domain name or a standard IP address")
    if not allow_private and _host_is_private(host):
        raise _refuse("webhook_url must not point to a private or local address")


# ---------------------------------------------------------------------- the body


def _not_an_int(value: object) -> object:
    # Strict floats take ints, which would let 2**53 slip past the integers' bound.
    if isinstance(value, int):
        raise ValueError("an integer is not a float here")
    return value


MetadataKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_METADATA_KEY_CHARS)]
MetadataValue = (
    Annotated[StrictStr, StringConstraints(max_length=MAX_METADATA_VALUE_CHARS)]
    | Annotated[StrictInt, Field(ge=-MAX_METADATA_INT, le=MAX_METADATA_INT)]
    | Annotated[StrictFloat, AllowInfNan(False), BeforeValidator(_not_an_int)]
    | StrictBool
    | None
)
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=MAX_METADATA_KEYS)]


class SubmitBody(BaseModel):
    """``POST /v1/video/generations``. An optional field sent as ``null`` counts as omitted, as
    SDKs commonly send unset fields that way."""

    model_config = ConfigDict(extra="forbid", strict=True, title="SubmitRequest")

    model: StrictStr = Field(
        description="A catalog model id or alias (GET /v1/models)",
        examples=["venice-video-gen"],
    )
    prompt: Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)] = (
        Field(
            description="What to generate; a model may take fewer characters (GET /v1/models)",
            examples=["a lighthouse at dusk"],
        )
    )
    duration_seconds: StrictInt | None = Field(
        default=None, description="One of the model's durations; omitted: the cheapest"
    )
    image_url: StrictStr | None = Field(
        default=None,
        description="An http(s) or data:image URL; required by image-to-video models only",
    )
    resolution: StrictStr | None = Field(
        default=None, description="One of the model's resolutions; omitted: the lowest"
    )
    aspect_ratio: StrictStr | None = Field(
        default=None, description="One of the model's aspect ratios; omitted: 16:9"
    )
    audio: StrictBool | None = Field(
        default=None, description="Audio, for models that generate it; omitted: off if it can be"
    )
    webhook_url: Annotated[StrictStr, StringConstraints(max_length=MAX_URL_CHARS)] | None = Field(
        default=None, description="An https URL told when the job ends; not a private address"
    )
    metadata: Metadata | None = Field(
        default=None, description="Echoed back: at most 16 keys of scalar values"
    )
    max_cost_usdc: Annotated[StrictStr, StringConstraints(pattern=CEILING_PATTERN)] | None = Field(
        default=None,
        description="Your own ceiling in microdollars, at least the estimate: becomes the hold",
        examples=["250000"],
    )

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise _refuse("prompt must not be empty")
        return prompt

    @field_validator("image_url")
    @classmethod
    def _image_url(cls, url: str | None) -> str | None:
        if url is not None:
            check_image_url(url)
        return url

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url(cls, url: str | None, info: ValidationInfo) -> str | None:
        if url is not None:
            flags = info.context or {}
            check_webhook_url(
                url,
                allow_http=flags.get("allow_http_webhooks", False),
                allow_private=flags.get("allow_private_webhooks", False),
            )
        return url


FIELD_TYPES = {
    "model": "a string",
    "prompt": "a string",
    "duration_seconds": "an integer",
    "image_url": "a string",
    "resolution": "a string",
    "aspect_ratio": "a string",
    "audio": "a boolean",
    "webhook_url": "a string",
    "metadata": "an object",
    "max_cost_usdc": "a decimal string of microdollars",
}
_TYPE_ERRORS = {"string_type", "int_type", "bool_type", "dict_type", "model_type"}


def _rank(error: ErrorDetails) -> int:
    """Shape first (unknown fields, types, required fields), then values: the error a client
    sees first is the most basic thing wrong."""
    kind, loc = error["type"], error["loc"]
    if kind == "extra_forbidden":
        return 0
    if kind in _TYPE_ERRORS and len(loc) == 1:
        return 1
    if kind == "missing":
        return 2
    return 3


def _metadata_message(errors: list[ErrorDetails]) -> str:
    first = errors[0]
    if len(first["loc"]) == 1:
        return f"metadata must have at most {MAX_METADATA_KEYS} keys"
    if first["loc"][-1] == "[key]":
        return f"metadata keys must be strings of 1 to {MAX_METADATA_KEY_CHARS} characters"
    key = ascii(str(first["loc"][1])[:MAX_METADATA_KEY_CHARS])
    kinds = {e["type"] for e in errors if e["loc"][:2] == first["loc"][:2]}
    if "string_too_long" in kinds:
        return f"metadata value for {key} must be at most {MAX_METADATA_VALUE_CHARS} characters"
    if kinds & {"less_than_equal", "greater_than_equal"}:
        return f"metadata value for {key} is too large"
    if "finite_number" in kinds:
        return f"metadata value for {key} must be finite"
    return f"metadata value for {key} must be a string, number, boolean or null"


def _message(name: str, error: ErrorDetails, errors: list[ErrorDetails]) -> RequestError:
    kind = error["type"]
    if kind == "extra_forbidden":
        return _invalid(name, f"unknown field {name[:100]!a}")
    if kind == "missing":
        return _invalid(name, f"{name} is required")
    if kind in _TYPE_ERRORS and len(error["loc"]) == 1:
        return _invalid(name, f"{name} must be {FIELD_TYPES[name]}")
    if kind == "request":
        return _invalid(name, str((error.get("ctx") or {})["message"]))
    if name == "prompt" and kind == "string_too_long":
        limit = MAX_PROMPT_CHARS
        return RequestError("prompt_too_long", f"prompt must be at most {limit} characters", name)
    if name == "prompt":
        return _invalid(name, "prompt must not be empty")
    if name == "metadata":
        return _invalid(name, _metadata_message([e for e in errors if e["loc"][0] == name]))
    if name == "max_cost_usdc":
        return _invalid(
            name,
            "max_cost_usdc must be a whole number of microdollars written as a decimal string "
            f'such as "250000", at most {MAX_CEILING_USDC}',
        )
    return _invalid(name, f"{name} is not valid: {error['msg']}")


def parse_submit(
    body: object, *, allow_http_webhooks: bool, allow_private_webhooks: bool
) -> SubmitBody:
    if not isinstance(body, dict):
        raise _invalid(None, "request body must be a JSON object")
    context = {
        "allow_http_webhooks": allow_http_webhooks,
        "allow_private_webhooks": allow_private_webhooks,
    }
    try:
        return SubmitBody.model_validate(body, context=context)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = min(errors, key=_rank)
        raise _message(str(first["loc"][0]), first, errors) from None


def validate_video_request(
    body: object,
    catalog: Catalog,
    *,
    allow_http_webhooks: bool,
    allow_private_webhooks: bool,
) -> VideoRequest:
    """A submit body checked against SPEC 4.1 and the model's constraints, defaults applied."""
    submit = parse_submit(
        body,
        allow_http_webhooks=allow_http_webhooks,
        allow_private_webhooks=allow_private_webhooks,
    )
    model = catalog.resolve(submit.model)
    if model is None:
        raise RequestError(
            "model_not_found", f"model {submit.model[:200]!a} does not exist", "model"
        )
    try:
        return VideoRequest.on_model(
            model,
            prompt=submit.prompt,
            duration_seconds=submit.duration_seconds,
            resolution=submit.resolution,
            aspect_ratio=submit.aspect_ratio,
            audio=submit.audio,
            image_url=submit.image_url,
            webhook_url=submit.webhook_url,
            metadata=submit.metadata,
            max_cost=None if submit.max_cost_usdc is None else int(submit.max_cost_usdc),
        )
    except PromptTooLong as e:
        raise RequestError("prompt_too_long", e.message, e.param) from None
    except MissingParameter as e:
        raise RequestError("invalid_request", e.message, e.param) from None
    except ModelConstraintError as e:
        raise RequestError("unsupported_parameter", e.message, e.param) from None
