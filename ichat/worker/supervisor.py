"""The supervisor: keep a worker's engine serving; restart it when it dies.

It wraps backends and the backends never import it (model: uvicorn ``main.run``
choosing a supervisor around ``server.run``).

- a backend that never became ready on the first start is a *boot failure*: raise it
  (bad flag, model that cannot load, port in use); no restart loop;
- an engine that died after it was ready is restarted after ``RestartPolicy``'s delay;
  a fresh start that fails to boot counts as one more crash;
- too many crashes within the window: ``CrashLoopError``;
- ``request_stop()`` during a backoff wait ends it at once;
- before a restart, what the stopped engine left frozen is handed back to the garbage
  collector (``release_frozen_heap``); not after the last stop, which the process'
  exit follows;
- a ``Membership`` (the gateway registration) is told to join when a backend is
  ready and to leave the moment its engine is found dead or a stop is requested;
- a backend with a standby engine fails over to it by itself (the worker stays in the
  gateway); the failover counts as a death, in the stats and towards a crash loop;
- ``reload(argv)`` asks the serving backend to replace its engine by one started with
  new flags while the old serves (``ichat reload``); the next backends (restarts) start
  with the flags the last successful reload gave; a new served model name is
  registered with the gateway in place of the old; a backend that cannot run new flags
  beside its engine (``RestartToReload``) is reloaded by a restart: out of the gateway,
  drained and stopped, the next backend started with the new flags at once (no back-off,
  no crash counted), and with the old ones if the new do not start.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from ichat.aio import first_completed
from ichat.backends.base_backend import BaseBackend, release_frozen_heap
from ichat.backends.continuation import Continued
from ichat.backends.failover import Failover, StandbyReport
from ichat.backends.reloaded import Reloaded, ReloadMethod
from ichat.errors import (
    CrashLoopError,
    EngineDiedError,
    ReloadError,
    RestartToReload,
    StartupError,
)
from ichat.restart_policy import CrashHistory, GiveUp, Restart, RestartPolicy
from ichat.worker.secrets import masked_argv
from ichat.worker.settings import apply_log_level, shown, updated

logger = logging.getLogger("ichat.supervisor")


class WorkerState(str, enum.Enum):
    STARTING = "starting"  # the first engine boots
    READY = "ready"  # an engine serves
    RESTARTING = "restarting"  # the engine died: until a new one serves
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


# every outcome of a reload (``ichat reload``), each exported from the start
RELOAD_OUTCOMES = ("ok", "failed", "refused")


@dataclass
class WorkerStats:
    """What the supervisor has seen; read by the metrics collector."""

    state: WorkerState = WorkerState.STARTING
    restarts: int = 0
    engine_deaths: int = 0
    last_ready_unix: float | None = None
    last_death_detected_unix: float | None = None
    # from the dead engine's last passed health check to the detection of its death
    last_death_detection_window_s: float | None = None
    last_restart_to_ready_s: float | None = None
    phase_seconds: dict[str, float] = field(default_factory=dict)
    # where the backends reach into the engine's internals: name -> "resolved", or
    # "missing: <what degrades>" (see ichat.backends.compat.Workarounds)
    workarounds: dict[str, str] = field(default_factory=dict)
    # --standby: failovers to the standby engine, its state (off, starting, ready,
    # asleep, failed) and why it failed, and each engine's processes
    failovers: int = 0
    standby: str = "off"
    standby_reason: str | None = None
    engines: dict[str, list[int]] = field(default_factory=dict)
    # cut streams continued on the next engine: by outcome, prompt tokens prefilled
    # again, and the last one's client-visible stall (cut to first continued chunk)
    continuations: dict[str, int] = field(default_factory=dict)
    continuation_reprefilled_tokens: int = 0
    last_continuation_stall_s: float | None = None
    # the configuration the engine runs (secrets masked) and its served model names;
    # reloads by outcome (ok, failed, refused) and the last one's report
    engine_args: list[str] = field(default_factory=list)
    served_model_names: list[str] = field(default_factory=list)
    settings: dict[str, object] = field(default_factory=dict)  # drain_timeout, log_level
    reloads: dict[str, int] = field(default_factory=dict)
    last_reload: dict[str, object] | None = None
    # who this worker is, for joining its metrics with the gateway's: the URL the
    # gateway reaches it at (SMG's ``worker`` label) and the gateway's URL ("": none)
    url: str = ""
    gateway_url: str = ""


@dataclass
class _Life:
    """What the supervisor saw of one backend (monotonic times)."""

    ready_at: float | None = None
    death_detected_at: float | None = None
    uptime: float = 0.0  # from ready to the death (0: it never became ready)


@dataclass
class _ReloadByRestart:
    """A reload by restart under way: the flags to go back to, and its outcome."""

    old_argv: list[str]
    outcome: asyncio.Future[dict[str, float]]
    began: float
    stopped: float | None = None  # the old backend ended (drained)
    rolling_back: bool = False


class Membership(Protocol):
    """Where the worker is announced (a gateway); every call returns at once."""

    def join(self) -> None: ...

    def leave(self) -> None: ...

    def serve_model(self, name: str) -> None:
        """The worker serves this model name from now on (after a reload)."""


class Supervisor:
    def __init__(
        self,
        make_backend: Callable[[], BaseBackend],
        policy: RestartPolicy | None = None,
        *,
        restart: bool = True,
        membership: Membership | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        reclaim: Callable[[], None] = release_frozen_heap,
    ) -> None:
        self._make_backend = make_backend
        self.policy = policy or RestartPolicy()
        self.restart = restart
        self.membership = membership
        self._sleep = sleep
        self._clock = clock
        self._wall_clock = wall_clock
        self._rand = rand
        self._reclaim = reclaim  # a stopped engine's memory, before the next start
        self.stats = WorkerStats()
        self.backend: BaseBackend | None = None
        self._stop = asyncio.Event()
        self._ever_ready = False
        self._history = CrashHistory(self.policy)
        self._serving_since: float | None = None  # the engine serving now (monotonic)
        self._gave_up: CrashLoopError | None = None  # a crash loop of failovers
        self._reload: _ReloadByRestart | None = None
        # dead engines' HTTP servers still relaying what they cut to the next engine
        self._detached: set[asyncio.Task[None]] = set()

    def request_stop(self, *, force: bool = False) -> None:
        """Stop the running backend (drain, or ``force``) and restart no more."""
        self._stop.set()
        if self._reload is not None and not self._reload.outcome.done():
            self._reload.outcome.set_exception(
                ReloadError("the worker stopped during the reload", 409)
            )
        if self.membership is not None:
            self.membership.leave()
        if self.stats.state is not WorkerState.STOPPED:
            self.stats.state = WorkerState.STOPPING
        if self.backend is not None:
            self.backend.request_stop(force=force)
        if force:
            for task in self._detached:
                task.cancel()

    async def run(self) -> None:
        """Serve until stopped; raise on boot failure or crash loop."""
        died_at: float | None = None  # the last death's detection: serving again counts from
        while not self._stop.is_set():
            life = await self._serve_one(died_at)
            if self._stop.is_set():
                break  # nothing reclaimed: the process exits (faster with a frozen heap)
            if life is None:  # stopped on request: a reload by restart, else the end
                if self._reload is None:
                    break
                self._reload.stopped = self._reload.stopped or self._clock()
                self._reclaim()
                died_at = None
                continue
            died_at = await self._prepare_restart(self._history, life, died_at)
        if self._detached:  # each ends within its own bound (uvicorn's graceful shutdown)
            await asyncio.wait(set(self._detached))
        if self._gave_up is not None:
            raise self._gave_up
        self.stats.state = WorkerState.STOPPED

    def _keep_detached(self, backend: BaseBackend) -> None:
        """A dead engine's HTTP server that still relays what it cut to the next engine:
        kept until it ends."""
        task = backend.detached_server
        if task is None:
            return
        self._detached.add(task)

        def ended(done: asyncio.Task[None]) -> None:
            self._detached.discard(done)
            if not done.cancelled() and done.exception() is not None:
                logger.warning("a dead engine's HTTP server ended with %r", done.exception())

        task.add_done_callback(ended)

    async def _serve_one(self, died_at: float | None) -> _Life | None:
        """Run one backend to its end. None: it stopped on request. Its life: its engine
        died, or a restart failed to boot; raised instead when no restart may follow."""
        backend = self._make_backend()
        self.backend = backend
        backend.on_failover = self._on_failover
        backend.on_standby = self._on_standby
        backend.on_continuation = self._on_continuation
        life = _Life()
        watcher = asyncio.create_task(self._on_ready(backend, life, died_at))
        try:
            await backend.run()
            return None
        except StartupError as exc:
            if self._reload is not None and not self._reload.rolling_back:
                self._roll_back(backend, exc)
                return None
            self._reload = None  # the old flags did not start again either: a boot failure
            if not self._ever_ready or not self.restart:
                self.stats.state = WorkerState.FAILED
                raise
            logger.error("restart %d failed to boot", self.stats.restarts)
        except EngineDiedError:
            self._record_death(backend, life)
            if not self.restart:
                self.stats.state = WorkerState.FAILED
                raise
            if life.ready_at is not None:
                life.uptime = self._clock() - life.ready_at
        finally:
            watcher.cancel()
            self._keep_detached(backend)
            if self.membership is not None:
                self.membership.leave()
            self.stats.phase_seconds.update(backend.phase_seconds)
            self.stats.workarounds.update(backend.workarounds.status())
        return life

    async def _prepare_restart(
        self, history: CrashHistory, life: _Life, died_at: float | None
    ) -> float | None:
        """Reclaim what the stopped engine left, account for its end, wait the back-off
        (or raise ``CrashLoopError``); return the death serving again counts from."""
        self._reclaim()
        crashed_at = self._clock()
        if life.death_detected_at is not None:  # a death, not a restart that failed to boot
            self.stats.phase_seconds["death_cleanup"] = crashed_at - life.death_detected_at
            died_at = crashed_at = life.death_detected_at
        await self._backoff(history.record(crashed_at, life.uptime, self._rand()))
        return died_at

    def _record_death(self, backend: BaseBackend, life: _Life) -> None:
        """Count this backend's death once, when it is first seen."""
        if life.death_detected_at is not None:
            return
        life.death_detected_at = self._clock()
        self.stats.engine_deaths += 1
        detected = backend.monitor.detected_unix if backend.monitor else None
        self.stats.last_death_detected_unix = detected or self._wall_clock()
        if backend.monitor is not None:
            self.stats.last_death_detection_window_s = backend.monitor.detection_window

    async def _on_ready(self, backend: BaseBackend, life: _Life, died_at: float | None) -> None:
        """From ready on: the worker's state, phases and membership; at the death's
        detection, out of service at once (``died_at``: the last death's detection)."""
        await backend.backend_ready_event.wait()
        now = self._clock()
        life.ready_at = self._serving_since = now
        self._ever_ready = True
        self.stats.state = WorkerState.READY
        self._note_configuration(backend)
        self.stats.last_ready_unix = self._wall_clock()
        self.stats.phase_seconds.update(backend.phase_seconds)  # this start's phases
        self.stats.workarounds.update(backend.workarounds.status())
        if died_at is not None:
            self.stats.last_restart_to_ready_s = now - died_at
            logger.info("serving again %.2f s after the engine death was detected", now - died_at)
        if self._reload is not None:  # a reload by restart: its engine (or the old) serves
            reload, self._reload = self._reload, None
            if not reload.outcome.done():
                stopped = reload.stopped or now
                reload.outcome.set_result({"reload_drain": stopped - reload.began,
                                           "reload_engine_start": now - stopped,
                                           "reload": now - reload.began})  # fmt: skip
        if self.membership is not None and not self._stop.is_set():
            self.membership.join()
        await backend.engine_dead_event.wait()
        # At detection, before the backend's cleanup (seconds, when engine processes
        # must be killed): not ready any more, and out of the gateway.
        self.stats.state = WorkerState.RESTARTING if self.restart else WorkerState.STOPPING
        self._record_death(backend, life)
        if self.membership is not None:
            self.membership.leave()

    async def _reload_by_restart(
        self, backend: BaseBackend, argv: list[str], why: RestartToReload
    ) -> Reloaded:
        """Out of the gateway, drain and stop ``backend``, start the next with ``argv``;
        its phases once it serves. ``ReloadError`` when it did not start: the worker
        then starts again with the flags it had."""
        logger.warning("reload by restart: %s", why)
        loop = asyncio.get_running_loop()
        reload = _ReloadByRestart(list(backend.backend_argv), loop.create_future(), self._clock())
        self._reload = reload
        if self.membership is not None:
            self.membership.leave()
        self.stats.state = WorkerState.STARTING  # a planned start, not an engine down
        backend.backend_argv = list(argv)  # what the next backend starts with
        backend.request_stop()
        phases = await reload.outcome
        return Reloaded(ReloadMethod.RESTART, phases)

    def _roll_back(self, backend: BaseBackend, error: StartupError) -> None:
        """The new flags did not start: the next backend starts with the old ones."""
        reload = self._reload
        assert reload is not None
        reload.rolling_back = True
        backend.backend_argv = list(reload.old_argv)
        logger.error("reload by restart: the new flags did not start (%s); starting again "
                     "with the old ones", error)  # fmt: skip
        if not reload.outcome.done():
            why = f"the new engine did not start ({error}); the worker starts again with "
            why += "its old flags"
            reload.outcome.set_exception(ReloadError(why, 500))

    def _on_failover(self, failover: Failover) -> None:
        """The backend serves its standby in place of its dead engine: a death, and
        serving again at once; the worker stayed in the gateway."""
        now = self._clock()
        self.stats.engine_deaths += 1
        self.stats.failovers += 1
        self.stats.last_death_detected_unix = failover.detected_unix or self._wall_clock()
        self.stats.last_death_detection_window_s = failover.detection_window
        self.stats.last_restart_to_ready_s = failover.seconds
        self.stats.phase_seconds.update(failover.phases)
        uptime = now - (self._serving_since or now)
        self._serving_since = now
        logger.info(
            "serving again %.3f s after the engine death was detected (failover %d)",
            failover.seconds,
            self.stats.failovers,
        )
        decision = self._history.record(now - failover.seconds, uptime, self._rand())
        if isinstance(decision, GiveUp):
            self._gave_up = CrashLoopError(
                f"the engine died {decision.crashes} times within {decision.window:g} s; "
                "not failing over again (crash loop)"
            )
            logger.error("%s", self._gave_up)
            self.request_stop(force=True)
            self.stats.state = WorkerState.FAILED

    async def reload(
        self,
        argv: list[str] | None,
        *,
        merge: bool = False,
        method: ReloadMethod = ReloadMethod.AUTO,
        settings: dict[str, object] | None = None,
    ) -> dict[str, object]:
        """Replace the serving engine by one started with ``argv`` (appended to the
        running flags with ``merge``: later flags win) while the old one serves, or with
        the same flags reload its weights in place (``method``); then apply framework
        ``settings`` (``argv`` None and no ``merge``: the settings alone). The reload's
        report. ``ReloadError`` when refused or failed: nothing changed."""
        started = self._wall_clock()
        backend = self.backend
        try:
            if backend is None or self.stats.state is not WorkerState.READY:
                raise ReloadError(
                    f"the worker is not serving (state {self.stats.state.value})", 409
                )
            config = updated(backend.framework_args, settings or {})
            if argv is None and not merge:
                reloaded = Reloaded(ReloadMethod.SETTINGS)
            else:
                new_argv = [*backend.backend_argv, *(argv or [])] if merge else list(argv or [])
                try:
                    reloaded = await backend.reload(new_argv, method)
                except RestartToReload as why:
                    reloaded = await self._reload_by_restart(backend, new_argv, why)
                    backend = self.backend or backend  # the one with the new flags
        except ReloadError as exc:
            # 501: this engine cannot reload so (nothing was tried)
            outcome = "refused" if exc.status < 500 or exc.status == 501 else "failed"
            self._note_reload(outcome, started, error=str(exc))
            raise
        if settings:
            backend.apply_settings(config)
            if config.log_level is not None and "log_level" in settings:
                apply_log_level(config.log_level)
        phases = reloaded.phases
        self.stats.phase_seconds.update(phases)
        if self.membership is not None:  # a new served model name: registered anew
            self.membership.serve_model(backend.served_model_name())
        self._note_configuration(backend)
        logger.info(
            "reload (%s) done in %.2f s: the engine runs %s",
            reloaded.method.value,
            phases.get("reload", 0.0),
            self.stats.engine_args,
        )
        return self._note_reload("ok", started, phases=phases, method=reloaded.method)

    def _note_reload(
        self,
        outcome: str,
        started: float,
        *,
        error: str | None = None,
        phases: dict[str, float] | None = None,
        method: ReloadMethod | None = None,
    ) -> dict[str, object]:
        self.stats.reloads[outcome] = self.stats.reloads.get(outcome, 0) + 1
        report: dict[str, object] = {
            "outcome": outcome,
            "method": method.value if method is not None else None,
            "started_unix": started,
            "seconds": self._wall_clock() - started,
            "phases": dict(phases or {}),
            "error": error,
            "engine_args": list(self.stats.engine_args),
            "served_model_names": list(self.stats.served_model_names),
        }
        self.stats.last_reload = report
        return report

    def _note_configuration(self, backend: BaseBackend) -> None:
        self.stats.engine_args = masked_argv(backend.backend_argv)
        self.stats.served_model_names = backend.served_model_names()
        self.stats.settings = shown(backend.framework_args)

    def _on_continuation(self, continued: Continued) -> None:
        counts = self.stats.continuations
        counts[continued.outcome] = counts.get(continued.outcome, 0) + 1
        self.stats.continuation_reprefilled_tokens += continued.reprefilled_tokens
        if continued.stall_s is not None:
            self.stats.last_continuation_stall_s = continued.stall_s

    def _on_standby(self, report: StandbyReport) -> None:
        self.stats.standby = report.state.value
        self.stats.standby_reason = report.reason
        self.stats.engines = dict(report.engines)
        if self.backend is not None:
            self.stats.phase_seconds.update(self.backend.phase_seconds)

    async def _backoff(self, decision: Restart | GiveUp) -> None:
        if isinstance(decision, GiveUp):
            self.stats.state = WorkerState.FAILED
            raise CrashLoopError(
                f"the engine died {decision.crashes} times within {decision.window:g} s; "
                "not restarting it again (crash loop)"
            )
        self.stats.state = WorkerState.RESTARTING
        self.stats.phase_seconds["restart_delay"] = decision.delay
        logger.warning("engine died; restart %d in %.2f s", self.stats.restarts + 1, decision.delay)
        await first_completed(self._sleep(decision.delay), self._stop.wait())
        if not self._stop.is_set():
            self.stats.restarts += 1  # the state stays "restarting" until it serves
