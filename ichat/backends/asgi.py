"""What iChat's ASGI middleware share: the ASGI types, a request's whole body, a JSON
answer. (Plain ASGI, as uvicorn and Starlette define it; no framework.)"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def whole_body(receive: Receive) -> bytes | None:
    """The request's body, read to its end; None if the client disconnected first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def send_error(send: Send, status: int, kind: str, message: str) -> None:
    """An OpenAI-style JSON error answer (``{"error": {message, type, code}}``)."""
    payload = {"error": {"message": message, "type": kind, "code": status}}
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})
