"""Find SGLang's server functions by feature, whatever release is installed.

============================  =======================================================
0.5.16 (GPU machine)          ``_launch_subprocesses`` a function of
                              ``sglang.srt.entrypoints.engine``, fewer return values
0.5.23 (CPU, CI)              ``Engine._launch_subprocesses`` (classmethod) returning
                              a 6-tuple; ``add_api_key_middleware`` in
                              ``sglang.srt.utils.auth``; ``ServerArgs.resolve_once``
============================  =======================================================

Names are looked up in candidate modules, newest first (:func:`ichat.backends.compat.find`);
what ``_launch_subprocesses`` returns is read by type, not by position, and its
``init_*``/``run_*`` functions are the defaults of SGLang's own ``launch_server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import inspect
import logging
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ichat.backends import zmq_context
from ichat.backends.compat import Workaround, Workarounds, call_with, find
from ichat.errors import ConfigError, EngineNotInstalledError

logger = logging.getLogger("ichat.sglang")

HTTP_SERVER = "sglang.srt.entrypoints.http_server"
IO_STRUCT = "sglang.srt.managers.io_struct"
CANDIDATES: dict[str, tuple[str, ...]] = {
    "ServerArgs": ("sglang.srt.server_args",),
    "prepare_server_args": ("sglang.srt.server_args",),
    "launch_server": (HTTP_SERVER,),
    "app": (HTTP_SERVER,),
    "set_global_state": (HTTP_SERVER,),
    "_GlobalState": (HTTP_SERVER,),
    "add_api_key_middleware": ("sglang.srt.utils.auth", "sglang.srt.utils"),
}
OPTIONAL: dict[str, tuple[str, ...]] = {
    # 0.5.23: admin-only endpoints need the auth middleware even without a key
    "app_has_admin_force_endpoints": ("sglang.srt.utils.auth", HTTP_SERVER),
    "set_uvicorn_logging_configs": (HTTP_SERVER, "sglang.srt.utils"),
    "envs": (HTTP_SERVER,),
    # the app's lifespan: the OpenAI handlers on app.state, for the engine in
    # _global_state (a standby's, entered again at a failover)
    "lifespan": (HTTP_SERVER,),
}
# SGLang's watchdog of its subprocesses (0.5.23; older releases have none)
WATCHDOG_MODULES = ("sglang.srt.utils.watchdog", "sglang.srt.utils.common", "sglang.srt.utils")
# Where iChat reaches into SGLang's internals; each is recorded when reached for
# (``Workarounds``), and a test per installed release fails when one stops resolving.
WORKAROUNDS = (
    Workaround(
        "custom_sigquit_handler",
        "ServerArgs has no custom_sigquit_handler: a failing SGLang process's SIGQUIT "
        "kills the whole worker (SGLang's default handler) instead of a restart",
    ),
    Workaround(
        "skip_server_warmup",
        "ServerArgs has no skip_server_warmup: SGLang's own warmup runs, and kills the "
        "worker's process if it fails",
    ),
    Workaround(
        "keep_alive_env",
        "SGLang's envs.SGLANG_TIMEOUT_KEEP_ALIVE is gone: uvicorn keeps connections 5 s",
    ),
    Workaround(
        "watchdog_found",
        "SGLang's SubprocessWatchdog is not among what its launch returns: it keeps "
        "polling (1 s) and may SIGQUIT the worker next to iChat's monitor",
    ),
    Workaround(
        "loop_signal_handlers_declined",
        "SGLang's tokenizer manager added no loop signal handler to decline: it may "
        "now take SIGTERM/SIGQUIT another way, away from the worker",
    ),
    Workaround(
        "tokenizer_manager_tasks",
        "the tokenizer manager has no asyncio_tasks: its loops are not cancelled at stop",
    ),
    Workaround(
        "server_stop_hook",
        "the tokenizer manager has no set_server_stop_hook: SGLang cannot stop the HTTP "
        "server when it gives up (the health monitor still notices the death)",
    ),
    Workaround(
        "tokenizer_manager_zmq_context",
        "no ZMQ socket on the tokenizer manager: each restart leaves its context's "
        "threads and descriptors until the process exits",
    ),
    Workaround(
        "abort_all_requests",
        "the tokenizer manager has no abort_request(abort_all=True): at the drain "
        "deadline streams are cut, not aborted",
    ),
    Workaround(
        "pyzmq_shadow_context",
        "pyzmq's shadow context no longer names what it shadows (_shadow_obj): engine "
        "ZMQ contexts are left to the process exit",
    ),
)
# the launch functions' parameters, with the defaults SGLang's own launch_server uses
LAUNCH_FUNCS = ("init_tokenizer_manager_func", "run_scheduler_process_func",
                "run_detokenizer_process_func")  # fmt: skip


@dataclass(frozen=True)
class SGLangServerAPI:
    """The SGLang functions iChat composes, as found in the installed release."""

    version: str
    ServerArgs: type[Any]
    prepare_server_args: Callable[[list[str]], Any]
    launch_server: Callable[..., Any]
    launch_subprocesses: Callable[..., Any]
    app: Any
    set_global_state: Callable[[Any], None]
    _GlobalState: type[Any]
    add_api_key_middleware: Callable[..., None]
    app_has_admin_force_endpoints: Callable[[Any], bool] | None
    set_uvicorn_logging_configs: Callable[[Any], None] | None
    envs: Any
    lifespan: Callable[[Any], contextlib.AbstractAsyncContextManager[None]] | None


@dataclass(frozen=True)
class Launched:
    """What SGLang's launch returned, by meaning."""

    tokenizer_manager: Any
    template_manager: Any
    scheduler_info: dict[str, Any]
    watchdog: Any | None  # SGLang's SubprocessWatchdog (0.5.23), if any


