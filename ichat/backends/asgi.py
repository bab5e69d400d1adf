"""What iChat's ASGI middleware share: the ASGI types, a request's whole body, a JSON
answer, a wait that keeps a stream alive. (Plain ASGI, as uvicorn and Starlette define
it; no framework.)"""

from __future__ import annotations

import asyncio
import json
import time
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


async def wait_keeping_alive(
    ready: Callable[[], Awaitable[bool]],
    timeout: float,
    keepalive: Send | None,
    comment: bytes,
    *,
    poll: float,
    clock: Callable[[], float] = time.monotonic,
) -> bool:
    """Poll ``ready`` every ``poll`` seconds until it holds (True) or ``timeout`` has
    passed (False); a stream waiting (``keepalive``) gets the SSE ``comment`` at once
    and every second, so that neither the client nor a proxy gives up on it."""
    deadline = clock() + timeout
    next_comment = clock()
    while not await ready():
        if clock() >= deadline:
            return False
        if keepalive is not None and clock() >= next_comment:
            await keepalive({"type": "http.response.body", "body": comment, "more_body": True})
            next_comment = clock() + 1.0
        await asyncio.sleep(poll)
    return True
