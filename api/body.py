"""Request bodies and query strings read strictly (SPEC 9: hostile input gets a 4xx).

JSON is read as UTF-8 only, with no duplicate keys, no nesting deeper than 32, no lone
surrogates (``"\\ud800"`` is valid JSON text but no Unicode string), no NaN or Infinity and no
numbers that overflow to them; then validated by the route's pydantic model. Each failure is a
400 (415 for a body that is not ``application/json``, 413 past the size limit), raised before
anything is written.
"""

from __future__ import annotations

import json
import math
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from api.errors import ApiError, invalid

M = TypeVar("M", bound=BaseModel)
MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_JSON_DEPTH = 32
JSON_TYPES = ("application/json",)


class _Refused(ValueError):
    """The JSON text is well formed but not acceptable; the message says why."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Refused(f"duplicate key {key[:100]!a} in a JSON object")
        result[key] = value
    return result


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Refused("a number in the request body is too large")
    return value


def _check_tree(value: Any) -> None:
    """Depth and strings, iteratively (a recursive walk is what deep nesting breaks)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise _Refused(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
            if isinstance(item, dict):
                for key in item:
                    _check_text(key)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)


def _check_text(text: str) -> None:
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise _Refused("the request body holds a lone surrogate, which is no text") from None


def decode_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("the request body is not valid UTF-8") from None
    try:
        value = json.loads(
            text, object_pairs_hook=_object, parse_constant=_constant, parse_float=_float
        )
        _check_tree(value)
    except _Refused as e:
        raise invalid(str(e)) from None
    except RecursionError:
        raise invalid(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:
        raise invalid("the request body is not valid JSON") from None
    return value


def _check_content_type(request: web.Request) -> None:
    header = request.headers.get("Content-Type")
    if header is None:
        raise ApiError(415, "unsupported_media_type", "the request body must be application/json")
    media_type, _, params = header.partition(";")
    charset = None
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    if media_type.strip().lower() not in JSON_TYPES or charset not in (None, "utf-8", "utf8"):
        raise ApiError(
            415,
            "unsupported_media_type",
            "the request body must be application/json (UTF-8)",
            "Content-Type",
        )


async def read_json(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise web.HTTPRequestEntityTooLarge(MAX_BODY_BYTES, request.content_length)
    raw = await request.read()
    if not raw:
        raise invalid("request body must be a JSON object")
    _check_content_type(request)
    return decode_json(raw)


def _problem(model: type[BaseModel], field: str) -> str | None:
    problems: dict[str, str] | None = getattr(model, "problems", None)
    return problems.get(field) if problems else None


def parse_model(model: type[M], body: Any, *, where: str = "field") -> M:
    """``body`` validated by ``model``; the first error as a 400 naming the field."""
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        # The top-level field: pydantic appends the member type for a union ("amount_usdc.str").
        param = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":
            message = f"unknown {where} {str(param)[:100]!a}"
        elif first["type"] == "missing":
            message = f"{param} is required"
        elif param is not None and (problem := _problem(model, param)):
            message = problem
        else:
            message = f"{param}: {first['msg']}" if param else first["msg"]
        raise invalid(message, param) from None


async def parse_body(request: web.Request, model: type[M]) -> M:
    return parse_model(model, await read_json(request))


def parse_query(request: web.Request, model: type[M]) -> M:
    values: dict[str, str] = {}
    for name, value in request.query.items():
        if name in values:
            raise invalid(f"query parameter {name[:100]!a} is given more than once", name)
        values[name] = value
    return parse_model(model, values, where="query parameter")
