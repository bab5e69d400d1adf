"""`ichat up` as a user runs it: gateway + one worker, a chat through the gateway,
Ctrl-C stops everything (exit 0, no process left, ports free)."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path

import openai
import pytest

from ichat.process.processes import free_port, port_is_free
from tests.probe import OutputFollower
from tests.support import (
    CONTEXT_LENGTH,
    MODEL_NAME,
    console_noise,
    ichat_cmd,
    our_processes,
    reap_zombies,
)

pytest.importorskip("smg", reason="`ichat up` needs smg (ichat[gateway])")


def test_ichat_up_serves_through_the_gateway_and_ctrl_c_leaves_nothing(model_dir: Path) -> None:
    port, worker_port = free_port(), free_port()
    up = subprocess.Popen(
        ichat_cmd(
            "up",
            "--port",
            str(port),
            "--worker-port",
            str(worker_port),
            "--api-key",
            "k",
            "--model-path",
            str(model_dir),
            "--served-model-name",
            MODEL_NAME,
            "--prometheus-port",
            str(free_port()),
            "--context-length",
            str(CONTEXT_LENGTH),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    follower = OutputFollower(up, "OpenAI endpoint:", None)
    try:
        try:
            follower.wait(timeout=600)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}:\n{follower.output()[-4000:]}") from exc
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        reply = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.choices[0].finish_reason == "length"
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(120)
    reap_zombies()
    out = follower.output()
    assert code == 0, out[-3000:]
    assert console_noise(out) == []  # no leak report, engine info line or access log
    assert 0 <= out.find("deregistered") < out.find("gateway stopped")  # workers leave first
    assert not our_processes()
    assert port_is_free("127.0.0.1", port) and port_is_free("127.0.0.1", worker_port)


def test_a_worker_that_fails_to_boot_gives_ichat_up_its_exit_code(model_dir: Path) -> None:
    port, worker_port = free_port(), free_port()
    args = ["--port", str(port), "--worker-port", str(worker_port),
            "--model-path", str(model_dir), "--no-such-engine-flag"]  # fmt: skip
    proc = subprocess.run(
        ichat_cmd("up", *args),
        capture_output=True,
        text=True,
        timeout=300,
    )
    reap_zombies()
    assert proc.returncode == 2, proc.stderr[-3000:]  # the worker's: configuration
    assert "worker 0 exited (exit code 2)" in proc.stderr
    assert not our_processes()
    assert port_is_free("127.0.0.1", port) and port_is_free("127.0.0.1", worker_port)


def test_ichat_gateway_on_a_busy_port_names_the_port_and_exits_3() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            ichat_cmd("gateway", "--port", str(port)), capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"port {port} on 127.0.0.1 is already in use\n" in proc.stderr  # no "(None)"
