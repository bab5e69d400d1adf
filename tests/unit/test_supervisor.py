"""Every branch of the supervisor with scripted backends: no engine, no real sleeping."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from ichat.backends.compat import Workarounds
from ichat.backends.failover import Failover, Standby, StandbyReport
from ichat.backends.reloaded import Reloaded, ReloadMethod
from ichat.config import WorkerConfig
from ichat.errors import (
    CrashLoopError,
    EngineDiedError,
    ReloadError,
    RestartToReload,
    StartupError,
)
from ichat.restart_policy import RestartPolicy
from ichat.worker.supervisor import Supervisor, WorkerState
from tests.unit.fakes import FakeClock


class ScriptedBackend:
    """Does what its script says: 'boot-fail', 'die', 'serve' (until stopped), 'hang',
    'failover' (its engine dies ``failovers`` times, a standby serving each time)."""

    failovers = 0
    # "die-relaying": its dead engine's HTTP server still relays what it cut to the next
    # engine (a real backend's ``relays_to_the_restart``): a task the supervisor keeps
    detached_server: asyncio.Task[None] | None = None

    def __init__(
        self, script: str, clock: FakeClock, uptime: float = 1.0, cleanup_s: float = 0.0
    ) -> None:
        self.script = script
        self.clock = clock
        self.uptime = uptime
        self.cleanup_s = cleanup_s
        self.backend_ready_event = asyncio.Event()
        self.engine_dead_event = asyncio.Event()
        self.log: list[str] = []
        self.phase_seconds = {"engine_start": 1.0}
        self.workarounds = Workarounds("scripted", ())
        self.monitor = None
        self._stopped = asyncio.Event()
        self.stop_calls: list[bool] = []
        self.on_cleanup: Any = None  # called where the real backend cleans up after a death
        self.on_failover: Any = None  # set by the supervisor
        self.on_standby: Any = None
        self.backend_argv = ["--model", "scripted"]
        self.framework_args = WorkerConfig()
        self.reloads: list[list[str]] = []
        self.reload_error: ReloadError | None = None  # what the next reload raises

    async def run(self) -> None:
        if self.script == "boot-fail":
            raise StartupError("model cannot load")
        if self.script == "hang":
            await self._stopped.wait()
            return
        self.backend_ready_event.set()
        await asyncio.sleep(0)  # let the supervisor see the ready event
        self.clock.now += self.uptime
        if self.script == "die-relaying":
            self.relay = asyncio.Event()
            self.detached_server = asyncio.create_task(self.relay.wait())
            self.script = "die"
        if self.script == "die":
            self.engine_dead_event.set()  # detected...
            await asyncio.sleep(0)
            self.log.append("cleanup")  # ...then the slow cleanup
            self.clock.now += self.cleanup_s
            if self.on_cleanup is not None:
                self.on_cleanup()
            raise EngineDiedError("engine died")
        if self.script == "failover":
            for i in range(self.failovers):
                if self._stopped.is_set():
                    break
                self.on_standby(StandbyReport(Standby.READY, None, {"active": [i], "standby": [9]}))
                self.clock.now += self.uptime
                self.on_failover(
                    Failover("engine died", 1000.0 + i, 0.25, {"failover_switch": 0.01})
                )
                await asyncio.sleep(0)
        await self._stopped.wait()

    def request_stop(self, *, force: bool = False) -> None:
        self.stop_calls.append(force)
        self._stopped.set()

    def served_model_name(self) -> str:
        return self.backend_argv[-1]

    def apply_settings(self, config: WorkerConfig) -> None:
        self.framework_args = config

    def served_model_names(self) -> list[str]:
        return [self.served_model_name()]

    async def reload(self, argv: list[str], method: ReloadMethod = ReloadMethod.AUTO) -> Reloaded:
        self.reloads.append(argv)
        if self.reload_error is not None:
            raise self.reload_error
        same = argv == self.backend_argv
        self.backend_argv = list(argv)
        done = (
            ReloadMethod.IN_PLACE if same and method is not ReloadMethod.SWAP else ReloadMethod.SWAP
        )
        return Reloaded(done, {"reload_engine_start": 2.0, "reload": 2.5})


def supervise(
    scripts: list[str],
    policy: RestartPolicy | None = None,
    *,
    restart: bool = True,
    uptime: float = 1.0,
    cleanup_s: float = 0.0,
    after_last: Any = None,
    phases_when_serving: dict[str, float] | None = None,
    reclaimed: list[int] | None = None,
) -> tuple[Supervisor, FakeClock, list[ScriptedBackend]]:
    clock = FakeClock()
    made: list[ScriptedBackend] = []

    def make() -> Any:
        backend = ScriptedBackend(scripts[len(made)], clock, uptime, cleanup_s)
        backend.phase_seconds = {"engine_start": 10.0 + len(made)}  # tells the starts apart
        made.append(backend)
        return backend

    supervisor = Supervisor(
        make,
        policy or RestartPolicy(jitter=0.1),
        restart=restart,
        sleep=clock.sleep,
        clock=clock,
        wall_clock=clock,
        rand=lambda: 0.5,
        reclaim=lambda: (reclaimed if reclaimed is not None else []).append(len(made)),
    )

    def last_one_is_serving() -> bool:
        if len(made) < len(scripts):
            return False
        last = made[-1]
        return last.script == "hang" or (
            last.script == "serve" and last.backend_ready_event.is_set()
        )

    async def main() -> None:
        task = asyncio.create_task(supervisor.run())
        while not task.done() and not last_one_is_serving():
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # the supervisor notes the ready backend
        if phases_when_serving is not None:
            phases_when_serving.update(supervisor.stats.phase_seconds)
        if not task.done():
            supervisor.request_stop()
        await task

    try:
        asyncio.run(main())
    except BaseException as exc:
        if after_last is None:
            raise
        assert isinstance(exc, after_last)
    return supervisor, clock, made


def exponential(**fields: Any) -> RestartPolicy:
    """A back-off of 1, 2, 4 ... s from the first restart on (no immediate first)."""
    return RestartPolicy(initial=1, factor=2, immediate_first=False, **fields)


def test_boot_failure_of_the_first_start_is_raised_without_restart() -> None:
    with pytest.raises(StartupError, match="model cannot load"):
        supervise(["boot-fail"])


def test_boot_failure_state_is_failed_and_nothing_slept() -> None:
    sup, clock, made = supervise(["boot-fail"], after_last=StartupError)
    assert len(made) == 1 and clock.sleeps == [] and sup.stats.state is WorkerState.FAILED


def test_deaths_after_ready_restart_with_growing_backoff() -> None:
    sup, clock, made = supervise(["die", "die", "serve"], exponential(jitter=0.1))
    assert clock.sleeps == [1.0, 2.0]
    assert sup.stats.restarts == 2 and sup.stats.engine_deaths == 2
    assert sup.stats.state is WorkerState.STOPPED
    assert sup.stats.last_restart_to_ready_s is not None
    assert made[-1].stop_calls == [False]


def test_a_single_death_is_restarted_at_once_by_default() -> None:
    sup, clock, _ = supervise(["die", "serve"], RestartPolicy())
    assert sup.stats.phase_seconds["restart_delay"] == 0
    assert sum(clock.sleeps) == 0 and sup.stats.restarts == 1


def test_serving_again_counts_from_the_detection_and_phases_are_the_last_ones() -> None:
    # died, 4 s of cleanup, 1 s of backoff, a restart that fails to boot, 2 s of
    # backoff, then serving: 7 s from the detection of the death
    phases: dict[str, float] = {}
    sup, clock, _ = supervise(
        ["die", "boot-fail", "serve"],
        exponential(jitter=0),
        cleanup_s=4,
        phases_when_serving=phases,
    )
    assert clock.sleeps == [1.0, 2.0]
    assert sup.stats.last_restart_to_ready_s == 7.0
    assert phases["death_cleanup"] == 4.0 and phases["restart_delay"] == 2.0
    assert phases["engine_start"] == 12.0  # the start now serving (the 3rd), not the first


def test_memory_is_reclaimed_before_each_restart_not_after_the_last_stop() -> None:
    reclaimed: list[int] = []  # how many backends had been made at each reclaim
    supervise(["die", "boot-fail", "serve"], reclaimed=reclaimed)
    assert reclaimed == [1, 2]
    supervise(["boot-fail"], reclaimed=reclaimed, after_last=StartupError)
    assert reclaimed == [1, 2]  # a boot failure ends the worker: nothing to reclaim for


def test_a_restart_that_fails_to_boot_counts_as_a_crash_and_is_retried() -> None:
    sup, clock, _ = supervise(["die", "boot-fail", "serve"], exponential(jitter=0))
    assert clock.sleeps == [1.0, 2.0] and sup.stats.restarts == 2
    assert sup.stats.state is WorkerState.STOPPED


def test_crash_loop_gives_up_with_a_clear_error() -> None:
    policy = exponential(max_crashes=3, crash_window=600)
    with pytest.raises(CrashLoopError, match="died 4 times within 600 s"):
        supervise(["die"] * 4, policy)


def test_crash_loop_leaves_state_failed_after_exactly_max_restarts() -> None:
    policy = exponential(jitter=0, max_crashes=3, crash_window=600)
    sup, clock, made = supervise(["die"] * 4, policy, after_last=CrashLoopError)
    assert len(made) == 4 and clock.sleeps == [1, 2, 4]
    assert sup.stats.state is WorkerState.FAILED


def test_stable_uptime_resets_the_backoff() -> None:
    policy = exponential(jitter=0, stable_after=60)
    _, clock, _ = supervise(["die", "die", "die", "serve"], policy, uptime=61)
    assert clock.sleeps == [1, 1, 1]


def test_without_restart_an_engine_death_is_raised() -> None:
    with pytest.raises(EngineDiedError):
        supervise(["die"], restart=False)


def test_stop_during_backoff_ends_at_once_and_starts_nothing_more() -> None:
    made: list[ScriptedBackend] = []
    clock = FakeClock()
    never = asyncio.Event()

    async def sleep_forever(_: float) -> None:
        await never.wait()

    def make() -> Any:
        made.append(ScriptedBackend("die", clock))
        return made[-1]

    sup = Supervisor(make, RestartPolicy(), sleep=sleep_forever, clock=clock, rand=lambda: 0.5)

    async def main() -> None:
        task = asyncio.create_task(sup.run())
        while sup.stats.state is not WorkerState.RESTARTING:
            await asyncio.sleep(0)
        sup.request_stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert len(made) == 1 and sup.stats.state is WorkerState.STOPPED
    assert sup.stats.restarts == 0


def test_stop_while_hanging_at_start_returns_cleanly() -> None:
    sup, _, made = supervise(["hang"])
    assert made[0].stop_calls == [False] and sup.stats.state is WorkerState.STOPPED


def test_force_stop_is_passed_to_the_backend() -> None:
    clock = FakeClock()
    backend = ScriptedBackend("serve", clock)
    sup = Supervisor(lambda: backend, sleep=clock.sleep, clock=clock)  # type: ignore[arg-type,return-value]

    async def main() -> None:
        task = asyncio.create_task(sup.run())
        await backend.backend_ready_event.wait()
        sup.request_stop()
        sup.request_stop(force=True)
        await task

    asyncio.run(main())
    assert backend.stop_calls == [False, True]


class Membership:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.member = False

    def join(self) -> None:
        self.member = True
        self.log.append("join")

    def leave(self) -> None:
        if self.member:  # repeated leaves are no-ops, as GatewayRegistration's
            self.member = False
            self.log.append("leave")

    def serve_model(self, name: str) -> None:
        self.log.append(f"serve_model {name}")


def test_the_gateway_is_joined_when_ready_and_left_at_death_before_cleanup() -> None:
    clock = FakeClock()
    log: list[str] = []
    scripts = ["die", "serve"]
    made: list[ScriptedBackend] = []

    def make() -> Any:
        made.append(ScriptedBackend(scripts[len(made)], clock))
        made[-1].log = log
        return made[-1]

    sup = Supervisor(
        make,
        RestartPolicy(jitter=0.0),
        sleep=clock.sleep,
        clock=clock,
        rand=lambda: 0.5,
        membership=Membership(log),
    )

    async def main() -> None:
        task = asyncio.create_task(sup.run())
        while len(made) < 2 or log[-1] != "join":
            await asyncio.sleep(0)
        sup.request_stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert log == ["join", "leave", "cleanup", "join", "leave"]


def test_the_worker_is_not_ready_from_the_death_detection_on_not_only_after_cleanup() -> None:
    clock = FakeClock()
    scripts = ["die", "serve"]
    made: list[ScriptedBackend] = []
    during_cleanup: list[tuple[WorkerState, float | None, int]] = []

    def make() -> Any:
        backend = ScriptedBackend(scripts[len(made)], clock)
        backend.on_cleanup = lambda: during_cleanup.append(
            (sup.stats.state, sup.stats.last_death_detected_unix, sup.stats.engine_deaths)
        )
        made.append(backend)
        return backend

    sup = Supervisor(make, RestartPolicy(jitter=0.0), sleep=clock.sleep, clock=clock,
                     wall_clock=clock, rand=lambda: 0.5)  # fmt: skip

    async def main() -> None:
        task = asyncio.create_task(sup.run())
        while len(made) < 2 or not made[-1].backend_ready_event.is_set():
            await asyncio.sleep(0)
        sup.request_stop()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    died = sup.stats.last_death_detected_unix
    assert died is not None
    assert during_cleanup == [(WorkerState.RESTARTING, died, 1)]
    assert sup.stats.engine_deaths == 1  # counted once


def supervise_failovers(
    failovers: int, policy: RestartPolicy, uptime: float
) -> tuple[Supervisor, list[str], ScriptedBackend, BaseException | None]:
    clock = FakeClock()
    log: list[str] = []
    backend = ScriptedBackend("failover", clock, uptime)
    backend.failovers = failovers
    sup = Supervisor(
        lambda: backend,  # type: ignore[arg-type,return-value]
        policy,
        sleep=clock.sleep,
        clock=clock,
        wall_clock=clock,
        rand=lambda: 0.5,
        membership=Membership(log),
    )
    raised: list[BaseException] = []

    async def main() -> None:
        task = asyncio.create_task(sup.run())
        while sup.stats.failovers < failovers and not task.done():
            await asyncio.sleep(0)
        if not task.done():
            sup.request_stop()
        try:
            await asyncio.wait_for(task, 5)
        except CrashLoopError as exc:
            raised.append(exc)

    asyncio.run(main())
    return sup, log, backend, raised[0] if raised else None


def test_a_failover_counts_as_a_death_served_again_at_once_in_the_gateway_throughout() -> None:
    sup, log, backend, raised = supervise_failovers(2, RestartPolicy(jitter=0.0), uptime=600.0)
    assert raised is None
    stats = sup.stats
    assert (stats.failovers, stats.engine_deaths, stats.restarts) == (2, 2, 0)
    assert stats.last_restart_to_ready_s == 0.25  # detection to serving, as reported
    assert stats.last_death_detected_unix == 1001.0
    assert stats.phase_seconds["failover_switch"] == 0.01
    assert (stats.standby, stats.engines) == ("ready", {"active": [1], "standby": [9]})
    assert log == ["join", "leave"]  # joined once, left only at the stop
    assert backend.stop_calls == [False]


def test_failovers_in_a_crash_loop_give_up() -> None:
    policy = RestartPolicy(jitter=0.0, max_crashes=2, crash_window=60.0)
    sup, log, backend, raised = supervise_failovers(5, policy, uptime=1.0)
    assert isinstance(raised, CrashLoopError)
    assert sup.stats.failovers == 3  # the third death within the window ends it
    assert sup.stats.state is WorkerState.FAILED
    assert backend.stop_calls and backend.stop_calls[0] is True  # forced
    assert log[-1] == "leave"


def reload_while_serving(
    argv: list[str] | None,
    *,
    merge: bool = False,
    error: ReloadError | None = None,
    settings: dict[str, object] | None = None,
) -> tuple[Supervisor, ScriptedBackend, list[str], Any]:
    """A supervisor serving one backend (with a gateway) asked to reload it once: the
    supervisor, the backend, what the gateway was told, and the reload's result (its
    report, or the ReloadError raised)."""
    clock = FakeClock()
    log: list[str] = []
    backend = ScriptedBackend("serve", clock)
    backend.reload_error = error
    sup = Supervisor(
        lambda: backend,
        sleep=clock.sleep,
        clock=clock,
        wall_clock=clock,
        membership=Membership(log),
    )
    result: list[Any] = []

    async def main() -> None:
        task = asyncio.create_task(sup.run())
        while sup.stats.state is not WorkerState.READY:
            await asyncio.sleep(0)
        try:
            result.append(await sup.reload(argv, merge=merge, settings=settings))
        except ReloadError as exc:
            result.append(exc)
        sup.request_stop()
        await task

    asyncio.run(main())
    return sup, backend, log, result[0]


def test_a_reload_replaces_the_flags_reports_its_phases_and_renames_at_the_gateway() -> None:
    sup, backend, log, report = reload_while_serving(["--model", "m2", "--api-key", "k"])
    assert backend.reloads == [["--model", "m2", "--api-key", "k"]]
    assert report["outcome"] == "ok" and report["phases"]["reload"] == 2.5
    assert report["method"] == "swap"
    # what /status shows: the new configuration, the key masked
    assert sup.stats.engine_args == ["--model", "m2", "--api-key", "***"]
    assert sup.stats.reloads == {"ok": 1} and sup.stats.last_reload == report
    assert "serve_model k" in log  # the served name (the scripted backend's last flag)


def test_a_merged_reload_appends_the_flags_to_those_running() -> None:
    _, backend, _, report = reload_while_serving(["--max-num-seqs", "4"], merge=True)
    assert backend.reloads == [["--model", "scripted", "--max-num-seqs", "4"]]
    assert report["outcome"] == "ok"


def test_a_merged_reload_without_flags_keeps_them_and_says_what_ran() -> None:
    _, backend, _, report = reload_while_serving([], merge=True)
    assert backend.reloads == [["--model", "scripted"]]
    assert report["method"] == "in_place"


def test_a_failed_reload_keeps_the_configuration_and_counts_as_failed() -> None:
    error = ReloadError("the new engine did not start (boom)", 500)
    sup, _, log, raised = reload_while_serving(["--model", "bad"], error=error)
    assert raised is error
    assert sup.stats.engine_args == ["--model", "scripted"]
    assert sup.stats.reloads == {"failed": 1}
    assert sup.stats.last_reload is not None and sup.stats.last_reload["error"] == str(error)
    assert not any(entry.startswith("serve_model") for entry in log)


def test_a_refused_reload_counts_as_refused() -> None:
    sup, _, _, raised = reload_while_serving(["--x"], error=ReloadError("bad flag", 400))
    assert isinstance(raised, ReloadError) and sup.stats.reloads == {"refused": 1}


def test_a_reload_while_not_serving_is_refused() -> None:
    sup = Supervisor(lambda: ScriptedBackend("serve", FakeClock()))

    async def main() -> None:
        with pytest.raises(ReloadError, match="not serving") as raised:
            await sup.reload(["--model", "x"])
        assert raised.value.status == 409

    asyncio.run(main())
    assert sup.stats.reloads == {"refused": 1}


def test_settings_alone_apply_at_once_without_touching_the_engine() -> None:
    sup, backend, _, report = reload_while_serving(None, settings={"drain_timeout": 75})
    assert backend.reloads == [] and report["method"] == "settings"
    assert backend.framework_args.drain_timeout == 75.0
    assert sup.stats.settings["drain_timeout"] == 75.0


def test_settings_come_with_a_reload_and_a_bad_one_changes_nothing() -> None:
    _, backend, _, _ = reload_while_serving(
        ["--model", "m2"], settings={"drain_timeout": 5, "log_level": "warning"}
    )
    assert backend.reloads == [["--model", "m2"]] and backend.framework_args.drain_timeout == 5
    sup, backend, _, raised = reload_while_serving(["--model", "m3"], settings={"color": 1})
    assert isinstance(raised, ReloadError) and raised.status == 400
    assert backend.reloads == [] and sup.stats.reloads == {"refused": 1}


class RestartingBackend(ScriptedBackend):
    """An engine that cannot run new flags beside itself (SGLang)."""

    async def reload(self, argv: list[str], method: ReloadMethod = ReloadMethod.AUTO) -> Reloaded:
        self.reloads.append(argv)
        raise RestartToReload("one engine per process")


def reload_by_restart(
    next_scripts: list[str],
) -> tuple[Supervisor, list[RestartingBackend], list[str], Any]:
    """A supervisor serving a ``RestartingBackend`` (with a gateway) asked for new flags;
    the backends after the first follow ``next_scripts``, each made with the flags of
    the one before (as ``ichat serve``'s). The supervisor, the backends, what the gateway
    was told, and the reload's report or ReloadError."""
    clock = FakeClock()
    log: list[str] = []
    made: list[RestartingBackend] = []

    def make() -> Any:
        backend = RestartingBackend(next_scripts[len(made) - 1] if made else "serve", clock)
        if made:
            backend.backend_argv = list(made[-1].backend_argv)
        backend.log.append(" ".join(backend.backend_argv))  # the flags it started with
        made.append(backend)
        return backend

    sup = Supervisor(make, sleep=clock.sleep, clock=clock, wall_clock=clock,
                     membership=Membership(log))  # fmt: skip
    result: list[Any] = []

    async def ready() -> None:
        while sup.stats.state is not WorkerState.READY:
            await asyncio.sleep(0)

    async def main() -> None:
        task = asyncio.create_task(sup.run())
        await ready()
        try:
            result.append(await sup.reload(["--model", "m2"]))
        except ReloadError as exc:
            result.append(exc)
        await ready()
        sup.request_stop()
        await task

    asyncio.run(main())
    return sup, made, log, result[0]


def test_new_flags_an_engine_cannot_run_beside_itself_restart_it_with_them() -> None:
    sup, made, log, report = reload_by_restart(["serve"])
    old, new = made
    assert old.reloads == [["--model", "m2"]] and old.stop_calls == [False]  # drained
    assert new.backend_argv == ["--model", "m2"] and report["method"] == "restart"
    assert set(report["phases"]) == {"reload_drain", "reload_engine_start", "reload"}
    assert log[:3] == ["join", "leave", "join"]  # out of the gateway while it restarts
    assert "serve_model m2" in log
    assert sup.stats.engine_args == ["--model", "m2"] and sup.stats.reloads == {"ok": 1}
    assert (sup.stats.restarts, sup.stats.engine_deaths) == (0, 0)  # not a crash


def test_new_flags_that_do_not_start_give_the_old_ones_back() -> None:
    sup, made, log, raised = reload_by_restart(["boot-fail", "serve"])
    assert isinstance(raised, ReloadError) and raised.status == 500
    assert "did not start (model cannot load)" in str(raised) and "old flags" in str(raised)
    assert [b.log[0] for b in made] == ["--model scripted", "--model m2", "--model scripted"]
    assert made[2].backend_ready_event.is_set()  # the old flags serve again
    assert sup.stats.engine_args == ["--model", "scripted"]
    assert sup.stats.reloads == {"failed": 1} and sup.stats.restarts == 0
    assert log.count("join") == 2  # back in the gateway with the old flags


async def relaying_then_serving(
    stop: Callable[[Supervisor, ScriptedBackend], Awaitable[None]],
) -> None:
    """A backend whose engine dies while its HTTP server still relays what it cut to the
    next engine (same port), then the next one serving; ``stop`` stops the worker."""
    clock = FakeClock()
    made: list[ScriptedBackend] = []

    def make() -> Any:
        made.append(ScriptedBackend(["die-relaying", "serve"][len(made)], clock))
        return made[-1]

    supervisor = Supervisor(make, RestartPolicy(jitter=0.1), sleep=clock.sleep, clock=clock,
                            wall_clock=clock, rand=lambda: 0.5, reclaim=lambda: None)  # fmt: skip
    task = asyncio.create_task(supervisor.run())
    while len(made) < 2 or not made[1].backend_ready_event.is_set():
        await asyncio.sleep(0)
    relaying = made[0].detached_server
    assert relaying is not None and not relaying.done()  # kept while the next one serves
    await stop(supervisor, made[0])
    await asyncio.wait_for(task, 5)


def test_a_dead_engines_server_still_relaying_is_kept_and_waited_for_at_the_stop() -> None:
    """The worker's stop waits for it (it ends within its own bound)."""

    async def stop(supervisor: Supervisor, dead: ScriptedBackend) -> None:
        supervisor.request_stop()
        for _ in range(20):
            await asyncio.sleep(0)
        assert dead.detached_server is not None and not dead.detached_server.done()
        dead.relay.set()  # its last relayed answer ended: the stop completes

    asyncio.run(relaying_then_serving(stop))


def test_a_forced_stop_cuts_a_dead_engines_server_that_still_relays() -> None:
    async def stop(supervisor: Supervisor, dead: ScriptedBackend) -> None:
        supervisor.request_stop(force=True)
        await asyncio.sleep(0)
        assert dead.detached_server is not None and dead.detached_server.cancelled()

    asyncio.run(relaying_then_serving(stop))
