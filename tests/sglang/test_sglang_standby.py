"""`ichat up --backend sglang --standby` on real SGLang (CPU): the gateway (a real SMG)
and one worker with two engines, as a user starts them.

kill -9 of the active engine's scheduler → the standby serves on the same port within
seconds (twice in a row), through the gateway too, which never loses the worker; the
chats in flight at the death are answered, the killed
engine's processes are gone and a new standby appears; completion streams under way at a
third death go on on the standby token-exactly (``--continuation-limit``); SIGTERM then
leaves no process, port or /dev/shm file. One start (two engine launches) for the
module, on the tiny Llama with wide greedy margins (its choices do not flip with the
batch, so a continued stream can equal one run without a kill).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from ichat.process.processes import free_ports, port_is_free, title
from tests.support import (
    MODEL_NAME,
    Stream,
    Worker,
    chats_until,
    ichat_cmd,
    our_processes,
    reap_zombies,
    scheduler_of,
    wait_all_streaming,
    wait_standby_ready,
)

from .conftest import CPU_FLAGS

KEY = "sk-ichat-sglang-standby"
AUTH = {"Authorization": f"Bearer {KEY}"}
KILL_TO_SERVING_LIMIT = 3.0  # seconds: the bound on the tiny model (CPU)
STREAM_TOKENS = 900  # several seconds on these 2 cores: the kill lands mid-way
RESULTS: dict[str, Any] = {}


@dataclass
class StandbyWorker(Worker):
    status_port: int = 0
    shm_before: frozenset[str] = frozenset()
    gateway_url: str = ""

    def routable(self) -> bool:
        """The gateway lists the worker, healthy and ready."""
        reply = httpx.get(f"{self.gateway_url}/workers", headers=AUTH, timeout=10)
        reply.raise_for_status()
        record = {w["url"]: w for w in reply.json()["workers"]}.get(self.url)
        return bool(record and record["is_healthy"] and record["status"] == "ready")

    def status(self) -> dict[str, Any]:
        reply = httpx.get(f"http://127.0.0.1:{self.status_port}/status", timeout=10)
        return reply.json()  # type: ignore[no-any-return]

    def wait_standby_ready(self, timeout: float = 300) -> dict[str, Any]:
        return wait_standby_ready(self.status, self.proc, self.output, timeout)


@pytest.fixture(scope="module")
def worker(
    wide_margin_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StandbyWorker]:
    pytest.importorskip("smg", reason="`ichat up` needs smg (ichat[gateway])")
    port, worker_port, status_port, prometheus_port = free_ports(4)
    shm_before = frozenset(os.listdir("/dev/shm"))
    log = tmp_path_factory.mktemp("sglang-standby") / "up.log"
    args = ("--backend", "sglang", "--standby", "--continuation-limit", "2", "--api-key", KEY,
            "--port", str(port), "--worker-port", str(worker_port),
            "--status-port", str(status_port), "--prometheus-port", str(prometheus_port),
            "--model-path", str(wide_margin_model), "--served-model-name", MODEL_NAME,
            *CPU_FLAGS)  # fmt: skip
    with log.open("w") as out:
        up = subprocess.Popen(
            ichat_cmd("up", *args), stdout=out, stderr=subprocess.STDOUT, text=True
        )
    sw = StandbyWorker(up, worker_port, log, status_port, shm_before, f"http://127.0.0.1:{port}")
    try:
        sw.wait_ready(400, url=f"http://127.0.0.1:{status_port}", path="/readyz")
        t0 = time.monotonic()
        while "OpenAI endpoint:" not in sw.output():  # the gateway lists the worker
            assert up.poll() is None and time.monotonic() - t0 < 60, sw.output()[-4000:]
            time.sleep(0.2)
        yield sw
    finally:
        if up.poll() is None:  # a test failed before the stop test ran
            up.send_signal(signal.SIGINT)
            up.wait(120)
        reap_zombies()
    print(f"\nSGLang standby figures: {RESULTS}")


def chat_ok(url: str) -> bool:
    body = {"model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    try:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=30)
    except httpx.TransportError:
        return False
    return reply.status_code == 200


def test_both_engines_are_reported(worker: StandbyWorker) -> None:
    status = worker.wait_standby_ready()
    engines = status["engines"]
    assert len(engines["active"]) == 2 and len(engines["standby"]) == 2  # scheduler, detokenizer
    assert not set(engines["active"]) & set(engines["standby"])
    assert status["phase_seconds"]["standby_start"] > 0
    metrics = httpx.get(f"http://127.0.0.1:{worker.status_port}/metrics", timeout=10).text
    assert 'ichat_worker_standby{state="ready"} 1.0' in metrics
    assert chat_ok(worker.url)
    t0 = time.monotonic()
    while not worker.routable():
        assert time.monotonic() - t0 < 30, "the worker did not register with the gateway"
        time.sleep(0.2)
    assert chat_ok(worker.gateway_url)


@pytest.mark.parametrize("round_", [1, 2])
def test_kill_9_of_the_active_engine_is_served_by_the_standby(
    worker: StandbyWorker, round_: int
) -> None:
    before = worker.wait_standby_ready()
    active, standby = before["engines"]["active"], before["engines"]["standby"]
    scheduler = scheduler_of(active)
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        load = [pool.submit(chats_until, worker.url, stop, AUTH) for _ in range(4)]
        time.sleep(1.0)
        t_kill = time.monotonic()
        os.kill(scheduler.pid, signal.SIGKILL)
        while not chat_ok(worker.gateway_url):  # through the gateway
            assert time.monotonic() - t_kill < 60, worker.output()[-3000:]
            time.sleep(0.05)
        serving = time.monotonic() - t_kill
        time.sleep(max(0.0, 2.0 - serving))
        stop.set()
        outcomes = [f.result() for f in load]
    answered = sum(a for a, _ in outcomes)
    failures = [f for _, fs in outcomes for f in fs]
    RESULTS[f"kill_{round_}_to_serving_s"] = round(serving, 3)
    print(f"\nfailover {round_}: kill -9 → a chat answered through the gateway after "
          f"{serving:.3f} s; {answered} chats under way answered, {len(failures)} "
          "failed")  # fmt: skip
    assert answered > 0
    assert failures == []  # the dead engine's were sent again to the standby
    assert serving <= KILL_TO_SERVING_LIMIT
    assert worker.routable()  # never out of the gateway: back before it could notice
    assert chat_ok(worker.url)  # the same port
    after = worker.wait_standby_ready()
    assert after["failovers"] == before["failovers"] + 1
    assert after["engines"]["active"] == standby  # the standby serves
    assert not set(after["engines"]["standby"]) & (set(active) | set(standby))  # a new one
    assert after["phase_seconds"]["failover_switch"] < 1.0
    assert after["restarts"] == before["restarts"]  # no restart: the same backend
    for pid in active:  # the killed engine's processes are gone
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def test_completion_streams_cut_by_the_death_go_on_on_the_standby_token_exactly(
    worker: StandbyWorker,
) -> None:
    before = worker.wait_standby_ready()
    streams = [Stream("/v1/completions", max_tokens=STREAM_TOKENS) for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        running = [pool.submit(s.run, worker.url, KEY) for s in streams]
        at_kill = wait_all_streaming(streams)
        scheduler_of(before["engines"]["active"]).kill()
        for f in running:
            f.result(timeout=240)
    print(f"\nstreams at the kill: {at_kill} tokens")
    assert all(n < STREAM_TOKENS for n in at_kill), "the streams ended before the kill"
    for s in streams:  # complete, one id, one finish, one usage, [DONE] once, text = ids
        s.check_complete(worker.url, KEY)
    reference = Stream("/v1/completions", max_tokens=STREAM_TOKENS)  # without a kill
    reference.run(worker.url, KEY)
    assert all(s.token_ids == reference.token_ids for s in streams)
    t0 = time.monotonic()
    while worker.status()["continuations"].get("continued", 0) < len(streams):
        assert time.monotonic() - t0 < 60, worker.status()["continuations"]
        time.sleep(0.2)
    assert "continued on the next engine" in worker.output()
    assert worker.status()["failovers"] == before["failovers"] + 1


def test_sigterm_while_a_new_standby_launches_leaves_no_process_port_or_shared_memory(
    worker: StandbyWorker,
) -> None:
    """Right after the last failover: the new standby is launching in a thread (or has
    just launched); whatever its launch makes after the stop is killed too."""
    standby = worker.status()["standby"]
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0, worker.output()[-3000:]
    t0 = time.monotonic()
    while left := [p for p in our_processes() if "sglang::" in title(p)]:
        assert time.monotonic() - t0 < 30, f"left running: {left}"
        time.sleep(0.5)
    print(f"\nSIGTERM with the standby {standby}: no engine process left")
    for port in (worker.port, worker.status_port, int(worker.gateway_url.rsplit(":", 1)[1])):
        assert port_is_free("127.0.0.1", port)
    assert set(os.listdir("/dev/shm")) <= worker.shm_before
