"""/docs and /redoc served from this gateway's own files: nothing is loaded from another host.

FastAPI's default pages fetch Swagger UI and ReDoc from a CDN (and ReDoc its fonts from Google),
which leaves a blank page on the closed networks this gateway runs on. The assets come from the
`fastapi-offline` package, which vendors them; the pages are FastAPI's own HTML pointed at them.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from starlette.responses import HTMLResponse, Response

from gateway.errors import GatewayError

ASSETS_URL = "/docs/assets"
# A fixed list, not a directory listing: the URL never names a file outside these four.
_ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "redoc.standalone.js": "text/javascript",
    "favicon.png": "image/png",
}

router = APIRouter(include_in_schema=False)


@cache
def _asset_body(name: str) -> bytes:
    return (files("fastapi_offline") / "static" / name).read_bytes()


@router.get(ASSETS_URL + "/{file}")
async def docs_asset(file: str) -> Response:
    """One of the vendored Swagger UI / ReDoc files."""
    media_type = _ASSET_TYPES.get(file)
    if media_type is None:
        raise GatewayError(404, "No such documentation asset.", code="not_found")
    return Response(
        _asset_body(file),
        media_type=media_type,
        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )


def _asset(request: Request, name: str) -> str:
    return f"{request.scope.get('root_path', '')}{ASSETS_URL}/{name}"


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI for /openapi.json."""
    app: FastAPI = request.app
    return get_swagger_ui_html(
        openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}",
        title=f"{app.title} - API",
        oauth2_redirect_url="/docs/oauth2-redirect",
        swagger_js_url=_asset(request, "swagger-ui-bundle.js"),
        swagger_css_url=_asset(request, "swagger-ui.css"),
        swagger_favicon_url=_asset(request, "favicon.png"),
        # No validator badge: it is an image from validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> HTMLResponse:
    """Swagger UI's OAuth2 redirect page."""
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc for /openapi.json (system fonts: no Google Fonts)."""
    app: FastAPI = request.app
    return get_redoc_html(
        openapi_url=f"{request.scope.get('root_path', '')}{app.openapi_url}",
        title=f"{app.title} - ReDoc",
        redoc_js_url=_asset(request, "redoc.standalone.js"),
        redoc_favicon_url=_asset(request, "favicon.png"),
        with_google_fonts=False,
    )


def install_docs(app: FastAPI) -> None:
    """Serve the documentation pages and their assets."""
    app.include_router(router)
