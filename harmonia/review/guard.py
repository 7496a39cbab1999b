"""What every response of the review service passes through: a body size limit applied before anything reads the
body (so before authentication: 413), and security headers (a content security policy without inline code or
other origins, nosniff, no framing)."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
     b"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class Guard:
    """ASGI middleware: refuse bodies over `max_body_bytes` (by Content-Length at once, else while streaming) and
    add SECURITY_HEADERS to every HTTP response."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max = max_body_bytes

    async def _reply(self, send: Send, status: int, detail: str) -> None:
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *SECURITY_HEADERS]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                await self._reply(send, 400, "Content-Length is not a number")
                return
            if n > self.max:
                await self._reply(send, 413, f"request body of {n} bytes exceeds the limit of {self.max}")
                return
        seen = 0
        started = refused = False

        async def limited_receive() -> Message:
            nonlocal seen, refused
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max and not refused:
                    # Answer now, then tell the app the client went away (whatever it sends later is dropped:
                    # an exception here would be turned into a 400 by the body parser).
                    refused = True
                    if not started:
                        await self._reply(send, 413, f"request body exceeds the limit of {self.max} bytes")
                    return {"type": "http.disconnect"}
            return msg

        async def secured_send(msg: Message) -> None:
            nonlocal started
            if refused:
                return
            if msg["type"] == "http.response.start":
                started = True
                msg = {**msg, "headers": [*msg.get("headers", []), *SECURITY_HEADERS]}
            await send(msg)

        await self.app(scope, limited_receive, secured_send)


def docs_page(openapi_url: str, title: str) -> str:
    """Swagger UI from the installed swagger-ui-bundle (no CDN), started by a script file (no inline code)."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} - API docs</title>
<link rel="stylesheet" href="/docs-assets/swagger-ui.css"></head>
<body><div id="swagger-ui" data-openapi="{openapi_url}"></div>
<script src="/docs-assets/swagger-ui-bundle.js"></script>
<script src="/static/docs.js"></script></body></html>"""
