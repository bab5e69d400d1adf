"""uvicorn, served on our pre-bound socket, with its signal handling off.

iChat owns SIGINT/SIGTERM (the worker's loop decides what a signal means), so the
server never installs handlers; ``should_exit`` / ``force_exit`` are its shutdown
switches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any

import uvicorn


class NoSignalServer(uvicorn.Server):
    """A ``uvicorn.Server`` that leaves process signals alone."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        return None

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:  # uvicorn >= 0.29
        yield


def graceful_shutdown_seconds(drain_timeout: float) -> int:
    """uvicorn's bound on a graceful shutdown: whole seconds, at least one."""
    return max(1, round(drain_timeout))


def make_server(app: Any, *, drain_timeout: float, **options: Any) -> NoSignalServer:
    """Build the server; ``options`` are further ``uvicorn.Config`` settings."""
    config = uvicorn.Config(
        app, timeout_graceful_shutdown=graceful_shutdown_seconds(drain_timeout), **options
    )
    return NoSignalServer(config)
