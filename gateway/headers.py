"""Security headers on every answer, and the trailing-slash redirect, made safe.

- ``Content-Security-Policy``: scripts and styles from this gateway only (the pages have no
  inline script or style: ``gateway/static/``), images from here, https (Supabase's signed
  links) and the local store's public address; nothing may frame the pages.
- ``Referrer-Policy: no-referrer``: a job page's address carries its token; no image host or
  link target is told it.
- ``X-Content-Type-Options: nosniff`` and ``X-Frame-Options: DENY`` for older browsers.

Starlette's own trailing-slash redirect builds an absolute URL from the ``Host`` header (so
``Host: evil.example`` sent a viewer there); ``/jobs/abc/`` is answered here instead, with a
relative ``Location`` that can never name another host.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def content_security_policy(image_origins: list[str]) -> str:
    images = " ".join(["'self'", "https:", *image_origins])
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        f"img-src {images}; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def origin_of(url: str | None) -> list[str]:
    """The origin of ``LOCAL_STORAGE_PUBLIC_URL``, for img-src; none when unset."""
    if not url:
        return []
    parts = urlsplit(url)
    return [f"{parts.scheme}://{parts.netloc}"] if parts.scheme and parts.netloc else []


class SecurityHeaders:
    def __init__(self, app: ASGIApp, *, image_origins: list[str]) -> None:
        self._app = app
        self._headers = {
            "Content-Security-Policy": content_security_policy(image_origins),
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
            "X-Frame-Options": "DENY",
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in self._headers.items():
                    headers.setdefault(name, value)
            await send(message)

        path = scope["path"]
        if path != "/" and path.endswith("/"):
            await _slash_redirect(scope)(scope, receive, with_headers)
            return
        await self._app(scope, receive, with_headers)


def _slash_redirect(scope: Scope) -> Response:
    """``/jobs/abc/`` → ``/jobs/abc``, path-absolute: never ``//host`` nor ``/\\host``, which
    browsers read as another host."""
    target = "/" + scope["path"].strip("/")
    if "\\" in target or any(ord(ch) < 0x20 for ch in target):
        return JSONResponse({"detail": "not found"}, status_code=404)
    query = scope.get("query_string", b"").decode("latin-1")
    target = quote(target, safe="/-_.~!$&'()*+,;=:@")
    location = f"{target}?{query}" if query else target
    return Response(status_code=307, headers={"Location": location})
