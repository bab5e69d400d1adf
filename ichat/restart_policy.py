"""When to start a fresh backend after its engine died: a pure policy, no sleeping.

``delay = policy.delay(attempt, rand)``: the first restart (after a stable run) is at
once when ``immediate_first`` -- a single death costs no back-off --, later ones grow
exponentially from ``initial`` by ``factor``, capped at ``maximum`` and jittered by
±``jitter`` (a fraction). The
attempt counter resets once a backend stayed up ``stable_after`` seconds; more than
``max_crashes`` crashes within ``crash_window`` seconds is a crash loop: give up.
Models: tenacity ``wait_exponential_jitter``, gunicorn's worker boot limits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    initial: float = 1.0
    factor: float = 2.0
    maximum: float = 30.0
    jitter: float = 0.1
    stable_after: float = 60.0
    max_crashes: int = 5
    crash_window: float = 600.0
    immediate_first: bool = True

    def delay(self, attempt: int, rand: float) -> float:
        """Seconds to wait before restart ``attempt`` (0-based); ``rand`` in [0, 1)."""
        if self.immediate_first:
            if attempt == 0:
                return 0.0
            attempt -= 1
        base = min(self.initial * self.factor**attempt, self.maximum)
        return min(base * (1 + self.jitter * (2 * rand - 1)), self.maximum)


@dataclass(frozen=True)
class Restart:
    delay: float
    attempt: int


@dataclass(frozen=True)
class GiveUp:
    crashes: int
    window: float


@dataclass
class CrashHistory:
    """Feeds crashes to the policy and says what to do next."""

    policy: RestartPolicy
    attempt: int = 0
    crash_times: deque[float] = field(default_factory=deque)

    def record(self, now: float, uptime: float, rand: float) -> Restart | GiveUp:
        if uptime >= self.policy.stable_after:
            self.attempt = 0
        self.crash_times.append(now)
        while self.crash_times and now - self.crash_times[0] > self.policy.crash_window:
            self.crash_times.popleft()
        if len(self.crash_times) > self.policy.max_crashes:
            return GiveUp(len(self.crash_times), self.policy.crash_window)
        decision = Restart(self.policy.delay(self.attempt, rand), self.attempt)
        self.attempt += 1
        return decision
