"""Start/stop cycles of an in-process backend in one fresh process (bench/leak_check.py):
no engine process left and the port free after every stop, RSS back near its level
after the first cycle. CI runs a few cycles; `-m slow` runs fifty."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import our_processes, reap_zombies

LEAK_CHECK = Path(__file__).resolve().parents[2] / "bench" / "leak_check.py"
# Measured: +4.2 MiB a cycle over 10 cycles (allocator and native caches; no engine
# object survives its stop). A retained engine (client, app, config, tokenizer) would
# add more than this per cycle, and is caught by name below.
RSS_PER_CYCLE_SLACK_MIB = 16


def run_cycles(model_dir: Path, cycles: int, tmp_path: Path) -> dict[str, object]:
    out = tmp_path / "leak.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(LEAK_CHECK),
            "--model-path",
            str(model_dir),
            "--cycles",
            str(cycles),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120 * cycles + 300,
    )
    reap_zombies()  # the cycles' exited model workers were adopted by this subreaper
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not our_processes()
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("cycle")))
    report: dict[str, object] = json.loads(out.read_text())
    return report


def check(report: dict[str, object]) -> None:
    assert report["engine_processes_left_total"] == 0
    assert report["port_not_free_count"] == 0
    alive = report["engine_objects_alive"]
    assert isinstance(alive, dict) and not any(alive.values()), alive
    assert float(report["rss_growth_per_cycle_mib"]) < RSS_PER_CYCLE_SLACK_MIB  # type: ignore[arg-type]


def test_start_stop_cycles_leave_nothing(model_dir: Path, tmp_path: Path) -> None:
    check(run_cycles(model_dir, int(os.environ.get("ICHAT_CI_CYCLES", "20")), tmp_path))


@pytest.mark.slow
def test_fifty_start_stop_cycles_leave_nothing(model_dir: Path, tmp_path: Path) -> None:
    check(run_cycles(model_dir, 50, tmp_path))
