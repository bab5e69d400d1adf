"""``VLLMBackend``: vLLM's OpenAI server composed in-process from vLLM's own functions.

vLLM's parser and validation, its socket setup, ``build_async_engine_client``,
``build_app`` and ``init_app_state``; no vLLM CLI subprocess, no copied vLLM code.
The functions are found by :mod:`ichat.backends.vllm_compat`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import TYPE_CHECKING, Any, ClassVar

import psutil

from ichat.auth import bearer_headers
from ichat.backends import vllm_compat, zmq_context
from ichat.backends.argmap import rename_flags
from ichat.backends.base_backend import BaseBackend
from ichat.backends.model_path import check_model_path
from ichat.config import WorkerConfig
from ichat.errors import ConfigError, EngineDiedError, StartupError
from ichat.process.processes import not_running, title

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger("ichat.vllm")

WARMUP_PROMPT = "Hello"


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
        self._zmq_contexts: list[Any] = []
        self._watched: list[psutil.Process] | None = None
        self._app: Any = None
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
        api.cli_env_setup()  # VLLM_WORKER_MULTIPROC_METHOD=spawn, as `vllm serve` does
        vllm_compat.record_release_workarounds(api, self.workarounds)
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

    @classmethod
    def engine_environment(cls, config: WorkerConfig) -> dict[str, str]:
        # read when vLLM is imported (0.26 has no --log-level) and by its processes
        return {"VLLM_LOGGING_LEVEL": vllm_log_level(config)}

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
        client = self._api.build_async_engine_client(self._backend_args)
        # these run after the client's own shutdown (the stack unwinds last-in first-out)
        stack.callback(self._clear_engine_keyed_caches)
        stack.push_async_callback(self._end_zmq_contexts)
        self._engine_client = await stack.enter_async_context(client)
        self._zmq_contexts = vllm_compat.engine_core_contexts(self._engine_client)
        self.workarounds.record("engine_core_zmq_context", bool(self._zmq_contexts))
        self.workarounds.record("engine_errored_flag", hasattr(self._engine_client, "errored"))
        abortable = vllm_compat.can_abort_all_requests(self._engine_client)
        self.workarounds.record("abort_all_requests", abortable)

    def _clear_engine_keyed_caches(self) -> None:
        """vLLM's memo caches that would keep this engine's tokenizer copies after it
        stopped (see ``vllm_compat.ENGINE_KEYED_CACHES``)."""
        for cache in self._api.engine_keyed_caches:
            cache.cache_clear()

    async def _end_zmq_contexts(self) -> None:
        """vLLM's shutdown closes its sockets but leaves the engine-core client's ZMQ
        context (2 I/O threads, a reaper, 7 descriptors) to the process exit."""
        await zmq_context.end_contexts([c for c in self._zmq_contexts if not c.closed])

    def _watch_engine_processes(self) -> list[psutil.Process]:
        """vLLM's own processes among those the engine start left (by their titles)."""
        self._watched = watched = vllm_compat.engine_processes(self.engine_processes, title)
        if self.engine_processes:  # none: the engine runs in this process
            self.workarounds.record("engine_process_titles", bool(watched))
        logger.debug("watching engine processes %s", [p.pid for p in watched])
        return watched

    async def build_app(self) -> Any:
        self._watch_engine_processes()  # the engine's processes are recorded by now
        client, args = self._engine_client, self._backend_args
        if hasattr(client, "get_supported_tasks"):
            self._supported_tasks = tuple(await client.get_supported_tasks())
        else:
            self._supported_tasks = ("generate",)
        app = vllm_compat.call_with(
            self._api.build_app,
            args=args,
            supported_tasks=self._supported_tasks,
            model_config=getattr(client, "model_config", None),
        )
        await vllm_compat.call_with(
            self._api.init_app_state,
            engine_client=client,
            state=app.state,
            args=args,
            supported_tasks=self._supported_tasks,
            vllm_config=getattr(client, "vllm_config", None),
        )
        self._app = app
        return app

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
        self._app.state.server = server
        count = getattr(self._backend_args, "h11_max_header_count", None)
        if count is not None:
            server.config.h11_max_header_count = count

    def served_model_name(self) -> str:
        args = self._backend_args
        names = args.served_model_name or [args.model]
        return str(names[0] if isinstance(names, list) else names)

    def api_key(self) -> str | None:
        key = getattr(self._backend_args, "api_key", None) or os.environ.get("VLLM_API_KEY")
        return str(key[0] if isinstance(key, list) else key) if key else None

    async def warmup(self, client: httpx.AsyncClient) -> None:
        model = self.served_model_name()
        headers = bearer_headers(self.api_key())
        if "generate" in self._supported_tasks:
            path = "/v1/completions"
            body: dict[str, Any] = {"model": model, "prompt": WARMUP_PROMPT, "max_tokens": 1}
        elif "embed" in self._supported_tasks:
            path, body = "/v1/embeddings", {"model": model, "input": WARMUP_PROMPT}
        else:
            logger.info("no warmup request for tasks %s", self._supported_tasks)
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
            raise EngineDiedError(f"the vLLM engine is dead: {exc}") from exc
