"""Process helpers with real child processes (no engine)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import psutil

from ichat.process import processes


def test_a_multiprocessing_child_is_reaped_through_multiprocessing() -> None:
    # What vLLM's shutdown leaves: its EngineCore SIGKILLed, not joined. Reaped behind
    # multiprocessing's back it would stay "running" in its table with two pipes open.
    child = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(60,))
    child.start()
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)
    proc = psutil.Process(child.pid)
    assert processes.wait_stopped([proc], timeout=10) == []

    assert child.exitcode == -signal.SIGKILL  # multiprocessing saw its exit status
    assert child not in multiprocessing.active_children()
    assert not psutil.pid_exists(child.pid) or proc.status() != psutil.STATUS_ZOMBIE


def test_stop_gracefully_terminates_and_kills_what_ignores_sigterm() -> None:
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    assert processes.stop_gracefully(polite, timeout=10) == -signal.SIGTERM

    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert stubborn.stdout is not None and stubborn.stdout.readline() == "ready\n"
    t0 = time.monotonic()
    assert processes.stop_gracefully(stubborn, timeout=0.5) == -signal.SIGKILL
    assert time.monotonic() - t0 < 5
    stubborn.stdout.close()


def test_kill_ends_a_process_tree_at_once() -> None:
    import subprocess
    import sys
    import time

    import psutil

    from ichat.process.processes import kill

    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', " \
        "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)']);" \
        " time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.5)
    tree = [psutil.Process(parent.pid), *psutil.Process(parent.pid).children()]
    assert len(tree) == 2
    t0 = time.monotonic()
    assert kill([psutil.Process(parent.pid)]) == []
    assert time.monotonic() - t0 < 5  # SIGKILL: no SIGTERM grace to wait out
    parent.wait(5)
    for proc in tree[1:]:
        assert not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE


def test_free_ports_are_different_and_free() -> None:
    ports = processes.free_ports(8)
    assert len(set(ports)) == 8
    assert all(processes.port_is_free("127.0.0.1", port) for port in ports)
