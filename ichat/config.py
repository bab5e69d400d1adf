"""The worker's typed configuration: what ``ichat serve`` parsed for itself.

The CLI builds this object; backends and the supervisor read it. Nothing here reads
the environment or ``sys.argv``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ichat.restart_policy import RestartPolicy


@dataclass(frozen=True)
class StopDeadlines:
    """Every bound of a stop, in seconds, named once. A step that outlives its bound is
    abandoned and the next, harsher one follows; the engine's processes are killed last
    in any case."""

    # on SIGTERM: at most this long to leave the gateway before draining starts
    gateway_leave: float = 3.0
    # beyond --drain-timeout, before the HTTP server's connections are closed
    drain_grace: float = 5.0
    # the HTTP server, once forced, to end
    server_close: float = 10.0
    # the health monitor to end once told to
    monitor_stop: float = 5.0
    # the engine's own shutdown, before its processes are killed instead
    engine_shutdown: float = 30.0
    # a cancelled step to end before it is abandoned
    cancelled_step: float = 5.0
    # SIGTERM to SIGKILL for the engine's processes, and after SIGKILL to reaping them
    terminate: float = 5.0
    # ichat up: beyond --drain-timeout, for a worker to exit after SIGTERM before it is
    # killed
    worker_exit: float = 30.0


@dataclass(frozen=True)
class WorkerConfig:
    """Framework settings of one worker (everything else goes to the engine)."""

    backend: str = "vllm"
    host: str = "127.0.0.1"
    port: int = 8000
    # None: iChat logs at info, the engine its warnings and errors only (engine_log_level).
    log_level: str | None = None
    # Readiness: give up on a backend that is not healthy after this many seconds.
    ready_timeout: float = 1800.0
    # Send one tiny request before declaring the backend ready.
    warmup: bool = True
    # Health monitor: how often the engine's liveness is checked, and how long a
    # probe may take before it is logged as slow (slow is never taken for dead).
    health_interval: float = 0.1
    health_probe_timeout: float = 5.0
    # Graceful stop: in-flight requests get this long before connections are closed.
    drain_timeout: float = 30.0
    # With a gateway: what is still running at the drain deadline goes on on another
    # worker, and this worker relays those answers for at most this long more.
    handoff_timeout: float = 60.0
    # Supervision: start a fresh backend when the engine dies after being ready.
    restart: bool = True
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    # Keep a second, initialised engine of the same configuration; serve it on the same
    # socket when the active engine dies (a failover), then start a new standby.
    standby: bool = False
    # A stream its dying engine cut is continued from its last token on the next engine
    # (a standby) or another worker (through the gateway), at most this many times (0:
    # off: reading every stream's token ids costs the API process CPU per token, 0.61
    # of native vLLM's throughput at 256 streams on an H100 before its fast path, 0.771
    # with it: docs/benchmarks.md); how
    # long a request waits for the next engine (continued or run again) before it gets
    # a 503 or error event.
    continuation_limit: int = 0
    continuation_timeout: float = 10.0
    # Gateway (SMG): register once ready, leave at once on death or stop.
    gateway_url: str | None = None
    gateway_api_key: str | None = None
    # The URL the gateway uses to reach this worker (default: base_url).
    advertise_url: str | None = None
    # /livez, /readyz, /status on a port of their own (None: off); /livez fails once
    # the engine has been down (restarting) for longer than liveness_grace seconds.
    status_port: int | None = None
    liveness_grace: float = 600.0
    # the key ``POST /reload`` on the status port needs (default: the engine's API
    # key; neither: reload is off)
    admin_key: str | None = None
    deadlines: StopDeadlines = field(default_factory=StopDeadlines)

    @property
    def engine_log_level(self) -> str:
        """The engine's (and its HTTP server's) log level: ``log_level`` when given,
        else "warning" (the engine's full log is ``--log-level info`` away)."""
        return self.log_level or "warning"

    @property
    def client_host(self) -> str:
        """The address a local client uses to reach the listening socket."""
        if self.host in ("", "0.0.0.0"):
            return "127.0.0.1"
        if self.host == "::":
            return "::1"
        return self.host

    @property
    def base_url(self) -> str:
        host = self.client_host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"
