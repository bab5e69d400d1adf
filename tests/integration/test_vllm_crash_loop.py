"""A crash loop with a real engine (vLLM on CPU): kill -9 of the engine under
``--crash-loop-max 2`` restarts it with a growing back-off, then gives up with exit 5;
threads and descriptors stay flat over the restarts, each dead engine's /dev/shm files
are gone once the next serves, and nothing is left."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import psutil
import pytest

from ichat.process import shared_memory
from ichat.process.processes import free_port, port_is_free
from tests.support import MODEL_NAME, engine_core, our_processes, start_worker


def status(port: int) -> dict[str, object]:
    return httpx.get(f"http://127.0.0.1:{port}/status", timeout=10).json()  # type: ignore[no-any-return]


def wait_serving_again(port: int, restarts: int, timeout: float = 300) -> dict[str, object]:
    t0 = time.monotonic()
    while True:
        stats = status(port)
        if stats["restarts"] == restarts and stats["state"] == "ready":
            return stats
        assert time.monotonic() - t0 < timeout, stats
        time.sleep(0.1)


def footprint(pid: int) -> tuple[int, int]:
    """The worker's threads and descriptors."""
    worker = psutil.Process(pid)
    return worker.num_threads(), worker.num_fds()


def shm_files(engine: psutil.Process) -> set[str]:
    """The /dev/shm files the engine process maps or holds open (by name)."""
    return {os.path.basename(m.path) for m in shared_memory.mapped([engine])}


def test_repeated_engine_deaths_back_off_more_each_time_then_exit_5(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    status_port = free_port()
    args = ["--model-path", str(model_dir), "--served-model-name", MODEL_NAME,
            "--status-port", str(status_port), "--crash-loop-max", "2"]  # fmt: skip
    with start_worker(tmp_path_factory.mktemp("crash-loop"), *args) as worker:
        # the worker's own readiness: a death before it (the engine's /health answers
        # before the worker's warmup) is a boot failure, not a restart
        worker.wait_ready(url=f"http://127.0.0.1:{status_port}", path="/readyz")
        delays, footprints, left = [], [], []
        for restarts in (1, 2):
            engine = engine_core(worker.proc.pid)
            dead_engines_files = shm_files(engine)
            engine.kill()
            stats = wait_serving_again(status_port, restarts)
            left.append(dead_engines_files & set(os.listdir("/dev/shm")))
            phases = stats["phase_seconds"]
            assert isinstance(phases, dict)
            delays.append(phases["restart_delay"])
            footprints.append(footprint(worker.proc.pid))
        engine_core(worker.proc.pid).kill()  # the third death within the window
        code = worker.proc.wait(120)
        out = worker.output()
    assert code == 5, out[-3000:]
    assert "crash loop" in out
    assert delays[1] > delays[0], delays  # the back-off grows (at once, then 1 s ±10 %)
    (threads_1, fds_1), (threads_2, fds_2) = footprints
    assert threads_2 <= threads_1 + 2 and fds_2 <= fds_1 + 2, footprints
    assert left == [set(), set()], left  # the dead engines' shared memory is unlinked
    assert port_is_free("127.0.0.1", worker.port) and port_is_free("127.0.0.1", status_port)
    assert not our_processes()
