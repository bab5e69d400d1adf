"""Shared memory a killed engine process leaves in /dev/shm (real processes, no engine)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from multiprocessing import shared_memory

import psutil
import pytest

from ichat.process import shared_memory as shm
from ichat.process.processes import wait_stopped

pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")

# an "engine process": creates a segment and keeps it mapped, as vLLM's EngineCore does;
# unregistered from its own resource tracker, which would otherwise unlink it at death
ENGINE = """
import sys, time
from multiprocessing import resource_tracker, shared_memory
seg = shared_memory.SharedMemory(create=True, size=1 << 20)
resource_tracker.unregister(seg._name, "shared_memory")
print(seg.name, flush=True)
time.sleep(60)
"""


def test_what_a_killed_engine_mapped_is_unlinked_and_what_we_map_is_kept() -> None:
    engine = subprocess.Popen([sys.executable, "-c", ENGINE], stdout=subprocess.PIPE, text=True)
    assert engine.stdout is not None
    name = engine.stdout.readline().strip()
    ours = shared_memory.SharedMemory(create=True, size=4096)
    try:
        recorded = shm.mapped([psutil.Process(engine.pid), psutil.Process()])
        assert {f"/dev/shm/{name}", f"/dev/shm/{ours.name}"} <= {m.path for m in recorded}
        engine.send_signal(signal.SIGKILL)  # it cannot unlink anything now
        assert wait_stopped([psutil.Process(engine.pid)], timeout=10) == []

        removed = shm.unlink_left_behind(recorded, [psutil.Process()])

        assert removed == [f"/dev/shm/{name}"]
        assert not os.path.exists(f"/dev/shm/{name}")
        assert os.path.exists(f"/dev/shm/{ours.name}")  # still mapped here: kept
    finally:
        engine.stdout.close()
        ours.close()
        ours.unlink()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/dev/shm/{name}")


# a process that creates a multiprocessing lock and dies by SIGKILL, as vLLM's workers do
# with tqdm's (spawn start method: a named semaphore, unlinked only by its finalizer)
SEMAPHORE_MAKER = """
import multiprocessing, time
from multiprocessing import resource_tracker
lock = multiprocessing.get_context("spawn").Lock()
resource_tracker.unregister(lock._semlock.name, "semaphore")  # the worker's tracker, in vLLM
print(lock._semlock.name, flush=True)
time.sleep(60)
"""


def test_a_semaphore_a_killed_process_created_is_found_by_inode_and_unlinked() -> None:
    maker = subprocess.Popen(
        [sys.executable, "-c", SEMAPHORE_MAKER], stdout=subprocess.PIPE, text=True
    )
    assert maker.stdout is not None
    path = "/dev/shm/sem." + maker.stdout.readline().strip().lstrip("/")
    try:
        recorded = shm.mapped([psutil.Process(maker.pid)])
        # glibc created it under a temporary name, which is all the memory map shows
        assert path not in {m.path for m in recorded}
        assert os.stat(path).st_ino in {m.inode for m in recorded}
        maker.send_signal(signal.SIGKILL)
        assert wait_stopped([psutil.Process(maker.pid)], timeout=10) == []

        assert shm.unlink_left_behind(recorded, [psutil.Process()]) == [path]
        assert not os.path.exists(path)
    finally:
        maker.stdout.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def test_only_files_directly_in_dev_shm_are_touched() -> None:
    inode = os.stat("/etc/hostname").st_ino
    recorded = [shm.Mapped(inode, "/etc/hostname"), shm.Mapped(inode, "/dev/shm/../etc/hostname")]
    assert shm.unlink_left_behind(recorded, []) == []
    assert os.path.exists("/etc/hostname")
