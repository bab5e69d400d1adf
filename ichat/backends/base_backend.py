"""``BaseBackend``: the one lifecycle every engine shares.

``run()`` only sequences the phases; each engine supplies hooks::

    startup   parse_args (in __init__) -> bind_socket -> start_engine -> build_app
              -> uvicorn on the pre-bound socket (signal handlers off)
    ready     probe_ready until healthy (fast, then backing off) -> warmup -> ready event
    serve     health monitor (check_engine_alive) started only now;
              first of {server, monitor} to end stops the other; an engine death
              with a ready standby is a failover (``fail_over``) and serving goes on
    shutdown  should_exit -> drain -> close the engine -> cleanup() (idempotent)
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import errno
import gc
import io
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import psutil

from ichat.aio import first_completed
from ichat.backends.compat import Workaround, Workarounds
from ichat.backends.continuation import Continued
from ichat.backends.elsewhere import ThisWorkerAgain, ThroughTheGateway
from ichat.backends.failover import Failover, Standby, StandbyReport
from ichat.backends.monitor import HealthMonitor
from ichat.backends.reloaded import Reloaded, ReloadMethod
from ichat.config import WorkerConfig
from ichat.errors import (
    ConfigError,
    EngineDiedError,
    IChatError,
    PortInUseError,
    ReadinessTimeoutError,
    ReloadError,
    StartupError,
)
from ichat.process import processes, shared_memory
from ichat.process.readiness import Backoff, wait_until_ready

if TYPE_CHECKING:
    import httpx

    from ichat.backends.http_server import NoSignalServer

logger = logging.getLogger("ichat.backend")


class BackendState(str, enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class BaseBackend(abc.ABC):
    """Run one engine in this process and serve its HTTP app until stopped."""

    engine_name: ClassVar[str]
    engine_package: ClassVar[str]  # the engine's top-level package ("vllm")
    # where the engine's compat module reaches into its internals (recorded per backend)
    WORKAROUNDS: ClassVar[tuple[Workaround, ...]] = ()

    def __init__(
        self,
        framework_args: WorkerConfig,
        backend_argv: Sequence[str],
        backend_ready_event: asyncio.Event | None = None,
    ) -> None:
        self.framework_args = framework_args
        self.backend_argv = list(backend_argv)
        self.backend_ready_event = backend_ready_event or asyncio.Event()
        # set the moment the engine is found dead, before the slow cleanup: a gateway
        # must stop routing here at once
        self.engine_dead_event = asyncio.Event()
        self.state = BackendState.CREATED
        self.failure: BaseException | None = None
        self.monitor: HealthMonitor | None = None
        self.phase_seconds: dict[str, float] = {}
        self.workarounds = Workarounds(self.engine_name, self.WORKAROUNDS)
        self._backend_args = self.parse_args(framework_args, self.backend_argv)
        self._sock: socket.socket | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._server: NoSignalServer | None = None
        self._server_task: asyncio.Task[None] | None = None
        # after a death: the server that still relays the requests its engine cut to
        # the next engine (``relays_to_the_restart``), no longer this backend's to stop
        self.detached_server: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._startup_task: asyncio.Task[None] | None = None
        self._children_before: set[int] | None = None
        self._engine_procs: list[psutil.Process] = []
        self._engine_shm: set[shared_memory.Mapped] = set()  # /dev/shm files it mapped
        # told of each file recorded (the orphan guard, which unlinks them if the worker
        # is killed before it can)
        self.on_engine_shm: Callable[[set[shared_memory.Mapped]], None] | None = None
        # told of each failover to a standby, and of each change of the standby
        self.on_failover: Callable[[Failover], None] | None = None
        self.on_standby: Callable[[StandbyReport], None] | None = None
        self._standby_reason: str | None = None  # why the last standby did not start
        self.on_continuation: Callable[[Continued], None] | None = None
        self._stop_requested = False
        self._stop_requested_at: float | None = None  # the drain starts here (monotonic)
        self._drain_deadline: asyncio.TimerHandle | None = None
        # at the drain deadline: what the engine aborts goes on on another worker
        self.handing_off = False
        self._aborting: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self._ran = False
        self._start_began = 0.0

    # ------------------------------------------------------------------ interface

    @property
    def engine_processes(self) -> list[psutil.Process]:
        """The processes that appeared while the engine started (recorded once)."""
        return list(self._engine_procs)

    def get_backend_args(self) -> Any:
        """The engine's final, parsed argument object."""
        return self._backend_args

    async def run(self) -> None:
        """Start, serve until stopped, always clean up.

        Returns normally after ``request_stop()``. Raises ``StartupError`` when the
        backend never became ready and ``EngineDiedError`` when the engine died after
        it was ready (the caller may then start a fresh backend).
        """
        if self._ran:
            raise RuntimeError("a backend runs once; create a new one to start again")
        self._ran = True
        self.state = BackendState.STARTING
        try:
            self._startup_task = asyncio.ensure_future(self._start_and_become_ready())
            try:
                await self._startup_task
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._stop_requested and not (task and task.cancelling()):
                    logger.info("stop requested during start-up")
                    return
                raise
            await self._serve_until_stopped()
        except BaseException as exc:
            self.failure = exc
            raise
        finally:
            self.state = BackendState.STOPPING
            t0 = time.monotonic()
            try:
                await self._shutdown()
            finally:
                self.cleanup()
                self.phase_seconds["shutdown"] = time.monotonic() - t0
                logger.info("backend stopped in %.2f s", self.phase_seconds["shutdown"])
                self.state = BackendState.FAILED if self.failure else BackendState.STOPPED
                self._finished.set()

    async def wait_for_server_ready(self, timeout: float | None = None) -> None:
        """Return once ready; raise at once if the backend stopped before that."""
        await first_completed(
            self.backend_ready_event.wait(), self._finished.wait(), timeout=timeout
        )
        if self.backend_ready_event.is_set():
            return
        if self._finished.is_set():
            raise StartupError(
                f"the {self.engine_name} backend stopped before it became ready: {self.failure}"
            ) from self.failure
        raise ReadinessTimeoutError(f"the backend was not ready within {timeout:g} s")

    def request_stop(self, *, force: bool = False) -> None:
        """Ask ``run()`` to stop: drain in-flight requests, or close them (``force``)."""
        self._stop_requested = True
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
            if not force:
                self._abort_at_the_drain_deadline()
        if self._startup_task is not None and not self._startup_task.done():
            self._startup_task.cancel()
        if self._server is not None:
            self._server.should_exit = True
            if force:
                self._server.force_exit = True

    def _abort_at_the_drain_deadline(self) -> None:
        """Once ``--drain-timeout`` has passed, abort the requests still in flight in the
        engine: each stream then ends well-formed (its final chunk, ``finish_reason``
        "abort", and ``[DONE]``) instead of being cut when the server closes -- or, when
        another worker can take them (``can_hand_off``), goes on there."""
        if self.state is not BackendState.READY:
            return
        loop = asyncio.get_running_loop()

        def abort() -> None:
            self._aborting = loop.create_task(self._at_the_drain_deadline())

        self._drain_deadline = loop.call_later(self.framework_args.drain_timeout, abort)

    async def _at_the_drain_deadline(self) -> None:
        config = self.framework_args
        self.handing_off = await self.can_hand_off()
        if self.handing_off:
            logger.warning(
                "drain timeout (%g s) reached: aborting the requests still in flight, "
                "which go on on another worker through the gateway (relayed for at most "
                "%g s more, --handoff-timeout)",
                config.drain_timeout,
                config.handoff_timeout,
            )
        else:
            logger.warning(
                "drain timeout (%g s) reached: aborting the requests still in flight",
                config.drain_timeout,
            )
        await self.abort_requests()

    def cleanup(self) -> None:
        """Release everything; idempotent and safe after a half-finished start."""
        if self._drain_deadline is not None:
            self._drain_deadline.cancel()
        if self._server is not None:
            self._server.should_exit = True
        for task in (self._startup_task, self._monitor_task, self._server_task, self._aborting):
            if task is not None and not task.done():
                task.cancel()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        # after a death nothing of the engine can finish: its survivors go at once
        self.stop_engine_processes(at_once=isinstance(self.failure, EngineDiedError))
        self._engine_procs = []
        self._children_before = None
        self.kill_engine_processes()
        self._unlink_engine_shm_left_behind()
        self._engine_shm = set()

    def _unlink_engine_shm_left_behind(self) -> None:
        """Unlink the recorded /dev/shm files that no engine process maps any more (an
        engine's that is gone); forget them. What this process itself maps keeps no
        file: its mapping outlives the name, and nothing else would unlink it (SGLang's
        load-snapshot file, which the worker maps for reading once a gateway asks for
        loads, stayed behind after every engine of a worker behind SMG)."""
        if self._engine_shm:
            live = processes.children()
            shared_memory.unlink_left_behind(self._engine_shm, live)
            in_use = {m.inode for m in shared_memory.mapped(live)}
            self._engine_shm = {m for m in self._engine_shm if m.inode in in_use}

    def stop_engine_processes(self, *, at_once: bool = False) -> None:
        """SIGTERM the engine's processes (those that appeared while it started, and
        since) with their descendants, SIGKILL what is left after the deadline, wait;
        ``at_once``: SIGKILL them at once. This process's other children (the orphan
        guard, multiprocessing's resource tracker) are left alone."""
        procs = processes.with_descendants([*self._engine_procs, *self._new_children()])
        if procs:
            deadline = self.framework_args.deadlines.terminate
            stop = processes.kill if at_once else processes.terminate
            survivors = stop(procs, deadline)
            if survivors:
                logger.error("could not stop processes: %s", [p.pid for p in survivors])

    # ---------------------------------------------------------------------- hooks

    @classmethod
    @abc.abstractmethod
    def engine_help(cls) -> str:
        """The engine's own ``--help`` text (imports the engine)."""

    @classmethod
    def engine_environment(cls, config: WorkerConfig) -> dict[str, str]:
        """Environment the engine reads at import (and its processes inherit), set by
        the CLI before the engine is imported unless the user set it (default: none)."""
        return {}

    @abc.abstractmethod
    def parse_args(self, config: WorkerConfig, argv: list[str]) -> Any:
        """Parse ``argv`` with the engine's own parser; merge the framework settings."""

    @abc.abstractmethod
    def served_model_name(self) -> str:
        """The model name clients send (what the gateway routes by)."""

    def served_model_names(self) -> list[str]:
        """Every name the model is served under, the first the main one."""
        return [self.served_model_name()]

    def api_key(self) -> str | None:
        """The key the engine's API requires (``Authorization: Bearer``), if any."""
        return None

    def apply_settings(self, config: WorkerConfig) -> None:
        """Framework settings that need no new engine, from now on (a reload's): the
        drain timeout, with the HTTP server's own bound."""
        self.framework_args = config
        if self._server is not None:
            from ichat.backends.http_server import graceful_shutdown_seconds

            bound = graceful_shutdown_seconds(self._server_drain(config))
            self._server.config.timeout_graceful_shutdown = bound

    async def reload(self, argv: list[str], method: ReloadMethod = ReloadMethod.AUTO) -> Reloaded:
        """Replace the engine by one started with ``argv`` while this one serves, on
        the same socket, and retire the old once its requests have ended (a swap); or,
        with the same flags, let the engine load its weights again in place. What ran,
        and its phases. ``ReloadError`` when it cannot: the old engine serves on
        (default: this engine has no reload)."""
        raise ReloadError(
            f"reload is not available with the {self.engine_name} engine; "
            "restart the worker with the new flags instead",
            501,
        )

    def parse_reload_args(self, argv: list[str]) -> Any:
        """A reload's ``argv`` parsed as at start (nothing launched); ``ConfigError`` for
        a bad flag (default: ``parse_args``)."""
        return self.parse_args(self.framework_args, argv)

    def _parsed_for_reload(self, argv: list[str]) -> Any:
        """``parse_reload_args``, with a bad flag refused (``ReloadError`` 400) by the
        parser's own message, which argparse prints to stderr."""
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                return self.parse_reload_args(argv)
        except ConfigError as exc:
            said = [line for line in err.getvalue().splitlines() if line.strip()]
            reason = said[-1] if said else str(exc)
            raise ReloadError(f"invalid {self.engine_name} arguments: {reason}", 400) from exc

    async def _within_the_drain_timeout(self, step: Awaitable[Any]) -> Any:
        """What ``step`` returns, a step of a reload that waits for the requests in
        flight to finish: those still running after ``--drain-timeout`` are aborted."""
        running = asyncio.ensure_future(step)
        done, _ = await asyncio.wait({running}, timeout=self.framework_args.drain_timeout)
        if not done:
            logger.warning("reload: requests still running after the drain timeout; aborting them")
            await self.abort_requests()
        return await running

    def bind_socket(self) -> socket.socket:
        """Create and bind the listening socket before the engine starts."""
        host, port = self.framework_args.host, self.framework_args.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    @abc.abstractmethod
    async def start_engine(self, stack: contextlib.AsyncExitStack) -> None:
        """Start the engine; register its shutdown on ``stack``."""

    @abc.abstractmethod
    async def build_app(self) -> Any:
        """The engine's ASGI app, its state initialised."""

    def uvicorn_options(self) -> dict[str, Any]:
        """Extra ``uvicorn.Config`` settings the engine's own server would use."""
        return {}

    def on_server_created(self, server: NoSignalServer) -> None:
        """Called once the uvicorn server exists, before it starts serving."""
        return None

    async def probe_ready(self, client: httpx.AsyncClient) -> bool:
        """True once the engine's health endpoint answers 200."""
        import httpx

        try:
            response = await client.get("/health")
        except httpx.TransportError:
            return False
        return response.status_code == 200

    @abc.abstractmethod
    async def warmup(self, client: httpx.AsyncClient) -> None:
        """Send one small real request through the HTTP app."""

    @abc.abstractmethod
    async def check_engine_alive(self) -> None:
        """Cheap liveness check; raise ``EngineDiedError`` when the engine is dead."""

    def check_engine_processes(self) -> None:
        """Synchronous, no I/O: raise ``EngineDiedError`` when an engine process is gone.

        The monitor keeps calling it while a ``check_engine_alive`` probe is slow, so
        a probe stuck on a dead engine cannot hide the death (default: nothing)."""
        return None

    def kill_engine_processes(self) -> None:
        """Engine-specific last line of defence against orphans (default: nothing)."""
        return None

    async def abort_requests(self) -> None:
        """Abort every request in flight in the engine (at the drain deadline), so that
        each ends with the engine's own "abort" finish (default: nothing)."""
        return None

    async def can_hand_off(self) -> bool:
        """At the drain deadline: whether what the engine aborts can go on on another
        worker (through the gateway) instead of ending with "abort": with a gateway that
        lists another ready worker of this model (this one has left it at the stop)."""
        config = self.framework_args
        if not config.gateway_url:
            return False
        gateway = ThroughTheGateway(config.gateway_url, config.gateway_api_key)
        own = config.advertise_url or config.base_url
        return await gateway.another_worker_serves(self.served_model_name(), own)

    def _report_continuation(self, continued: Continued) -> None:
        if self.on_continuation is not None:
            self.on_continuation(continued)

    def _report_standby_of(
        self, active: Any, standby: Any, state: Standby | None, reason: str | None
    ) -> None:
        """Tell ``on_standby`` the standby's state (``state``, or what ``standby`` is
        now: an engine with ``pids`` and maybe ``asleep``, or None) and both engines'
        processes; the reason a standby failed is kept until another state is told."""
        if state is None:
            if not self.framework_args.standby:
                state = Standby.OFF
            elif standby is None:
                state = Standby.FAILED if self._standby_reason else Standby.STARTING
            else:
                state = Standby.ASLEEP if getattr(standby, "asleep", False) else Standby.READY
            reason = self._standby_reason if state is Standby.FAILED else None
        self._standby_reason = reason
        roles = (("active", active), ("standby", standby))
        engines = {role: engine.pids for role, engine in roles if engine is not None}
        if self.on_standby is not None:
            self.on_standby(StandbyReport(state, reason, engines))

    async def fail_over(self) -> dict[str, float] | None:
        """The active engine died: serve a ready standby in its place on the same HTTP
        server and return the failover's phases (seconds); None when there is no
        standby to serve (default), and the backend ends as without one."""
        return None

    # --------------------------------------------------------------------- phases

    async def _start_and_become_ready(self) -> None:
        self._start_began = time.monotonic()  # --ready-timeout counts from here
        try:
            await self._startup()
            await self._become_ready()
        except IChatError:
            raise
        except Exception as exc:
            raise StartupError(f"the {self.engine_name} engine failed to start: {exc}") from exc

    async def _startup(self) -> None:
        from ichat.backends.http_server import make_server

        config = self.framework_args
        try:
            self._sock = self.bind_socket()
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUseError(config.host, config.port, exc) from exc
            raise
        self._children_before = {p.pid for p in processes.children()}
        self._stack = contextlib.AsyncExitStack()
        t0 = time.monotonic()
        await self.start_engine(self._stack)
        self._engine_procs = self._new_children()
        self._record_engine_shm(self._engine_procs)  # an engine that dies before ready
        self.phase_seconds["engine_start"] = time.monotonic() - t0
        logger.info(
            "%s engine started in %.2f s (processes %s)",
            self.engine_name,
            self.phase_seconds["engine_start"],
            [p.pid for p in self._engine_procs],
        )
        t0 = time.monotonic()
        app = await self.build_app()
        self.phase_seconds["app"] = time.monotonic() - t0  # the engine's app state
        options = self.uvicorn_options()
        options.setdefault("log_level", config.engine_log_level)
        # uvicorn cuts what is left at its own deadline: after ours, when the engine has
        # aborted the requests still in flight and their streams have ended
        self._server = make_server(app, drain_timeout=self._server_drain(config), **options)
        self.on_server_created(self._server)
        self._server_task = asyncio.create_task(self._server.serve(sockets=[self._sock]))

    async def _become_ready(self) -> None:
        import httpx

        config = self.framework_args
        # the engine's start counts too: what is left of --ready-timeout after it
        started_s = time.monotonic() - self._start_began
        left = config.ready_timeout - started_s
        if left <= 0:
            raise ReadinessTimeoutError(
                f"the engine was not ready within the readiness timeout of "
                f"{config.ready_timeout:g} s (--ready-timeout): its start alone took "
                f"{started_s:.1f} s"
            )
        async with httpx.AsyncClient(base_url=config.base_url, timeout=60.0) as client:
            try:
                waited = await wait_until_ready(
                    lambda: self.probe_ready(client),
                    timeout=left,
                    check_alive=self._raise_if_stopped,
                    backoff=Backoff(),
                )
            except ReadinessTimeoutError as exc:
                raise ReadinessTimeoutError(
                    f"the engine was not ready within the readiness timeout of "
                    f"{config.ready_timeout:g} s (--ready-timeout)"
                ) from exc
            self.phase_seconds["ready"] = waited
            if config.warmup:
                t0 = time.monotonic()
                await self.warmup(client)
                self.phase_seconds["warmup"] = time.monotonic() - t0
                logger.info("warmup request took %.3f s", self.phase_seconds["warmup"])
        self._record_engine_shm()  # a process that dies between ready and stop
        self.state = BackendState.READY
        self.backend_ready_event.set()
        logger.info(
            "%s backend ready on %s (healthy %.3f s after the engine started)",
            self.engine_name,
            config.base_url,
            self.phase_seconds["ready"],
        )

    def _record_engine_shm(self, procs: list[psutil.Process] | None = None) -> None:
        """Note the /dev/shm files the engine's processes (``procs``, else those found
        now) map: a process that is killed unlinks none of them, so ``cleanup()`` unlinks
        those nobody maps then. Called at start, at ready and when the stop begins: each
        sees files or processes the others cannot."""
        found = self._new_children() if procs is None else procs
        new = shared_memory.mapped(found) - self._engine_shm
        self._engine_shm |= new
        if new and self.on_engine_shm is not None:
            self.on_engine_shm(new)

    @contextlib.asynccontextmanager
    async def recording_engine_shm(self, every: float = 0.5) -> AsyncIterator[None]:
        """While inside (an engine starting beside the serving one), note every
        ``every`` seconds the /dev/shm files our processes map: an engine whose start
        fails has its processes gone before it could be asked, and leaves them."""

        async def poll() -> None:
            while True:
                self._record_engine_shm()
                await asyncio.sleep(every)

        task = asyncio.create_task(poll())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.wait({task})

    def _raise_if_stopped(self) -> None:
        task = self._server_task
        if task is not None and task.done():
            exc = None if task.cancelled() else task.exception()
            raise StartupError(f"the HTTP server stopped during start-up: {exc}") from exc

    async def _serve_until_stopped(self) -> None:
        while not await self._serve_one_engine():
            pass  # a failover: the standby serves now, under a new monitor

    async def _serve_one_engine(self) -> bool:
        """Serve until the server ends or the engine dies: False after a failover to a
        standby (serve on), True when stopped; ``EngineDiedError`` otherwise."""
        config = self.framework_args
        assert self._server_task is not None
        self.monitor = HealthMonitor(
            self.check_engine_alive,
            interval=config.health_interval,
            probe_timeout=config.health_probe_timeout,
            liveness=self.check_engine_processes,
        )
        self._monitor_task = asyncio.create_task(self.monitor.run())
        done, _ = await asyncio.wait(
            {self._server_task, self._monitor_task}, return_when=asyncio.FIRST_COMPLETED
        )
        try:
            if self._monitor_task in done:
                try:
                    self._monitor_task.result()  # raises EngineDiedError
                except EngineDiedError as death:
                    if await self._failed_over(death):
                        return False
                    raise
                raise AssertionError("the health monitor returned without a verdict")
            self._server_task.result()  # a server crash propagates here
            if self._stop_requested:
                return True
            # The engine's own handler may stop the server when it sees the engine dead.
            await self.check_engine_alive()
            raise EngineDiedError("the HTTP server stopped although no stop was requested")
        except EngineDiedError:
            self.engine_dead_event.set()
            raise

    async def _failed_over(self, death: EngineDiedError) -> bool:
        """Serve a standby in place of the dead engine, if there is one ready."""
        assert self.monitor is not None
        detected_at, detected_unix = self.monitor.detected_at, self.monitor.detected_unix
        if self._stop_requested or (self._server_task is not None and self._server_task.done()):
            return False
        try:
            phases = await self.fail_over()
        except Exception:
            logger.exception("the failover to the standby engine failed")
            return False
        if phases is None:
            return False
        seconds = time.monotonic() - (detected_at or time.monotonic())
        self.phase_seconds.update(phases)
        logger.warning(
            "engine died (%s); the standby engine serves %.3f s after the death was detected",
            death,
            seconds,
        )
        if self.on_failover is not None:
            window = self.monitor.detection_window
            self.on_failover(Failover(str(death), detected_unix, seconds, phases, window))
        return True

    async def _shutdown(self) -> None:
        """Every step is bounded: a step that hangs is abandoned, and ``cleanup()``
        (which always follows) kills the engine's processes."""
        config = self.framework_args
        deadlines = config.deadlines
        self._record_engine_shm()  # segments made after ready
        if self._monitor_task is not None:
            if self.monitor is not None:
                self.monitor.stop()
            self._monitor_task.cancel()
            await _settle(self._monitor_task, deadlines.monitor_stop, "health monitor")
        if isinstance(self.failure, EngineDiedError) and self.relays_to_the_restart():
            await self._detach_the_server()
        if self._server is not None and self._server_task is not None:
            self._server.should_exit = True
            # the server has been draining since the stop was requested, if it was
            t0 = self._stop_requested_at or time.monotonic()
            drain = self._server_drain(config)
            left = t0 + drain - time.monotonic()
            done, _ = await asyncio.wait({self._server_task}, timeout=max(left, 0.0))
            if not done:
                logger.warning("HTTP server still draining after %.0f s; forcing", drain)
                self._server.force_exit = True
                self._server_task.cancel()
            await _settle(self._server_task, deadlines.server_close, "HTTP server")
            self._log_phase("drain", t0, "HTTP server drained and closed")
        if self._stack is not None:
            stack, self._stack = self._stack, None
            t0 = time.monotonic()
            closing = asyncio.ensure_future(stack.aclose())
            settled = await _settle(
                closing,
                deadlines.engine_shutdown,
                "engine shutdown",
                cancelled_within=deadlines.cancelled_step,
            )
            if not settled:
                logger.warning("killing the engine's processes instead")
            elif not closing.cancelled() and closing.exception() is not None:
                # the engine may already be dead; cleanup() kills what is left
                logger.warning("engine shutdown raised %r", closing.exception())
            self._log_phase("engine_shutdown", t0, "engine shut down")

    async def _detach_the_server(self) -> None:
        """The engine died and what it cut waits for the next engine on this port: the
        HTTP server stops accepting (uvicorn closes the listening socket, so that the
        next engine's server can bind the port) and keeps its connections, relaying,
        while the worker restarts; it ends by itself once they have ended, within
        its bound (``_server_drain``; ``detached_server``: whoever restarts the engine
        keeps it)."""
        server, task, sock = self._server, self._server_task, self._sock
        if server is None or task is None or sock is None:
            return
        config = self.framework_args
        server.should_exit = True  # its bound: _server_drain
        t0 = time.monotonic()
        while sock.fileno() != -1 and not task.done():
            if time.monotonic() - t0 > config.deadlines.server_close:
                logger.error("the HTTP server did not close its socket; stopping it")
                return  # the ordinary shutdown follows, and cleanup() closes it
            await asyncio.sleep(0.01)
        self.detached_server, self._server_task = task, None
        logger.info(
            "the engine's HTTP server keeps the requests that wait for the next engine "
            "(at most %.0f s) while it starts on the same port",
            self._server_drain(config),
        )

    def _server_drain(self, config: WorkerConfig) -> float:
        """How long uvicorn lets a graceful shutdown run: past our drain deadline, when
        the engine has aborted what was still in flight and those streams have ended;
        with a gateway, the answers of what was handed off to another worker are relayed
        for ``handoff_timeout`` more; when what a dying engine cuts waits for the next
        engine, for ``continuation_timeout`` and ``handoff_timeout`` more (vLLM's own
        error handler may begin the shutdown at the death, before the worker does)."""
        relays = config.handoff_timeout if config.gateway_url else 0.0
        if self.relays_to_the_restart():
            relays = config.continuation_timeout + config.handoff_timeout
        return config.drain_timeout + config.deadlines.drain_grace + relays

    def relays_to_the_restart(self) -> bool:
        """With continuation on and neither a standby nor a gateway, what the dying
        engine cuts waits for this worker's next engine (the restart) on the same port."""
        config = self.framework_args
        return bool(config.continuation_limit) and not config.standby and not config.gateway_url

    def _where_cut_requests_go(self) -> tuple[ThroughTheGateway | None, ThisWorkerAgain | None]:
        """Where what a dying engine cuts goes on when no engine of this worker takes
        over at once: another worker through the gateway (``--gateway-url``), else this
        worker's restarted engine (``relays_to_the_restart``), else nowhere."""
        config = self.framework_args
        if config.gateway_url:
            return ThroughTheGateway(config.gateway_url, config.gateway_api_key), None
        if self.relays_to_the_restart():
            return None, ThisWorkerAgain(config.base_url, self.api_key())
        return None, None

    def _log_phase(self, phase: str, started: float, what: str) -> None:
        self.phase_seconds[phase] = time.monotonic() - started
        logger.info("%s in %.2f s", what, self.phase_seconds[phase])

    def _new_children(self) -> list[psutil.Process]:
        """Our processes that appeared since the engine started ([] before that)."""
        before = self._children_before
        if before is None:
            return []
        return [p for p in processes.children() if p.pid not in before]


