"""The worker's status endpoints on a port of their own, up for the worker's whole life.

The engine's HTTP server comes and goes with each backend (its port is closed while a
dead engine restarts), so probes that must outlive a restart live here, on a tiny
threaded HTTP server that imports nothing of the engines:

    GET /readyz   200 while a backend serves (state ready), else 503: route traffic here?
    GET /livez    200 while the worker can still recover, 503 once it cannot: the worker
                  gave up (crash loop), or its engine has been down longer than
                  ``liveness_grace`` (a restart that hangs): restart the container?
    GET /status   the supervisor's stats as JSON
    GET /metrics  the worker's ``ichat_*`` metrics (Prometheus text), also while the
                  engine restarts and with engines whose ``/metrics`` lacks them (SGLang)
    POST /reload  replace the engine by one with new flags while the old serves
                  (``ichat reload``); needs ``Authorization: Bearer`` with the worker's
                  admin key, and answers when the reload has ended

Kubernetes: readinessProbe -> /readyz, livenessProbe -> /livez (see deploy/kubernetes).
"""

from __future__ import annotations

import dataclasses
import hmac
import http.server
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ichat.backends.reloaded import ReloadMethod
from ichat.worker import metrics
from ichat.worker.supervisor import WorkerState, WorkerStats

logger = logging.getLogger("ichat.status")


@dataclass(frozen=True)
class ReloadRequest:
    """``POST /reload``'s body: the engine's flags (None: settings only), whether they
    are appended to the running ones, how, and framework settings to apply."""

    argv: list[str] | None
    merge: bool = False
    method: ReloadMethod = ReloadMethod.AUTO
    settings: dict[str, object] = field(default_factory=dict)


# a reload request -> (HTTP status, the reload's report or its error); blocks
Reload = Callable[[ReloadRequest], tuple[int, dict[str, object]]]


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
    """Answers from a thread of its own: the worker's event loop is blocked for seconds
    while an engine starts (vLLM builds its client synchronously), and a probe must
    not time out then -- that is exactly when ``/livez`` has to say "alive"."""

    def __init__(
        self,
        stats: WorkerStats,
        host: str,
        port: int,
        *,
        liveness_grace: float = 600.0,
        wall_clock: Callable[[], float] = time.time,
        admin_key: str | None = None,
    ) -> None:
        self.stats = stats
        self.host = host
        self.port = port
        self.liveness_grace = liveness_grace
        self.admin_key = admin_key
        self.reload: Reload | None = None  # set by the worker once its loop runs
        self._wall_clock = wall_clock
        self._httpd: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind (``OSError`` if the port is taken) and serve from a daemon thread."""
        reply, post = self.reply, self.post

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._send(*reply(self.path.split("?", 1)[0]))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length > 0 else b""
                path = self.path.split("?", 1)[0]
                code, answer = post(path, self.headers.get("Authorization"), body)
                self._send(code, json.dumps(answer).encode(), "application/json")

            def _send(self, code: int, payload: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                return  # probes every few seconds: not worth a log line each

        self._httpd = http.server.ThreadingHTTPServer((self.host, self.port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="ichat-status", daemon=True
        )
        self._thread.start()
        logger.info("status endpoints (/livez /readyz /status) on %s:%d", self.host, self.port)

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def reply(self, path: str) -> tuple[int, bytes, str]:
        """Status code, body and content type for ``GET path``."""
        if path == "/metrics":
            return 200, *metrics.exposition(self.stats)
        code, body = self.answer(path)
        return code, json.dumps(body).encode(), "application/json"

    def post(
        self, path: str, authorization: str | None, body: bytes
    ) -> tuple[int, dict[str, object]]:
        """Status code and JSON answer for ``POST path`` (``/reload``)."""
        if path != "/reload":
            return 404, {"error": f"no such endpoint: {path}"}
        if not self.admin_key:
            return 403, {
                "error": "reload is off: this worker has no admin key "
                "(start it with --admin-key, or an engine --api-key)"
            }
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), self.admin_key.encode()):
            return 401, {"error": "a reload needs the worker's admin key (Bearer)"}
        request = _reload_request(body)
        if isinstance(request, str):
            return 400, {"error": request}
        if self.reload is None:
            return 503, {"error": "the worker is not running yet"}
        return self.reload(request)

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


def _reload_request(body: bytes) -> ReloadRequest | str:
    """``{"engine_args": [...], "merge": false, "method": "auto", "settings": {}}`` read
    (``engine_args`` may be left out with ``settings`` or ``merge``); what is wrong with
    it otherwise."""
    try:
        request: Any = json.loads(body or b"{}")
    except ValueError as exc:
        return f"the body is not JSON: {exc}"
    if not isinstance(request, dict):
        return "the body is a JSON object"
    argv = request.get("engine_args")
    settings = request.get("settings") or {}
    merge = bool(request.get("merge", False))
    if not isinstance(settings, dict):
        return '"settings" is an object: {"drain_timeout": 60, "log_level": "info"}'
    if argv is None and not (settings or merge):
        return 'the body needs "engine_args" (the engine\'s flags) or "settings"'
    if argv is not None and (
        not isinstance(argv, list) or not all(isinstance(a, str) for a in argv)
    ):
        return '"engine_args" is a list of strings (the engine\'s flags)'
    try:
        method = ReloadMethod(request.get("method", ReloadMethod.AUTO.value))
    except ValueError:
        return f'"method" is one of {[m.value for m in ReloadMethod]}'
    return ReloadRequest(argv, merge, method, settings)
