"""``ichat gateway``: the Shepherd Model Gateway (SMG) as a supervised child.

iChat writes no proxy. It starts SMG (``python -m smg launch``) with defaults that
suit workers which register and leave by themselves, waits until it answers, and
stops it so that nothing is left: SIGTERM, then SIGKILL of the whole tree after the
grace period. Every flag iChat does not know goes to SMG unchanged, and a flag the
user gives replaces iChat's default for it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import psutil

from ichat.commands.run import run_command
from ichat.errors import ConfigError, GatewayError, PortInUseError
from ichat.process import processes
from ichat.process.readiness import wait_answering
from ichat.process.signals import captured_signals, first_signal

logger = logging.getLogger("ichat.gateway")


@dataclass(frozen=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    # Measured on the H200 with 2 workers and 256 streams (docs/benchmarks.md): SMG's
    # cache_aware kept 0.79-0.94 of the direct throughput (a burst on an empty tree all
    # goes to one worker), round_robin 0.99-1.05. cache_aware pays off when requests
    # share long prefixes (multi-turn chats): `--policy cache_aware`. power_of_two needs
    # two workers at the gateway's start, so it cannot serve workers that register.
    policy: str = "round_robin"
    # SMG's Prometheus listener defaults to 0.0.0.0:29000 whatever --host says:
    # a second gateway on the host would fail; iChat uses the port after --port.
    prometheus_port: int | None = None
    # Workers leave by themselves within a second of a death; SMG's own probe is
    # the backstop for a worker that vanished with its host.
    health_check_interval: int = 5
    health_failure_threshold: int = 2
    shutdown_grace: int = 30
    # After SIGTERM the gateway keeps serving this long for load balancers to notice it
    # leaving, then stops as soon as no request is in flight (SMG's own window is 5 s;
    # iChat ends it early: a gateway no load balancer sends to has nothing to wait for).
    drain_settle: float = 0.0
    log_level: str = "warn"
    extra: list[str] = field(default_factory=list)  # SMG flags, unchanged

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"http://{host}:{self.port}"

    @property
    def metrics_port(self) -> int:
        """SMG's Prometheus port: as given, else the port after ``port``."""
        return self.prometheus_port or self.port + 1

    def smg_argv(self) -> list[str]:
        given = {arg.split("=", 1)[0] for arg in self.extra if arg.startswith("--")}
        defaults = {
            "--host": self.host,
            "--port": str(self.port),
            "--policy": self.policy,
            "--prometheus-port": str(self.metrics_port),
            "--health-check-interval-secs": str(self.health_check_interval),
            "--health-failure-threshold": str(self.health_failure_threshold),
            "--shutdown-grace-period-secs": str(self.shutdown_grace),
            "--log-level": self.log_level,
        }
        if self.api_key:
            defaults["--api-key"] = self.api_key  # clients and SMG->worker calls
        argv = [sys.executable, "-m", "smg", "launch"]
        for flag, value in defaults.items():
            if flag not in given:
                argv += [flag, value]
        return argv + self.extra


def check_installed() -> None:
    if importlib.util.find_spec("smg") is None:
        raise ConfigError(
            "the gateway (SMG) is not installed; install it with: pip install 'ichat[gateway]'"
        )


IN_FLIGHT_METRICS = ("smg_worker_requests_active", "smg_admission_inflight")


def requests_in_flight(metrics: str) -> float:
    """The requests SMG has in flight, from its Prometheus text (0 when it has served
    none: its gauges appear with the first request)."""
    total = 0.0
    for line in metrics.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in IN_FLIGHT_METRICS:
            total += float(line.rsplit(" ", 1)[1])
    return total


