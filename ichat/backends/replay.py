"""Requests that a dying engine failed before their first byte are sent again.

With a standby, an engine death costs the worker a fraction of a second, but every
request in flight on the dead engine still fails: a non-streamed one with a 500, a
stream with an error event. Those whose client has not received a byte of the answer
yet -- every non-streamed request, and each stream that had produced nothing -- can be
run again on the engine that serves next, and the client never sees the death.

``ReplayOnEngineDeath`` is ASGI middleware around the engine's own app. For the
generating routes it keeps the request's body, holds the response's start until its
first body message, and when that message is a failure *and* the engine that served
the request is dead (the engine's own verdict), it drops that response, waits until
another engine serves, and runs the request again on it (at most ``max_replays``
times). A request whose answer had begun is passed through untouched: continuing it
token-exactly is a different mechanism. A sampled request runs again from its start:
the client gets a complete answer, drawn anew (the same one with a ``seed``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

logger = logging.getLogger("ichat.replay")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class EngineWatch(Protocol):
    """What the middleware asks of the backend about the engine serving requests."""

    def current(self) -> Any:
        """The engine serving now (an opaque token, compared by identity)."""

    def died(self, engine: Any) -> bool:
        """Whether ``engine`` is dead by its own verdict."""


class ReplayOnEngineDeath:
    def __init__(
        self,
        app: ASGIApp,
        watch: EngineWatch,
        *,
        wait_for_next_engine: float = 10.0,
        max_replays: int = 1,
        paths: frozenset[str] = GENERATING_PATHS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.watch = watch
        self.wait_for_next_engine = wait_for_next_engine
        self.max_replays = max_replays
        self.paths = paths
        self._clock = clock
        self.replayed = 0  # requests run again after an engine death (for tests, logs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        generating = scope["type"] == "http" and scope["method"] == "POST"
        if not (generating and scope["path"] in self.paths):
            await self.app(scope, receive, send)
            return
        body = await _whole_body(receive)
        if body is None:
            return  # the client left while sending it
        for attempt in range(self.max_replays + 1):
            engine = self.watch.current()
            gate = _FirstMessageGate(send, functools.partial(self.watch.died, engine))
            await self.app(scope, _replaying(body, receive), gate.send)
            if not gate.dropped:
                await gate.flush()
                return
            if attempt == self.max_replays or not await self._next_engine(engine):
                await _unavailable(send, "the engine died and no other engine took over")
                return
            self.replayed += 1
            logger.warning(
                "%s failed as the engine died, before any byte reached the client: "
                "sent again to the engine that serves now",
                scope["path"],
            )

    async def _next_engine(self, dead: Any) -> bool:
        deadline = self._clock() + self.wait_for_next_engine
        while self.watch.current() is dead or self.watch.died(self.watch.current()):
            if self._clock() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True


class _FirstMessageGate:
    """Holds the response's start until its first body message; drops the response
    when that message is a failure and the request's engine is dead."""

    def __init__(self, send: Send, engine_died: Callable[[], bool]) -> None:
        self._send = send
        self._engine_died = engine_died
        self._start: Message | None = None
        self.decided = False
        self.dropped = False

    async def send(self, message: Message) -> None:
        if self.dropped:
            return
        if self.decided:
            await self._send(message)
            return
        if message["type"] == "http.response.start":
            self._start = message
            return
        if message["type"] != "http.response.body":
            await self._send(message)
            return
        self.decided = True
        status = self._start["status"] if self._start is not None else 200
        failed = status >= 500 or _is_error_event(message.get("body", b""))
        if failed and self._engine_died():
            self.dropped = True
            return
        if self._start is not None:
            await self._send(self._start)
        await self._send(message)

    async def flush(self) -> None:
        """A response that ended without a body message: its start, as it was."""
        if not self.decided and self._start is not None:
            self.decided = True
            await self._send(self._start)


def _is_error_event(body: bytes) -> bool:
    """A stream's first chunk that is an error event (``data: {"error": ...}``)."""
    text = body.lstrip()
    if not text.startswith(b"data:"):
        return False
    try:
        event = json.loads(text[5:].split(b"\n", 1)[0])
    except ValueError:
        return False
    return isinstance(event, dict) and "error" in event


async def _whole_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """The request's body once, then the client's own messages (its disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _unavailable(send: Send, why: str) -> None:
    payload = json.dumps({"error": {"message": why, "type": "ServiceUnavailable", "code": 503}})
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": payload.encode()})
