"""``SGLangBackend``: SGLang's HTTP server composed in-process from SGLang's own functions.

SGLang's parser (``prepare_server_args``: its flags, ``--config`` files), its launch of
the scheduler and detokenizer processes and the tokenizer manager
(``_launch_subprocesses``, with the functions its ``launch_server`` uses), its FastAPI
app with ``set_global_state`` and its API-key middleware, served by iChat's uvicorn on
the pre-bound socket. No copied or patched SGLang code; the functions are found by
:mod:`ichat.backends.sglang_compat`.

What iChat does instead of SGLang's standalone launcher, and why:

- **Signals**: the worker owns SIGTERM/SIGINT (drain, leave the gateway). SGLang's
  tokenizer manager adds its own SIGTERM/SIGQUIT handlers to the event loop for a
  standalone server; they are declined here. SGLang's processes report a failure to
  their parent with SIGQUIT: SGLang's ``custom_sigquit_handler`` setting receives it,
  and it only records the failure for the health monitor (SGLang's default handler
  kills the process tree, this process included).
- **Watching**: SGLang's ``SubprocessWatchdog`` (1 s polls, then SIGQUIT to this
  process) is stopped; the health monitor checks every engine process each
  ``--health-interval`` instead.
- **Warmup**: SGLang's start-up warmup kills its own process on failure, so it is
  skipped (``skip_server_warmup``); iChat's readiness probes ``/model_info`` and sends
  one ``/generate`` (or ``/encode``) request, and a failure is a boot failure (exit 3).
- **Standby** (``--standby``): a second engine of the same flags, launched first (and
  again in a thread after each failover, while the active one serves), idle. SGLang's
  app serves the engine in its module-level ``_global_state``; a failover makes the
  standby's current there (``set_global_state``) and enters SGLang's own app lifespan
  for it, which binds the OpenAI handlers on ``app.state`` to it. With SGLang's own
  ``--enable-memory-saver`` (CUDA and ``torch-memory-saver``) the standby sleeps: every
  engine also gets ``--enable-weights-cpu-backup``; a ready standby gives its GPU memory
  back (``release_memory_occupation``: weights kept in host memory, KV cache and CUDA
  graphs' memory freed), and a failover kills what is left of the dead engine, then
  takes the memory again (``resume_memory_occupation``). Without it the standby keeps
  its memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

from ichat.aio import cancelled
from ichat.auth import bearer_headers
from ichat.backends import sglang_compat
from ichat.backends.argmap import flag_value
from ichat.backends.base_backend import BackendState, BaseBackend
from ichat.backends.continuation import COMPLETIONS
from ichat.backends.failover import Standby
from ichat.backends.model_path import check_model_path
from ichat.backends.reloaded import Reloaded, ReloadMethod
from ichat.backends.replay import ReplayOnEngineDeath
from ichat.backends.sglang_engine import SGLangEngine
from ichat.config import WorkerConfig
from ichat.errors import (
    ConfigError,
    EngineDiedError,
    ReloadError,
    RestartToReload,
    StartupError,
)
from ichat.process import processes

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger("ichat.sglang")

WARMUP_PROMPT = "Hello"
# iChat's log levels -> SGLang's --log-level choices
LOG_LEVELS = {"trace": "debug", "critical": "critical", "debug": "debug", "info": "info",
              "warning": "warning", "error": "error"}  # fmt: skip


class FailureReport:
    """SGLang's ``custom_sigquit_handler``: a child process signalled a failure.

    A plain object, so that it pickles with the server arguments SGLang hands to its
    spawned processes; it only records (the monitor acts)."""

    def __init__(self) -> None:
        self.received = False

    def __call__(self, signum: int, frame: object) -> None:
        self.received = True


class SGLangBackend(BaseBackend):
    engine_name = "sglang"
    engine_package = "sglang"
    WORKAROUNDS = sglang_compat.WORKAROUNDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._active: SGLangEngine | None = None
        self._standby: SGLangEngine | None = None
        self._sleep = False  # a standby gives its GPU memory back while it waits
        self._said_the_standby_keeps_its_memory = False
        self._standby_task: asyncio.Task[None] | None = None
        # standby launches under way in the executor (a thread cannot be stopped)
        self._launches: set[asyncio.Future[SGLangEngine]] = set()
        self._retired: list[SGLangEngine] = []  # dead or replaced, being closed
        self._app: Any = None
        self._stop_server: Any = None  # SGLang's hook to stop the HTTP server
        self._failure_report = FailureReport()
        self._is_generation = True
        self._reloading = False
        super().__init__(*args, **kwargs)

    @property
    def _launched(self) -> sglang_compat.Launched | None:
        """What SGLang's launch returned for the active engine."""
        return self._active.launched if self._active is not None else None

    # ------------------------------------------------------------------ arguments

    @classmethod
    def engine_help(cls) -> str:
        import argparse

        api = sglang_compat.load()
        parser = argparse.ArgumentParser(prog="ichat serve --backend sglang")
        api.ServerArgs.add_cli_args(parser)
        return parser.format_help()

    def parse_args(self, config: WorkerConfig, argv: list[str]) -> Any:
        self._api = api = sglang_compat.load()
        sglang_compat.record_release_workarounds(api, self.workarounds)
        # iChat's unified names (--model-path, --tokenizer-path, --context-length,
        # --served-model-name, --trust-remote-code) are SGLang's own: nothing to rename.
        # The model folder is checked before SGLang reads its config (``--model`` is
        # SGLang's alias of --model-path).
        check_model_path(flag_value(argv, "--model-path") or flag_value(argv, "--model"))
        framework = ["--host", config.host, "--port", str(config.port)]
        framework += ["--log-level", LOG_LEVELS.get(config.engine_log_level, "info")]
        try:  # SGLang's parsing, then its own checks (resolve_once: newer releases)
            server_args = api.prepare_server_args([*argv, *framework])  # the last one wins
            self._reject_unsupported_modes(server_args)
            if config.standby:
                self._check_a_standby_fits(server_args)
                self._let_the_standby_sleep(server_args)
            self._check_the_gateways_key(server_args, config)
            server_args.skip_server_warmup = True  # iChat warms up (see the module docstring)
            server_args.custom_sigquit_handler = self._failure_report
            if hasattr(server_args, "resolve_once"):
                server_args.resolve_once()
            server_args.check_server_args()
        except SystemExit as exc:  # argparse printed SGLang's own message to stderr
            raise ConfigError("invalid SGLang arguments (see the message above)") from exc
        except (ValueError, TypeError, AssertionError, OSError) as exc:
            raise ConfigError(f"invalid SGLang arguments: {exc}") from exc
        return server_args

    @staticmethod
    def _reject_unsupported_modes(server_args: Any) -> None:
        """iChat serves one uvicorn HTTP server on host:port in its own process."""
        workers = getattr(server_args, "tokenizer_worker_num", 1) or 1
        if workers > 1:
            raise ConfigError(
                f"--tokenizer-worker-num {workers}: ichat serve runs one HTTP server in its "
                "process; run several workers behind the gateway instead"
            )
        if getattr(server_args, "enable_http2", False):
            raise ConfigError("--enable-http2 (Granian) is not supported by ichat serve")
        if (getattr(server_args, "node_rank", 0) or 0) >= 1:
            raise ConfigError(
                "--node-rank >= 1 serves no HTTP: start SGLang's own launcher "
                "(python -m sglang.launch_server) on the other nodes, ichat serve on node 0"
            )

    def _check_a_standby_fits(self, server_args: Any) -> None:
        """Refuse what two engines of one configuration in one process cannot share."""
        if self._api.lifespan is None:
            raise ConfigError(
                f"--standby: SGLang {self._api.version} has no app lifespan to serve a "
                "standby with; use --backend vllm, or two workers behind the gateway"
            )
        if getattr(server_args, "enable_metrics", False):
            raise ConfigError(
                "--standby with --enable-metrics: SGLang registers its HTTP metrics and "
                "middleware once per process, at the app's start, and a failover enters "
                "the app's lifespan again for the standby; drop one of the two"
            )
        if getattr(server_args, "grpc_port", None) is not None:
            raise ConfigError(
                "--standby with --grpc-port: each engine's lifespan binds SGLang's gRPC "
                "server to that one port; drop one of the two"
            )

    def _let_the_standby_sleep(self, server_args: Any) -> None:
        """With SGLang's own ``--enable-memory-saver`` (CUDA, ``torch-memory-saver``):
        the standby gives its GPU memory back while it waits, its weights kept in host
        memory (``--enable-weights-cpu-backup``, set here: they are not read again).
        Without it, on CUDA, each engine keeps its memory, which is said once."""
        self._sleep = bool(getattr(server_args, "enable_memory_saver", False))
        if self._sleep:
            server_args.enable_weights_cpu_backup = True
            if hasattr(server_args, "enable_draft_weights_cpu_backup"):
                server_args.enable_draft_weights_cpu_backup = True
        elif not self._said_the_standby_keeps_its_memory and sglang_compat.on_cuda(server_args):
            self._said_the_standby_keeps_its_memory = True
            logger.warning(
                "--standby without --enable-memory-saver: the standby keeps its GPU memory "
                "(--mem-fraction-static of what is free when it starts, so the active engine "
                "gets that share of the rest); with --enable-memory-saver "
                "(torch-memory-saver installed) it gives its memory back while it waits"
            )

    @staticmethod
    def _check_the_gateways_key(server_args: Any, config: WorkerConfig) -> None:
        """SMG sends the worker each client's own ``Authorization`` header (the gateway's
        key); SGLang takes a single ``--api-key``, so a different one would refuse
        every request routed to this worker."""
        key, own = config.gateway_api_key, server_args.api_key
        if config.gateway_url and key and own and own != key:
            raise ConfigError(
                "--api-key differs from --gateway-api-key: the gateway (SMG) forwards each "
                "client's key, which SGLang's single --api-key would refuse; give the "
                "worker the gateway's key"
            )

    # ---------------------------------------------------------------------- hooks

    def bind_socket(self) -> socket.socket:
        sock = super().bind_socket()
        # Listening from the start: SGLang's lifespan thread calls its own /freeze_gc
        # while uvicorn starts up; queued in the backlog, it is answered once serving.
        sock.listen(2048)
        return sock

    async def start_engine(self, stack: contextlib.AsyncExitStack) -> None:
        stack.push_async_callback(self._stop_engine)
        if self.framework_args.standby:
            # first, as vLLM's: the active engine then sizes its memory beside it
            await self._start_standby(threaded=False)
            if self._standby is None:
                raise StartupError(f"the standby engine did not start: {self._standby_reason}")
        # Blocks the loop while the model loads, as SGLang's launcher does.
        self._active = active = SGLangEngine.launch(self._api, self._backend_args)
        sglang_compat.record_launch_workarounds(active.launched, self.workarounds)
        self._started(active)
        logger.info(
            "watching engine processes %s (KV cache %s tokens)",
            active.pids,
            active.launched.scheduler_info.get("max_total_num_tokens"),
        )
        self._report_standby()

    def _started(self, engine: SGLangEngine) -> None:
        launched = engine.launched
        if launched.watchdog is not None:
            launched.watchdog.stop()  # the health monitor watches the same processes
        sglang_compat.start_tokenizer_manager_loop(launched, self.workarounds)

    async def _stop_engine(self) -> None:
        await cancelled(self._standby_task)
        self._standby_task = None
        engines = [e for e in (self._standby, self._active, *self._retired) if e is not None]
        for engine in engines:
            sglang_compat.cancel_tokenizer_manager_tasks(engine.launched)
        # Exactly the engines' processes, SIGKILLed and waited for, as SGLang's own
        # cleanup does; not its kill_process_tree(this process), which kills every
        # child of the worker, the orphan guard and multiprocessing's tracker included.
        await self._engine_processes_killed()
        await self._launches_ended()
        for engine in engines:  # ZMQ contexts and sockets (3 threads, 9 descriptors each)
            await engine.close(self.framework_args.deadlines.terminate)
        self._standby = None
        self._retired = []

    async def _engine_processes_killed(self) -> None:
        """SIGKILL the engines' processes and wait for them, noting first what they map
        or hold open in /dev/shm (a killed process unlinks nothing)."""
        self._record_engine_shm()
        await asyncio.to_thread(self.stop_engine_processes, at_once=True)

    async def _launches_ended(self) -> None:
        """A standby launch the stop cut goes on in its thread: what it starts is killed
        until the launch ends (it fails once its scheduler is gone), or until the
        terminate deadline. Else it would start a scheduler after the stop, whose
        load-snapshot file (/dev/shm/sglang_loads_*) nobody would unlink (seen in CI once:
        SIGTERM right after a failover)."""
        if not self._launches:
            return
        t0 = time.monotonic()
        while self._launches and time.monotonic() - t0 < self.framework_args.deadlines.terminate:
            await asyncio.wait(self._launches, timeout=0.1)
            await self._engine_processes_killed()
        if self._launches:
            logger.warning("a standby launch still runs at the stop; its processes are killed")
        else:
            logger.info("the standby launch the stop cut ended %.2f s later", time.monotonic() - t0)

    async def build_app(self) -> Any:
        api, args, launched = self._api, self._backend_args, self._launched
        assert launched is not None
        sglang_compat.serve(api, launched)
        self._app = app = api.app
        app.is_single_tokenizer_mode = True
        app.server_args = args
        app.warmup_thread_kwargs = {"server_args": args}
        needs_auth = bool(args.api_key or getattr(args, "admin_api_key", None))
        if api.app_has_admin_force_endpoints is not None:
            needs_auth = needs_auth or api.app_has_admin_force_endpoints(app)
        # SGLang's app is one object per process: its middleware is added once (a
        # restarted engine in the same process reuses it; the keys do not change).
        if needs_auth and not getattr(app.state, "ichat_auth_added", False):
            sglang_compat.call_with(
                api.add_api_key_middleware,
                app=app,
                api_key=args.api_key,
                admin_api_key=getattr(args, "admin_api_key", None),
            )
            app.state.ichat_auth_added = True
        if api.set_uvicorn_logging_configs is not None:
            api.set_uvicorn_logging_configs(args)
        return self._ended_at_the_death(app)

    def _ended_at_the_death(self, app: Any) -> Any:
        """SGLang's app, its answers ended as soon as the engine's death is known
        (``ReplayOnEngineDeath``): SGLang's own stall at a scheduler's death, waiting for
        a process that is gone, which held each client -- and the restart, which waits
        for the HTTP server to drain -- until ``--drain-timeout``. With a gateway, what
        the death (or the drain deadline) cuts goes on on another worker: a request with
        no byte sent yet runs there again, a ``/v1/completions`` stream under way is
        continued there token-exactly (``--continuation-limit``). Without one, with
        continuation on, the same on this worker's restarted engine, within
        ``--continuation-timeout``; with a standby ready, the same on the standby once it
        serves; else a request with no byte sent gets a 503 and a stream under way an
        error event and ``[DONE]``. SGLang's
        streamed chat returns no token ids (it refuses ``return_token_ids`` there), so a
        chat stream under way ends with an error event in either case."""
        config = self.framework_args
        gateway, restarted = self._where_cut_requests_go()
        # a standby takes over at once; without one only the restarted engine does,
        # and only with continuation on (``relays_to_the_restart``)
        waits = config.standby or restarted is not None
        return ReplayOnEngineDeath(
            app,
            ServingEngine(self),
            wait_for_next_engine=config.continuation_timeout if waits else 0.0,
            continuation_limit=config.continuation_limit,
            max_model_len=lambda: sglang_compat.context_len(self._serving()),
            decode=lambda ids, skip: sglang_compat.decode(self._serving(), ids, skip),
            on_continuation=self._report_continuation,
            gateway=gateway,
            restarted=restarted,
            takes_over_here=self._takes_over_here,
            handing_off=lambda: self.handing_off,
            death_of=self._death_of,
            continuable_paths=frozenset({COMPLETIONS}),
            ids_unasked_absent=True,
        )

    def _serving(self) -> sglang_compat.Launched:
        launched = self._launched
        assert launched is not None
        return launched

    def _takes_over_here(self) -> bool:
        """Whether an engine of this worker serves at once in place of a dead one: a
        standby is ready, or has taken over already."""
        if self._standby is not None:
            return True
        active = self._active
        return active is not None and not self._has_died(active)

    def _has_died(self, engine: SGLangEngine) -> bool:
        """Dead: failed over from, or the backend ends with its death."""
        return engine.dead.is_set() or (engine is self._active and self.engine_dead_event.is_set())

    async def _death_of(self, engine: SGLangEngine) -> None:
        """Returns once ``engine`` is dead (SGLang's answers stall at its death)."""
        waits = {asyncio.ensure_future(engine.dead.wait())}
        if engine is self._active:
            waits.add(asyncio.ensure_future(self.engine_dead_event.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    def uvicorn_options(self) -> dict[str, Any]:
        args = self._backend_args
        options: dict[str, Any] = {
            "root_path": getattr(args, "fastapi_root_path", "") or "",
            "timeout_keep_alive": sglang_compat.keep_alive_seconds(self._api),
            "ssl_keyfile": getattr(args, "ssl_keyfile", None),
            "ssl_certfile": getattr(args, "ssl_certfile", None),
            "ssl_ca_certs": getattr(args, "ssl_ca_certs", None),
            "ssl_keyfile_password": getattr(args, "ssl_keyfile_password", None),
        }
        level = getattr(args, "log_level_http", None) or getattr(args, "log_level", None)
        if level:
            options["log_level"] = level
        return options

    def on_server_created(self, server: Any) -> None:
        assert self._launched is not None
        self._stop_server = lambda: setattr(server, "should_exit", True)
        sglang_compat.set_server_stop_hook(self._launched, self._stop_server)

    def served_model_name(self) -> str:
        args = self._backend_args
        return str(args.served_model_name or args.model_path)

    def api_key(self) -> str | None:
        return self._backend_args.api_key or None

    def _auth_headers(self) -> dict[str, str]:
        return bearer_headers(self.api_key())

    async def probe_ready(self, client: httpx.AsyncClient) -> bool:
        """SGLang's model info answers (``/model_info``; ``/get_model_info`` before)."""
        import httpx

        for path in ("/model_info", "/get_model_info"):
            try:
                response = await client.get(path, headers=self._auth_headers())
            except httpx.TransportError:
                return False
            if response.status_code == 200:
                self._is_generation = bool(response.json().get("is_generation", True))
                return True
            if response.status_code != 404:
                return False
        return False

    async def warmup(self, client: httpx.AsyncClient) -> None:
        sampling = {"max_new_tokens": 1, "temperature": 0}
        path = "/generate" if self._is_generation else "/encode"
        body = {"text": WARMUP_PROMPT, "sampling_params": sampling}
        response = await client.post(path, json=body, headers=self._auth_headers())
        if response.status_code != 200:
            raise StartupError(
                f"warmup request {path} failed: HTTP {response.status_code} {response.text[:500]}"
            )

    def check_engine_processes(self) -> None:
        active = self._active
        if active is None:
            return
        dead = active.dead_processes()  # its scheduler(s) and detokenizer
        if dead:
            raise EngineDiedError(f"SGLang engine process {dead[0].pid} exited")
        standby = self._standby
        if standby is not None and standby.dead_processes():
            self._failure_report.received = False  # the standby's report, if any
            self._standby_died(standby)
        if self._failure_report.received:
            raise EngineDiedError("an SGLang process reported a failure (SIGQUIT)")

    # ------------------------------------------------------------------- standby

    async def _start_standby(self, *, threaded: bool = True) -> None:
        """Launch an engine of the same flags (in a thread while the active one serves;
        SGLang parses and publishes its own copy of the flags) and start its tokenizer
        manager's loops. A standby that cannot start is reported, not raised."""
        self._report_standby(Standby.STARTING)
        t0 = time.monotonic()
        engine: SGLangEngine | None = None
        try:
            args = self.parse_args(self.framework_args, self.backend_argv)
            async with self.recording_engine_shm():
                if threaded:
                    engine = await _launched_beside(self._api, args, self._launches)
                else:  # at boot: blocks the loop as the active engine's launch does
                    engine = SGLangEngine.launch(self._api, args)
            self._started(engine)
            if self._sleep:
                await sglang_compat.release_memory(engine.launched)
                engine.asleep = True
        except Exception as exc:
            if engine is not None:  # launched, then failed to start or to sleep
                await engine.close(self.framework_args.deadlines.terminate)
            self._unlink_engine_shm_left_behind()  # what a start that failed left
            logger.error("the standby engine did not start: %s", exc)
            self._report_standby(Standby.FAILED, f"{type(exc).__name__}: {exc}")
            return
        self._standby = engine
        self.phase_seconds["standby_start"] = time.monotonic() - t0
        self._record_engine_shm()
        logger.info(
            "standby engine %s (processes %s; KV cache %s tokens)",
            "asleep" if engine.asleep else "ready",
            engine.pids,
            engine.launched.scheduler_info.get("max_total_num_tokens"),
        )
        if self._active is not None and (
            smaller := _smaller_kv_cache(
                self._active.launched.scheduler_info, engine.launched.scheduler_info
            )
        ):
            logger.warning(smaller)
        self._report_standby()

    def _standby_died(self, standby: SGLangEngine) -> None:
        logger.error("the standby engine died (processes %s); starting another", standby.pids)
        self._standby = None
        self._report_standby(Standby.STARTING)
        self._standby_task = asyncio.get_running_loop().create_task(self._replace_standby(standby))

    async def fail_over(self) -> dict[str, float] | None:
        standby, dead = self._standby, self._active
        if standby is None or dead is None or self._app is None or standby.dead_processes():
            if standby is not None and standby.dead_processes():
                logger.error("the standby engine is dead too (processes %s)", standby.pids)
            return None
        self._standby = None
        phases: dict[str, float] = {}
        t0 = time.monotonic()
        try:
            if standby.asleep:
                # the dead engine's GPU memory free first: the standby takes it
                await dead.kill(self.framework_args.deadlines.terminate)
                await _resumed(standby)
                standby.asleep = False
                phases["failover_wake"] = time.monotonic() - t0
            t1 = time.monotonic()
            sglang_compat.serve(self._api, standby.launched)
            # SGLang's lifespan binds its OpenAI handlers to the engine it serves
            state = await sglang_compat.enter_serving_state(self._api, standby.args, standby.stack)
        except BaseException:
            sglang_compat.serve(self._api, dead.launched)
            self._retired.append(standby)  # closed with the others at the stop
            raise
        for name, value in state.items():
            setattr(self._app.state, name, value)
        if self._stop_server is not None:
            sglang_compat.set_server_stop_hook(standby.launched, self._stop_server)
        self._active = standby
        dead.dead.set()  # what it served ends now, and goes on on the standby
        phases["failover_switch"] = time.monotonic() - t1
        logger.info("the standby engine %s is active", standby.pids)
        self._report_standby(Standby.STARTING)  # its replacement, next
        self._standby_task = asyncio.create_task(self._replace_standby(dead))
        return phases

    async def _replace_standby(self, dead: SGLangEngine) -> None:
        """Close the dead engine (its processes killed: nothing of it can finish), unlink
        the shared memory it left, then start a new standby."""
        self._retired.append(dead)
        t0 = time.monotonic()
        await dead.close(self.framework_args.deadlines.terminate)
        self._retired.remove(dead)
        self._unlink_engine_shm_left_behind()
        self.phase_seconds["failover_cleanup"] = time.monotonic() - t0
        await self._start_standby()

    def _report_standby(self, state: Standby | None = None, reason: str | None = None) -> None:
        self._report_standby_of(self._active, self._standby, state, reason)

    async def abort_requests(self) -> None:
        if self._launched is not None:
            sglang_compat.abort_all_requests(self._launched)

    async def reload(self, argv: list[str], method: ReloadMethod = ReloadMethod.AUTO) -> Reloaded:
        """The same flags: the engine reads its weights again in place (SGLang's own
        ``update_weights_from_disk``: requests in flight finish first, within
        ``--drain-timeout``, then are aborted; new ones wait meanwhile; a load that fails
        leaves the old weights serving, as SGLang restores them). New flags would need a
        second engine, which SGLang's app cannot serve beside the first (its state is
        module-level): once they parse, ``RestartToReload`` (the supervisor stops this
        engine and starts one with them); ``--swap`` is refused (501)."""
        if self._reloading or self._launched is None or self.state is not BackendState.READY:
            raise ReloadError(f"the engine is not serving or reloading (backend "
                              f"{self.state.value})", 409)  # fmt: skip
        if method is ReloadMethod.SWAP:
            raise ReloadError(
                "SGLang cannot swap engines (a second engine beside the first: its app's "
                "state is module-level); without --swap, new flags restart the engine",
                501,
            )
        if argv != self.backend_argv:
            if method is ReloadMethod.IN_PLACE:
                raise ReloadError("an in-place reload is not possible: the flags differ", 409)
            self._parsed_for_reload(argv)
            raise RestartToReload(
                "SGLang cannot start an engine with new flags beside the serving one (its "
                "app's state is module-level): draining and stopping it, then starting one "
                "with them (the old flags again if they do not start)"
            )
        update = sglang_compat.weight_reloader(self._launched)
        if update is None:
            raise ReloadError("this SGLang cannot reload its weights in place", 501)
        self._reloading = True
        try:
            return await self._reload_weights(update)
        finally:
            self._reloading = False

    async def _reload_weights(self, update: Any) -> Reloaded:
        t0 = time.monotonic()
        # SGLang waits for the requests in flight before it loads
        result = await self._within_the_drain_timeout(update(self._backend_args.model_path))
        success, message = bool(result[0]), str(result[1])
        seconds = time.monotonic() - t0
        if not success:
            raise ReloadError(f"SGLang did not load the weights: {message}; the old weights "
                              "serve on", 500)  # fmt: skip
        logger.info("reload: weights loaded again in place in %.2f s (%s)", seconds, message)
        if self._standby is not None:  # it holds the old weights: a new one reads them
            old, self._standby = self._standby, None
            self._report_standby(Standby.STARTING)
            self._standby_task = asyncio.create_task(self._replace_standby(old))
        phases = {"reload_weights": seconds, "reload": seconds}
        self.phase_seconds.update(phases)
        return Reloaded(ReloadMethod.IN_PLACE, phases)

    async def check_engine_alive(self) -> None:
        self.check_engine_processes()


async def _launched_beside(
    api: sglang_compat.SGLangServerAPI, args: Any, launches: set[asyncio.Future[SGLangEngine]]
) -> SGLangEngine:
    """Launch an engine in a thread of the event loop's executor while the loop serves.

    Not in a thread of its own: SGLang's scheduler and detokenizer die with the thread
    that started them (``kill_itself_when_parent_died``: ``PR_SET_PDEATHSIG``, which
    Linux ties to the parent *thread*), so a thread that ends after the launch killed
    every standby at once (seen); the executor's threads live as long as the loop. The
    launch is in ``launches`` until it ends. If the waiting task is cancelled (a stop),
    what the launch makes is killed when it ends."""
    loop = asyncio.get_running_loop()
    launch = loop.run_in_executor(None, functools.partial(SGLangEngine.launch, api, args))
    launches.add(launch)
    launch.add_done_callback(launches.discard)
    try:
        return await asyncio.shield(launch)
    except asyncio.CancelledError:
        launch.add_done_callback(_abandoned)
        raise


def _smaller_kv_cache(active: dict[str, Any], standby: dict[str, Any]) -> str | None:
    """What to tell when a replacement standby's KV cache holds fewer tokens than the
    active engine's (SGLang sizes each engine from the memory free when it starts, and
    a replacement starts beside an awake engine); None when it holds as many, or within
    5 % (engines of the same flags differ by a few percent: 274 238 and 270 810 tokens at
    boot on an H100)."""
    have, want = standby.get("max_total_num_tokens"), active.get("max_total_num_tokens")
    if not isinstance(have, int) or not isinstance(want, int) or have >= 0.95 * want:
        return None
    return (
        f"the new standby's KV cache holds {have} tokens, the active engine's {want}: "
        f"after the next failover the worker holds {have / want:.0%} of the tokens at once; "
        f"--max-total-tokens {have} (or less) gives every engine the same KV cache"
    )


async def _resumed(standby: SGLangEngine, limit: float = 300.0) -> None:
    """The standby's GPU memory taken again (SGLang's ``resume_memory_occupation``),
    given up if one of its processes dies meanwhile (SGLang's call would wait for its
    reply for ever) or after ``limit`` seconds."""
    resume = asyncio.ensure_future(sglang_compat.resume_memory(standby.launched))
    t0 = time.monotonic()
    try:
        while not resume.done():
            await asyncio.wait({resume}, timeout=0.05)
            if dead := standby.dead_processes():
                raise EngineDiedError(f"the standby's process {dead[0].pid} died as it woke")
            if time.monotonic() - t0 > limit:
                raise EngineDiedError(f"the standby did not wake within {limit:.0f} s")
    finally:
        await cancelled(resume)
    resume.result()


def _abandoned(launch: asyncio.Future[SGLangEngine]) -> None:
    """A standby whose launch ended after the backend stopped waiting for it."""
    if not launch.cancelled() and launch.exception() is None:
        processes.kill(processes.with_descendants(launch.result().processes), 5.0)


class ServingEngine:
    """The engine an SGLang backend serves now, for ``ReplayOnEngineDeath``: swapped at
    a failover to the standby (a restarted engine is another backend)."""

    def __init__(self, backend: SGLangBackend) -> None:
        self._backend = backend

    def current(self) -> Any:
        return self._backend._active

    def died(self, engine: Any) -> bool:
        return engine is None or self._backend._has_died(engine)