class GatewayProcess:
    """One SMG process: start, wait until it answers, stop with nothing left."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        check_installed()
        config = self.config
        for port in (config.port, config.metrics_port):
            if not processes.port_is_free(config.host or "0.0.0.0", port):
                raise PortInUseError(config.host, port)
        argv = config.smg_argv()
        logger.info("starting the gateway: %s", " ".join(argv))
        self.proc = subprocess.Popen(argv)

    async def wait_ready(self, timeout: float) -> float:
        """Seconds until SMG's /health answered; raises if it exits or times out."""
        assert self.proc is not None
        url = f"{self.config.url}/health"
        return await wait_answering(url, self.proc, timeout, GatewayError, "the gateway")

    def check_running(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is not None:
            raise GatewayError(f"the gateway exited unexpectedly with code {proc.returncode}")

    async def drain(self, received: asyncio.Queue[signal.Signals]) -> None:
        """SMG's own drain, ended early, then ``stop()``.

        SIGTERM: SMG keeps its listener open 5 s for load balancers to notice, then lets
        the requests in flight finish, for at most the grace period. iChat ends that
        once ``drain_settle`` has passed and SMG reports no request in flight (its
        metrics: ``smg_worker_requests_active``, ``smg_admission_inflight``); a signal
        received meanwhile ends it at once."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            logger.info("gateway draining (a second signal stops it at once)")
            why = "it exited"
            async with httpx.AsyncClient(timeout=1) as client:
                while proc.poll() is None:
                    elapsed = time.monotonic() - t0
                    if not received.empty():
                        why = "signal received again"
                        break
                    if elapsed > self.config.shutdown_grace:
                        why = "grace period over"
                        break
                    if elapsed >= self.config.drain_settle and await self._idle(client):
                        why = "no request in flight"
                        break
                    await asyncio.sleep(0.05)
            logger.info("gateway drained in %.2f s (%s)", time.monotonic() - t0, why)
        self.stop()

    async def _idle(self, client: httpx.AsyncClient) -> bool:
        """True when SMG's metrics show no request in flight; False when unknown."""
        config = self.config
        url = f"http://127.0.0.1:{config.metrics_port}/metrics"
        try:
            response = await client.get(url)
        except httpx.HTTPError:
            return False
        if response.status_code != 200:
            return False
        return requests_in_flight(response.text) == 0

    def stop(self) -> None:
        """SIGKILL of the tree at once, reaped: nothing is left. For a gateway whose
        workers are gone (``ichat up`` stops them first) or that drained already."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        t0 = time.monotonic()
        with contextlib.suppress(psutil.NoSuchProcess):
            left = processes.kill([psutil.Process(proc.pid)])
            if left:
                logger.error("gateway processes still running after SIGKILL: %s", left)
        with contextlib.suppress(ChildProcessError):
            proc.wait()
        logger.info("gateway stopped in %.2f s", time.monotonic() - t0)


def build_parser() -> argparse.ArgumentParser:
    defaults = GatewayConfig()
    parser = argparse.ArgumentParser(
        prog="ichat gateway",
        allow_abbrev=False,
        description="Run the Shepherd Model Gateway (SMG) with iChat's defaults. Every "
        "other argument goes to `smg launch` unchanged and wins over iChat's default.",
    )
    parser.add_argument("--host", default=defaults.host, help="default: %(default)s")
    parser.add_argument("--port", type=int, default=defaults.port, help="default: %(default)s")
    parser.add_argument(
        "--api-key",
        default=None,
        help="key clients must send (401 otherwise); SMG also sends it to the workers",
    )
    parser.add_argument("--policy", default=defaults.policy, help="default: %(default)s")
    parser.add_argument("--prometheus-port", type=int, default=None, help="default: --port + 1")
    parser.add_argument(
        "--drain-settle",
        type=float,
        default=defaults.drain_settle,
        help="after SIGTERM, seconds the gateway keeps serving for load balancers to notice "
        "it leaving; then it stops once no request is in flight (default: %(default)s; "
        "behind a load balancer, at least its propagation time)",
    )
    return parser


def parse_args(argv: Sequence[str]) -> GatewayConfig:
    ns, extra = build_parser().parse_known_args(list(argv))
    return GatewayConfig(
        host=ns.host,
        port=ns.port,
        api_key=ns.api_key,
        policy=ns.policy,
        prometheus_port=ns.prometheus_port,
        drain_settle=ns.drain_settle,
        extra=extra,
    )


async def run_gateway(config: GatewayConfig) -> int:
    """Start SMG, wait for SIGTERM/SIGINT or its exit, stop it; return an exit code."""
    gateway = GatewayProcess(config)
    received: asyncio.Queue[signal.Signals] = asyncio.Queue()
    with captured_signals(asyncio.get_running_loop(), received):
        gateway.start()
        try:
            ready = await gateway.wait_ready(timeout=60)
            logger.info("gateway ready after %.2f s at %s/v1", ready, config.url)
            sig = await first_signal(received, gateway.check_running)
            logger.info("%s received: stopping the gateway", sig.name)
        finally:
            await gateway.drain(received)
    return 0


def main(argv: Sequence[str]) -> int:
    return run_command("ichat gateway", lambda: run_gateway(parse_args(argv)))
