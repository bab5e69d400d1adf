"""``ichat up``: a gateway and N workers on one machine, ready to use, stopped cleanly.

    ichat up                              # the generated test model, one worker
    ichat up --workers 2 --model-path DIR --api-key KEY [engine flags...]

Order of a start: gateway (SMG) -> workers (``ichat serve --gateway-url ...``, each
registering itself once ready) -> wait until every worker is routable through the
gateway -> print the endpoint. Order of a stop (Ctrl-C / SIGTERM): workers first
(each leaves the gateway, then drains), then the gateway; a second signal kills.
A worker or the gateway that exits on its own stops the whole group with its
error. An orphan guard kills everything if ``ichat up`` itself is SIGKILLed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from ichat.aio import first_completed
from ichat.auth import bearer_headers
from ichat.commands.gateway import GatewayConfig, GatewayProcess
from ichat.commands.rolling import Roll, roll
from ichat.commands.run import run_command
from ichat.config import StopDeadlines
from ichat.errors import (
    ConfigError,
    IChatError,
    ModelNotFoundError,
    PortInUseError,
    ReadinessTimeoutError,
    WorkerExitedError,
)
from ichat.observability.prometheus import PrometheusConfig, PrometheusProcess
from ichat.process import processes
from ichat.process.readiness import Backoff, wait_until_ready
from ichat.process.signals import HANDLED, captured_signals, first_signal

logger = logging.getLogger("ichat.up")

DEFAULT_MODEL_DIR = Path.home() / ".cache" / "ichat" / "test-model"


@dataclass(frozen=True)
class UpConfig:
    workers: int = 1
    model_path: str | None = None  # None: the generated test model
    served_model_name: str = "ichat-test"
    backend: str = "vllm"
    host: str = "127.0.0.1"
    port: int = 8080  # the gateway; workers listen on worker_port, worker_port + 1, ...
    worker_port: int = 8100
    api_key: str | None = None
    prometheus_port: int | None = None  # the gateway's (default: port + 1)
    ready_timeout: float = 1800.0
    drain_timeout: float = 30.0
    standby: bool = False  # each worker keeps a standby engine (ichat serve --standby)
    continuation_limit: int = 0  # ichat serve --continuation-limit
    status_port: int | None = None  # the first worker's /status port (then +1, +2...)
    admin_key: str | None = None  # the workers' reload key (default: api_key)
    # a Prometheus server scraping the fleet and evaluating iChat's alert rules on this
    # port (None: off); its binary (default: $ICHAT_PROMETHEUS, else on the PATH)
    prometheus: int | None = None
    prometheus_bin: str | None = None
    engine_argv: list[str] = field(default_factory=list)

    @property
    def worker_status_port(self) -> int | None:
        """The first worker's status port: as given, else with Prometheus (which
        scrapes it) the worker port + 100."""
        if self.status_port is None and self.prometheus is not None:
            return self.worker_port + 100
        return self.status_port

    @property
    def status_urls(self) -> list[str]:
        """The workers' status URLs (none without --status-port)."""
        first = self.worker_status_port
        if first is None:
            return []
        return [f"http://127.0.0.1:{first + i}" for i in range(self.workers)]

    @property
    def monitoring(self) -> PrometheusConfig | None:
        """What the Prometheus server scrapes (None: no --prometheus)."""
        if self.prometheus is None:
            return None
        return PrometheusConfig(
            workers=[url.removeprefix("http://") for url in self.status_urls],
            engines=[f"127.0.0.1:{self.worker_port + i}" for i in range(self.workers)],
            gateways=[f"127.0.0.1:{self.gateway.metrics_port}"],
            port=self.prometheus,
            binary=self.prometheus_bin,
        )

    @property
    def gateway(self) -> GatewayConfig:
        return GatewayConfig(
            host=self.host,
            port=self.port,
            api_key=self.api_key,
            prometheus_port=self.prometheus_port,
        )

    def worker_argv(self, index: int, model_path: str) -> list[str]:
        argv = [sys.executable, "-m", "ichat", "serve", "--backend", self.backend]
        argv += ["--host", "127.0.0.1", "--port", str(self.worker_port + index)]
        argv += ["--drain-timeout", str(self.drain_timeout)]
        argv += ["--ready-timeout", str(self.ready_timeout)]
        argv += ["--gateway-url", self.gateway.url]
        if self.standby:
            argv += ["--standby"]
        if self.continuation_limit:
            argv += ["--continuation-limit", str(self.continuation_limit)]
        if self.worker_status_port is not None:
            argv += ["--status-port", str(self.worker_status_port + index)]
        if self.api_key:  # SMG sends the clients' key on; the engine's own is the same
            argv += ["--gateway-api-key", self.api_key]
        if self.admin_key:
            argv += ["--admin-key", self.admin_key]
        return argv + self.engine_flags(model_path)

    def engine_flags(self, model_path: str) -> list[str]:
        """The workers' engine flags: the engine's own key (the same as the gateway's),
        the model and everything iChat does not know."""
        flags = ["--api-key", self.api_key] if self.api_key else []
        flags += ["--model-path", model_path, "--served-model-name", self.served_model_name]
        return flags + self.engine_argv

    def fixed_fields_changed(self, new: UpConfig) -> list[str]:
        """The settings ``new`` changes that a rolling reload cannot (it changes the
        engine flags, the model and the drain timeout)."""
        movable = {"engine_argv", "model_path", "served_model_name", "drain_timeout"}
        return [
            f.name
            for f in dataclasses.fields(self)
            if f.name not in movable and getattr(self, f.name) != getattr(new, f.name)
        ]


