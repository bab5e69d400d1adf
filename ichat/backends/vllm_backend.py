"""``VLLMBackend``: vLLM's OpenAI server composed in-process from vLLM's own functions.

vLLM's parser and validation, its socket setup, ``build_async_engine_client``,
``build_app`` and ``init_app_state``; no vLLM CLI subprocess, no copied vLLM code.
The functions are found by :mod:`ichat.backends.vllm_compat`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import psutil

from ichat.aio import cancelled
from ichat.auth import bearer_headers
from ichat.backends import vllm_compat
from ichat.backends.app_switch import AppSwitch, InstalledApp
from ichat.backends.argmap import rename_flags
from ichat.backends.base_backend import BackendState, BaseBackend, freeze_before_fork
from ichat.backends.failover import Standby
from ichat.backends.model_path import check_model_path
from ichat.backends.reloaded import Reloaded, ReloadMethod
from ichat.backends.replay import ReplayOnEngineDeath
from ichat.backends.vllm_engine import VLLMEngine
from ichat.config import WorkerConfig
from ichat.errors import ConfigError, EngineDiedError, ReloadError, StartupError
from ichat.process import processes
from ichat.process.processes import not_running

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger("ichat.vllm")

WARMUP_PROMPT = "Hello"
# after a failover: how long vLLM may take to see the dead engine dead itself (its
# requests still waiting then get their error) before the dead client is shut down
DEAD_ENGINE_VERDICT_S = 5.0


def vllm_log_level(config: WorkerConfig) -> str:
    level = config.engine_log_level
    return ("debug" if level == "trace" else level).upper()


class VLLMBackend(BaseBackend):
    engine_name = "vllm"
    engine_package = "vllm"
    WORKAROUNDS = vllm_compat.WORKAROUNDS
    # iChat's unified names -> vLLM's own flags.
    FLAG_NAMES: ClassVar[dict[str, str]] = {
        "--model-path": "--model",
        "--tokenizer-path": "--tokenizer",
        "--context-length": "--max-model-len",
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._engine_client: Any = None
        self._active: VLLMEngine | None = None
        self._standby: VLLMEngine | None = None
        self._retired: list[VLLMEngine] = []  # dead engines, closed in the background
        self._standby_task: asyncio.Task[None] | None = None
        self._sleep_mode = False  # a standby sleeps (level 1) while it waits
        self._watched: list[psutil.Process] | None = None
        self._app: Any = None
        self._switch: AppSwitch | None = None  # what the HTTP server serves
        self._reload_task: asyncio.Task[Reloaded] | None = None
        self._supported_tasks: tuple[str, ...] = ()
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ arguments

    @classmethod
    def engine_help(cls) -> str:
        api = vllm_compat.load()
        return str(cls._parser(api).format_help())

    @staticmethod
    def _parser(api: vllm_compat.VLLMServerAPI) -> Any:
        parser = api.FlexibleArgumentParser(
            prog="ichat serve --backend vllm",
            description="vLLM OpenAI-compatible server, in-process.",
        )
        return api.make_arg_parser(parser)

    def parse_args(self, config: WorkerConfig, argv: list[str]) -> Any:
        self._api = api = vllm_compat.load()
        api.cli_env_setup()  # spawn, as `vllm serve` does, unless set (engine_environment)
        vllm_compat.record_release_workarounds(api, self.workarounds)
        return self._parsed(api, config, argv)

    def _parsed(self, api: vllm_compat.VLLMServerAPI, config: WorkerConfig, argv: list[str]) -> Any:
        """``argv`` parsed and validated by vLLM, the framework's settings merged."""
        try:
            args = self._parser(api).parse_args(rename_flags(argv, self.FLAG_NAMES))
        except SystemExit as exc:  # argparse printed vLLM's own message to stderr
            raise ConfigError("invalid vLLM arguments (see the message above)") from exc
        if getattr(args, "model_tag", None):
            args.model = args.model_tag
        args.host, args.port = config.host, config.port
        if api.configure_logging_from_args is not None:  # vLLM >= 0.32: --log-level
            args.log_level = vllm_log_level(config)
        self._reject_unsupported_modes(args)
        if config.standby:
            self._prepare_for_a_standby(api, args)
        self._accept_the_gateways_key(args, config)
        check_model_path(args.model)
        try:
            api.validate_parsed_serve_args(args)
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"invalid vLLM arguments: {exc}") from exc
        if api.configure_logging_from_args is not None:
            api.configure_logging_from_args(args)
        return args

    @staticmethod
    def _reject_unsupported_modes(args: Any) -> None:
        """iChat serves one HTTP API server on host:port in its own process."""
        if getattr(args, "uds", None):
            raise ConfigError("--uds is not supported by ichat serve; use --host and --port")
        for flag in ("headless", "grpc"):
            if getattr(args, flag, False):
                raise ConfigError(f"--{flag} is not supported in-process by ichat serve")
        count = getattr(args, "api_server_count", None)
        if count is not None and count > 1:
            raise ConfigError(
                f"--api-server-count {count}: ichat serve runs one API server in its process; "
                "run several workers behind the gateway instead"
            )
        if hasattr(args, "api_server_count"):
            args.api_server_count = 1

    def _prepare_for_a_standby(self, api: vllm_compat.VLLMServerAPI, args: Any) -> None:
        """Refuse what two engines of one configuration cannot share; let the standby
        sleep where the platform allows it."""
        size = getattr(args, "data_parallel_size", 1) or 1
        if size > 1:
            raise ConfigError(
                f"--standby with --data-parallel-size {size}: the standby's data-parallel "
                "engines would need the same RPC and coordinator ports as the active's; "
                "run one worker per data-parallel group instead"
            )
        if getattr(args, "kv_transfer_config", None):
            raise ConfigError(
                "--standby with --kv-transfer-config: a KV connector binds its own "
                "side-channel ports, which a second engine cannot bind too"
            )
        self._sleep_mode = vllm_compat.sleep_mode_available(api)
        if self._sleep_mode and not getattr(args, "enable_sleep_mode", False):
            args.enable_sleep_mode = True
            logger.info("--standby: sleep mode enabled (the standby sleeps while it waits)")

    @classmethod
    def engine_environment(cls, config: WorkerConfig) -> dict[str, str]:
        # read when vLLM is imported (0.26 has no --log-level) and by its processes.
        # Fork: the engine's process starts from this one, vLLM already imported,
        # instead of importing it again (`vllm serve` sets spawn; vLLM itself falls back
        # to spawn where fork is unsafe: CUDA initialised here, Ray, the CPU platform).
        # H100, 1 B Llama: a restart's engine start 12.8-14.9 s forked vs 31.5-33.4 s
        # spawned (docs/benchmarks.md). vLLM's startup plan (VLLM_ENABLE_STARTUP_PLAN) is
        # left to the user: it keeps a start's KV-cache size in bytes under
        # VLLM_CACHE_ROOT for every later start of the machine whose fingerprint matches,
        # which leaves out --gpu-memory-utilization, and a size profiled beside another
        # engine starting on the same GPU is kept too: on an H100 a plan left by
        # `ichat up --workers 2` gave a later single worker at 0.4 a KV cache of
        # 0.07 GiB, and it did not start (docs/benchmarks.md).
        return {
            "VLLM_LOGGING_LEVEL": vllm_log_level(config),
            "VLLM_WORKER_MULTIPROC_METHOD": "fork",
        }

    @staticmethod
    def _accept_the_gateways_key(args: Any, config: WorkerConfig) -> None:
        """SMG sends the worker each client's own ``Authorization`` header (the key the
        client gave the gateway); the key registered with the worker serves only SMG's
        own calls (health, models, loads). An engine with keys of its own also accepts
        the gateway's, or every request routed to it would get 401."""
        key = config.gateway_api_key
        own = args.api_key if isinstance(args.api_key, list) else [args.api_key]
        own = [k for k in own if k] or [os.environ.get("VLLM_API_KEY", "")]
        own = [k for k in own if k]
        if not config.gateway_url or not key or not own or key in own:
            return
        args.api_key = [*own, key]
        logger.info("the engine accepts the gateway's key too (SMG forwards clients' keys)")

    # ---------------------------------------------------------------------- hooks

    def bind_socket(self) -> socket.socket:
        _, sock = vllm_compat.call_with(
            self._api.setup_server, args=self._backend_args, reuse_port=False
        )
        return sock  # type: ignore[no-any-return]

    async def start_engine(self, stack: contextlib.AsyncExitStack) -> None:
        # these run after every engine's shutdown (the stack unwinds last-in first-out)
        stack.callback(self._clear_engine_keyed_caches)
        stack.push_async_callback(self._close_engines)
        freeze_before_fork()  # the engine's processes are forked from this one
        if self.framework_args.standby:
            # first: on a GPU it sleeps before the active engine sizes its memory
            await self._start_standby()
            if self._standby is None:
                raise StartupError(f"the standby engine did not start: {self._standby_reason}")
        self._active = active = await VLLMEngine.launch(
            self._api.build_async_engine_client(self._backend_args)
        )
        self._engine_client = client = active.client
        self.workarounds.record("engine_core_zmq_context", bool(active.zmq_contexts))
        self.workarounds.record("engine_errored_flag", hasattr(client, "errored"))
        self.workarounds.record("abort_all_requests", vllm_compat.can_abort_all_requests(client))
        # what a standby's metrics need, checked on every start (standby or not)
        self.workarounds.record("prometheus_collectors", vllm_compat.vllm_collectors() is not None)
        self._report_standby()

    def _clear_engine_keyed_caches(self) -> None:
        """vLLM's memo caches that would keep this engine's tokenizer copies after it
        stopped (see ``vllm_compat.ENGINE_KEYED_CACHES``)."""
        for cache in self._api.engine_keyed_caches:
            cache.cache_clear()

    async def _close_engines(self) -> None:
        """Shut every engine down: one a reload is starting, the standby (or the one
        starting), the active, and dead or replaced ones still being closed."""
        for task in (self._reload_task, self._standby_task):
            await cancelled(task)
        self._standby_task = None
        active = self._active
        if active is not None and isinstance(self.failure, EngineDiedError):
            # what the dead engine cut goes on elsewhere only once vLLM has ended it
            await self._vllms_verdict(active)
        engines = [self._standby, active, *self._retired]
        self._standby = self._active = None
        self._retired = []
        for engine in engines:
            if engine is not None:
                await engine.stack.aclose()

    @staticmethod
    async def _vllms_verdict(dead: VLLMEngine) -> None:
        """Wait (at most ``DEAD_ENGINE_VERDICT_S``) until vLLM has seen its engine dead:
        its output handler then ends every request still waiting on that engine with an
        error, which the worker continues or runs again (on a standby, the restarted
        engine, another worker); a client shut down before that leaves them waiting
        until the drain deadline (seen in CI: the streams a death cut, to be continued
        on the restarted engine, hung)."""
        t0 = time.monotonic()
        while not vllm_compat.engine_has_errored(dead.client):
            if time.monotonic() - t0 > DEAD_ENGINE_VERDICT_S:
                logger.warning("vLLM did not see its engine dead in %g s", DEAD_ENGINE_VERDICT_S)
                return
            await asyncio.sleep(0.02)

    def _watch_engine_processes(self) -> list[psutil.Process]:
        """vLLM's own processes among those the active engine's start left."""
        active = self._active
        self._watched = watched = active.watched if active is not None else []
        if active is not None and active.processes:  # none: the engine runs in-process
            self.workarounds.record("engine_process_titles", bool(watched))
        logger.debug("watching engine processes %s", [p.pid for p in watched])
        return watched

    # ------------------------------------------------------------------- standby

    async def _start_standby(self) -> None:
        """Start an engine of the same configuration, built in a thread while the
        active one serves; prepare its app state and its metrics; put it to sleep where
        the platform allows. A standby that cannot start is reported, not raised."""
        self._report_standby(Standby.STARTING)
        t0 = time.monotonic()
        serving = vllm_compat.vllm_collectors()  # the active engine's metrics
        engine: VLLMEngine | None = None
        try:
            async with self.recording_engine_shm():
                engine = await VLLMEngine.launch(
                    vllm_compat.engine_client_built_in_a_thread(self._api, self._backend_args)
                )
            # a new engine registers its own vllm: collectors in place of the active's
            engine.collectors = vllm_compat.vllm_collectors()
            if serving is not None:
                vllm_compat.serve_collectors(serving)
            engine.state = await self._prepared_state(engine.client)
            if self._sleep_mode:
                await engine.client.sleep(level=1)
                engine.asleep = True
        except Exception as exc:
            if serving is not None:
                vllm_compat.serve_collectors(serving)
            if engine is not None:
                self._retired.append(engine)
            self._unlink_engine_shm_left_behind()  # what a start that failed left
            logger.error("the standby engine did not start: %s", exc)
            self._report_standby(Standby.FAILED, f"{type(exc).__name__}: {exc}")
            return
        except BaseException:
            if engine is not None:
                self._retired.append(engine)  # closed with the others at the stop
            raise
        self._standby = engine
        self.phase_seconds["standby_start"] = time.monotonic() - t0
        self._record_engine_shm()
        logger.info(
            "standby engine %s (processes %s)", "asleep" if engine.asleep else "ready", engine.pids
        )
        self._report_standby()

    async def _prepared_state(self, client: Any) -> Any:
        """The app state vLLM's ``init_app_state`` makes for ``client``, made now so
        that a failover only swaps it in."""
        from starlette.datastructures import State

        state = State()
        tasks = await self._tasks_of(client)
        await vllm_compat.call_with(
            self._api.init_app_state,
            engine_client=client,
            state=state,
            args=self._backend_args,
            supported_tasks=tasks,
            vllm_config=getattr(client, "vllm_config", None),
        )
        return state

    async def fail_over(self) -> dict[str, float] | None:
        standby, dead = self._standby, self._active
        if standby is None or dead is None or self._app is None:
            return None
        if standby.dead_processes():
            logger.error("the standby engine is dead too (processes %s)", standby.pids)
            self._standby = None
            self._retired.append(standby)
            return None
        self._standby = None
        phases: dict[str, float] = {}
        t0 = time.monotonic()
        if standby.asleep:
            try:
                await standby.client.wake_up()
            except BaseException:
                self._retired.append(standby)  # closed with the others at the stop
                raise
            standby.asleep = False
            phases["failover_wake"] = time.monotonic() - t0
        t1 = time.monotonic()
        for name, value in standby.state._state.items():  # what init_app_state set
            setattr(self._app.state, name, value)
        if standby.collectors is not None:
            vllm_compat.serve_collectors(standby.collectors)
        self._active, self._engine_client = standby, standby.client
        self._watched = standby.watched
        phases["failover_switch"] = time.monotonic() - t1
        logger.info("the standby engine %s is active", standby.pids)
        self._report_standby(Standby.STARTING)  # its replacement, next
        self._standby_task = asyncio.create_task(self._replace_standby(dead))
        return phases

    async def _replace_standby(self, dead: VLLMEngine) -> None:
        """Close the dead engine (its processes killed first: nothing of it can finish),
        unlink the shared memory it left, then start a new standby."""
        self._retired.append(dead)
        t0 = time.monotonic()
        await self._vllms_verdict(dead)  # before its client is shut down
        deadlines = self.framework_args.deadlines
        # in a thread: reaping waits, and the loop serves the new active engine meanwhile
        await asyncio.to_thread(
            processes.kill, processes.with_descendants(dead.processes), deadlines.terminate
        )
        await self._close_engine(dead)
        self._retired.remove(dead)
        self.phase_seconds["failover_cleanup"] = time.monotonic() - t0
        await self._start_standby()

    def _report_standby(self, state: Standby | None = None, reason: str | None = None) -> None:
        self._report_standby_of(self._active, self._standby, state, reason)

    @staticmethod
    async def _tasks_of(client: Any) -> tuple[str, ...]:
        if hasattr(client, "get_supported_tasks"):
            return tuple(await client.get_supported_tasks())
        return ("generate",)

    async def build_app(self) -> Any:
        self._watch_engine_processes()  # the engine's processes are recorded by now
        installed, self._supported_tasks = await self._app_for(
            self._engine_client, self._backend_args
        )
        self._app = installed.app
        await installed.start_lifespan()
        assert self._stack is not None
        self._stack.push_async_callback(self._end_serving_lifespan)  # before the engines'
        self._switch = AppSwitch(installed)
        return self._switch

    async def _app_for(self, client: Any, args: Any) -> tuple[InstalledApp, tuple[str, ...]]:
        """vLLM's app for ``client`` built with ``args`` and its state initialised, and
        the tasks the engine supports."""
        tasks = await self._tasks_of(client)
        app = vllm_compat.call_with(
            self._api.build_app,
            args=args,
            supported_tasks=tasks,
            model_config=getattr(client, "model_config", None),
        )
        await vllm_compat.call_with(
            self._api.init_app_state,
            engine_client=client,
            state=app.state,
            args=args,
            supported_tasks=tasks,
            vllm_config=getattr(client, "vllm_config", None),
        )
        asgi: Any = app
        config = self.framework_args
        # what the dying engine failed runs on: a standby, another worker, or (with
        # continuation on) this worker's next engine
        if config.standby or config.gateway_url or config.continuation_limit:
            gateway, restarted = self._where_cut_requests_go()  # no standby ready
            asgi = ReplayOnEngineDeath(
                app,
                _ServingEngine(app),
                wait_for_next_engine=config.continuation_timeout,
                continuation_limit=config.continuation_limit,
                max_model_len=lambda: vllm_compat.max_model_len(self._engine_client),
                decode=lambda ids, skip: vllm_compat.decode(self._engine_client, ids, skip),
                reasoning_parser=bool(getattr(args, "reasoning_parser", None)),
                on_continuation=self._report_continuation,
                gateway=gateway,
                restarted=restarted,
                takes_over_here=self._takes_over_here,
                handing_off=lambda: self.handing_off,
            )
        return InstalledApp(asgi, app), tasks

    def _takes_over_here(self) -> bool:
        """Whether an engine of this worker serves at once in place of a dead one: a
        standby is ready, or has taken over already."""
        if self._standby is not None:
            return True
        client = self._engine_client
        return client is not None and not vllm_compat.engine_has_errored(client)

    async def _end_serving_lifespan(self) -> None:
        if self._switch is not None:
            await self._switch.serving.end_lifespan()

    # -------------------------------------------------------------------- reload

    async def reload(self, argv: list[str], method: ReloadMethod = ReloadMethod.AUTO) -> Reloaded:
        if self._reload_task is not None and not self._reload_task.done():
            raise ReloadError("a reload is in progress; try again once it has ended", 409)
        if self.state is not BackendState.READY or self._switch is None or self._stop_requested:
            raise ReloadError(f"the engine is not serving (backend {self.state.value})", 409)
        self._reload_task = task = asyncio.create_task(self._reload(argv, method))
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current and current.cancelling()):
                raise ReloadError("the worker stopped during the reload", 409) from None
            raise

    async def _reload(self, argv: list[str], method: ReloadMethod) -> Reloaded:
        """The same flags and an engine that can: its weights loaded again in place;
        otherwise (or ``swap``) a new engine started with ``argv`` while the active one
        serves, its app built and warmed up, new requests switched to it, the old
        retired once its requests have ended. Until the switch, any failure leaves the
        old serving."""
        t0 = time.monotonic()
        args = self._parsed_for_reload(argv)
        in_place = vllm_compat.can_reload_weights_in_place(self._engine_client)
        same = argv == self.backend_argv
        if method is ReloadMethod.IN_PLACE and not (same and in_place):
            why = "the flags differ" if not same else "this vLLM cannot reload weights in place"
            raise ReloadError(f"an in-place reload is not possible: {why}", 409)
        if same and in_place and method is not ReloadMethod.SWAP:
            phases = await self._reload_weights_in_place()
            phases["reload"] = time.monotonic() - t0
            self.phase_seconds.update(phases)
            return Reloaded(ReloadMethod.IN_PLACE, phases)
        engine, installed, tasks, phases = await self._engine_and_app(args)
        # the switch: new requests reach the new engine from here on
        t1 = time.monotonic()
        old_engine, switch = self._active, self._switch
        assert old_engine is not None and switch is not None and self._server is not None
        standby = self.framework_args.standby
        installed.app.state.server = _StopUnlessStandingBy(self._server, lambda: standby)
        # the old engine's requests that see it closed must not end the server
        switch.serving.app.state.server = _StopUnlessStandingBy(self._server, lambda: True)
        retired = switch.switch_to(installed)
        self._retired.append(old_engine)  # closed with the others if the worker stops now
        self._active, self._engine_client, self._watched = engine, engine.client, engine.watched
        self._app, self._supported_tasks = installed.app, tasks
        self._backend_args, self.backend_argv = args, list(argv)
        if engine.collectors is not None:
            vllm_compat.serve_collectors(engine.collectors)
        self._record_engine_shm()
        phases["reload_switch"] = time.monotonic() - t1
        logger.info("reload: the new engine %s serves; retiring %s", engine.pids, old_engine.pids)
        if standby:
            await self._renew_standby_in_the_background()
        t2 = time.monotonic()
        await self._retire(retired, old_engine)
        phases["reload_retire_old"] = time.monotonic() - t2
        phases["reload"] = time.monotonic() - t0
        self.phase_seconds.update(phases)
        return Reloaded(ReloadMethod.SWAP, phases)

    async def _reload_weights_in_place(self) -> dict[str, float]:
        """Pause (new requests wait in the engine, those in flight finish within
        ``--drain-timeout``, then are aborted), load the weights again, resume. A load
        that fails leaves the weights in an unknown state: the engine is then stopped
        and the worker fails over to its standby or restarts it, as after a death."""
        client, engine = self._engine_client, self._active
        assert engine is not None
        phases: dict[str, float] = {}
        t0 = time.monotonic()
        await self._within_the_drain_timeout(vllm_compat.pause_letting_requests_finish(client))
        phases["reload_pause"] = time.monotonic() - t0
        t1 = time.monotonic()
        try:
            await vllm_compat.reload_weights(client)
        except Exception as exc:
            logger.error("reload: the weights did not load in place (%s); stopping the engine", exc)
            processes.kill(processes.with_descendants(engine.processes), 0.0)
            raise ReloadError(
                f"the weights did not load in place ({type(exc).__name__}: {exc}); the "
                "engine, its weights now in an unknown state, was stopped: the worker "
                "fails over to its standby or restarts it"
            ) from exc
        phases["reload_weights"] = time.monotonic() - t1
        await vllm_compat.resume(client)
        logger.info("reload: weights loaded again in place in %.2f s", phases["reload_weights"])
        if self.framework_args.standby:
            await self._renew_standby_in_the_background()
        return phases

    def parse_reload_args(self, argv: list[str]) -> Any:
        return self._parsed(self._api, self.framework_args, argv)

    async def _engine_and_app(
        self, args: Any
    ) -> tuple[VLLMEngine, InstalledApp, tuple[str, ...], dict[str, float]]:
        """A new engine for ``args``, its app built, its lifespan started and one warmup
        request answered; closed again (and ``ReloadError``) if any of it fails."""
        phases: dict[str, float] = {}
        t0 = time.monotonic()
        serving = vllm_compat.vllm_collectors()  # the active engine's metrics
        engine: VLLMEngine | None = None
        installed: InstalledApp | None = None
        try:
            async with self.recording_engine_shm():
                engine = await VLLMEngine.launch(
                    vllm_compat.engine_client_built_in_a_thread(self._api, args)
                )
            engine.collectors = vllm_compat.vllm_collectors()
            if serving is not None:  # the active engine's served until the switch
                vllm_compat.serve_collectors(serving)
            phases["reload_engine_start"] = time.monotonic() - t0
            t1 = time.monotonic()
            installed, tasks = await self._app_for(engine.client, args)
            await installed.start_lifespan()
            if self.framework_args.warmup:
                await self._warm_up_app(installed, args, tasks)
            phases["reload_warmup"] = time.monotonic() - t1
        except BaseException as exc:
            if serving is not None:
                vllm_compat.serve_collectors(serving)
            if installed is not None:
                await installed.end_lifespan()
            if engine is not None:
                await self._close_engine(engine)
            self._unlink_engine_shm_left_behind()  # what a start that failed left
            if isinstance(exc, Exception):
                logger.error("reload: the new engine did not start: %s", exc)
                raise ReloadError(
                    f"the new engine did not start ({type(exc).__name__}: {exc}); "
                    "the running engine keeps serving (the engine's own messages are "
                    "in the worker's log)"
                ) from exc
            raise
        return engine, installed, tasks, phases

    async def _warm_up_app(
        self, installed: InstalledApp, args: Any, tasks: tuple[str, ...]
    ) -> None:
        """One small request through the new app itself, before any client's."""
        import httpx

        transport = httpx.ASGITransport(app=installed.asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://reload") as client:
            await self._warmup_through(
                client, _served_model_name_of(args), _api_key_of(args), tasks
            )

    async def _retire(self, retired: InstalledApp, engine: VLLMEngine) -> None:
        """Let the old app's requests finish (``--drain-timeout``), abort what is left,
        end its lifespan and close its engine."""
        config = self.framework_args
        if not await retired.idle(config.drain_timeout):
            logger.warning(
                "reload: %d requests still on the old engine after %g s; aborting them",
                retired.in_flight,
                config.drain_timeout,
            )
            await vllm_compat.abort_all_requests(engine.client)
            await retired.idle(config.deadlines.drain_grace)
        await retired.end_lifespan()
        await self._close_engine(engine)
        if engine in self._retired:
            self._retired.remove(engine)

    async def _close_engine(self, engine: VLLMEngine) -> None:
        """Shut an engine down (bounded), stop what is left of its processes, unlink
        the shared memory it left."""
        deadlines = self.framework_args.deadlines
        try:
            await asyncio.wait_for(engine.stack.aclose(), deadlines.engine_shutdown)
        except Exception as exc:
            logger.warning("closing an engine raised %r", exc)
        left = [p for p in processes.with_descendants(engine.processes) if p.is_running()]
        if left:
            await asyncio.to_thread(processes.terminate, left, deadlines.terminate)
        self._unlink_engine_shm_left_behind()

    async def _renew_standby_in_the_background(self) -> None:
        """After a reload the standby runs the old configuration or weights: stop the
        one starting, if any, and replace it by one of the new, in the background."""
        await cancelled(self._standby_task)
        self._report_standby(Standby.STARTING)
        self._standby_task = asyncio.create_task(self._renew_standby())

    async def _renew_standby(self) -> None:
        """After a reload: close the standby of the old configuration, start one of the new."""
        old, self._standby = self._standby, None
        if old is not None:
            await self._close_engine(old)
        await self._start_standby()

    def uvicorn_options(self) -> dict[str, Any]:
        args = self._backend_args
        options: dict[str, Any] = {
            "access_log": not args.disable_uvicorn_access_log,
            "timeout_keep_alive": vllm_compat.keep_alive_seconds(self._api),
            "ssl_keyfile": args.ssl_keyfile,
            "ssl_certfile": args.ssl_certfile,
            "ssl_ca_certs": args.ssl_ca_certs,
            "ssl_cert_reqs": args.ssl_cert_reqs,
        }
        if getattr(args, "uvicorn_log_level", "info") != "info":  # vLLM's default: ours
            options["log_level"] = args.uvicorn_log_level
        for name in ("ssl_ciphers", "h11_max_incomplete_event_size"):
            if getattr(args, name, None) is not None:
                options[name] = getattr(args, name)
        if self._api.get_uvicorn_log_config is not None:
            log_config = self._api.get_uvicorn_log_config(args)
            if log_config is not None:
                options["log_config"] = log_config
        return options

    def on_server_created(self, server: Any) -> None:
        # vLLM's EngineDeadError handler stops the server through app.state.server.
        # With --standby the health monitor alone decides what a death ends: a failover
        # keeps this server (even while the standby wakes), no standby ends it.
        standby = self.framework_args.standby
        self._app.state.server = _StopUnlessStandingBy(server, lambda: standby)
        count = getattr(self._backend_args, "h11_max_header_count", None)
        if count is not None:
            server.config.h11_max_header_count = count

    def served_model_name(self) -> str:
        return _served_model_name_of(self._backend_args)

    def served_model_names(self) -> list[str]:
        return _served_model_names_of(self._backend_args)

    def api_key(self) -> str | None:
        return _api_key_of(self._backend_args)

    async def warmup(self, client: httpx.AsyncClient) -> None:
        await self._warmup_through(
            client, self.served_model_name(), self.api_key(), self._supported_tasks
        )

    @staticmethod
    async def _warmup_through(
        client: httpx.AsyncClient, model: str, api_key: str | None, tasks: tuple[str, ...]
    ) -> None:
        headers = bearer_headers(api_key)
        if "generate" in tasks:
            path = "/v1/completions"
            body: dict[str, Any] = {"model": model, "prompt": WARMUP_PROMPT, "max_tokens": 1}
        elif "embed" in tasks:
            path, body = "/v1/embeddings", {"model": model, "input": WARMUP_PROMPT}
        else:
            logger.info("no warmup request for tasks %s", tasks)
            return
        response = await client.post(path, json=body, headers=headers)
        if response.status_code != 200:
            raise StartupError(
                f"warmup request {path} failed: HTTP {response.status_code} {response.text[:500]}"
            )

    def check_engine_processes(self) -> None:
        if self._engine_client is None:
            return
        watched = self._watched if self._watched is not None else self._watch_engine_processes()
        dead = not_running(watched)
        if dead:
            # vLLM itself may take seconds to notice a dead tensor-parallel worker.
            raise EngineDiedError(f"vLLM engine process {dead[0].pid} exited")

    async def abort_requests(self) -> None:
        if self._engine_client is not None:
            await vllm_compat.abort_all_requests(self._engine_client)

    async def check_engine_alive(self) -> None:
        client = self._engine_client
        if client is None:
            return
        self.check_engine_processes()
        if vllm_compat.engine_has_errored(client):
            raise EngineDiedError("the vLLM engine is dead (engine_client.errored)")
        try:
            await client.check_health()
        except self._api.EngineDeadError as exc:
            if client is not self._engine_client:
                return  # a reload replaced this engine meanwhile
            raise EngineDiedError(f"the vLLM engine is dead: {exc}") from exc


def _served_model_names_of(args: Any) -> list[str]:
    names = args.served_model_name or [args.model]
    return [str(n) for n in (names if isinstance(names, list) else [names])]


def _served_model_name_of(args: Any) -> str:
    return _served_model_names_of(args)[0]


def _api_key_of(args: Any) -> str | None:
    key = getattr(args, "api_key", None) or os.environ.get("VLLM_API_KEY")
    return str(key[0] if isinstance(key, list) else key) if key else None


class _StopUnlessStandingBy:
    """What vLLM's engine-error handler finds as ``app.state.server``: it sets
    ``should_exit`` when a request finds the engine dead, to end a server whose engine
    is gone (``app.state`` still names the dead engine while the standby wakes). With
    ``--standby`` the health monitor decides instead: it fails over on this same
    server (the request that saw the death gets its error, the server stays) or, with
    no standby ready, ends the backend itself. Every other attribute is the server's."""

    def __init__(self, server: Any, standing_by: Callable[[], bool]) -> None:
        object.__setattr__(self, "_server", server)
        object.__setattr__(self, "_standing_by", standing_by)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "should_exit" and value and self._standing_by():
            logger.info("the engine died; the standby takes over (the server stays)")
            return
        setattr(self._server, name, value)


class _ServingEngine:
    """The engine client the app serves now (``app.state.engine_client``), for
    ``ReplayOnEngineDeath``: swapped at a failover."""

    def __init__(self, app: Any) -> None:
        self._app = app

    def current(self) -> Any:
        return self._app.state.engine_client

    def died(self, engine: Any) -> bool:
        return vllm_compat.engine_has_errored(engine)
