"""The worker's membership in the gateway (SMG's control plane: ``/workers``).

The supervisor says what it wants -- ``join()`` once the engine serves, ``leave()``
the moment it is found dead or the worker stops -- and returns at once. One
background task makes the gateway agree: ``POST /workers`` (with the served model
name), ``DELETE /workers/<id>``. A gateway that is down or answers an error is
retried with capped back-off and logged; it never stops the worker, which keeps
serving directly. While joined, the task checks every ``recheck`` seconds that the
gateway still knows the worker (a restarted gateway forgets it) and joins again.
After a reload that changed the served model name, ``serve_model()`` registers the
worker again under the new name (SMG keeps one model per worker: the first of a list).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from ichat import smg_workers
from ichat.aio import first_completed
from ichat.auth import bearer_headers
from ichat.errors import GatewayRefused

logger = logging.getLogger("ichat.registration")


@dataclass(frozen=True)
class GatewaySettings:
    url: str  # the gateway's base URL, e.g. http://127.0.0.1:8080
    worker_url: str  # how the gateway reaches this worker
    model: str  # the served model name
    api_key: str | None = None  # the gateway's admin key (Bearer)
    # the engine's own API key: what the gateway sends this worker with each request
    worker_api_key: str | None = None
    retry_initial: float = 0.2
    retry_max: float = 5.0
    recheck: float = 5.0
    request_timeout: float = 2.0


class GatewayRegistration:
    def __init__(
        self,
        settings: GatewaySettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self._transport = transport
        self._sleep = sleep
        self._want_member = False
        self._renamed = False  # registered under a name it no longer serves
        self._changed = asyncio.Event()
        self._settled = asyncio.Event()
        self.worker_id: str | None = None  # set while the gateway has us
        self.joins = 0
        self.leaves = 0
        self.failures = 0

    # ----------------------------------------------------------- what is wanted

    def join(self) -> None:
        self._want(True)

    def leave(self) -> None:
        self._want(False)

    def serve_model(self, name: str) -> None:
        """Register under ``name`` from now on (the worker serves it after a reload)."""
        if name == self.settings.model:
            return
        self.settings = dataclasses.replace(self.settings, model=name)
        self._renamed = self.worker_id is not None
        self._want(self._want_member)

    async def wait_settled(self, timeout: float) -> bool:
        """Wait (bounded) until the gateway agrees with the last join/leave."""
        waiter = asyncio.ensure_future(self._settled.wait())
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()
        return self._settled.is_set()

    def _want(self, member: bool) -> None:
        self._want_member = member
        self._settled.clear()
        self._changed.set()

    # ------------------------------------------------------------ the one task

    async def run(self) -> None:
        """Reconcile until cancelled; never raises for the gateway's sake."""
        settings = self.settings
        headers = bearer_headers(settings.api_key)
        async with httpx.AsyncClient(
            base_url=settings.url,
            headers=headers,
            timeout=settings.request_timeout,
            transport=self._transport,
        ) as client:
            delay = settings.retry_initial
            failing = 0
            while True:
                self._changed.clear()
                try:
                    called = await self._reconcile(client)
                except (httpx.HTTPError, GatewayRefused) as exc:
                    self.failures += 1
                    failing += 1
                    # the first failure and then one in ten: a gateway down for long
                    # must not flood the log
                    log = logger.warning if failing % 10 == 1 else logger.debug
                    log(
                        "gateway %s: %s; retrying in %.1f s (the worker keeps serving)",
                        settings.url,
                        exc or type(exc).__name__,
                        delay,
                    )
                    await self._wait_change(delay)
                    delay = min(delay * 2, settings.retry_max)
                    continue
                if failing and called:  # not when nothing was left to ask it
                    logger.info("gateway %s answers again", settings.url)
                failing = 0
                delay = settings.retry_initial
                self._settled.set()
                await self._wait_change(settings.recheck if self.worker_id else None)

    async def _wait_change(self, timeout: float | None) -> None:
        if timeout is None:
            await self._changed.wait()
            return
        await first_completed(self._changed.wait(), self._sleep(timeout))

    async def _reconcile(self, client: httpx.AsyncClient) -> bool:
        """Bring the gateway to what is wanted; whether the gateway was called."""
        if self._want_member:
            if self.worker_id is not None and self._renamed:
                await self._delete(client, self.worker_id)  # then under the new name
            self._renamed = False
            if self.worker_id is not None and await self._still_known(client, self.worker_id):
                return True
            await self._post(client)
        elif self.worker_id is not None:
            await self._delete(client, self.worker_id)
        else:
            return False
        return True

    async def _post(self, client: httpx.AsyncClient) -> None:
        settings = self.settings
        body: dict[str, object] = {"url": settings.worker_url, "models": [{"id": settings.model}]}
        if settings.worker_api_key:
            body["api_key"] = settings.worker_api_key
        response = await client.post("/workers", json=body)
        if response.status_code == 409:  # our URL is there already (e.g. we restarted in place)
            await self._adopt(client)
            return
        if response.status_code not in (200, 201, 202):
            raise GatewayRefused("POST /workers", response.status_code, response.text)
        self.worker_id = str(response.json().get("worker_id") or settings.worker_url)
        self.joins += 1
        logger.info(
            "registered %s (model %s) with gateway %s as %s",
            settings.worker_url,
            settings.model,
            settings.url,
            self.worker_id,
        )

    async def _adopt(self, client: httpx.AsyncClient) -> None:
        """The gateway has a worker at our URL: take it over if it serves our model.

        An entry left by an earlier run at the same address (a container restarted in
        place before the gateway dropped it) would otherwise answer every POST with 409
        for ever. One serving another model is removed, and the next attempt registers."""
        settings = self.settings
        response = await client.get("/workers")
        if response.status_code != 200:
            raise GatewayRefused("GET /workers", response.status_code, response.text)
        for worker in smg_workers.entries(response.json()):
            if worker.get("url") != settings.worker_url:
                continue
            if not smg_workers.serves(worker, settings.model):
                await client.delete(f"/workers/{worker['id']}")
                raise GatewayRefused(
                    "POST /workers",
                    409,
                    f"removed a stale entry for {sorted(smg_workers.model_ids(worker))}",
                )
            self.worker_id = str(worker["id"])
            self.joins += 1
            logger.info(
                "gateway %s already had %s as %s; adopted it",
                settings.url,
                settings.worker_url,
                self.worker_id,
            )
            return
        # 409 for a creation still in progress: not listed yet; the retry finds it
        raise GatewayRefused("POST /workers", 409, "creation in progress at the gateway")

    async def _delete(self, client: httpx.AsyncClient, worker_id: str) -> None:
        response = await client.delete(f"/workers/{worker_id}")
        if response.status_code not in (200, 202, 204, 404):
            raise GatewayRefused(
                f"DELETE /workers/{worker_id}", response.status_code, response.text
            )
        self.worker_id = None
        self.leaves += 1
        logger.info("deregistered %s from gateway %s", self.settings.worker_url, self.settings.url)

    async def _still_known(self, client: httpx.AsyncClient, worker_id: str) -> bool:
        response = await client.get(f"/workers/{worker_id}")
        if response.status_code == 404:
            logger.warning("gateway %s forgot this worker; registering again", self.settings.url)
            self.worker_id = None
            return False
        if response.status_code != 200:
            raise GatewayRefused(f"GET /workers/{worker_id}", response.status_code, response.text)
        return True
