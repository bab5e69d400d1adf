"""In-process restarts of SGLang (bench/leak_check.py --engine sglang, a fresh process):
no engine process left, the port free, and no ZMQ context, thread, descriptor or
tokenizer piling up. SGLang's tokenizer manager keeps its ZMQ context (3 threads,
9 descriptors a start) until the process exits; the backend ends it after a stop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support import cycle_timeout, run_leak_check

from .conftest import CPU_FLAGS

CYCLES = 4  # about 20 s each on 2 cores


@pytest.mark.timeout(cycle_timeout(CYCLES) + 120)
def test_start_stop_cycles_leave_nothing(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(Path(__file__).resolve().parents[2])  # the script imports ichat from here
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.environ["PYTHONPATH"], root]))
    report = run_leak_check(model_dir, CYCLES, tmp_path, "--engine", "sglang", "--", *CPU_FLAGS)
    cycles = report["cycles"]
    assert report["engine_processes_left_total"] == 0
    assert report["port_not_free_count"] == 0
    assert report["dev_shm_files_left"] == []
    # from the 2nd cycle on (the 1st opens what a process keeps once: logging, caches)
    assert [c["native_threads"] for c in cycles[1:]] == [cycles[1]["native_threads"]] * (CYCLES - 1)
    assert [c["open_fds"] for c in cycles[1:]] == [cycles[1]["open_fds"]] * (CYCLES - 1)
    assert report["tokenizers_growth"] <= 0
    assert report["frozen_objects_after_stops"] == 0
