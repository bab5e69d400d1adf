"""Engine backends, found by name and imported only when chosen."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ichat.errors import ConfigError

if TYPE_CHECKING:
    from ichat.backends.base_backend import BaseBackend

# name -> (module, class): importing a backend module imports its engine lazily.
BACKENDS: dict[str, tuple[str, str]] = {
    "vllm": ("ichat.backends.vllm_backend", "VLLMBackend"),
    "sglang": ("ichat.backends.sglang_backend", "SGLangBackend"),
}


def backend_class(name: str) -> type[BaseBackend]:
    try:
        module_name, class_name = BACKENDS[name]
    except KeyError:
        choices = ", ".join(sorted(BACKENDS))
        raise ConfigError(f"unknown backend {name!r} (choose from {choices})") from None
    cls: type[BaseBackend] = getattr(importlib.import_module(module_name), class_name)
    return cls
