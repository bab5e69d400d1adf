"""A model given as a local folder must exist: say so before the engine starts."""

from __future__ import annotations

from pathlib import Path

from ichat.errors import ModelNotFoundError


def looks_like_local_path(model: str) -> bool:
    """A model name meant as a folder (absolute, ./, ../, ~, or deeper than org/name)."""
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1


def check_model_path(model: str | None) -> None:
    if model and looks_like_local_path(model) and not Path(model).expanduser().exists():
        raise ModelNotFoundError(model)
