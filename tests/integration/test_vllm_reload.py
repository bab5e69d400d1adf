"""`ichat reload`: a real vLLM worker behind a real SMG gateway gets new engine flags
while it serves.

Under a steady load (chats and streams, through the gateway and straight to it): a
reload without the key is refused; reloads that cannot start (an engine that fails
during its start, an unknown flag, a missing model) leave the old engine serving; a
reload to a new context length and then to a new served model name switches engines
on the same port with no failed request, the gateway following the new name; new
weights at the same path and the same flags are loaded in place by the same engine;
a restart after that keeps the new configuration; nothing is left after the stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from ichat.commands.make_test_model import SHAPES, make_test_model
from ichat.process.processes import free_ports, port_is_free, title
from tests.integration.test_gateway import KEY, start_gateway, wait_for
from tests.support import (
    CONTEXT_LENGTH,
    MODEL_NAME,
    SteadyLoad,
    Worker,
    engine_core,
    ichat_cmd,
    running,
    start_worker,
    vllm_processes,
)

# KEY: the gateway's, the engine's and (by default) the worker's admin key
RENAMED = "tiny-chat-v2"
NEW_CONTEXT = CONTEXT_LENGTH // 2


@dataclass
class Setup:
    gateway_url: str
    worker: Worker
    status_url: str
    model_dir: Path  # a copy of the test model: its weights are replaced by a test

    def status(self) -> dict[str, Any]:
        return httpx.get(f"{self.status_url}/status", timeout=10).json()  # type: ignore[no-any-return]

    def reload(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ichat_cmd("reload", self.status_url, *args),
            capture_output=True,
            text=True,
            timeout=900,
            env={**os.environ, "ICHAT_ADMIN_KEY": KEY},
        )

    def models(self, url: str) -> dict[str, int]:
        """Served model id -> its max_model_len, as ``url``'s /v1/models lists them."""
        reply = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        reply.raise_for_status()
        return {m["id"]: m.get("max_model_len", 0) for m in reply.json()["data"]}


