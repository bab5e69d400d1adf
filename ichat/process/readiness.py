"""Readiness as a handshake: poll fast at first, back off, fail at once on death."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from ichat.errors import ReadinessTimeoutError


@dataclass(frozen=True)
class Backoff:
    """Poll delays: ``initial`` seconds, growing by ``factor`` up to ``maximum``."""

    initial: float = 0.02
    factor: float = 1.5
    maximum: float = 0.25

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay
            delay = min(delay * self.factor, self.maximum)


async def wait_until_ready(
    probe: Callable[[], Awaitable[bool]],
    *,
    timeout: float,
    check_alive: Callable[[], None],
    backoff: Backoff | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """Return the seconds waited once ``probe()`` is true.

    ``check_alive()`` runs before every probe and raises if the backend died
    meanwhile; that exception propagates at once. After ``timeout`` seconds
    ``ReadinessTimeoutError`` names the timeout.
    """
    start = clock()
    deadline = start + timeout
    for delay in (backoff or Backoff()).delays():
        check_alive()
        if await probe():
            return clock() - start
        remaining = deadline - clock()
        if remaining <= 0:
            raise ReadinessTimeoutError(
                f"the engine was not ready within the readiness timeout of {timeout:g} s"
                " (--ready-timeout)"
            )
        await sleep(min(delay, remaining))
    raise AssertionError("unreachable")  # pragma: no cover


async def wait_answering(
    url: str,
    proc: subprocess.Popen[bytes],
    timeout: float,
    failed: Callable[[str], Exception],
    name: str,
) -> float:
    """Seconds until ``GET url`` answered 200 from the child ``proc`` (a server iChat
    started: the gateway, Prometheus); ``failed(message)`` is raised if ``proc`` exits
    first or ``timeout`` passes."""
    import httpx

    def check_alive() -> None:
        if proc.poll() is not None:
            raise failed(
                f"{name} exited with code {proc.returncode} during start-up (its log above "
                "says why)"
            )

    async with httpx.AsyncClient(timeout=2) as client:

        async def answers() -> bool:
            try:
                return (await client.get(url)).status_code == 200
            except httpx.TransportError:
                return False

        try:
            return await wait_until_ready(
                answers,
                timeout=timeout,
                check_alive=check_alive,
                backoff=Backoff(initial=0.05, factor=1.5, maximum=0.5),
            )
        except ReadinessTimeoutError:
            raise failed(f"{name} did not answer within {timeout:.0f} s") from None
