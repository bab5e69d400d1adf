"""vLLM data parallel 2 through `ichat serve` (real vLLM on CPU: it runs there).

`--data-parallel-size 2` passes to vLLM unchanged; vLLM then starts a DP coordinator
and one engine core (with its worker) per rank. The monitor must cover them all: kill -9
of the second rank's engine core is a death of the whole engine, noticed within 1 s;
with `--no-restart` the worker exits 4 and leaves no process and a free port.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from ichat.process.processes import free_port, port_is_free, title
from tests.support import MODEL_NAME, chat_ok, start_worker, vllm_processes

pytestmark = pytest.mark.timeout(900)


def test_data_parallel_2_serves_and_a_dead_rank_stops_the_worker(
    model_dir: Path, tmp_path: Path
) -> None:
    status_port = free_port()
    status = f"http://127.0.0.1:{status_port}/status"
    args = ("--model-path", str(model_dir), "--served-model-name", MODEL_NAME,
            "--data-parallel-size", "2", "--no-restart",
            "--status-port", str(status_port))  # fmt: skip
    with start_worker(tmp_path, *args) as worker:
        worker.wait_ready(timeout=600)
        names = {title(p).split()[0] for p in vllm_processes(worker.proc.pid)}
        assert {"VLLM::EngineCore_DP0", "VLLM::EngineCore_DP1"} <= names, names
        assert chat_ok(worker.url)
        rank1 = next(p for p in vllm_processes(worker.proc.pid) if "EngineCore_DP1" in title(p))
        children = psutil.Process(worker.proc.pid).children(recursive=True)
        wall_kill = time.time()
        os.kill(rank1.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while (stats := httpx.get(status, timeout=5).json())["engine_deaths"] == 0:
            assert time.monotonic() < deadline, "the dead rank was not noticed within 10 s"
            time.sleep(0.05)
        detected = stats["last_death_detected_unix"] - wall_kill
        print(f"\nDP=2: kill -9 of EngineCore_DP1 detected after {detected:.3f} s")
        assert 0 <= detected <= 1.0
        try:  # not ready from the detection on (the worker may have exited already)
            readyz = httpx.get(f"http://127.0.0.1:{status_port}/readyz", timeout=5)
            assert readyz.status_code == 503
        except httpx.TransportError:
            pass
        assert worker.proc.wait(120) == 4, worker.output()[-3000:]  # died, --no-restart
        _, alive = psutil.wait_procs(children, timeout=15)
        assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
        assert port_is_free("127.0.0.1", worker.port)
