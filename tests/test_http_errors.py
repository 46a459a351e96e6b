"""The API's error shape for failures a handler does not answer itself (``request_context``)."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api.http import STARTUP, Startup, request_context
from services.commands import ConflictError


async def test_a_command_that_lost_every_try_to_contention_answers_503_to_retry() -> None:
    """``ConflictError`` (a command's conflicts outlasted its retries; nothing was written) is
    a transient 503 with ``Retry-After``, in SPEC's error shape, not a 500."""

    async def contended(request: web.Request) -> web.Response:
        raise ConflictError("too much contention; try again")

    app = web.Application(middlewares=[request_context])
    app[STARTUP] = Startup()
    app.router.add_post("/v1/video/generations", contended)
    async with TestClient(TestServer(app)) as client:
        response = await client.post("/v1/video/generations", json={})
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        body = await response.json()
        assert body["error"]["code"] == "contention"
        assert set(body["error"]) >= {"code", "message"}