def freeze_before_fork() -> None:
    """Collect, then freeze what is alive in this process, before an engine's process is
    forked from it: the child inherits the heap frozen, and the full collections it runs
    while it starts (vLLM 0.26: about nine, around the model load, memory profiling,
    CUDA-graph capture and its own heap freeze) walk only what the child made, not the
    worker's whole heap; its pages stay shared. Python's own advice for a fork without
    exec (``gc.freeze``). The next app start's full collection is then short too.
    ``release_frozen_heap`` hands it all back to the collector when the engine has
    stopped."""
    gc.collect()
    gc.freeze()


def release_frozen_heap() -> None:
    """Hand what a stopped engine left in reference cycles back to the garbage
    collector: whoever starts another engine in this process calls it first.

    vLLM freezes the garbage collector's heap at each app start (``gc.freeze()``: a
    pause-time saving for a server that runs until its process exits). Everything
    alive at that moment, the engine client, its app and processes' handles included,
    goes to the permanent generation; once the engine stops, its cycles would stay
    there for the life of the worker, one engine's worth per in-process restart.
    Unfreezing is enough: the next engine's start collects the whole heap before it
    freezes it again (``freeze_before_fork``; vLLM's app start, ``freeze_gc_heap``),
    and the collector's next full pass takes them otherwise. Collecting here as well
    walked the same heap twice on the way to serving again (0.33 s on 2 cores per full
    collection of a worker's heap).
    After the last stop it is not called: the process exits, and a frozen heap spares
    the interpreter's final collection a walk over it (2 s of a 3 s SIGTERM-to-exit
    on 2 cores, measured)."""
    gc.unfreeze()


async def _settle(
    task: asyncio.Future[Any], timeout: float, what: str, *, cancelled_within: float = 0.0
) -> bool:
    """Wait at most ``timeout`` for ``task`` to end; never wait forever on it. With
    ``cancelled_within``, a task still running then is cancelled and waited for that long.

    ``asyncio.wait_for`` would wait for a cancelled task without limit, so a step that
    ignores cancellation could hang the stop; here it is abandoned and logged."""
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done and cancelled_within:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=cancelled_within)
    if not done:
        logger.error("%s did not end within %.0f s; abandoning it", what, timeout)
        return False
    if not task.cancelled():
        task.exception()  # retrieved: never "exception was never retrieved"
    return True
