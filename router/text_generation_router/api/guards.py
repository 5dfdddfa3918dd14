"""The checks every request passes before a route sees it: the API key and the body size limit.

Both are plain ASGI middleware, so they act on the headers alone: a refused request is never routed, and a
body larger than the limit is never read past the limit.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# TGI protects the routes that generate or tokenize; health, info, metrics and the model list stay open
# (Prometheus keeps scraping /metrics without the key).
PROTECTED_ROUTES = frozenset(
    {
        ("POST", "/"),
        ("POST", "/generate"),
        ("POST", "/generate_stream"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/tokenize"),
        ("POST", "/chat_tokenize"),
    }
)


async def _answer(send: Send, status: int, body: bytes = b"", content_type: bytes = b"text/plain") -> None:
    headers = [(b"content-length", str(len(body)).encode())]
    if body:
        headers.append((b"content-type", content_type))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class ApiKeyGuard:
    """401 with an empty body (TGI's answer) for a protected route without `Authorization: Bearer <key>`.
    The scheme is matched case-insensitively, the key exactly (in constant time)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = api_key.encode()

    def _authorized(self, scope: Scope) -> bool:
        value = _header(scope, b"authorization") or b""
        scheme, _, key = value.partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(key.strip(), self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        protected = scope["type"] == "http" and (scope["method"], scope["path"]) in PROTECTED_ROUTES
        if protected and not self._authorized(scope):
            await _answer(send, 401)
            return
        await self.app(scope, receive, send)


class PayloadLimit:
    """413 for a request body over `limit` bytes: at once when Content-Length says so, else as soon as the
    streamed body passes the limit (the app is then not called). Bodies within the limit are handed on
    unchanged."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _answer(send, 400, b"invalid Content-Length")
                return
            if int(declared) > self.limit:
                await _answer(send, 413, self._message())
                return
            await self.app(scope, receive, send)
            return
        # no Content-Length (a chunked body): read it here, never more than the limit
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await _answer(send, 413, self._message())
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def _message(self) -> bytes:
        return f"the request body is larger than the payload limit of {self.limit} bytes (--payload-limit)".encode()
