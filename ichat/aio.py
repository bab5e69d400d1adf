"""Waiting for the first of several things, then cancelling the rest; waiting for a
blocking call in a thread of its own.

``asyncio.wait`` with ``FIRST_COMPLETED`` leaves the losers running, and
``asyncio.wait_for`` would cancel the one awaitable it has and, on Python 3.11, may
swallow a cancellation of the caller; this cancels every loser, whatever ends the wait
(a winner, the timeout or the caller's own cancellation)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


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


async def in_a_thread(fn: Callable[[], T], *, name: str, on_abandoned: Callable[[T], None]) -> T:
    """Run the blocking ``fn`` in a daemon thread of its own and await its result.

    The event loop goes on meanwhile. If the waiting task is cancelled first, ``fn``
    still runs to its end (a thread cannot be stopped); what it returns then is handed
    to ``on_abandoned`` on the loop, so that nothing it built is lost."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, exc: BaseException | None) -> None:
        if future.cancelled():
            if exc is None:
                on_abandoned(result)  # type: ignore[arg-type]
        elif exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result, exc = fn(), None
        except BaseException as error:  # handed to the awaiting task
            result, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: exiting
            loop.call_soon_threadsafe(settle, result, exc)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


async def cancelled(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` if it still runs, and wait until it has ended (never raising
    what it raised, nor swallowing a cancellation of the caller)."""
    if task is not None and not task.done():
        task.cancel()
        await asyncio.wait({task})
