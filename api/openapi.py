"""``/openapi.json``: OpenAPI 3.1, generated from the routes and their pydantic models."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from api.routes import (
    ERROR_STATUSES,
    MIN_PREFIX_PATH,
    PATH_PARAMETERS,
    REQUEST_ID,
    RESPONSE_HEADERS,
    Header,
    Reply,
    Route,
)
from api.schemas.common import ErrorBody

REF_TEMPLATE = "#/components/schemas/{model}"
SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "buyer": {
        "type": "http",
        "scheme": "bearer",
        "description": "A buyer's API key (POST /admin/buyers shows it once)",
    },
    "seller": {
        "type": "http",
        "scheme": "bearer",
        "description": "A seller's API key (POST /admin/sellers shows it once)",
    },
    "admin": {
        "type": "http",
        "scheme": "bearer",
        "description": "The operator's MEDIAMARKET_ADMIN_TOKEN",
    },
    "job_token": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Job-Token",
        "description": "The job_token a submit returned: this one job only",
    },
}
SCHEME_NAMES = {"buyer": "buyerKey", "seller": "sellerKey", "admin": "adminToken"}


def _scheme(auth: str) -> str:
    return SCHEME_NAMES.get(auth, "jobToken")


def _header_parameter(header: Header) -> dict[str, Any]:
    return {
        "name": header.name,
        "in": "header",
        "required": header.required,
        "description": header.description,
        "schema": dict(header.schema),
    }


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or a value: drop the ``null`` of an optional field."""
    options = schema.get("anyOf")
    if options is None:
        return schema
    rest = [o for o in options if o != {"type": "null"}]
    if len(rest) != 1:
        return schema
    merged = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return {**rest[0], **merged}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    required = set(schema.get("required", []))
    parameters = []
    for name, prop in schema["properties"].items():
        prop = _not_null(dict(prop))
        prop.pop("title", None)
        description = prop.pop("description", None)
        parameter: dict[str, Any] = {
            "name": name,
            "in": "query",
            "required": name in required,
            "schema": prop,
        }
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters


def _path_parameters(route: Route, path: str) -> list[dict[str, Any]]:
    parameters = []
    for name in re.findall(r"{(\w+)}", path):
        schema, description = route.path_parameters.get(name) or PATH_PARAMETERS[name]
        parameters.append(
            {
                "name": name,
                "in": "path",
                "required": True,
                "description": description,
                "schema": dict(schema),
            }
        )
    return parameters


def _response_headers(names: Iterable[str]) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    for name in ("X-Request-Id", *names):
        schema, description = RESPONSE_HEADERS[name]
        headers[name] = {
            "description": description,
            # Every response carries X-Request-Id (SPEC 4); the others when they apply.
            "required": name == "X-Request-Id",
            "schema": schema,
        }
    return headers


class _Schemas:
    """Every model the routes name, as components, referenced by ``$ref``."""

    def __init__(self, routes: list[Route]) -> None:
        wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {
            (ErrorBody, "serialization"): None
        }
        for route in routes:
            if route.body is not None:
                wanted[(route.body, "validation")] = None
            for reply in route.replies.values():
                if reply.model is not None:
                    wanted[(reply.model, "serialization")] = None
        refs, document = models_json_schema(list(wanted), ref_template=REF_TEMPLATE)
        self.refs = refs
        self.components: dict[str, Any] = document.get("$defs", {})

    def ref(self, model: type[BaseModel], mode: JsonSchemaMode) -> dict[str, Any]:
        return dict(self.refs[(model, mode)])


def _reply(schemas: _Schemas, reply: Reply) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": reply.description,
        "headers": _response_headers(reply.headers),
    }
    if reply.model is not None:
        schema = schemas.ref(reply.model, "serialization")
        answer["content"] = {reply.media_type: {"schema": schema}}
    elif reply.schema is not None:
        answer["content"] = {
            media_type: {"schema": dict(reply.schema)}
            for media_type in (reply.media_type, *reply.also)
        }
    return answer


def _operation(schemas: _Schemas, route: Route, path: str, prefixed: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": route.name + ("_with_minimum_discount" if prefixed else ""),
        "summary": route.summary,
        "tags": [route.tag],
    }
    if route.description:
        operation["description"] = route.description
    parameters = _path_parameters(route, path)
    if route.query is not None:
        parameters += _query_parameters(route.query)
    parameters += [_header_parameter(h) for h in (*route.headers, REQUEST_ID)]
    operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": schemas.ref(route.body, "validation")}},
        }
    responses = {str(status): _reply(schemas, reply) for status, reply in route.replies.items()}
    errors = route.error_statuses()
    if prefixed:
        errors[400] = errors.get(400, ERROR_STATUSES[400]) + "; invalid_minimum_discount"
    for status, meaning in sorted(errors.items()):
        responses[str(status)] = {
            "description": meaning,
            "headers": _response_headers(()),
            "content": {"application/json": {"schema": schemas.ref(ErrorBody, "serialization")}},
        }
    operation["responses"] = dict(sorted(responses.items()))
    operation["security"] = [{_scheme(auth): []} for auth in route.auth]
    return operation


def openapi_document(routes: Iterable[Route], *, version: str) -> dict[str, Any]:
    routes = list(routes)
    schemas = _Schemas(routes)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(
            schemas, route, route.path, prefixed=False
        )
        if route.min_prefix:
            path = MIN_PREFIX_PATH + route.path
            paths.setdefault(path, {})[route.method.lower()] = _operation(
                schemas, route, path, prefixed=True
            )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "mediamarket",
            "version": version,
            "description": "An event-sourced marketplace for asynchronous AI video generation. "
            "Amounts are integer USDC microdollars written as decimal strings; every error has "
            'the shape {"error": {"message", "type", "code", "param"}} and every response an '
            "X-Request-Id header.",
        },
        "servers": [{"url": "/"}],
        "tags": [{"name": tag} for tag in dict.fromkeys(route.tag for route in routes)],
        "paths": paths,
        "components": {
            "schemas": schemas.components,
            "securitySchemes": {_scheme(auth): scheme for auth, scheme in SECURITY_SCHEMES.items()},
        },
    }
