"""kill -9 of vLLM's EngineCore under an in-process VLLMBackend.

The backend runs inside this test process, so the moment of detection is read off
the health monitor directly rather than from a log.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from ichat.backends.base_backend import BackendState
from ichat.backends.vllm_backend import VLLMBackend
from ichat.config import WorkerConfig
from ichat.errors import EngineDiedError
from ichat.process.processes import free_port, port_is_free, title
from tests.support import MODEL_NAME


def test_kill_9_of_engine_core_is_detected_within_1s_and_run_ends(model_dir: Path) -> None:
    config = WorkerConfig(port=free_port())
    backend = VLLMBackend(
        config, ["--model-path", str(model_dir), "--served-model-name", MODEL_NAME]
    )
    assert backend.get_backend_args().model == str(model_dir)
    result: dict[str, float] = {}

    async def main() -> None:
        task = asyncio.create_task(backend.run())
        await backend.wait_for_server_ready(timeout=600)
        async with httpx.AsyncClient(base_url=config.base_url, timeout=60) as client:
            ok = await client.post(
                "/v1/completions", json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4}
            )
            assert ok.status_code == 200
        # this backend's own processes: never one adopted from an earlier test
        engine_procs = [p for p in backend.engine_processes if "VLLM::" in title(p)]
        result["engine_procs"] = len(engine_procs)
        core = next(p for p in engine_procs if "EngineCore" in title(p))
        t0 = time.monotonic()
        os.kill(core.pid, signal.SIGKILL)
        with pytest.raises(EngineDiedError):
            await asyncio.wait_for(task, 60)
        assert backend.monitor is not None and backend.monitor.detected_at is not None
        result["detect_s"] = backend.monitor.detected_at - t0
        result["run_ended_s"] = time.monotonic() - t0
        _, alive = psutil.wait_procs(engine_procs, timeout=10)
        assert not alive, f"engine processes left: {alive}"

    asyncio.run(main())
    print(
        f"kill -9 EngineCore: detected after {result['detect_s']:.3f} s, "
        f"run() ended after {result['run_ended_s']:.3f} s"
    )
    assert result["detect_s"] <= 1.0
    assert backend.state is BackendState.FAILED
    assert port_is_free("127.0.0.1", config.port)
    backend.cleanup()  # idempotent after a death
