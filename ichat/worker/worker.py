"""``Worker``: one ``ichat serve`` process's life, as phases (model: uvicorn ``Server``).

    startup    the status port (its reload endpoint runs reloads on this loop), the
               metrics collector, gateway membership, the signal handlers (which
               only record)
    main loop  the supervisor runs backends until a stop or a failure; the signal
               policy acts meanwhile: the first SIGTERM/SIGINT leaves the gateway
               (bounded by ``deadlines.gateway_leave``), then drains; a second forces
    shutdown   out of the gateway (a worker that gives up leaves too), the status port
               closed, the collector unregistered, the signal handlers restored

``serve()`` only sequences them. The backends are made by the supervisor; the worker
owns what outlives each backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from collections.abc import Callable

from ichat.backends.base_backend import BaseBackend
from ichat.config import StopDeadlines, WorkerConfig
from ichat.errors import PortInUseError, ReloadError
from ichat.process.signals import captured_signals
from ichat.worker import metrics
from ichat.worker.registration import GatewayRegistration, GatewaySettings
from ichat.worker.status_server import ReloadRequest, StatusServer
from ichat.worker.supervisor import Supervisor

logger = logging.getLogger("ichat.serve")


class Worker:
    def __init__(
        self,
        supervisor: Supervisor,
        *,
        registration: GatewayRegistration | None = None,
        status: StatusServer | None = None,
        deadlines: StopDeadlines | None = None,
    ) -> None:
        self.supervisor = supervisor
        self.registration = registration
        self.status = status
        self.deadlines = deadlines or StopDeadlines()
        self.should_exit = False
        self.force_exit = False
        self._signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self._stack = contextlib.ExitStack()
        self._tasks: list[asyncio.Task[None]] = []

    @classmethod
    def from_config(
        cls,
        config: WorkerConfig,
        make_backend: Callable[[], BaseBackend],
        model: str,
        api_key: str | None = None,
    ) -> Worker:
        """The worker ``ichat serve`` runs: ``model`` is the served model name (what the
        gateway routes by), ``api_key`` the engine's own (what the gateway sends it)."""
        registration = None
        if config.gateway_url:
            registration = GatewayRegistration(
                GatewaySettings(
                    url=config.gateway_url.rstrip("/"),
                    worker_url=config.advertise_url or config.base_url,
                    model=model,
                    api_key=config.gateway_api_key,
                    worker_api_key=api_key,
                )
            )
        supervisor = Supervisor(
            make_backend, config.restart_policy, restart=config.restart, membership=registration
        )
        supervisor.stats.url = config.advertise_url or config.base_url
        supervisor.stats.gateway_url = (config.gateway_url or "").rstrip("/")
        status = None
        if config.status_port is not None:
            status = StatusServer(
                supervisor.stats,
                config.host,
                config.status_port,
                liveness_grace=config.liveness_grace,
                admin_key=config.admin_key or api_key,
            )
        return cls(supervisor, registration=registration, status=status, deadlines=config.deadlines)

    async def serve(self) -> None:
        """Run until stopped; raise on boot failure, crash loop, or death without restart."""
        await self.startup()
        try:
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        loop = asyncio.get_running_loop()
        if self.status is not None:
            try:
                self.status.start()
            except OSError as exc:
                raise PortInUseError(self.status.host, self.status.port, exc) from exc
            self._stack.callback(self.status.stop)
            self.status.reload = functools.partial(self._reload_from_a_thread, loop)
        self._stack.enter_context(metrics.registered(self.supervisor.stats))
        self._stack.enter_context(captured_signals(loop, self._signals))
        self._tasks.append(asyncio.create_task(self._act_on_signals()))
        if self.registration is not None:
            self._tasks.append(asyncio.create_task(self.registration.run()))

    def _reload_from_a_thread(
        self, loop: asyncio.AbstractEventLoop, request: ReloadRequest
    ) -> tuple[int, dict[str, object]]:
        """Run a reload on the worker's loop; block the calling thread until it ends."""
        reload = self.supervisor.reload(
            request.argv, merge=request.merge, method=request.method, settings=request.settings
        )
        try:
            return 200, asyncio.run_coroutine_threadsafe(reload, loop).result()
        except ReloadError as exc:
            return exc.status, {"outcome": "failed", "error": str(exc)}
        except Exception as exc:  # the loop ended (the worker stops) or a defect
            logger.exception("reload failed")
            return 500, {"outcome": "failed", "error": f"{type(exc).__name__}: {exc}"}

    async def main_loop(self) -> None:
        await self.supervisor.run()

    async def shutdown(self) -> None:
        signals, *membership = self._tasks
        signals.cancel()
        if self.registration is not None:
            await self._leave_gateway()  # a worker that gives up leaves the gateway too
        for task in membership:
            task.cancel()
        self._tasks = []
        self._stack.close()

    def handle_signal(self, sig: signal.Signals) -> None:
        """Act on a recorded signal: the first stops (drain), a second forces."""
        if self.should_exit:
            logger.warning("%s received again: forcing the stop", sig.name)
            self.force_exit = True
            self.supervisor.request_stop(force=True)
            return
        self.should_exit = True
        logger.info(
            "%s received: stopping (in-flight requests may finish within "
            "the drain timeout; send it again to force)",
            sig.name,
        )

    async def _act_on_signals(self) -> None:
        while True:
            sig = await self._signals.get()
            first = not self.should_exit
            self.handle_signal(sig)
            if first:
                # out of the gateway before draining: no request is routed here meanwhile
                if self.registration is not None:
                    await self._leave_gateway()
                if not self.force_exit:
                    self.supervisor.request_stop()

    async def _leave_gateway(self) -> None:
        assert self.registration is not None
        self.registration.leave()
        await self.registration.wait_settled(self.deadlines.gateway_leave)
