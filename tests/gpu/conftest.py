"""GPU suite: runs on the GPU machine only (skipped where no NVIDIA GPU is visible)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from ichat.process.processes import free_port
from tests.support import become_subreaper, engine_env_set

GPU_ENV = {
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
    # flashinfer is not carried to the GPU machine (shared/gpu/skip.txt)
    "VLLM_USE_FLASHINFER_SAMPLER": "0",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if shutil.which("nvidia-smi") is None:
        skip = pytest.mark.skip(reason="no NVIDIA GPU on this machine")
        for item in items:
            if "tests/gpu" in str(item.path):
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def gpu_env() -> Iterator[None]:
    become_subreaper()
    with engine_env_set(GPU_ENV):
        yield


@pytest.fixture(scope="session")
def gpu_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ICHAT_GPU_MODEL if set (made once per machine), else a ~1B model made now."""
    from ichat.commands.make_test_model import SHAPES, make_test_model

    given = os.environ.get("ICHAT_GPU_MODEL")
    if given and (Path(given) / "config.json").exists():
        return Path(given)
    target = Path(given) if given else tmp_path_factory.mktemp("model") / "llama-1b"
    return make_test_model(target, SHAPES["1b"])


@pytest.fixture(scope="module")
def status_port() -> int:
    """A free port for the worker's status endpoints (``--status-port``)."""
    return free_port()
