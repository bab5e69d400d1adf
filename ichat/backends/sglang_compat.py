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

import importlib.util
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ichat.backends.compat import call_with, find
from ichat.errors import ConfigError, EngineNotInstalledError

HTTP_SERVER = "sglang.srt.entrypoints.http_server"
CANDIDATES: dict[str, tuple[str, ...]] = {
    "ServerArgs": ("sglang.srt.server_args",),
    "prepare_server_args": ("sglang.srt.server_args",),
    "launch_server": (HTTP_SERVER,),
    "app": (HTTP_SERVER,),
    "set_global_state": (HTTP_SERVER,),
    "_GlobalState": (HTTP_SERVER,),
    "add_api_key_middleware": ("sglang.srt.utils.auth", "sglang.srt.utils"),
    "kill_process_tree": ("sglang.srt.utils", "sglang.srt.utils.common"),
}
OPTIONAL: dict[str, tuple[str, ...]] = {
    # 0.5.23: admin-only endpoints need the auth middleware even without a key
    "app_has_admin_force_endpoints": ("sglang.srt.utils.auth", HTTP_SERVER),
    "set_uvicorn_logging_configs": (HTTP_SERVER, "sglang.srt.utils"),
    "envs": (HTTP_SERVER,),
}
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
    kill_process_tree: Callable[..., None]
    app_has_admin_force_endpoints: Callable[[Any], bool] | None
    set_uvicorn_logging_configs: Callable[[Any], None] | None
    envs: Any


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
        elif type(item).__name__.endswith("Watchdog"):
            watchdog = item
    if tokenizer_manager is None or scheduler_info is None:
        raise ConfigError(
            "SGLang's launch returned no tokenizer manager or scheduler info "
            "(a node with --node-rank >= 1 serves no HTTP; run SGLang's own launcher there)"
        )
    return Launched(tokenizer_manager, template_manager, scheduler_info, watchdog)


__all__ = ["Launched", "SGLangServerAPI", "call_with", "launch", "load"]
