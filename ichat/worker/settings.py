"""Framework settings a reload changes at once, without a new engine.

``--drain-timeout`` (what the next stop or reload gives requests in flight) and
``--log-level`` (iChat's own loggers and the engine's in this process). Anything else
of the worker's configuration needs a restart of the worker.
"""

from __future__ import annotations

import dataclasses
import logging

from ichat.config import WorkerConfig
from ichat.errors import ReloadError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# the engines' loggers in the worker's own process
ENGINE_LOGGERS = ("vllm", "sglang")


def updated(config: WorkerConfig, settings: dict[str, object]) -> WorkerConfig:
    """``config`` with ``settings`` (``drain_timeout``, ``log_level``) applied;
    ``ReloadError`` (400) for an unknown name or a bad value."""
    unknown = sorted(set(settings) - {"drain_timeout", "log_level"})
    if unknown:
        raise ReloadError(
            f"settings a reload cannot change: {unknown} (only drain_timeout, log_level)", 400
        )
    changes: dict[str, object] = {}
    if "drain_timeout" in settings:
        value = settings["drain_timeout"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ReloadError(f"drain_timeout must be a number of seconds >= 0, not {value!r}", 400)
        changes["drain_timeout"] = float(value)
    if "log_level" in settings:
        level = str(settings["log_level"]).lower()
        if level not in LOG_LEVELS:
            raise ReloadError(f"log_level must be one of {list(LOG_LEVELS)}, not {level!r}", 400)
        changes["log_level"] = level
    return dataclasses.replace(config, **changes)  # type: ignore[arg-type]


def apply_log_level(level: str) -> None:
    """iChat's loggers and the engines' loggers of this process at ``level`` (the
    engine's own processes keep the level they started with)."""
    value = logging_level(level)
    logging.getLogger("ichat").setLevel(value)
    for name in ENGINE_LOGGERS:
        logging.getLogger(name).setLevel(value)


def logging_level(level: str) -> int:
    """The ``logging`` level of a ``--log-level`` name (uvicorn's "trace": DEBUG)."""
    return logging.DEBUG if level == "trace" else int(getattr(logging, level.upper()))


def shown(config: WorkerConfig) -> dict[str, object]:
    """The settings as ``/status`` shows them."""
    return {"drain_timeout": config.drain_timeout, "log_level": config.engine_log_level}
