"""`--standby --backend sglang --enable-memory-saver` on the GPU: the standby sleeps
(SGLang's memory saver: weights in host memory, KV cache and CUDA graphs' memory given
back), is resumed when the active engine's scheduler is killed and serves on the same
port; the GPU memory of each process is read from nvidia-smi; nothing is left on the GPU
after the stop.

Run on the GPU machine with SGLang (and torch-memory-saver) installed:
``ICHAT_RESULTS_SGLANG_STANDBY=out.json python -m pytest tests/gpu/test_gpu_sglang_standby.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.gpu.test_gpu_standby import serving_after_kill_9, status, wait_standby_asleep
from tests.gpu.test_gpu_vllm import gpu_memory_used_mib, nvidia_smi, stopped_by_sigterm
from tests.support import MODEL_NAME, Worker, chat_ok, scheduler_of, start_worker

RESULTS: dict[str, Any] = {}
FLAGS = os.environ.get(
    "ICHAT_SGLANG_GPU_FLAGS",
    "--enable-memory-saver --attention-backend fa3 --sampling-backend pytorch "
    "--disable-piecewise-cuda-graph --mem-fraction-static 0.45 --context-length 2048",
).split()


def gpu_mib_by_pid() -> dict[int, int]:
    return {int(pid): int(mib) for pid, mib in nvidia_smi("compute-apps=pid,used_memory")}


def gpu_memory_used_and_total_mib() -> tuple[int, int]:
    used, total = nvidia_smi("gpu=memory.used,memory.total")[0]
    return int(used), int(total)


def engine_gpu_mib(pids: list[int]) -> int:
    held = gpu_mib_by_pid()
    return sum(held.get(pid, 0) for pid in pids)


@pytest.fixture(scope="module")
def worker(
    gpu_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, status_port: int
) -> Iterator[Worker]:
    RESULTS["gpu_memory_used_before_start_mib"] = gpu_memory_used_mib()[0]
    RESULTS["flags"] = FLAGS
    out = os.environ.get("ICHAT_RESULTS_SGLANG_STANDBY")
    with start_worker(
        tmp_path_factory.mktemp("gpu-sglang-standby"),
        "--standby",
        "--status-port",
        str(status_port),
        "--ready-timeout",
        "900",
        "--model-path",
        str(gpu_model_dir),
        "--served-model-name",
        MODEL_NAME,
        *FLAGS,
        backend="sglang",
    ) as w:
        try:
            w.wait_ready(timeout=900)
            yield w
        finally:
            if out:  # the worker's own log next to the results: what happened when
                Path(out).with_suffix(".log").write_text(w.output())
    if out:
        Path(out).write_text(json.dumps(RESULTS, indent=2) + "\n")


def test_the_standby_sleeps_beside_the_active_engine(worker: Worker, status_port: int) -> None:
    now = wait_standby_asleep(status_port)
    active, standby = (
        engine_gpu_mib(now["engines"]["active"]),
        engine_gpu_mib(now["engines"]["standby"]),
    )
    used, total = gpu_memory_used_and_total_mib()
    RESULTS["at_boot"] = {
        "active_gpu_mib": active,
        "standby_asleep_gpu_mib": standby,
        "gpu_used_mib": used,
        "gpu_total_mib": total,
    }
    assert chat_ok(worker.url)
    if active == 0:  # nvidia-smi shows no process of this container: judge by the total
        # each engine keeps 0.45 of the memory free when it starts: two awake engines use
        # 0.45 + 0.45 * 0.55 = 0.70 of the GPU, an asleep standby and the active ~0.5
        RESULTS["at_boot"]["per_process_memory"] = "not shown by nvidia-smi"
        assert used < 0.6 * total, RESULTS
    else:
        assert 0 < standby < active / 4, RESULTS


@pytest.mark.parametrize("round_", [1, 2])
def test_kill_9_of_the_active_scheduler_resumes_the_standby(
    worker: Worker, status_port: int, round_: int
) -> None:
    before = wait_standby_asleep(status_port)
    scheduler = scheduler_of(before["engines"]["active"])
    serving = serving_after_kill_9(worker, scheduler.pid)
    after = status(status_port)
    RESULTS[f"failover_{round_}"] = {
        "kill_to_chat_200_s": serving,
        "worker_detection_to_serving_s": after["last_restart_to_ready_s"],
        "phases_s": after["phase_seconds"],
        "active_gpu_mib_after": engine_gpu_mib(after["engines"]["active"]),
    }
    assert serving <= 3.0, RESULTS
    assert (after["failovers"], after["restarts"]) == (round_, 0)
    assert after["engines"]["active"] == before["engines"]["standby"]
    assert not scheduler.is_running()
    now = wait_standby_asleep(status_port)  # a new standby started beside the active one
    RESULTS[f"failover_{round_}"]["new_standby_asleep_gpu_mib"] = engine_gpu_mib(
        now["engines"]["standby"]
    )
    RESULTS[f"failover_{round_}"]["standby_start_s"] = now["phase_seconds"].get("standby_start")
    assert chat_ok(worker.url)


def test_sigterm_exits_0_and_frees_the_gpu(worker: Worker, status_port: int) -> None:
    wait_standby_asleep(status_port)
    RESULTS["gpu_memory_used_with_sleeping_standby_mib"] = gpu_memory_used_mib()[0]
    used, apps = stopped_by_sigterm(worker)
    RESULTS["gpu_memory_used_after_stop_mib"] = used
    assert apps == []
    assert used <= RESULTS["gpu_memory_used_before_start_mib"]
