"""Signal handlers that only record; the worker's loop decides what to do.

Model: uvicorn ``Server.capture_signals`` and gunicorn's arbiter signal queue.
Previous handlers are restored on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def captured_signals(
    loop: asyncio.AbstractEventLoop,
    received: asyncio.Queue[signal.Signals],
    signals: tuple[signal.Signals, ...] = HANDLED,
) -> Iterator[None]:
    """While inside, ``signals`` (SIGINT/SIGTERM) are put on ``received`` and nothing
    else happens."""
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
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


def forked_children_drop_our_handlers() -> None:
    """Give every process forked from this one (vLLM's engine with its ``fork`` start
    method) the default SIGINT/SIGTERM handling and no event-loop wakeup descriptor.

    Without it a fork inherits the loop's wakeup descriptor (a socket shared with this
    process): a SIGTERM sent to the engine would be written there and read by this
    process's loop as its own SIGTERM. Call once per process (the hook is process-wide)."""
    os.register_at_fork(after_in_child=_drop_handlers_in_child)


def _drop_handlers_in_child() -> None:
    with contextlib.suppress(ValueError):  # not the main thread: nothing was installed
        signal.set_wakeup_fd(-1)
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_DFL)
