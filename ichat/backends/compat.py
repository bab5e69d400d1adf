"""Finding an engine's functions by feature: the helpers every engine's compat module uses,
and the record of its workarounds (what iChat reaches for inside an engine).

An engine moves its entry points between releases; its compat module lists candidate
modules per name, newest first, and calls functions whose parameters changed with only
the parameters the installed release declares.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("ichat.backend")


def _import(module_name: str) -> Any | None:
    """The module, or None when this release has no such module."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            return None
        raise


def find(name: str, modules: tuple[str, ...]) -> Any | None:
    """The first ``name`` found in ``modules``, in order; None if in none."""
    for module_name in modules:
        module = _import(module_name)
        if module is not None and hasattr(module, name):
            return getattr(module, name)
    return None


def call_with(fn: Callable[..., Any], **available: Any) -> Any:
    """Call ``fn`` with those of ``available`` that it declares, by name."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**available)
    return fn(**{k: v for k, v in available.items() if k in params})


@dataclass(frozen=True)
class Workaround:
    """One place where iChat reaches into an engine's internals (a private attribute, a
    process title, a class found by name) because the engine offers no public way."""

    name: str
    if_missing: str  # what degrades, silently but for this record, when it stops resolving


class Workarounds:
    """Which of an engine's workarounds resolved for one backend.

    Each is recorded when the backend reaches for it (at parse, start or stop); one that
    no longer resolves in the installed release is logged as a warning, shown in the
    worker's ``/status`` (``workarounds``), and fails the test of the installed engine."""

    def __init__(self, engine: str, known: tuple[Workaround, ...]) -> None:
        self.engine = engine
        self.known = {w.name: w for w in known}
        self.resolved: dict[str, bool] = {}

    def record(self, name: str, resolved: bool) -> bool:
        workaround = self.known[name]  # KeyError: a workaround the compat module lacks
        if not resolved and self.resolved.get(name) is not False:
            logger.warning(
                "%s workaround %r no longer resolves in the installed release: %s",
                self.engine,
                name,
                workaround.if_missing,
            )
        self.resolved[name] = resolved
        return resolved

    def status(self) -> dict[str, str]:
        """``{name: "resolved"}``, or ``"missing: <what degrades>"``, for those recorded."""
        return {
            name: "resolved" if ok else f"missing: {self.known[name].if_missing}"
            for name, ok in self.resolved.items()
        }