def _launch_subprocesses() -> Callable[..., Any] | None:
    engine_cls = find("Engine", ("sglang.srt.entrypoints.engine",))
    method = getattr(engine_cls, "_launch_subprocesses", None)
    if method is not None:
        return method  # type: ignore[no-any-return]
    found: Callable[..., Any] | None = find(
        "_launch_subprocesses", ("sglang.srt.entrypoints.engine",)
    )
    return found


def load() -> SGLangServerAPI:
    """Import SGLang and find every function iChat needs, or say clearly why not."""
    if importlib.util.find_spec("sglang") is None:
        raise EngineNotInstalledError("SGLang", "pip install 'ichat[sglang]'")
    try:
        from importlib.metadata import version as dist_version

        version = dist_version("sglang")
        found: dict[str, Any] = {name: find(name, modules) for name, modules in CANDIDATES.items()}
        optional: dict[str, Any] = {name: find(name, modules) for name, modules in OPTIONAL.items()}
        launch = _launch_subprocesses()
    except ImportError as exc:
        raise ConfigError(f"SGLang is installed but does not import: {exc}") from exc
    missing = sorted(name for name, value in found.items() if value is None)
    if launch is None:
        missing.append("_launch_subprocesses")
    if missing or launch is None:
        raise ConfigError(
            f"SGLang {version} is not supported by this iChat: cannot find {', '.join(missing)}"
        )
    return SGLangServerAPI(version=version, launch_subprocesses=launch, **found, **optional)


def launch(api: SGLangServerAPI, server_args: Any) -> Launched:
    """Start SGLang's scheduler and detokenizer processes and its tokenizer manager,
    exactly as its own ``launch_server`` does before it starts serving HTTP."""
    params = inspect.signature(api.launch_server).parameters
    funcs = {name: params[name].default for name in LAUNCH_FUNCS if name in params}
    result = call_with(api.launch_subprocesses, server_args=server_args, **funcs)
    tokenizer_manager, template_manager, *rest = result
    scheduler_info: dict[str, Any] | None = None
    watchdog = None
    for item in rest:
        if isinstance(item, dict) and scheduler_info is None:
            scheduler_info = item  # older releases: the scheduler info itself
        elif hasattr(item, "scheduler_infos"):
            scheduler_info = item.scheduler_infos[0]
        elif type(item).__name__.endswith("Watchdog"):  # its class is not exported
            watchdog = item
    if tokenizer_manager is None or scheduler_info is None:
        raise ConfigError(
            "SGLang's launch returned no tokenizer manager or scheduler info "
            "(a node with --node-rank >= 1 serves no HTTP; run SGLang's own launcher there)"
        )
    return Launched(tokenizer_manager, template_manager, scheduler_info, watchdog)


