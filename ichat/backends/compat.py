"""Finding an engine's functions by feature: the helpers every engine's compat module uses.

An engine moves its entry points between releases; its compat module lists candidate
modules per name, newest first, and calls functions whose parameters changed with only
the parameters the installed release declares.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any


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