def prepare_model(config: UpConfig) -> str:
    if config.model_path is not None:
        if not Path(config.model_path).exists():
            raise ModelNotFoundError(config.model_path)
        return config.model_path
    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        logger.info("generating the test model in %s", DEFAULT_MODEL_DIR)
        made = subprocess.run(
            [sys.executable, "-m", "ichat", "make-test-model", str(DEFAULT_MODEL_DIR)]
        )
        if made.returncode != 0:
            raise ConfigError("could not generate the test model (see above)")
    return str(DEFAULT_MODEL_DIR)


async def routable_workers(client: httpx.AsyncClient, model: str) -> int:
    """How many healthy workers the gateway lists for ``model``."""
    response = await client.get("/workers")
    response.raise_for_status()
    count = 0
    for worker in response.json().get("workers", []):
        models = {m.get("id") for m in worker.get("models", []) if isinstance(m, dict)}
        if worker.get("is_healthy") and (model in models or worker.get("model_id") == model):
            count += 1
    return count


class Group:
    """The gateway and the worker processes of one ``ichat up``."""

    def __init__(self, config: UpConfig) -> None:
        self.config = config
        self.gateway = GatewayProcess(config.gateway)
        self.workers: list[subprocess.Popen[bytes]] = []
        monitoring = config.monitoring
        self.prometheus = PrometheusProcess(monitoring) if monitoring is not None else None

    def check_ports(self) -> None:
        config = self.config
        if self.prometheus is not None:
            self.prometheus.config.find_binary()  # before anything starts
        for i in range(config.workers):
            for base in (config.worker_port, config.worker_status_port):
                if base is not None and not processes.port_is_free("127.0.0.1", base + i):
                    raise PortInUseError("127.0.0.1", base + i)

    def start_workers(self, model_path: str) -> None:
        for i in range(self.config.workers):
            argv = self.config.worker_argv(i, model_path)
            logger.info("starting worker %d: %s", i, " ".join(argv))
            self.workers.append(subprocess.Popen(argv))

    async def start_prometheus(self) -> None:
        if self.prometheus is not None:
            self.prometheus.start()
            await self.prometheus.wait_ready(timeout=60)

    def check_running(self) -> None:
        self.gateway.check_running()
        if self.prometheus is not None:
            self.prometheus.check_running()
        for i, worker in enumerate(self.workers):
            if worker.poll() is not None:
                raise WorkerExitedError(i, worker.returncode)

    async def wait_routable(self) -> float:
        config = self.config
        headers = bearer_headers(config.api_key)
        async with httpx.AsyncClient(base_url=config.gateway.url, headers=headers, timeout=5) as c:

            async def routable() -> bool:
                with contextlib.suppress(httpx.HTTPError):
                    return await routable_workers(c, config.served_model_name) >= config.workers
                return False

            try:
                return await wait_until_ready(
                    routable,
                    timeout=config.ready_timeout,
                    check_alive=self.check_running,
                    backoff=Backoff(initial=0.1, factor=1.5, maximum=1.0),
                )
            except ReadinessTimeoutError:
                raise IChatError(f"not routable within {config.ready_timeout:.0f} s") from None

    async def serve(
        self, received: asyncio.Queue[signal.Signals], argv: Sequence[str]
    ) -> signal.Signals:
        """Until a stop signal (returned); each SIGHUP reads the arguments again (a file
        given as ``@FILE``) and rolls the workers onto their new engine flags."""
        while True:
            sig = await first_signal(received, self.check_running)
            if sig is not signal.SIGHUP:
                return sig
            task = asyncio.ensure_future(self.reload(argv))
            stop = await self._while(task, received)
            if stop is not None:
                return stop

    async def _while(
        self, task: asyncio.Future[None], received: asyncio.Queue[signal.Signals]
    ) -> signal.Signals | None:
        """Wait for ``task`` (checking the processes); a stop signal meanwhile cancels
        it and is returned, a SIGHUP is ignored (a roll is in progress)."""
        while not task.done():
            getter: asyncio.Future[signal.Signals] = asyncio.ensure_future(received.get())
            both: set[asyncio.Future[Any]] = {task, getter}
            await asyncio.wait(both, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                self.check_running()
                continue
            if getter.result() is signal.SIGHUP:
                logger.warning("SIGHUP ignored: a roll is in progress")
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return getter.result()
        task.result()
        return None

    async def reload(self, argv: Sequence[str]) -> None:
        """SIGHUP: the arguments read again; new engine flags, model or drain timeout
        rolled over the workers one at a time. Anything else is refused (logged)."""
        old = self.config
        try:
            new = parse_args(argv)
            model_path = prepare_model(new)
        except (IChatError, SystemExit) as exc:  # argparse exits on a bad argument
            logger.error("SIGHUP: the arguments cannot be read (%s): nothing reloaded", exc)
            return
        fixed = old.fixed_fields_changed(new)
        why = None
        if fixed:
            why = f"{', '.join(fixed)} cannot change without restarting ichat up"
        elif new == old:
            why = "the arguments did not change (read again from a file given as @FILE)"
        elif not old.status_urls:
            why = "the workers have no status port (--status-port)"
        elif not (old.admin_key or old.api_key):
            why = "the workers take no reload without a key (--admin-key or --api-key)"
        if why is not None:
            logger.error("SIGHUP: nothing reloaded: %s", why)
            return
        settings: dict[str, object] = {}
        if new.drain_timeout != old.drain_timeout:
            settings["drain_timeout"] = new.drain_timeout
        plan = Roll(
            status_urls=old.status_urls,
            engine_argv=new.engine_flags(model_path),
            settings=settings,
            admin_key=old.admin_key or old.api_key,
            timeout=old.ready_timeout,
        )
        logger.info("SIGHUP: rolling %d worker(s) onto %s", old.workers, plan.engine_argv)
        done = await roll(plan)
        if done.ok:
            self.config = new
            logger.info("SIGHUP: every worker reloaded")
            return
        left = [url for url in old.status_urls if url not in done.reloaded]
        logger.error(
            "SIGHUP: the roll stopped: %s; reloaded: %s; on their old configuration: %s",
            done.error,
            done.reloaded,
            left,
        )

    async def stop(self, received: asyncio.Queue[signal.Signals]) -> None:
        """Workers first (leave, drain), then the gateway; a signal meanwhile kills."""
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        deadlines = StopDeadlines()
        deadline = time.monotonic() + self.config.drain_timeout + deadlines.worker_exit
        while any(w.poll() is None for w in self.workers) and time.monotonic() < deadline:
            if not received.empty():
                logger.warning("signal received again: killing the workers")
                break
            await asyncio.sleep(0.1)
        for worker in self.workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                processes.terminate([psutil.Process(worker.pid)], deadlines.terminate)
            with contextlib.suppress(ChildProcessError):
                worker.wait()
        self.gateway.stop()  # no worker left to route to: nothing to drain
        if self.prometheus is not None:  # last: it saw the stop
            self.prometheus.stop()


async def run_up(config: UpConfig, argv: Sequence[str] = ()) -> int:
    group = Group(config)
    received: asyncio.Queue[signal.Signals] = asyncio.Queue()
    with captured_signals(asyncio.get_running_loop(), received, (*HANDLED, signal.SIGHUP)):
        group.check_ports()
        model_path = prepare_model(config)
        group.gateway.start()
        try:
            await group.gateway.wait_ready(timeout=60)
            await group.start_prometheus()
            group.start_workers(model_path)
            waiting, got_signal = await first_completed(group.wait_routable(), received.get())
            if got_signal.done():
                logger.info("stopping before the workers were ready")
                return 0
            print_endpoint(config, waiting.result())
            sig = await group.serve(received, argv)
            logger.info("%s received: stopping workers, then the gateway", sig.name)
            return 0
        finally:
            await group.stop(received)


def print_endpoint(config: UpConfig, ready_s: float) -> None:
    key = config.api_key or "none"
    auth = f" -H 'Authorization: Bearer {config.api_key}'" if config.api_key else ""
    print(
        f"\nichat up: {config.workers} worker(s) serving {config.served_model_name!r} "
        f"behind the gateway (routable {ready_s:.1f} s after the workers started)\n"
        f"  OpenAI endpoint: {config.gateway.url}/v1   (api key: {key})\n"
        f"  try: curl {config.gateway.url}/v1/chat/completions{auth} "
        "-H 'Content-Type: application/json' "
        f'-d \'{{"model": "{config.served_model_name}", "messages": '
        '[{"role": "user", "content": "Hello"}], "max_tokens": 16}\'\n'
        + reload_hint(config)
        + prometheus_hint(config)
        + "  Ctrl-C stops everything.\n",
        flush=True,
    )


def reload_hint(config: UpConfig) -> str:
    """How to roll new engine flags over the workers (with --status-port)."""
    if not config.status_urls:
        return ""
    urls = " ".join(config.status_urls)
    return f"  new engine flags, worker by worker: ichat reload {urls} --api-key KEY -- FLAGS\n"


def prometheus_hint(config: UpConfig) -> str:
    """Where the fleet's Prometheus answers (with --prometheus)."""
    monitoring = config.monitoring
    if monitoring is None:
        return ""
    return (
        f"  Prometheus: {monitoring.url}  (alerts: {monitoring.url}/alerts; Grafana "
        "dashboard: deploy/observability/grafana-dashboard.json)\n"
    )


class ArgumentsFromFiles(argparse.ArgumentParser):
    """``@FILE`` arguments as shell words per line, ``#`` comments allowed."""

    def convert_arg_line_to_args(self, arg_line: str) -> list[str]:
        return shlex.split(arg_line, comments=True)


def build_parser() -> argparse.ArgumentParser:
    d = UpConfig()
    parser = ArgumentsFromFiles(
        prog="ichat up",
        allow_abbrev=False,
        fromfile_prefix_chars="@",
        description="Start the gateway and N workers; every other argument goes to the "
        "workers' engine unchanged. Arguments may come from a file (@FILE: shell words, "
        "# comments); SIGHUP reads them again and rolls new engine flags, model or drain "
        "timeout over the workers, one at a time (needs --status-port).",
    )
    parser.add_argument("--workers", type=int, default=d.workers, help="default: %(default)s")
    parser.add_argument(
        "--model-path", default=None, help=f"default: a generated test model in {DEFAULT_MODEL_DIR}"
    )
    parser.add_argument(
        "--served-model-name", default=None, help="default: the model folder's name"
    )
    parser.add_argument("--backend", default=d.backend, help="default: %(default)s")
    parser.add_argument("--host", default=d.host, help="gateway address (default: %(default)s)")
    parser.add_argument(
        "--port", type=int, default=d.port, help="gateway port (default: %(default)s)"
    )
    parser.add_argument(
        "--worker-port",
        type=int,
        default=d.worker_port,
        help="first worker's port (default: %(default)s)",
    )
    parser.add_argument("--api-key", default=None, help="required by the gateway and the workers")
    parser.add_argument(
        "--prometheus-port",
        type=int,
        default=None,
        help="the gateway's metrics (default: --port + 1)",
    )
    parser.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    parser.add_argument("--ready-timeout", type=float, default=d.ready_timeout)
    parser.add_argument(
        "--standby",
        action="store_true",
        help="each worker keeps a standby engine and fails over to it (ichat serve --standby)",
    )
    parser.add_argument(
        "--continuation-limit",
        type=int,
        default=d.continuation_limit,
        metavar="N",
        help="continue streams cut by an engine death on the standby or another worker, "
        "at most N times a request (ichat serve --continuation-limit; default: off)",
    )
    parser.add_argument(
        "--status-port",
        type=int,
        default=None,
        help="the first worker's /livez /readyz /status /metrics port, the next +1... "
        "(default: off); with a key, also `ichat reload`'s",
    )
    parser.add_argument(
        "--admin-key",
        default=None,
        help="the key `ichat reload` needs at the workers' status ports (default: "
        "$ICHAT_ADMIN_KEY, else --api-key)",
    )
    parser.add_argument(
        "--prometheus",
        type=int,
        nargs="?",
        const=9090,
        default=None,
        metavar="PORT",
        help="also run a Prometheus server on PORT (default 9090) that scrapes the workers, "
        "their engines and the gateway and evaluates iChat's alert rules; gives the "
        "workers status ports (--status-port, default: --worker-port + 100)",
    )
    parser.add_argument(
        "--prometheus-bin",
        default=None,
        metavar="PATH",
        help="the Prometheus binary (default: $ICHAT_PROMETHEUS, else `prometheus` on the PATH)",
    )
    return parser


def parse_args(argv: Sequence[str]) -> UpConfig:
    ns, engine_argv = build_parser().parse_known_args(list(argv))
    if ns.workers < 1:
        raise ConfigError("--workers must be at least 1")
    name = ns.served_model_name or (
        Path(ns.model_path).name if ns.model_path else UpConfig.served_model_name
    )
    return UpConfig(
        workers=ns.workers,
        model_path=ns.model_path,
        served_model_name=name,
        backend=ns.backend,
        host=ns.host,
        port=ns.port,
        worker_port=ns.worker_port,
        api_key=ns.api_key,
        prometheus_port=ns.prometheus_port,
        drain_timeout=ns.drain_timeout,
        ready_timeout=ns.ready_timeout,
        standby=ns.standby,
        continuation_limit=ns.continuation_limit,
        status_port=ns.status_port,
        admin_key=ns.admin_key,
        prometheus=ns.prometheus,
        prometheus_bin=ns.prometheus_bin,
        engine_argv=engine_argv,
    )


def main(argv: Sequence[str]) -> int:
    return run_command("ichat up", lambda: run_up(parse_args(argv), argv))
