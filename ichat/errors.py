"""The one exception hierarchy of iChat.

    IChatError                      exit 1
    ├── ConfigError                 exit 2  bad flags, missing model, engine not installed
    │   ├── EngineNotInstalledError
    │   └── ModelNotFoundError
    ├── StartupError                exit 3  the backend never became ready (boot failure)
    │   ├── PortInUseError
    │   └── ReadinessTimeoutError
    ├── EngineDiedError             exit 4  the engine died after it was ready
    ├── CrashLoopError              exit 5  it kept dying: the supervisor gave up
    ├── GatewayError                exit 6  the gateway (SMG) cannot start or answers wrong
    │   └── GatewayRefused                  a control-plane call got an unexpected status
    ├── WorkerExitedError           exit 2-5 (the worker's own) or 7: ``ichat up``'s worker
    │                                       exited on its own
    └── ReloadError                 exit 8  a reload was refused or its engine did not
        │                                   start; the running engine keeps serving
        └── RestartToReload                 the engine cannot start new flags beside the
                                            running one: the worker restarts it with them

Engine exceptions are translated into these at the backend boundary with
``raise X(...) from exc``; only the CLI turns them into exit codes.
"""

from __future__ import annotations


class IChatError(Exception):
    """Base of every error iChat raises on purpose."""

    exit_code = 1


class ConfigError(IChatError):
    """The command line or the environment cannot work; nothing was started."""

    exit_code = 2


class EngineNotInstalledError(ConfigError):
    """The engine chosen with ``--backend`` cannot be imported."""

    def __init__(self, engine: str, install: str) -> None:
        super().__init__(f"the {engine} engine is not installed; install it with: {install}")
        self.engine = engine
        self.install = install


class ModelNotFoundError(ConfigError):
    """The model path given does not exist."""

    def __init__(self, path: str) -> None:
        super().__init__(f"model path does not exist: {path}")
        self.path = path


class StartupError(IChatError):
    """The backend never became ready: a boot failure, not a crash; do not restart."""

    exit_code = 3


class PortInUseError(StartupError):
    """The listening address is taken; found before the engine starts."""

    def __init__(self, host: str, port: int, cause: BaseException | None = None) -> None:
        reason = f" ({cause})" if cause is not None else ""
        super().__init__(f"port {port} on {host or '0.0.0.0'} is already in use{reason}")
        self.host = host
        self.port = port


class ReadinessTimeoutError(StartupError):
    """The engine did not become healthy within the readiness timeout."""


class EngineDiedError(IChatError):
    """The engine died after it had been ready; the caller may start a fresh backend."""

    exit_code = 4


class CrashLoopError(IChatError):
    """The engine kept dying; the supervisor stopped restarting it."""

    exit_code = 5


class GatewayError(IChatError):
    """The gateway cannot be started, or it answered a control-plane call wrongly.

    A worker never stops for it: registration retries and the worker keeps serving."""

    exit_code = 6


class GatewayRefused(GatewayError):
    """The gateway answered a control-plane call with an unexpected status."""

    def __init__(self, call: str, status: int, text: str) -> None:
        super().__init__(f"{call} -> HTTP {status} {text[:200]}")
        self.status = status


class PrometheusError(IChatError):
    """The Prometheus server ``ichat up --prometheus`` runs next to the fleet did not
    start, or exited."""

    exit_code = 9


class WorkerExitedError(IChatError):
    """A worker of ``ichat up`` exited on its own. ``ichat up`` exits with the worker's
    code when it is one of iChat's (2 configuration, 3 boot failure, 4 died without
    restart, 5 crash loop), else with 7 (killed by a signal, or an unknown code)."""

    OWN_CODES = (2, 3, 4, 5)
    OTHER = 7

    def __init__(self, index: int, returncode: int) -> None:
        how = f"killed by signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
        super().__init__(f"worker {index} exited ({how}); see its log above")
        self.index = index
        self.returncode = returncode
        self.exit_code = returncode if returncode in self.OWN_CODES else self.OTHER


class ReloadError(IChatError):
    """A reload (``ichat reload``) did not replace the engine: refused (bad flags, not
    serving, one in progress, an engine without reload) or its new engine failed to
    start or warm up. The engine that served before keeps serving (rollback).
    ``status`` is the HTTP status the worker answers the reload with."""

    exit_code = 8

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


class RestartToReload(ReloadError):
    """The engine cannot run new flags beside the serving one (SGLang: one engine per
    process), and they parsed: the supervisor reloads by a restart instead -- out of the
    gateway, drain, stop, start with the new flags, back to the old ones if the new do
    not start. Raised by a backend's ``reload``; never reaches a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 501)
