"""Waiting for the first of several things, then cancelling the rest.

``asyncio.wait`` with ``FIRST_COMPLETED`` leaves the losers running, and
``asyncio.wait_for`` would cancel the one awaitable it has and, on Python 3.11, may
swallow a cancellation of the caller; this cancels every loser, whatever ends the wait
(a winner, the timeout or the caller's own cancellation)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def first_completed(
    *awaitables: Awaitable[Any], timeout: float | None = None
) -> list[asyncio.Future[Any]]:
    """Wait until one of ``awaitables`` ends (or ``timeout`` passes); cancel the others.

    Returns the futures, in the order given, so the caller can ask which one ended
    (``futures[i].done()``) and take its result."""
    futures: list[asyncio.Future[Any]] = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for future in futures:
            if not future.done():
                future.cancel()
    return futures
