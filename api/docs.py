"""``/docs``: an interactive reference rendered from ``/openapi.json`` by Swagger UI.

Swagger UI's files come from the ``swagger-ui-py`` package on PyPI (only its static assets are
used), and are served by the engine itself: the page loads nothing from another host, so it
works offline and behind a strict firewall.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from aiohttp import web

from api.errors import not_found
from api.routes import Reply, Route


def _package_dir(name: str) -> Path:
    # Found, not imported: importing swagger_ui pulls in jinja2 and yaml, a tenth of every
    # process's start-up (a server's, and each CLI tool's), for files read only from disk.
    spec = find_spec(name)
    if spec is None or spec.origin is None:
        raise ImportError(f"{name} is not installed")
    return Path(spec.origin).parent


STATIC = _package_dir("swagger_ui") / "static"
# What the page needs, and nothing else of the package: (file, content type).
ASSETS: dict[str, tuple[Path | None, str]] = {
    "swagger-ui.css": (STATIC / "swagger-ui.css", "text/css"),
    "swagger-ui-bundle.js": (STATIC / "swagger-ui-bundle.js", "text/javascript"),
    "swagger-ui-standalone-preset.js": (
        STATIC / "swagger-ui-standalone-preset.js",
        "text/javascript",
    ),
    "favicon-32x32.png": (STATIC / "favicon-32x32.png", "image/png"),
    "init.js": (None, "text/javascript"),
}

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>mediamarket API reference</title>
  <link rel="stylesheet" href="/docs/swagger-ui.css">
  <link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
  <style>body { margin: 0; background: #fafafa; }</style>
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/swagger-ui-bundle.js"></script>
  <script src="/docs/swagger-ui-standalone-preset.js"></script>
  <script src="/docs/init.js"></script>
</body>
</html>
"""

# A file of its own rather than an inline script, so a Content-Security-Policy of 'self' holds.
INIT = """window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    displayRequestDuration: true,
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
    layout: "StandaloneLayout"
  });
};
"""


async def page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html", charset="utf-8")


async def asset(request: web.Request) -> web.StreamResponse:
    found = ASSETS.get(request.match_info["asset"])
    if found is None:
        raise not_found("file")
    path, content_type = found
    if path is None:
        return web.Response(text=INIT, content_type=content_type, charset="utf-8")
    return web.FileResponse(path, headers={"Content-Type": content_type})


DOCS_ROUTES: list[Route] = [
    Route(
        "GET",
        "/docs",
        page,
        name="get_docs",
        summary="This reference, interactive (Swagger UI, served from this engine)",
        tag="meta",
        replies={200: Reply("The page", media_type="text/html", schema={"type": "string"})},
    ),
    Route(
        "GET",
        "/docs/{asset}",
        asset,
        name="get_docs_asset",
        summary="A file of the reference page",
        tag="meta",
        replies={
            200: Reply(
                "The file",
                media_type="text/javascript",
                schema={"type": "string"},
                also=("text/css", "image/png"),
            )
        },
        errors={404: "not_found: no such file"},
        path_parameters={"asset": ({"type": "string", "enum": sorted(ASSETS)}, "A file name")},
    ),
]
