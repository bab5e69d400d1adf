"""The worker's status endpoints on a port of their own, up for the worker's whole life.

The engine's HTTP server comes and goes with each backend (its port is closed while a
dead engine restarts), so probes that must outlive a restart live here, on a tiny
asyncio server that imports nothing of the engines:

    GET /readyz   200 while a backend serves (state ready), else 503: route traffic here?
    GET /livez    200 while the worker can still recover, 503 once it cannot: the worker
                  gave up (crash loop), or its engine has been down longer than
                  ``liveness_grace`` (a restart that hangs): restart the container?
    GET /status   the supervisor's stats as JSON

Kubernetes: readinessProbe -> /readyz, livenessProbe -> /livez (see deploy/kubernetes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable

from ichat.supervisor import WorkerState, WorkerStats

logger = logging.getLogger("ichat.status")


def readiness(stats: WorkerStats) -> tuple[bool, str]:
    return stats.state is WorkerState.READY, stats.state.value


def liveness(stats: WorkerStats, now_unix: float, grace: float) -> tuple[bool, str]:
    """Alive unless the worker gave up or its engine stayed down past ``grace``."""
    if stats.state is WorkerState.FAILED:
        return False, "the worker gave up (crash loop or boot failure)"
    died = stats.last_death_detected_unix
    recovering = stats.state in (WorkerState.RESTARTING, WorkerState.STARTING)
    if recovering and died is not None and now_unix - died > grace:
        return False, f"the engine has been down for {now_unix - died:.0f} s (> {grace:g} s)"
    return True, stats.state.value


class StatusServer:
    def __init__(
        self,
        stats: WorkerStats,
        host: str,
        port: int,
        *,
        liveness_grace: float = 600.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.stats = stats
        self.host = host
        self.port = port
        self.liveness_grace = liveness_grace
        self._wall_clock = wall_clock
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        logger.info("status endpoints (/livez /readyz /status) on %s:%d", self.host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    def answer(self, path: str) -> tuple[int, dict[str, object]]:
        if path == "/readyz":
            ok, why = readiness(self.stats)
        elif path == "/livez":
            ok, why = liveness(self.stats, self._wall_clock(), self.liveness_grace)
        elif path == "/status":
            stats = dataclasses.asdict(self.stats)
            stats["state"] = self.stats.state.value
            return 200, stats
        else:
            return 404, {"error": f"no such endpoint: {path}"}
        return (200 if ok else 503), {"ok": ok, "reason": why}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            parts = request.decode("latin-1").split()
            path = parts[1].split("?", 1)[0] if len(parts) >= 2 else ""
            code, body = self.answer(path) if parts[:1] in (["GET"], ["HEAD"]) else (405, {})
            payload = json.dumps(body).encode()
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}.get(code, "Error")
            writer.write(
                f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
                + (payload if parts[:1] != ["HEAD"] else b"")
            )
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
