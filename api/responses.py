"""JSON answers, written compactly: the form the views store job documents in, so a poll can
send a stored document's text as it is (``api.jobs.job_response``) and every answer looks the
same."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from projections.store import dumps

# The views' own encoder: a stored document's text is what encoding it here would give.
compact_json = dumps


def json_response(
    data: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=compact_json)


def json_text_response(text: str, status: int = 200) -> web.Response:
    """An answer whose JSON is already written (``compact_json``'s form)."""
    return web.Response(text=text, status=status, content_type="application/json")
