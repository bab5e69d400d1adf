"""The static check of a vLLM release (scripts/check_vllm_release.py) on the installed
one: everything vllm_compat looks up is found where the check says, without importing
vLLM. The same check ran on the 0.26.0 and 0.33.0 wheels
(docs/results/vllm-release-check-2026-12-01.json)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_vllm_has_everything_the_compat_module_looks_up(tmp_path: Path) -> None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed here")
    site = Path(next(iter(spec.submodule_search_locations))).parent
    summary = tmp_path / "check.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts/check_vllm_release.py"), str(site),
         "--json", str(summary)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(summary.read_text())
    assert result["missing_required"] == []
    assert all(result["client_internals"].values()), result["client_internals"]
    assert all(result["found"]["engine_keyed_caches"].values())

