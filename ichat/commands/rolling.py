"""A rolling reload of ``ichat up``'s workers, one at a time, through their status
ports (``POST /reload``, as ``ichat reload`` does): each worker starts its new engine
while the old one serves, so all N serve throughout. The first failure stops the roll;
the workers after it keep their configuration. Model: gunicorn's SIGHUP (re-read the
configuration, replace the workers gracefully)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from ichat.auth import bearer_headers

logger = logging.getLogger("ichat.up")


@dataclass(frozen=True)
class Roll:
    """What to send each worker: its engine's new flags (``merge``: appended to those it
    runs with; None and no ``merge``: no engine touched), ``method`` (auto, swap,
    in_place), settings that apply at once (``drain_timeout``, ``log_level``), with the
    workers' admin key."""

    status_urls: list[str]
    engine_argv: list[str] | None
    settings: dict[str, object] = field(default_factory=dict)
    admin_key: str | None = None
    timeout: float = 1800.0
    merge: bool = False
    method: str = "auto"

    def body(self) -> dict[str, object]:
        """The ``POST /reload`` body each worker gets."""
        body: dict[str, object] = {"merge": self.merge, "method": self.method,
                                   "settings": self.settings}  # fmt: skip
        if self.engine_argv is not None:
            body["engine_args"] = self.engine_argv
        return body


@dataclass
class Rolled:
    """How far a roll got: the workers reloaded (each answer goes to ``on_reloaded``),
    and the error that stopped it with the refusing worker's HTTP status (None: it could
    not be reached)."""

    reloaded: list[str] = field(default_factory=list)
    error: str | None = None
    status: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


async def roll(
    plan: Roll,
    transport: httpx.AsyncBaseTransport | None = None,
    on_reloaded: Callable[[str, dict[str, Any]], None] | None = None,
) -> Rolled:
    """Reload the workers one after another (``on_reloaded`` is told of each, with its
    answer); stop at the first that fails."""
    done = Rolled()
    headers = bearer_headers(plan.admin_key)
    async with httpx.AsyncClient(
        headers=headers, timeout=plan.timeout, transport=transport
    ) as client:
        for url in plan.status_urls:
            logger.info("reloading the worker at %s", url)
            try:
                reply = await client.post(f"{url}/reload", json=plan.body())
            except httpx.HTTPError as exc:
                done.error = f"{url} cannot be reached: {exc}"
                return done
            try:
                answer = reply.json()
            except ValueError:
                answer = {"error": reply.text[:500]}
            if reply.status_code != 200:
                done.error = f"{url}: HTTP {reply.status_code}: {answer.get('error')}"
                done.status = reply.status_code
                return done
            logger.info(
                "worker at %s reloaded (%s) in %.1f s",
                url,
                answer.get("method"),
                float(answer.get("seconds") or 0.0),
            )
            done.reloaded.append(url)
            if on_reloaded is not None:
                on_reloaded(url, answer)
    return done
