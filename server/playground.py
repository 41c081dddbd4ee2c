"""GET /steer: the steering playground, a page served by the extension itself, and its two assets.

Everything it loads ships in the package (server/static/): no CDN, no outside fonts, so it works offline.
It talks only to this server's own routes (/v1/...), with the keys typed into it held in the page's memory.
Model text, labels and contexts are put into the page as text nodes only (playground.js); the strict
Content-Security-Policy below is the second wall: no inline script or style, no other origin, no framing.

/steer is outside /v1, so vLLM's --api-key does not guard it: the page holds no data, and every request it
makes goes to /v1 routes, which need the keys as they do for any client."""
from __future__ import annotations

from http import HTTPStatus
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from sae_steer.server.errors import error

router = APIRouter()
STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
ASSETS = {"playground.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}


def _file(name: str, media_type: str) -> Response:
    return Response((STATIC / name).read_bytes(), media_type=media_type, headers=HEADERS)


@router.get("/steer", response_class=Response, responses={200: {"content": {"text/html": {}},
                                                                 "description": "the playground page"}})
async def playground():
    """The steering playground: find a feature, steer with it, compare, look inside, logit lens, build."""
    return _file("playground.html", "text/html; charset=utf-8")


@router.get("/steer/assets/{name}", response_class=Response,
            responses={200: {"content": {"text/javascript": {}, "text/css": {}}}, 404: {"description": "no such asset"}})
async def playground_asset(name: str):
    """The page's script and style sheet (a fixed list: no path from the request reaches the disk)."""
    if name not in ASSETS:
        return error(f"no such playground asset; assets: {sorted(ASSETS)}", "name", HTTPStatus.NOT_FOUND)
    return _file(name, ASSETS[name])