@pytest.fixture(scope="module")
def setup(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("reload")
    served = Path(shutil.copytree(model_dir, tmp / "served"))
    shm_before = set(os.listdir("/dev/shm"))
    port, status_port = free_ports(2)
    gateway_url = f"http://127.0.0.1:{port}"
    gateway = start_gateway(port, tmp / "gateway.log")
    args = [
        "--model-path", str(served), "--served-model-name", MODEL_NAME,
        "--context-length", str(CONTEXT_LENGTH), "--api-key", KEY,
        "--gateway-url", gateway_url, "--gateway-api-key", KEY,
        "--status-port", str(status_port), "--drain-timeout", "20",
    ]  # fmt: skip
    try:
        with start_worker(tmp, *args) as worker:
            worker.wait_ready()
            setup = Setup(gateway_url, worker, f"http://127.0.0.1:{status_port}", served)
            wait_for(lambda: MODEL_NAME in gateway_models(gateway_url), 60, "registered")
            yield setup
    finally:
        gateway.terminate()
        gateway.wait(60)
    assert port_is_free("127.0.0.1", port)
    left = sorted(set(os.listdir("/dev/shm")) - shm_before)
    assert left == [], f"left in /dev/shm after the stop: {left}"


def gateway_models(url: str) -> list[str]:
    try:
        reply = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    except httpx.TransportError:
        return []
    return [m["id"] for m in reply.json().get("data", [])] if reply.status_code == 200 else []


def load(setup: Setup, *, through_gateway: bool = True) -> SteadyLoad:
    """Chats and streams straight to the worker, and through the gateway."""
    targets = [(setup.worker.url, False), (setup.worker.url, True)]
    if through_gateway:
        targets += [(setup.gateway_url, False), (setup.gateway_url, True)]
    return SteadyLoad(targets, KEY)


def engine_pid(setup: Setup) -> int:
    return engine_core(setup.worker.proc.pid).pid


def test_a_reload_without_the_admin_key_is_refused_and_changes_nothing(setup: Setup) -> None:
    before, pid = setup.status(), engine_pid(setup)
    body = {"engine_args": ["--model-path", "/elsewhere"]}
    assert httpx.post(f"{setup.status_url}/reload", json=body).status_code == 401
    wrong = {"Authorization": "Bearer not-the-key"}
    assert httpx.post(f"{setup.status_url}/reload", json=body, headers=wrong).status_code == 401
    after = setup.status()
    assert after["engine_args"] == before["engine_args"] and after["reloads"] == {}
    assert engine_pid(setup) == pid
    assert KEY not in str(after)  # /status is open: the engine's key is masked there


def test_reloads_that_cannot_start_leave_the_old_engine_serving(setup: Setup) -> None:
    pid = engine_pid(setup)
    shm_before = set(os.listdir("/dev/shm"))
    with load(setup) as running_load:
        # the engine starts and fails during its start (no room for one KV block)
        failed = setup.reload("--merge", "--", "--num-gpu-blocks-override", "1")
        unknown = setup.reload("--merge", "--", "--no-such-flag")
        missing = setup.reload("--", "--model-path", "/no/such/model")
        time.sleep(1)  # the load goes on after the last refusal
    assert failed.returncode == 8, failed.stderr
    assert "did not start" in failed.stderr and "keeps serving" in failed.stderr
    assert unknown.returncode == 2 and "unrecognized arguments: --no-such-flag" in unknown.stderr
    assert missing.returncode == 2 and "does not exist: /no/such/model" in missing.stderr
    assert running_load.failures == [] and running_load.ok > 0
    assert engine_pid(setup) == pid  # the same engine throughout
    status = setup.status()
    assert status["reloads"] == {"failed": 1, "refused": 2}
    assert status["last_reload"]["outcome"] == "refused" and status["state"] == "ready"
    # the engine that failed left no process and nothing in /dev/shm
    cores = [p.pid for p in vllm_processes(setup.worker.proc.pid) if "EngineCore" in title(p)]
    assert cores == [pid]
    assert set(os.listdir("/dev/shm")) - shm_before == set()


def test_a_reload_under_load_switches_engines_without_a_failed_request(setup: Setup) -> None:
    old = psutil.Process(engine_pid(setup))
    with load(setup) as running_load:
        done = setup.reload("--merge", "--", "--context-length", str(NEW_CONTEXT))
        served_before_stop = running_load.ok
        time.sleep(1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert running_load.failures == [] and running_load.ok > served_before_stop > 0
    # the new engine runs the new configuration; the old one is gone
    assert setup.models(setup.worker.url) == {MODEL_NAME: NEW_CONTEXT}
    assert not running(old)
    assert engine_pid(setup) != old.pid
    status = setup.status()
    assert status["engine_args"][-2:] == ["--context-length", str(NEW_CONTEXT)]
    assert status["reloads"]["ok"] == 1 and status["last_reload"]["outcome"] == "ok"
    assert {"reload_engine_start", "reload_switch", "reload_retire_old"} <= set(
        status["last_reload"]["phases"]
    )
    metrics = httpx.get(f"{setup.status_url}/metrics").text
    assert 'ichat_worker_reloads_total{outcome="ok"} 1.0' in metrics


def test_a_reload_renames_the_model_and_the_gateway_follows(setup: Setup) -> None:
    # clients keep the old name (still served, second) straight at the worker
    with load(setup, through_gateway=False) as running_load:
        done = setup.reload("--merge", "--", "--served-model-name", RENAMED, MODEL_NAME)
        time.sleep(1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert running_load.failures == [] and running_load.ok > 0
    assert list(setup.models(setup.worker.url)) == [RENAMED, MODEL_NAME]
    assert setup.status()["served_model_names"] == [RENAMED, MODEL_NAME]
    # SMG keeps one model per worker: it is registered again under the new name
    wait_for(lambda: gateway_models(setup.gateway_url) == [RENAMED], 30, "renamed at the gateway")
    client = openai.OpenAI(base_url=f"{setup.gateway_url}/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(
        model=RENAMED, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert reply.choices[0].finish_reason in ("length", "stop")


def greedy(setup: Setup) -> list[int]:
    """The token ids of one greedy completion (the same every time, for fixed weights)."""
    reply = httpx.post(
        f"{setup.worker.url}/v1/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": MODEL_NAME, "prompt": "once upon a time", "max_tokens": 16,
              "temperature": 0, "ignore_eos": True, "return_token_ids": True},
        timeout=60,
    )  # fmt: skip
    reply.raise_for_status()
    return reply.json()["choices"][0]["token_ids"]  # type: ignore[no-any-return]


def test_new_weights_at_the_same_path_are_loaded_in_place(setup: Setup) -> None:
    pid, before = engine_pid(setup), greedy(setup)
    assert greedy(setup) == before  # greedy: the same ids while the weights are the same
    other = make_test_model(setup.model_dir.parent / "other", SHAPES["tiny"], seed=1)
    weights = setup.model_dir / "model.safetensors"
    staged = weights.with_suffix(".new")
    shutil.copyfile(other / "model.safetensors", staged)
    os.replace(staged, weights)  # a new file: the serving engine's mapping keeps the old
    with load(setup, through_gateway=False) as running_load:
        done = setup.reload("--merge")  # the same flags
        time.sleep(1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"method": "in_place"' in done.stdout
    assert running_load.failures == [] and running_load.ok > 0
    assert engine_pid(setup) == pid  # the same engine, no second one
    assert greedy(setup) != before  # it generates from the new weights
    phases = setup.status()["last_reload"]["phases"]
    assert {"reload_pause", "reload_weights"} <= set(phases)


def test_framework_settings_change_at_once_without_touching_the_engine(setup: Setup) -> None:
    pid, reloads = engine_pid(setup), setup.status()["reloads"]["ok"]
    done = setup.reload("--drain-timeout", "7", "--log-level", "info")
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"method": "settings"' in done.stdout
    status = setup.status()
    assert status["settings"] == {"drain_timeout": 7.0, "log_level": "info"}
    assert status["reloads"]["ok"] == reloads + 1 and engine_pid(setup) == pid


def test_a_restart_after_a_reload_keeps_the_new_configuration(setup: Setup) -> None:
    os.kill(engine_pid(setup), signal.SIGKILL)
    wait_for(lambda: setup.status()["engine_deaths"] == 1, 30, "the death seen")
    wait_for(lambda: setup.status()["state"] == "ready", 300, "ready again")
    assert setup.models(setup.worker.url)[RENAMED] == NEW_CONTEXT
    status = setup.status()
    assert status["restarts"] == 1 and status["settings"]["drain_timeout"] == 7.0


def test_weights_that_fail_to_load_in_place_stop_that_engine_and_the_worker_restarts(
    setup: Setup,
) -> None:
    """An in-place load that fails leaves the weights unknown: that engine is stopped
    (the command says why, exit 8), and the worker restarts it as after a death, from
    the weights on disk then (here: restored at once, as an operator would)."""
    before, deaths = greedy(setup), setup.status()["engine_deaths"]
    weights = setup.model_dir / "model.safetensors"
    good = weights.with_suffix(".good")
    shutil.copyfile(weights, good)
    other = make_test_model(setup.model_dir.parent / "bigger", SHAPES["small"], seed=2)
    staged = weights.with_suffix(".new")
    shutil.copyfile(other / "model.safetensors", staged)
    os.replace(staged, weights)  # tensors of another shape: the load must fail
    try:
        done = setup.reload("--merge", "--in-place")
    finally:
        os.replace(good, weights)
    assert done.returncode == 8, done.stderr[-3000:]
    assert "did not load in place" in done.stderr and "was stopped" in done.stderr
    wait_for(lambda: setup.status()["engine_deaths"] == deaths + 1, 30, "the death seen")
    wait_for(lambda: setup.status()["state"] == "ready", 300, "ready again")
    status = setup.status()
    assert status["last_reload"]["outcome"] == "failed" and status["reloads"]["failed"] >= 1
    assert greedy(setup) == before  # the restarted engine serves the weights on disk
