"""An SGLang worker behind a real SMG gateway (`ichat gateway`, one API key), as the vLLM
suite does it: registered once ready, chats through the gateway, a client that
disconnects mid-stream has its request aborted in the engine, kill -9 of the scheduler
takes the worker out of the gateway within 1 s and back after the restart, SIGTERM
makes it leave before it exits 0.

SMG is installed in the main environment (`.venv`), not in SGLang's: the gateway runs
with that environment's Python (``ICHAT_GATEWAY_PYTHON`` to name another).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from ichat.process.processes import free_port, title
from tests.support import MODEL_NAME, Worker, start_worker

from .conftest import CPU_FLAGS, running_gateway

KEY = "sk-ichat-sglang"
AUTH = {"Authorization": f"Bearer {KEY}"}


@dataclass
class Setup:
    gateway: subprocess.Popen[str]
    gateway_url: str
    worker: Worker
    shm_before: set[str]  # /dev/shm before the worker started

    @property
    def worker_url(self) -> str:
        return self.worker.url

    def records(self) -> dict[str, dict[str, object]]:
        reply = httpx.get(f"{self.gateway_url}/workers", headers=AUTH, timeout=5)
        reply.raise_for_status()
        return {w["url"]: w for w in reply.json()["workers"]}

    def routable(self) -> bool:
        record = self.records().get(self.worker_url)
        return bool(record and record["is_healthy"] and record["status"] == "ready")


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def setup(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with running_gateway(KEY) as (gateway, gateway_url):
        status_port = free_port()
        shm_before = set(os.listdir("/dev/shm"))
        args = ("--model-path", str(model_dir), "--served-model-name", MODEL_NAME,
                "--api-key", KEY, "--gateway-url", gateway_url, "--gateway-api-key", KEY,
                "--status-port", str(status_port), *CPU_FLAGS)  # fmt: skip
        with start_worker(tmp_path_factory.mktemp("sglang-gw"), *args, backend="sglang") as w:
            w.wait_ready(timeout=400, url=f"http://127.0.0.1:{status_port}", path="/readyz")
            yield Setup(gateway, gateway_url, w, shm_before)


def chat(url: str, max_tokens: int = 4, **extra: object) -> httpx.Response:
    body = {"model": MODEL_NAME, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}], **extra}  # fmt: skip
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def test_registered_once_ready_and_chats_go_through_the_gateway(setup: Setup) -> None:
    wait_for(setup.routable, 30, "the worker registered and routable")
    reply = chat(setup.gateway_url, ignore_eos=True)  # the random model's EOS: not a failure
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["finish_reason"] == "length"
    assert chat(setup.gateway_url).status_code == 200


def running_requests(setup: Setup) -> int:
    reply = httpx.get(f"{setup.worker_url}/v1/loads", headers=AUTH, timeout=10)
    reply.raise_for_status()
    return sum(int(load.get("num_running_reqs", 0)) for load in reply.json()["loads"])


def test_a_client_that_disconnects_mid_stream_aborts_the_request_in_the_engine(
    setup: Setup,
) -> None:
    max_tokens = 900
    t0 = time.monotonic()
    full = chat(setup.gateway_url, max_tokens, ignore_eos=True)
    finished_s = time.monotonic() - t0  # how long the engine is busy with it, left to run
    assert full.status_code == 200 and full.json()["usage"]["completion_tokens"] == max_tokens
    body = {"model": MODEL_NAME, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    with httpx.stream(
        "POST", f"{setup.gateway_url}/v1/chat/completions", json=body, headers=AUTH, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
    # the connection is closed here, after a few tokens
    gone_s = wait_for(lambda: running_requests(setup) == 0, finished_s + 10, "no request left")
    print(f"\nclosed stream: aborted {gone_s:.2f} s after the close (whole: {finished_s:.1f} s)")
    assert gone_s < finished_s / 2


def test_kill_9_of_the_scheduler_takes_the_worker_out_of_the_gateway_and_back(
    setup: Setup,
) -> None:
    wait_for(setup.routable, 30, "routable before the kill")
    children = psutil.Process(setup.worker.proc.pid).children(recursive=True)
    scheduler = next(p for p in children if "sglang::scheduler" in title(p))
    t_kill = time.monotonic()
    scheduler.kill()
    left_s = wait_for(lambda: not setup.routable(), 10, "out of the gateway")
    back_s = wait_for(setup.routable, 300, "back in the gateway after the restart")
    assert chat(setup.gateway_url).status_code == 200
    print(f"\nkill -9 scheduler: out of the gateway {left_s:.2f} s, back {back_s:.1f} s later")
    assert left_s <= 1.0, f"still routable {left_s:.2f} s after the kill"
    assert time.monotonic() - t_kill < 300


def test_sigterm_leaves_the_gateway_then_exits_0(setup: Setup) -> None:
    wait_for(setup.routable, 30, "routable before the stop")
    setup.worker.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: setup.worker_url not in setup.records(), 10, "unlisted at the stop")
    assert setup.worker.proc.wait(60) == 0, setup.worker.output()[-3000:]
    # SGLang's load-snapshot file of each engine (the first and the restarted one), which
    # the worker maps once the gateway asks for loads, was left behind before
    assert set(os.listdir("/dev/shm")) - setup.shm_before == set()
