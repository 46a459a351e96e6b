"""The error shape of SPEC 4 and the exception that carries it to the response."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api.responses import json_response

TYPES = {
    401: "authentication_error",
    402: "insufficient_funds_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        error_type = TYPES.get(self.status) or (
            "api_error" if self.status >= 500 else "invalid_request_error"
        )
        return {
            "error": {
                "message": self.message,
                "type": error_type,
                "code": self.code,
                "param": self.param,
            }
        }

    def response(self) -> web.Response:
        return json_response(self.body(), status=self.status)


def not_found(what: str = "resource") -> ApiError:
    return ApiError(404, "not_found", f"no such {what}")


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, "invalid_request", message, param)
