"""Fault injection on a supervised `ichat serve` worker (real vLLM on CPU).

One worker for the module: kill -9 of the engine while streams run (restart), a
saturating load (no false verdict), then SIGKILL of the whole worker (no orphan).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from ichat.process.processes import free_port, title
from tests.support import (
    ENGINE_INFO_LINE,
    MODEL_NAME,
    RESTART_PHASES,
    Worker,
    chat_ok,
    check_restart_account,
    engine_core,
    metric,
    our_processes,
    phase_seconds,
    reap_zombies,
    start_worker,
    stream_once,
    vllm_processes,
)


@pytest.fixture(scope="module")
def status_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def worker(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory, status_port: int
) -> Iterator[Worker]:
    with start_worker(
        tmp_path_factory.mktemp("faults"),
        "--model-path",
        str(model_dir),
        "--served-model-name",
        MODEL_NAME,
        "--drain-timeout",
        "20",
        "--status-port",
        str(status_port),
        "--log-level",
        "info",  # the engine's full log
    ) as w:
        # the worker's own readiness: the engine's /health answers before the worker's
        # warmup has run and it counts itself ready
        w.wait_ready(url=f"http://127.0.0.1:{status_port}", path="/readyz")
        yield w


def test_log_level_info_shows_the_engines_full_log(worker: Worker) -> None:
    lines = worker.output().splitlines()
    assert [line for line in lines if ENGINE_INFO_LINE.search(line)]
    assert [line for line in lines if 'GET /health HTTP/1.1" 200' in line]  # access log


def test_worker_metrics_are_served_next_to_the_engines(worker: Worker) -> None:
    text = httpx.get(f"{worker.url}/metrics", timeout=10).text
    assert "vllm:" in text  # the engine's own
    assert 'ichat_worker_state{state="ready"} 1.0' in text
    assert metric(worker, "ichat_worker_restarts_total") == 0


def test_every_vllm_workaround_resolves_in_the_installed_release(
    worker: Worker, status_port: int
) -> None:
    """Each place iChat reaches into vLLM's internals still resolves: a vLLM upgrade
    that moves one fails here instead of degrading silently."""
    from ichat.backends.vllm_compat import WORKAROUNDS

    status = httpx.get(f"http://127.0.0.1:{status_port}/status", timeout=5).json()
    assert status["workarounds"] == {w.name: "resolved" for w in WORKAROUNDS}
    assert 'ichat_worker_workaround_missing{workaround="engine_process_titles"} 0.0' in (
        httpx.get(f"{worker.url}/metrics", timeout=10).text
    )


def probe_codes(status_port: int) -> tuple[int, int]:
    """(/readyz, /livez) status codes of the worker's always-on status server."""
    base = f"http://127.0.0.1:{status_port}"
    return (
        httpx.get(f"{base}/readyz", timeout=5).status_code,
        httpx.get(f"{base}/livez", timeout=5).status_code,
    )


def test_kill_9_engine_while_streaming_restarts_and_serves_again(
    worker: Worker, status_port: int
) -> None:
    assert probe_codes(status_port) == (200, 200)
    old_engine = vllm_processes(worker.proc.pid)
    assert len(old_engine) >= 2  # EngineCore and its model worker
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream_once, worker.url, 2000) for _ in range(8)]
        time.sleep(1.5)  # the streams are running
        core = engine_core(worker.proc.pid)
        t_kill, wall_kill = time.monotonic(), time.time()
        os.kill(core.pid, signal.SIGKILL)
        outcomes = [f.result(timeout=60) for f in streams]  # no stream hangs
        t_streams_ended = time.monotonic() - t_kill
    assert all(o != "finished" for o in outcomes), outcomes
    deadline = time.monotonic() + 300
    probes = set()
    while not chat_ok(worker.url):
        assert worker.proc.poll() is None, worker.output()[-3000:]
        assert time.monotonic() < deadline, "worker did not serve again"
        probes.add(probe_codes(status_port))  # the engine's port is closed meanwhile
        time.sleep(0.1)
    t_serving = time.monotonic() - t_kill
    # while the engine restarts: not ready (no traffic), but alive (no container restart)
    assert (503, 200) in probes and all(live == 200 for _, live in probes), probes
    assert probe_codes(status_port) == (200, 200)
    assert worker.proc.poll() is None  # the same worker process, restarted inside
    assert metric(worker, "ichat_worker_restarts_total") == 1
    assert metric(worker, "ichat_worker_engine_deaths_total") == 1
    detected = metric(worker, "ichat_worker_last_death_detected_timestamp_seconds") - wall_kill
    assert 0 <= detected <= 1.0
    _, alive = psutil.wait_procs([p for p in old_engine if p.pid != core.pid], timeout=10)
    assert not alive, f"old engine processes left: {alive}"
    # the worker's own account of the restart: from the detection to serving again,
    # phase by phase (the client saw it later: it polls, and its first chat is slower)
    restart_s = metric(worker, "ichat_worker_last_restart_to_ready_seconds")
    phases = phase_seconds(worker)
    check_restart_account(detected, restart_s, phases, t_serving)
    print(
        f"kill -9 EngineCore: detected after {detected:.3f} s, "
        f"streams ended after {t_streams_ended:.2f} s "
        f"({outcomes}); serving again after {t_serving:.1f} s; the worker's phases: "
        + ", ".join(f"{k} {phases[k]:.2f} s" for k in RESTART_PHASES)
    )


def test_saturating_load_gives_no_false_death(worker: Worker) -> None:
    deaths = metric(worker, "ichat_worker_engine_deaths_total")
    restarts = metric(worker, "ichat_worker_restarts_total")
    t_end = time.monotonic() + 20
    done = 0
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        while time.monotonic() < t_end:
            results = list(pool.map(lambda _: stream_once(worker.url, 64), range(64)))
            assert results == ["finished"] * 64, results
            done += 64
    assert metric(worker, "ichat_worker_engine_deaths_total") == deaths
    assert metric(worker, "ichat_worker_restarts_total") == restarts
    print(f"saturating load: {done} streams, 0 deaths, 0 restarts")


def test_sigkill_of_the_worker_leaves_no_orphan(worker: Worker) -> None:
    # Last: it kills the shared worker. The test process is a subreaper, so an
    # orphan would become our child and show in our_processes().
    # Every descendant counts (vLLM's, and e.g. torch's compile workers under them).
    engine = vllm_processes(worker.proc.pid)
    assert any("EngineCore" in title(p) for p in engine)
    t0 = time.monotonic()
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(10)
    _, alive = psutil.wait_procs(engine, timeout=10)
    assert not alive, f"orphans: {alive}"
    left = our_processes()
    while left and time.monotonic() - t0 < 10:  # SIGKILLed ones may take a moment to exit
        reap_zombies()
        time.sleep(0.05)
        left = our_processes()
    elapsed = time.monotonic() - t0
    assert not left, f"orphans: {[(p.pid, title(p)) for p in left]}"
    print(f"SIGKILL of the worker: every process below it gone after {elapsed:.2f} s")
