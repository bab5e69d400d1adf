"""What the real-engine suites share (tests/integration: vLLM; tests/sglang: SGLang)."""

from __future__ import annotations

from pathlib import Path

import pytest

ENGINE_SUITES = ("integration", "sglang")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.parent.name in ENGINE_SUITES:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama generated here (random weights, a BPE tokenizer trained on the spot)."""
    from ichat.commands.make_test_model import SHAPES, make_test_model

    return make_test_model(tmp_path_factory.mktemp("model") / "tiny", SHAPES["tiny"])
