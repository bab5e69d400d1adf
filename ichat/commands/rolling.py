"""A rolling reload of ``ichat up``'s workers, one at a time, through their status
ports (``POST /reload``, as ``ichat reload`` does): each worker starts its new engine
while the old one serves, so all N serve throughout. The first failure stops the roll;
the workers after it keep their configuration. Model: gunicorn's SIGHUP (re-read the
configuration, replace the workers gracefully)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import httpx

from ichat.auth import bearer_headers

logger = logging.getLogger("ichat.up")


@dataclass(frozen=True)
class Roll:
    """What to send each worker: its engine's whole new flags, settings that apply at
    once (``drain_timeout``), with the workers' admin key."""

    status_urls: list[str]
    engine_argv: list[str]
    settings: dict[str, object] = field(default_factory=dict)
    admin_key: str | None = None
    timeout: float = 1800.0


@dataclass
class Rolled:
    """How far a roll got: the workers reloaded, and the error that stopped it."""

    reloaded: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


async def roll(plan: Roll, transport: httpx.AsyncBaseTransport | None = None) -> Rolled:
    """Reload the workers one after another; stop at the first that fails."""
    done = Rolled()
    body = {"engine_args": plan.engine_argv, "merge": False, "settings": plan.settings}
    headers = bearer_headers(plan.admin_key)
    async with httpx.AsyncClient(
        headers=headers, timeout=plan.timeout, transport=transport
    ) as client:
        for url in plan.status_urls:
            logger.info("reloading the worker at %s", url)
            try:
                reply = await client.post(f"{url}/reload", json=body)
            except httpx.HTTPError as exc:
                done.error = f"{url} cannot be reached: {exc}"
                return done
            if reply.status_code != 200:
                try:
                    why = reply.json().get("error")
                except ValueError:
                    why = reply.text[:500]
                done.error = f"{url}: HTTP {reply.status_code}: {why}"
                return done
            answer = reply.json()
            logger.info(
                "worker at %s reloaded (%s) in %.1f s",
                url,
                answer.get("method"),
                float(answer.get("seconds") or 0.0),
            )
            done.reloaded.append(url)
    return done
