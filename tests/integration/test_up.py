"""`ichat up` as a user runs it: gateway + one worker, a chat through the gateway,
Ctrl-C stops everything (exit 0, no process left, ports free)."""

from __future__ import annotations

import signal
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
