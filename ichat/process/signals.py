"""Signal handlers that only record; the worker's loop decides what to do.

Model: uvicorn ``Server.capture_signals`` and gunicorn's arbiter signal queue.
Previous handlers are restored on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def captured_signals(
    loop: asyncio.AbstractEventLoop, received: asyncio.Queue[signal.Signals]
) -> Iterator[None]:
    """While inside, SIGINT/SIGTERM are put on ``received`` and nothing else happens."""
    previous = {sig: signal.getsignal(sig) for sig in HANDLED}
    for sig in HANDLED:
        loop.add_signal_handler(sig, received.put_nowait, sig)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)


async def first_signal(
    received: asyncio.Queue[signal.Signals], check: Callable[[], None], poll: float = 0.2
) -> signal.Signals:
    """The first signal received; meanwhile ``check()`` runs every ``poll`` seconds and
    whatever it raises (a supervised child exited) ends the wait."""
    while True:
        check()
        try:
            return await asyncio.wait_for(received.get(), poll)
        except asyncio.TimeoutError:
            pass
