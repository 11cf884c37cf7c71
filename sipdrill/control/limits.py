"""A request body limit for every control API (ASGI middleware).

An app may allow more on some paths: ``app.state.body_limits`` maps a path to
its limit (the pool's replication batches and user imports). A body over the
limit gets 413 ``{"code": "too-large", "message": ...}`` and is
not read past the limit: a declared Content-Length over it is refused before
any byte is read, and a chunked body as soon as it goes over. The answer never
echoes the body.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: No control request needs more: the largest (a DNS change batch, a user import) is far below.
MAX_BODY = 1024 * 1024


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(send, limit)
            return
        # Read the body first (at most the limit), then hand it to the app: a
        # body cut off halfway through the app's own reading would end in a 500.
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                await self._refuse(send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: a disconnect, when it comes

        await self.app(scope, replay, send)

    def _limit(self, scope: Scope) -> int:
        """The app's own limit for this path (``app.state.body_limits``), else ours."""
        state = getattr(self.app, "state", None)
        limits = getattr(state, "body_limits", None) or {}
        return int(limits.get(scope.get("path", ""), self.max_bytes))

    async def _refuse(self, send: Send, limit: int) -> None:
        body = json.dumps(
            {"code": "too-large", "message": f"the request body is over {limit} bytes"}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
