from __future__ import annotations

import pytest

from ichat.restart_policy import CrashHistory, GiveUp, Restart, RestartPolicy

NO_JITTER = 0.5  # rand=0.5 puts the jitter factor at exactly 1


def test_delay_grows_exponentially_and_is_capped() -> None:
    policy = RestartPolicy(initial=1, factor=2, immediate_first=False, maximum=30, jitter=0.1)
    assert [policy.delay(a, NO_JITTER) for a in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_the_first_restart_is_at_once_then_the_back_off_grows() -> None:
    policy = RestartPolicy(initial=1, factor=2, maximum=30, jitter=0.1)
    assert [policy.delay(a, NO_JITTER) for a in range(7)] == [0, 1, 2, 4, 8, 16, 30]
    assert policy.delay(0, 0.999999) == 0  # no jitter on "at once"
    history = CrashHistory(RestartPolicy(stable_after=60, max_crashes=99))
    assert history.record(now=0, uptime=1, rand=NO_JITTER) == Restart(0, 0)
    assert history.record(now=5, uptime=1, rand=NO_JITTER) == Restart(1, 1)
    assert history.record(now=100, uptime=61, rand=NO_JITTER) == Restart(0, 0)


def test_jitter_stays_within_its_fraction_and_under_the_cap() -> None:
    policy = RestartPolicy(initial=10, factor=2, maximum=30, jitter=0.1, immediate_first=False)
    assert policy.delay(0, 0.0) == pytest.approx(9.0)
    assert policy.delay(0, 0.999999) == pytest.approx(11.0, abs=1e-4)
    assert policy.delay(5, 0.999999) == 30  # jitter never exceeds the cap


def test_attempts_reset_after_a_stable_uptime() -> None:
    history = CrashHistory(
        RestartPolicy(initial=1, factor=2, immediate_first=False, stable_after=60, max_crashes=99)
    )
    assert history.record(now=0, uptime=1, rand=NO_JITTER) == Restart(1, 0)
    assert history.record(now=5, uptime=1, rand=NO_JITTER) == Restart(2, 1)
    assert history.record(now=10, uptime=1, rand=NO_JITTER) == Restart(4, 2)
    assert history.record(now=100, uptime=61, rand=NO_JITTER) == Restart(1, 0)


def test_crash_loop_cap_within_the_window() -> None:
    history = CrashHistory(RestartPolicy(max_crashes=3, crash_window=100))
    for t in (0, 10, 20):
        assert isinstance(history.record(now=t, uptime=0, rand=NO_JITTER), Restart)
    assert history.record(now=30, uptime=0, rand=NO_JITTER) == GiveUp(4, 100)


def test_old_crashes_leave_the_window() -> None:
    history = CrashHistory(RestartPolicy(max_crashes=2, crash_window=100))
    for t in (0, 50, 160, 210):
        assert isinstance(history.record(now=t, uptime=0, rand=NO_JITTER), Restart)
    assert list(history.crash_times) == [160, 210]
