"""An entry of SMG's worker list (``GET /workers``): what iChat reads of it."""

from __future__ import annotations

from typing import Any


def entries(answer: Any) -> list[dict[str, Any]]:
    """The worker entries of a ``GET /workers`` answer's JSON (none when malformed)."""
    listed = answer.get("workers") if isinstance(answer, dict) else None
    return [w for w in listed or [] if isinstance(w, dict)]


def model_ids(worker: dict[str, Any]) -> set[str]:
    """The ids of the models an entry lists (SMG's ``models``)."""
    return {str(m.get("id")) for m in worker.get("models") or [] if isinstance(m, dict)}


def serves(worker: dict[str, Any], model: str) -> bool:
    """Whether an entry serves ``model``; one that lists no model serves any."""
    models = model_ids(worker)
    return not models or model in models