def serve(api: SGLangServerAPI, launched: Launched) -> None:
    """Make ``launched`` the engine that SGLang's app serves (its ``_global_state``)."""
    api.set_global_state(
        api._GlobalState(
            tokenizer_manager=launched.tokenizer_manager,
            template_manager=launched.template_manager,
            scheduler_info=launched.scheduler_info,
        )
    )


async def enter_serving_state(
    api: SGLangServerAPI, server_args: Any, stack: contextlib.AsyncExitStack
) -> dict[str, Any]:
    """The app state SGLang's own lifespan makes (its OpenAI handlers, bound to the
    engine ``serve`` made current) -- entered on a stand-in of the app, on ``stack``
    (left when the engine closes), without warmup (``skip_server_warmup``: it marks the
    tokenizer manager up) -- as the attributes to set on the app's state."""
    from starlette.datastructures import State

    assert api.lifespan is not None
    stand_in = _AppStandIn(State(), server_args)
    await stack.enter_async_context(api.lifespan(stand_in))
    return dict(stand_in.state._state)


@dataclass
class _AppStandIn:
    """What SGLang's lifespan reads of its app in single-tokenizer mode."""

    state: Any
    server_args: Any
    is_single_tokenizer_mode: bool = True

    @property
    def warmup_thread_kwargs(self) -> dict[str, Any]:
        return {"server_args": self.server_args}


def on_cuda(server_args: Any) -> bool:
    """Whether the engine runs on CUDA (``--device``, or what SGLang itself picks)."""
    device = getattr(server_args, "device", None)
    if device is None:
        get_device = find("get_device", ("sglang.srt.utils.common", "sglang.srt.utils"))
        try:  # SGLang's own choice (it raises where it finds no device it knows)
            device = get_device() if get_device is not None else None
        except (RuntimeError, ImportError):
            return False
    return str(device).split(":", 1)[0] == "cuda"


def _memory_call(launched: Launched, action: str) -> Any:
    """The tokenizer manager's ``{action}_memory_occupation`` for every kind of GPU
    memory (weights, KV cache, CUDA graphs), as SGLang's own endpoint calls it."""
    request_cls = find(f"{action.title()}MemoryOccupationReqInput", (IO_STRUCT,))
    method = getattr(launched.tokenizer_manager, f"{action}_memory_occupation", None)
    if request_cls is None or method is None:
        raise ConfigError(f"this SGLang has no {action}_memory_occupation")
    return method(request_cls(), None)


async def release_memory(launched: Launched) -> None:
    """The engine's GPU memory given back (its weights kept in host memory with
    ``--enable-weights-cpu-backup``); the engine must be idle."""
    await _memory_call(launched, "release")


async def resume_memory(launched: Launched) -> None:
    """The engine's GPU memory taken again, its weights copied back."""
    await _memory_call(launched, "resume")


def context_len(launched: Launched) -> int:
    """The engine's context length (``--context-length`` or the model's)."""
    return int(launched.tokenizer_manager.context_len)


def decode(launched: Launched, ids: list[int], skip_special_tokens: bool) -> str:
    """``ids`` as text, by the engine's own tokenizer."""
    tokenizer = launched.tokenizer_manager.tokenizer
    return str(tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))


def record_release_workarounds(api: SGLangServerAPI, workarounds: Workarounds) -> None:
    """The workarounds that the installed release's modules decide (at parse)."""
    for field in ("custom_sigquit_handler", "skip_server_warmup"):
        workarounds.record(field, _declares(api.ServerArgs, field))
    keep_alive = getattr(api.envs, "SGLANG_TIMEOUT_KEEP_ALIVE", None)
    workarounds.record("keep_alive_env", callable(getattr(keep_alive, "get", None)))
    workarounds.record("pyzmq_shadow_context", zmq_context.shadow_names_its_owner())


def _declares(cls: type[Any], field: str) -> bool:
    """Whether ``cls`` declares ``field`` (a dataclass, or a msgspec Struct as in 0.5.23)."""
    return any(field in getattr(klass, "__annotations__", {}) for klass in cls.__mro__)


