"""`--standby` on the GPU: the standby sleeps (vLLM's sleep mode, level 1), is woken when
the active engine dies and serves on the same port; a new standby is started beside the
awake engine; nothing is left on the GPU after the stop."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from ichat.process.processes import title
from tests.gpu.test_gpu_vllm import gpu_memory_used_mib, stopped_by_sigterm
from tests.support import MODEL_NAME, Worker, chat_ok, start_worker

RESULTS: dict[str, Any] = {}


def status(port: int) -> dict[str, Any]:
    return httpx.get(f"http://127.0.0.1:{port}/status", timeout=10).json()  # type: ignore[no-any-return]


def wait_standby_asleep(port: int, timeout: float = 600) -> dict[str, Any]:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        now = status(port)
        assert now["standby"] != "failed", now
        if now["standby"] == "asleep" and now["engines"].get("active"):
            return now
        time.sleep(0.5)
    raise AssertionError(f"no sleeping standby within {timeout:.0f} s: {status(port)}")


@pytest.fixture(scope="module")
def worker(
    gpu_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, status_port: int
) -> Iterator[Worker]:
    RESULTS["gpu_memory_used_before_start_mib"] = gpu_memory_used_mib()[0]
    with start_worker(
        tmp_path_factory.mktemp("gpu-standby"),
        "--standby",
        "--model-path",
        str(gpu_model_dir),
        "--served-model-name",
        MODEL_NAME,
        "--max-model-len",
        "2048",
        "--gpu-memory-utilization",
        "0.4",
        "--status-port",
        str(status_port),
    ) as w:
        try:
            w.wait_ready(timeout=900)
            yield w
        finally:
            out = os.environ.get("ICHAT_RESULTS_STANDBY")
            if out:  # the worker's own log next to the results: what happened when
                Path(out).with_suffix(".log").write_text(w.output())
    if out:
        Path(out).write_text(json.dumps(RESULTS, indent=2) + "\n")


def serving_after_kill_9(worker: Worker, pid: int) -> float:
    """Seconds from kill -9 of ``pid`` to the worker's first chat answered 200."""
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while not chat_ok(worker.url):
        assert time.monotonic() - t_kill < 60, worker.output()[-3000:]
        time.sleep(0.02)
    return time.monotonic() - t_kill


@pytest.mark.parametrize("round_", [1, 2])
def test_kill_9_of_the_active_engine_wakes_the_standby(
    worker: Worker, status_port: int, round_: int
) -> None:
    before = wait_standby_asleep(status_port)
    assert before["restarts"] == 0, worker.output()[-5000:]
    core = next(
        psutil.Process(pid)
        for pid in before["engines"]["active"]
        if "EngineCore" in title(psutil.Process(pid))
    )
    serving = serving_after_kill_9(worker, core.pid)
    after = status(status_port)
    RESULTS[f"failover_{round_}"] = {
        "kill_to_chat_200_s": serving,
        "worker_detection_to_serving_s": after["last_restart_to_ready_s"],
        "phases_s": after["phase_seconds"],
    }
    assert serving <= 3.0
    assert (after["failovers"], after["restarts"]) == (round_, 0)
    assert after["engines"]["active"] == before["engines"]["standby"]


def test_sigterm_exits_0_and_frees_the_gpu(worker: Worker, status_port: int) -> None:
    wait_standby_asleep(status_port)  # a new standby fitted beside the awake engine
    RESULTS["gpu_memory_used_with_sleeping_standby_mib"] = gpu_memory_used_mib()[0]
    used, apps = stopped_by_sigterm(worker)
    RESULTS["gpu_memory_used_after_stop_mib"] = used
    assert apps == []
    assert used <= RESULTS["gpu_memory_used_before_start_mib"]
