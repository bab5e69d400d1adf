from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import pytest

# A stand-in worker: starts the orphan guard, then an "engine" tree (child and
# grandchild), prints their pids and waits to be killed.
WORKER = """
import subprocess, sys, time
from ichat.process import reaper
guard = reaper.Reaper(interval=float(sys.argv[2]))
guard.start()
engine = subprocess.Popen([sys.executable, "-c",
    "import subprocess, sys, time; "
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
    "print(p.pid, flush=True); time.sleep(300)"], stdout=subprocess.PIPE, text=True)
grandchild = int(engine.stdout.readline())
print(guard.proc.pid, engine.pid, grandchild, flush=True)
if sys.argv[1] == "clean":
    engine.kill(); engine.wait()
    guard.stop()
    print("stopped", flush=True)
time.sleep(300)
"""


def running(*pids: int) -> list[int]:
    """Those of ``pids`` still running (a zombie has ended: only its parent must reap it)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def start_worker(mode: str, interval: float = 0.05) -> tuple[subprocess.Popen[str], list[int]]:
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, mode, str(interval)], stdout=subprocess.PIPE, text=True
    )
    assert worker.stdout is not None
    pids = [int(x) for x in worker.stdout.readline().split()]
    time.sleep(0.3)  # a few snapshot intervals
    return worker, pids


@pytest.mark.parametrize(
    "interval",
    [0.05, 600.0],
    ids=["in-snapshot", "started-after-the-last-snapshot"],  # found by its inherited token
)
def test_sigkill_of_the_worker_kills_its_engine_tree(interval: float) -> None:
    worker, (guard, engine, grandchild) = start_worker("kill", interval)
    try:
        worker.send_signal(signal.SIGKILL)
        worker.wait(5)
        t0 = time.monotonic()
        while running(engine, grandchild, guard) and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert not running(engine, grandchild, guard)
        assert time.monotonic() - t0 < 2
    finally:
        for pid in (engine, grandchild, guard):
            if psutil.pid_exists(pid):
                psutil.Process(pid).kill()


def test_a_clean_stop_kills_nothing_and_the_guard_exits() -> None:
    worker, (guard, engine, grandchild) = start_worker("clean")
    try:
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == "stopped"
        assert not running(guard)
        # the grandchild was orphaned by the worker's own kill of its parent, on
        # purpose: a clean stop leaves process policy to the worker, so it lives on
        assert psutil.pid_exists(grandchild)
    finally:
        worker.kill()
        worker.wait()
        for pid in (engine, grandchild):
            if psutil.pid_exists(pid):
                psutil.Process(pid).kill()


# A stand-in `ichat up`: starts the orphan guard, then a "worker" that makes a shared
# memory segment through multiprocessing (registered with the worker's resource
# tracker, as vLLM's are) and an "engine" child that maps a /dev/shm file of its own
# (registered nowhere, as SGLang's sglang_loads_* are); prints their names.
UP = """
import subprocess, sys, time
from ichat.process import reaper
guard = reaper.Reaper(interval=0.05)
guard.start()
worker = subprocess.Popen([sys.executable, "-c", '''
import mmap, os, subprocess, sys, time
from multiprocessing import shared_memory
segment = shared_memory.SharedMemory(create=True, size=4096)
engine = subprocess.Popen([sys.executable, "-c", (
    "import mmap, os, sys, time; name = f'/dev/shm/ichat-test-{os.getpid()}'; "
    "fd = os.open(name, os.O_CREAT | os.O_RDWR); os.ftruncate(fd, 4096); "
    "m = mmap.mmap(fd, 4096); print(name, flush=True); time.sleep(300)")],
    stdout=subprocess.PIPE, text=True)
print(segment.name, engine.stdout.readline().strip(), flush=True)
time.sleep(300)
'''], stdout=subprocess.PIPE, text=True)
print(worker.stdout.readline().strip(), flush=True)
time.sleep(300)
"""


def test_sigkill_leaves_nothing_in_dev_shm() -> None:
    import os

    up = subprocess.Popen([sys.executable, "-c", UP], stdout=subprocess.PIPE, text=True)
    assert up.stdout is not None
    segment, engine_file = up.stdout.readline().split()
    tracked = f"/dev/shm/{segment.lstrip('/')}"
    assert os.path.exists(tracked) and os.path.exists(engine_file)
    time.sleep(0.3)  # a few snapshot intervals
    up.send_signal(signal.SIGKILL)
    up.wait(5)
    t0 = time.monotonic()
    while (os.path.exists(tracked) or os.path.exists(engine_file)) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    left = [path for path in (tracked, engine_file) if os.path.exists(path)]
    for path in left:
        os.unlink(path)
    assert left == []


# A stand-in worker that tells its guard of a /dev/shm file its engine made, as the
# backend does, then holds nothing open: only the guard's record can find it.
TOLD = """
import os, sys, time
from ichat.process import reaper, shared_memory
guard = reaper.Reaper(interval=0.05)
guard.start()
path = f"/dev/shm/ichat-test-told-{os.getpid()}"
with open(path, "wb") as f:
    f.write(b"x" * 4096)
guard.record_shm({shared_memory.Mapped(os.stat(path).st_ino, path)})
print(path, flush=True)
time.sleep(300)
"""


def test_a_file_the_worker_told_of_is_unlinked_when_it_is_killed() -> None:
    import os

    worker = subprocess.Popen([sys.executable, "-c", TOLD], stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None
    path = worker.stdout.readline().strip()
    assert os.path.exists(path)
    time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait(5)
    t0 = time.monotonic()
    while os.path.exists(path) and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    left = os.path.exists(path)
    if left:
        os.unlink(path)
    assert not left
