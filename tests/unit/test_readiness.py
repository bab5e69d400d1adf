from __future__ import annotations

import asyncio
import itertools

import pytest

from ichat.errors import EngineDiedError, ReadinessTimeoutError
from ichat.process.readiness import Backoff, wait_until_ready
from tests.unit.fakes import FakeClock


def test_backoff_starts_fast_grows_and_is_capped() -> None:
    delays = list(itertools.islice(Backoff(initial=0.02, factor=2, maximum=0.25).delays(), 7))
    assert delays == [0.02, 0.04, 0.08, 0.16, 0.25, 0.25, 0.25]


def test_default_backoff_keeps_ready_detection_within_half_a_second() -> None:
    assert Backoff().initial <= 0.05
    assert Backoff().maximum <= 0.5


def test_returns_as_soon_as_the_probe_succeeds() -> None:
    t = FakeClock(start=0.0)
    answers = iter([False, False, False, True])

    async def probe() -> bool:
        return next(answers)

    waited = asyncio.run(
        wait_until_ready(
            probe,
            timeout=10,
            check_alive=lambda: None,
            backoff=Backoff(0.02, 2, 1),
            sleep=t.sleep,
            clock=t,
        )
    )
    assert t.sleeps == [0.02, 0.04, 0.08]
    assert waited == pytest.approx(0.14)


def test_raises_at_once_when_the_backend_died_meanwhile() -> None:
    t = FakeClock(start=0.0)
    calls = []

    async def probe() -> bool:
        calls.append(1)
        return False

    def check_alive() -> None:
        if len(calls) == 2:
            raise EngineDiedError("engine gone")

    with pytest.raises(EngineDiedError, match="engine gone"):
        asyncio.run(
            wait_until_ready(probe, timeout=1000, check_alive=check_alive, sleep=t.sleep, clock=t)
        )
    assert len(calls) == 2 and t.now < 0.1


def test_timeout_names_the_timeout_and_never_oversleeps() -> None:
    t = FakeClock(start=0.0)

    async def probe() -> bool:
        return False

    with pytest.raises(ReadinessTimeoutError, match=r"readiness timeout of 3 s"):
        asyncio.run(
            wait_until_ready(probe, timeout=3, check_alive=lambda: None, sleep=t.sleep, clock=t)
        )
    assert t.now == pytest.approx(3.0)
