"""The health monitor: notice a dead engine fast, never mistake a busy one for dead.

The probe is engine-specific and cheap (vLLM: ``engine_client.errored``, SGLang:
are the engine processes alive). It raises ``EngineDiedError`` when the engine is
dead. A probe that takes longer than ``probe_timeout`` is logged as slow and the
monitor goes on: slowness under load is not death. While a slow probe is pending,
the synchronous ``liveness`` check (no I/O: are the engine processes there?) still
runs every ``interval``, so a probe stuck on a dead engine never hides the death.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ichat.errors import EngineDiedError

logger = logging.getLogger("ichat.monitor")


class HealthMonitor:
    def __init__(
        self,
        probe: Callable[[], Awaitable[None]],
        *,
        interval: float,
        probe_timeout: float,
        liveness: Callable[[], None] = lambda: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._probe = probe
        self._interval = interval
        self._probe_timeout = probe_timeout
        self._liveness = liveness
        self._sleep = sleep
        self._clock = clock
        self._wall_clock = wall_clock
        self.checks = 0
        self.slow_probes = 0
        self.detected_at: float | None = None  # monotonic
        self.detected_unix: float | None = None  # wall clock, for metrics
        self.alive_at: float | None = None  # monotonic: the last check the engine passed
        self._stopped = False

    async def run(self) -> None:
        """Probe until the engine is found dead (raise ``EngineDiedError``) or stopped.

        Cancelling the task stops it too, but ``stop()`` is the reliable way: on
        Python 3.11 a cancellation that arrives as a wait completes can be lost."""
        self._stopped = False
        while not self._stopped:
            await self._check_once()
            await self._sleep(self._interval)

    def stop(self) -> None:
        self._stopped = True

    async def _check_once(self) -> None:
        self.checks += 1
        probe = asyncio.ensure_future(self._probe())
        started = self._clock()
        try:
            # asyncio.wait, not wait_for: it neither cancels the probe (a slow probe
            # keeps running) nor, on Python 3.11, swallows a cancellation of this task
            # when the probe ends at the same moment (wait_for then returns the result,
            # and a monitor told to stop would probe on forever).
            try:
                await asyncio.wait({probe}, timeout=self._probe_timeout)
            except asyncio.CancelledError:
                probe.cancel()
                raise
            if probe.done():
                probe.result()
                self.alive_at = self._clock()
            else:
                self.slow_probes += 1
                logger.warning(
                    "engine health probe is slow (> %.1f s): busy, not dead; waiting on",
                    self._probe_timeout,
                )
                await self._wait_slow_probe(probe)
                self.alive_at = self._clock()
        except EngineDiedError:
            self.detected_at = self._clock()
            self.detected_unix = self._wall_clock()
            logger.error(
                "engine death detected (probe started %.3f s earlier)",
                self.detected_at - started,
            )
            raise

    @property
    def detection_window(self) -> float | None:
        """Seconds from the last check the engine passed to the detection of its death:
        the death happened within them, so its detection took at most this long."""
        if self.detected_at is None or self.alive_at is None:
            return None
        return self.detected_at - self.alive_at

    async def _wait_slow_probe(self, probe: asyncio.Future[None]) -> None:
        try:
            while not probe.done():
                self._liveness()
                await asyncio.wait({probe}, timeout=max(self._interval, 0.01))
        except BaseException:  # dead by liveness, or the monitor itself cancelled
            probe.cancel()
            raise
        probe.result()