def record_launch_workarounds(launched: Launched, workarounds: Workarounds) -> None:
    """The workarounds that what SGLang's launch returned decides."""
    has_watchdog_class = find("SubprocessWatchdog", WATCHDOG_MODULES) is not None
    workarounds.record("watchdog_found", launched.watchdog is not None or not has_watchdog_class)
    manager = launched.tokenizer_manager
    workarounds.record("tokenizer_manager_tasks", hasattr(manager, "asyncio_tasks"))
    workarounds.record("server_stop_hook", hasattr(manager, "set_server_stop_hook"))
    workarounds.record("abort_all_requests", _abort_request(launched) is not None)
    workarounds.record("tokenizer_manager_zmq_context", bool(zmq_context.find_contexts(manager)))


def keep_alive_seconds(api: SGLangServerAPI) -> Any:
    keep_alive: Any = getattr(api.envs, "SGLANG_TIMEOUT_KEEP_ALIVE", None)
    return keep_alive.get() if callable(getattr(keep_alive, "get", None)) else 5


def _abort_request(launched: Launched) -> Callable[..., Any] | None:
    abort = getattr(launched.tokenizer_manager, "abort_request", None)
    declared = abort is not None and "abort_all" in inspect.signature(abort).parameters
    return abort if declared else None


def abort_all_requests(launched: Launched) -> None:
    """Abort every request in flight (each ends with SGLang's own abort finish)."""
    abort = _abort_request(launched)
    if abort is not None:
        abort(abort_all=True)


def weight_reloader(launched: Launched) -> Callable[[str], Any] | None:
    """SGLang's own in-place weight reload (its ``/update_weights_from_disk``): the
    tokenizer manager's ``update_weights_from_disk`` with the request object it takes;
    a coroutine function of the model path whose result starts with (success,
    message). None when this SGLang has no such function."""
    update = getattr(launched.tokenizer_manager, "update_weights_from_disk", None)
    request_cls = find("UpdateWeightFromDiskReqInput", (IO_STRUCT,))
    if update is None or request_cls is None:
        return None

    def reload(model_path: str) -> Any:
        return update(request_cls(model_path=model_path), None)

    return reload


def cancel_tokenizer_manager_tasks(launched: Launched) -> None:
    for task in list(getattr(launched.tokenizer_manager, "asyncio_tasks", ())):
        task.cancel()


def set_server_stop_hook(launched: Launched, stop: Callable[[], None]) -> None:
    """SGLang stops the HTTP server through this hook when it gives up on its engine."""
    manager = launched.tokenizer_manager
    if hasattr(manager, "set_server_stop_hook"):
        manager.set_server_stop_hook(stop)


def start_tokenizer_manager_loop(launched: Launched, workarounds: Workarounds) -> None:
    """Start the tokenizer manager's loops on the running event loop, declining the
    loop signal handlers it adds for a standalone server (SIGTERM: its own drain;
    SIGQUIT: kill the process tree): the worker owns them. Only this loop object is
    touched, for the duration of the call."""
    loop = asyncio.get_running_loop()
    declined: list[str] = []

    def decline(sig: int, callback: Any, *args: Any) -> None:
        declined.append(signal.Signals(sig).name)

    with _patched(loop, "add_signal_handler", decline):
        launched.tokenizer_manager.auto_create_handle_loop()
    logger.debug("kept the worker's handling of %s", declined)
    workarounds.record("loop_signal_handlers_declined", bool(declined))


@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    setattr(obj, name, value)
    try:
        yield
    finally:
        delattr(obj, name)


__all__ = [
    "WORKAROUNDS",
    "Launched",
    "SGLangServerAPI",
    "abort_all_requests",
    "call_with",
    "cancel_tokenizer_manager_tasks",
    "enter_serving_state",
    "keep_alive_seconds",
    "launch",
    "load",
    "on_cuda",
    "record_launch_workarounds",
    "record_release_workarounds",
    "release_memory",
    "resume_memory",
    "serve",
    "set_server_stop_hook",
    "start_tokenizer_manager_loop",
]
