from __future__ import annotations

import asyncio

import pytest

from ichat.backends.monitor import HealthMonitor
from ichat.errors import EngineDiedError


class Stop(Exception):
    pass


def run_monitor(probe, *, rounds: int, probe_timeout: float = 5.0) -> HealthMonitor:  # type: ignore[no-untyped-def]
    """Run the monitor with a fake sleep that ends the loop after ``rounds`` sleeps."""
    slept = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) >= rounds:
            raise Stop

    monitor = HealthMonitor(probe, interval=0.1, probe_timeout=probe_timeout, sleep=sleep)

    async def main() -> None:
        await monitor.run()

    with pytest.raises(Stop):
        asyncio.run(main())
    assert slept == [0.1] * rounds
    return monitor


def test_healthy_engine_is_checked_every_interval_and_never_declared_dead() -> None:
    async def alive() -> None:
        return None

    monitor = run_monitor(alive, rounds=50)
    assert monitor.checks == 50 and monitor.detected_at is None


def test_a_slow_probe_is_busy_not_dead() -> None:
    async def slow() -> None:
        await asyncio.sleep(0.05)  # longer than the probe timeout below

    monitor = run_monitor(slow, rounds=3, probe_timeout=0.01)
    assert monitor.slow_probes == 3
    assert monitor.detected_at is None


def test_death_is_raised_with_its_detection_time() -> None:
    n = 0

    async def dies_on_third_check() -> None:
        nonlocal n
        n += 1
        if n == 3:
            raise EngineDiedError("gone")

    monitor = HealthMonitor(
        dies_on_third_check, interval=0.0, probe_timeout=1.0, wall_clock=lambda: 1234.5
    )
    with pytest.raises(EngineDiedError, match="gone"):
        asyncio.run(monitor.run())
    assert monitor.checks == 3 and monitor.detected_at is not None
    assert monitor.detected_unix == 1234.5


def test_death_reported_by_a_slow_probe_still_counts() -> None:
    async def slow_then_dead() -> None:
        await asyncio.sleep(0.03)
        raise EngineDiedError("gone late")

    monitor = HealthMonitor(slow_then_dead, interval=0.0, probe_timeout=0.01)
    with pytest.raises(EngineDiedError, match="gone late"):
        asyncio.run(monitor.run())
    assert monitor.slow_probes == 1 and monitor.detected_at is not None


def test_a_probe_stuck_on_a_dead_engine_does_not_hide_the_death() -> None:
    cancelled = asyncio.Event()
    liveness_calls = 0

    async def stuck_forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    def processes_gone_on_third_look() -> None:
        nonlocal liveness_calls
        liveness_calls += 1
        if liveness_calls == 3:
            raise EngineDiedError("engine process 42 exited")

    monitor = HealthMonitor(
        stuck_forever,
        interval=0.01,
        probe_timeout=0.01,
        liveness=processes_gone_on_third_look,
    )

    async def main() -> None:
        with pytest.raises(EngineDiedError, match="42 exited"):
            await asyncio.wait_for(monitor.run(), 5)
        await asyncio.wait_for(cancelled.wait(), 1)  # the stuck probe is not left behind

    asyncio.run(main())
    assert monitor.slow_probes == 1 and liveness_calls == 3
    assert monitor.detected_at is not None


def test_stop_ends_the_monitor_even_if_a_cancellation_was_lost() -> None:
    async def alive() -> None:
        return None

    monitor = HealthMonitor(alive, interval=0.01, probe_timeout=1.0)

    async def main() -> None:
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.05)
        monitor.stop()  # no cancel() at all: the loop itself must notice
        await asyncio.wait_for(task, 1)

    asyncio.run(main())
    assert monitor.checks >= 2 and monitor.detected_at is None


def test_the_detection_window_runs_from_the_last_passed_check_to_the_detection() -> None:
    """The death happened after the last check the engine passed: its detection took at
    most the time from that check to the detection."""
    n, now = 0, 0.0

    def clock() -> float:
        nonlocal now
        now += 1.0
        return now

    async def dies_on_third_check() -> None:
        nonlocal n
        n += 1
        if n == 3:
            raise EngineDiedError("gone")

    monitor = HealthMonitor(dies_on_third_check, interval=0.0, probe_timeout=1.0, clock=clock)
    assert monitor.detection_window is None
    with pytest.raises(EngineDiedError):
        asyncio.run(monitor.run())
    # clock: check 1 starts 1, passes 2; check 2 starts 3, passes 4; check 3 starts 5,
    # the death is detected at 6
    assert (monitor.alive_at, monitor.detected_at, monitor.detection_window) == (4.0, 6.0, 2.0)
