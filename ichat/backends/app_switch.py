"""``AppSwitch``: the HTTP server's ASGI app, which a reload points at a new engine app.

A reload builds a new engine and a new app for it (its flags may change the app's
routes and middleware: API keys, CORS, served model names) while the old one serves.
The server keeps its socket and its connections; the switch sends every request that
arrives from then on to the new app, while each request already in an app finishes
there. The old app is retired once its last request has ended (or at the deadline).

Each app's lifespan (vLLM's: its periodic stats logging, the garbage-collector freeze)
runs from its installation to its retirement, not the server's: the switch answers
the server's own lifespan messages itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from ichat.backends.asgi import ASGIApp, Receive, Scope, Send

logger = logging.getLogger("ichat.switch")


class InstalledApp:
    """One engine app behind the switch: what serves (``asgi``, the app or middleware
    around it), the app whose lifespan runs, and its requests in flight."""

    def __init__(self, asgi: ASGIApp, app: Any) -> None:
        self.asgi = asgi
        self.app = app
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._lifespan = contextlib.AsyncExitStack()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def start_lifespan(self) -> None:
        """Run the app's lifespan start-up (a Starlette app: its ``router``'s)."""
        router = getattr(self.app, "router", None)
        context = getattr(router, "lifespan_context", None)
        if context is not None:
            await self._lifespan.enter_async_context(context(self.app))

    async def end_lifespan(self) -> None:
        await self._lifespan.aclose()

    async def idle(self, timeout: float) -> bool:
        """Wait at most ``timeout`` for its last request to end; whether it did."""
        waiter = asyncio.ensure_future(self._idle.wait())
        try:
            await asyncio.wait({waiter}, timeout=max(timeout, 0.0))
        finally:
            waiter.cancel()
        return self._idle.is_set()


class AppSwitch:
    def __init__(self, first: InstalledApp) -> None:
        self.serving = first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan_of_the_server(receive, send)
            return
        installed = self.serving
        installed.enter()
        try:
            await installed.asgi(scope, receive, send)
        finally:
            installed.leave()

    def switch_to(self, new: InstalledApp) -> InstalledApp:
        """New requests go to ``new`` from now on; return the app that served before."""
        old, self.serving = self.serving, new
        return old


async def _lifespan_of_the_server(receive: Receive, send: Send) -> None:
    """Answer the server's start-up and shutdown: the apps' own lifespans run from
    their installation to their retirement (``InstalledApp``)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
