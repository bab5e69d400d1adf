"""A Prometheus server next to a local fleet (``ichat up --prometheus``).

It scrapes the three jobs ``alerts.yml`` and the dashboard expect -- ``ichat-worker``
(each worker's status port: ``ichat_worker_*``, answered also while the engine
restarts), ``ichat-engine`` (each worker's serving port: the engine's own metrics, with
the worker's copies of ``ichat_*`` dropped) and ``ichat-gateway`` (SMG's metrics port)
-- and evaluates iChat's alert rules. Its configuration and data live in a temporary
folder removed at stop. The binary is the user's (Debian/Ubuntu: ``apt-get install
prometheus``; or prometheus.io's release): ``--prometheus-bin``, ``$ICHAT_PROMETHEUS``
or ``prometheus`` on the PATH.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ichat.errors import ConfigError, PortInUseError, PrometheusError
from ichat.observability import shipped
from ichat.process import processes
from ichat.process.readiness import wait_answering

logger = logging.getLogger("ichat.prometheus")


@dataclass(frozen=True)
class PrometheusConfig:
    """What to scrape (``host:port`` targets) and where Prometheus listens."""

    workers: list[str] = field(default_factory=list)  # status ports
    engines: list[str] = field(default_factory=list)  # serving ports
    gateways: list[str] = field(default_factory=list)  # SMG's metrics ports
    host: str = "127.0.0.1"
    port: int = 9090
    interval: float = 5.0  # scrape and rule evaluation, seconds
    binary: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def document(self, rules: Path) -> dict[str, object]:
        """prometheus.yml as data (JSON is YAML: written as JSON)."""
        every = f"{self.interval:g}s"
        drop_worker_copies = [
            {"source_labels": ["__name__"], "regex": "ichat_.*", "action": "drop"}
        ]
        jobs: list[dict[str, object]] = [
            {"job_name": "ichat-worker", "static_configs": [{"targets": self.workers}]},
            {
                "job_name": "ichat-engine",
                "static_configs": [{"targets": self.engines}],
                "metric_relabel_configs": drop_worker_copies,
            },
            {"job_name": "ichat-gateway", "static_configs": [{"targets": self.gateways}]},
        ]
        return {
            "global": {"scrape_interval": every, "evaluation_interval": every},
            "rule_files": [str(rules)],
            "scrape_configs": jobs,
        }

    def find_binary(self) -> str:
        """The Prometheus binary; a ``ConfigError`` saying how to get one if none."""
        wanted = self.binary or os.environ.get("ICHAT_PROMETHEUS") or "prometheus"
        found = shutil.which(wanted)
        if found is None:
            raise ConfigError(
                f"Prometheus not found ({wanted!r}): install it (Debian/Ubuntu: apt-get "
                "install prometheus; or a release from prometheus.io) and put it on the "
                "PATH, or pass --prometheus-bin PATH"
            )
        return found


class PrometheusProcess:
    """One Prometheus server: start, wait until ready, stop with nothing left."""

    def __init__(self, config: PrometheusConfig) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self._folder: Path | None = None

    def start(self) -> None:
        config = self.config
        binary = config.find_binary()
        if not processes.port_is_free(config.host, config.port):
            raise PortInUseError(config.host, config.port)
        self._folder = Path(tempfile.mkdtemp(prefix="ichat-prometheus-"))
        config_file = self._folder / "prometheus.yml"
        config_file.write_text(json.dumps(config.document(shipped("alerts.yml")), indent=2))
        argv = [
            binary,
            f"--config.file={config_file}",
            f"--storage.tsdb.path={self._folder / 'data'}",
            f"--web.listen-address={config.host}:{config.port}",
            "--log.level=warn",
        ]
        logger.info("starting Prometheus: %s", " ".join(argv))
        self.proc = subprocess.Popen(argv)

    async def wait_ready(self, timeout: float) -> float:
        """Seconds until Prometheus' /-/ready answered 200; raises if it exits first."""
        assert self.proc is not None
        url = f"{self.config.url}/-/ready"
        return await wait_answering(url, self.proc, timeout, PrometheusError, "Prometheus")

    def check_running(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is not None:
            raise PrometheusError(f"Prometheus exited unexpectedly with code {proc.returncode}")

    def stop(self) -> None:
        """SIGTERM (Prometheus closes its database), SIGKILL after 5 s; the folder with
        its configuration and data is removed."""
        proc, self.proc = self.proc, None
        if proc is not None:
            t0 = time.monotonic()
            with contextlib.suppress(psutil.NoSuchProcess):
                left = processes.terminate([psutil.Process(proc.pid)])
                if left:
                    logger.error("Prometheus still running after SIGKILL: %s", left)
            with contextlib.suppress(ChildProcessError):
                proc.wait()
            logger.info("Prometheus stopped in %.2f s", time.monotonic() - t0)
        folder, self._folder = self._folder, None
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
