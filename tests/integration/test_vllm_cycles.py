"""Start/stop cycles of an in-process backend in one fresh process (bench/leak_check.py):
no engine process left and the port free after every stop, RSS back near its level
after the first cycle. CI runs eight cycles (about 40 s each on 2 cores);
`-m slow` runs fifty."""

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


def cycle_timeout(cycles: int) -> int:
    return 120 * cycles + 300


def run_cycles(model_dir: Path, cycles: int, tmp_path: Path) -> dict[str, object]:
    out = tmp_path / "leak.json"
    cmd = [sys.executable, str(LEAK_CHECK), "--model-path", str(model_dir)]
    cmd += ["--cycles", str(cycles), "--out", str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cycle_timeout(cycles))
    except subprocess.TimeoutExpired as exc:  # killed; its orphan guard kills its engine
        reap_zombies()
        output = (exc.stdout or b"")[-6000:] + (exc.stderr or b"")[-6000:]
        raise AssertionError(f"leak check timed out:\n{output.decode(errors='replace')}") from None
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


CI_CYCLES = int(os.environ.get("ICHAT_CI_CYCLES", "8"))


# pytest's own timeout comes after the subprocess's: a stuck cycle then fails with
# the leak check's output (and the stacks it dumps after 300 s) instead of nothing
@pytest.mark.timeout(cycle_timeout(CI_CYCLES) + 120)
def test_start_stop_cycles_leave_nothing(model_dir: Path, tmp_path: Path) -> None:
    check(run_cycles(model_dir, CI_CYCLES, tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(cycle_timeout(50) + 120)
def test_fifty_start_stop_cycles_leave_nothing(model_dir: Path, tmp_path: Path) -> None:
    check(run_cycles(model_dir, 50, tmp_path))
