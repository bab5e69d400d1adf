"""Test doubles shared by the unit tests."""

from __future__ import annotations


class FakeClock:
    """A monotonic clock that only moves when the code under test sleeps.

    Call it for the time; pass ``sleep`` where the code takes an async sleep.
    """

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Engines:
    """Engine tokens for ``ReplayOnEngineDeath``: ``dead`` by their own verdict;
    ``serving`` is the current one."""

    def __init__(self) -> None:
        self.serving = "e1"
        self.dead: set[str] = set()

    def current(self) -> str:
        return self.serving

    def died(self, engine: object) -> bool:
        return engine in self.dead
