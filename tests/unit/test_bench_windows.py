"""The benchmark's steady-state windows (bench/windows.py) against bench/trivial_server.py,
and how bench/profile_worker.py charges a py-spy sample."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from ichat.process.processes import free_port, stop_gracefully
from tests.probe import wait_healthy

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their siblings by name


def test_a_window_counts_only_what_arrives_inside_it(bench: None) -> None:
    from common import Load
    from windows import ClientPool, Window

    port = free_port()
    server = subprocess.Popen([sys.executable, str(BENCH / "trivial_server.py"), "--port",
                               str(port), "--processes", "2", "--itl-ms", "5"])  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server, timeout=30)
        children = psutil.Process(server.pid).children(recursive=True)
        assert len(children) >= 2
        with ClientPool(2) as pool:
            result: dict[str, Any] = pool.run(Window(url, Load(0, 8, 20), warmup=0.5,
                                                     seconds=1.5, stagger=0.2))  # fmt: skip
    finally:
        stop_gracefully(server, 15)
    # every chunk comes >= 5 ms after the one before: 8 streams reach 1600 tokens/s at
    # most; tokens of the warm-up or after the window, counted too, would pass that
    assert 0 < result["out_tok_per_s"] <= 8 / 0.005 * 1.02
    assert result["itl_p50_ms"] >= 5 and result["ttft_p50_ms"] >= 5
    assert result["req_per_s"] > 0 and result["client_processes"] == 2
    # SIGTERM to the server ends its server processes too
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize(
    ("stack", "charged"),
    [
        # uvloop's own work under iChat's loop runner: the loop, not iChat
        (["<module> (ichat/__main__.py:3)", "run_event_loop (ichat/commands/serve.py:245)"],
         ("event loop", "")),
        (["<module> (vllm/entrypoints/openai/api_server.py:9)", "run (uvloop/__init__.py:96)"],
         ("event loop", "")),
        (["run_event_loop (ichat/commands/serve.py:245)", "Runner.run (asyncio/runners.py:118)",
          "Handle._run (asyncio/events.py:84)"], ("event loop", "")),
        # the innermost known package wins; the standard library goes to its caller
        (["run_event_loop (ichat/commands/serve.py:245)", "chat (vllm/serving.py:10)",
          "dumps (json/__init__.py:231)"], ("vllm", "chat (vllm/serving.py)")),
        (["run_event_loop (ichat/commands/serve.py:245)", "check (ichat/backends/monitor.py:80)",
          "sleep (time.py:1)"], ("ichat", "check (ichat/backends/monitor.py)")),
        (["f (<string>:4)"], ("other", "")),
    ],
)  # fmt: skip
def test_a_sample_is_charged_to_the_innermost_known_package(
    bench: None, stack: list[str], charged: tuple[str, str]
) -> None:
    from profile_worker import charged_to

    assert charged_to(stack) == charged
