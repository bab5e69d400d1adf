"""The HTTP ``Authorization`` header iChat sends: an engine's API key, the gateway's."""

from __future__ import annotations


def bearer_headers(key: str | None) -> dict[str, str]:
    """``{"Authorization": "Bearer KEY"}``, or no header when there is no key."""
    return {"Authorization": f"Bearer {key}"} if key else {}
