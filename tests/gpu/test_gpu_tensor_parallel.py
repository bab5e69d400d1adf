"""Tensor parallel 2 through `ichat serve` (needs 2 GPUs; skipped otherwise).

kill -9 of one tensor-parallel worker process: the whole engine is declared dead
within 1 s, the worker restarts it and serves again; after the stop no process and
no GPU memory is left on either GPU. NCCL's NVLink multicast stays off (the machine
sets NCCL_NVLS_ENABLE=0; workers inherit the environment unchanged).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from ichat.process.processes import title
from tests.support import (
    MODEL_NAME,
    Worker,
    chat_ok,
    kill_and_wait_serving,
    start_worker,
    stream_once,
    vllm_processes,
)

from .test_gpu_vllm import gpu_memory_used_mib

RESULTS: dict[str, object] = {}


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


@pytest.fixture(scope="module")
def tp_worker(gpu_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    if gpu_count() < 2:
        pytest.skip("tensor parallel 2 needs 2 GPUs")
    assert os.environ.get("NCCL_NVLS_ENABLE", "0") == "0"
    t0 = time.monotonic()
    with start_worker(
        tmp_path_factory.mktemp("tp"),
        "--model-path",
        str(gpu_model_dir),
        "--served-model-name",
        MODEL_NAME,
        "--max-model-len",
        "2048",
        "--tensor-parallel-size",
        "2",
        "--gpu-memory-utilization",
        "0.85",
    ) as w:
        w.wait_ready(timeout=900)
        RESULTS["tp2_ready_s"] = time.monotonic() - t0
        yield w
    out = os.environ.get("ICHAT_RESULTS_TP")
    if out:
        Path(out).write_text(json.dumps(RESULTS, indent=2) + "\n")


def tp_workers(worker_pid: int) -> list[psutil.Process]:
    return [p for p in vllm_processes(worker_pid) if "Worker_TP" in title(p)]


def test_tp2_serves_chat_and_stream(tp_worker: Worker) -> None:
    assert len(tp_workers(tp_worker.proc.pid)) == 2
    assert chat_ok(tp_worker.url)
    assert stream_once(tp_worker.url, 64) == "finished"


def test_kill_9_of_one_tp_worker_is_detected_and_restarted(tp_worker: Worker) -> None:
    result = kill_and_wait_serving(tp_worker, tp_workers(tp_worker.proc.pid)[1].pid)
    RESULTS["tp2_kill_worker_to_serving_again_s"] = result.serving_again_s
    RESULTS["tp2_kill_worker_to_detection_s"] = result.detected_s
    assert 0 <= result.detected_s <= 1.0
    assert len(tp_workers(tp_worker.proc.pid)) == 2


def test_tp2_stop_leaves_no_process_and_no_gpu_memory(tp_worker: Worker) -> None:
    children = psutil.Process(tp_worker.proc.pid).children(recursive=True)
    tp_worker.proc.send_signal(signal.SIGTERM)
    assert tp_worker.proc.wait(120) == 0, tp_worker.output()[-3000:]
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive
    time.sleep(1)
    used, apps = gpu_memory_used_mib()
    RESULTS["tp2_gpu_memory_used_after_stop_mib"] = used
    assert apps == []
