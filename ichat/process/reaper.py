"""Orphan guard: engine processes die with their worker, even on SIGKILL.

vLLM's engine process outlives an API server killed with SIGKILL (seen on the H200:
123 GB of GPU memory held until killed by hand). The worker starts this small watcher
process with a pipe on its stdin. While the worker lives, the watcher snapshots the
worker's descendants every ``interval`` seconds. When the pipe reaches EOF (the kernel
closes it however the worker dies), the watcher kills the last snapshot and their
descendants: the owner is gone, nobody is left to drain for. Each process is matched
by pid *and* create time, so a reused pid is never hit. A clean stop says ``bye``
first; the watcher then exits without killing anything.

A child started after the last snapshot is found too: the worker puts a random token
in its environment before it starts the engine, every engine process inherits it, and
on EOF the watcher also kills every process of this user that carries the token.

Shared memory: once it has killed them, the watcher unlinks the ``/dev/shm`` files the
killed processes mapped or held open and no process holds any more. It learns them
three ways, since a process that dies with its parent (SGLang's, through
PR_SET_PDEATHSIG) is gone before it can be read at the end: the worker sends what its
backend recorded (``shm INODE PATH`` lines on the pipe, ``Reaper.record_shm``), the
watcher reads them itself every ``SHM_REFRESH_S`` and when the processes change, and
it reads the survivors at the end.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator

import psutil

from ichat.process import shared_memory
from ichat.process.processes import is_python_helper, wait_stopped

BYE = b"bye\n"
SHM_REFRESH_S = 5.0
TOKEN_ENV = "ICHAT_REAPER_TOKEN"


def snapshot(owner: int) -> dict[int, float]:
    """pid -> create time of the owner's descendants (not this watcher, not helpers)."""
    found: dict[int, float] = {}
    with contextlib.suppress(psutil.NoSuchProcess):
        for proc in psutil.Process(owner).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if proc.pid != os.getpid() and not is_python_helper(proc):
                    found[proc.pid] = proc.create_time()
    return found


def marked(token: str) -> dict[int, float]:
    """pid -> create time of every process that inherited the worker's token."""
    found: dict[int, float] = {}
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if (
                proc.pid != os.getpid()
                and proc.environ().get(TOKEN_ENV) == token
                and not is_python_helper(proc)
            ):
                found[proc.pid] = proc.create_time()
    return found


def kill_snapshot(
    seen: dict[int, float], recorded: set[shared_memory.Mapped] | None = None
) -> list[int]:
    """SIGKILL every process of ``seen`` still alive (same create time) and its tree,
    then unlink the ``/dev/shm`` files they mapped that no process maps any more.

    Python's multiprocessing helpers are spared: a worker's resource tracker, once every
    holder of its pipe is dead, unlinks the segments and semaphores registered with it
    (those of a worker that died with nothing else mapping them). Files not registered
    there (SGLang's ``sglang_loads_*``) are unlinked here: those ``recorded`` while the
    processes lived (one that dies with its parent, as SGLang's do through
    PR_SET_PDEATHSIG, is gone before it could be read now) and those mapped now."""
    targets: dict[int, psutil.Process] = {}
    for pid, created in seen.items():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                targets[pid] = proc
                targets.update(
                    (c.pid, c) for c in proc.children(recursive=True) if not is_python_helper(c)
                )
    mapped = (recorded or set()) | shared_memory.mapped(targets.values())
    killed = []
    for proc in targets.values():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill()
            killed.append(proc.pid)
    # orphans now: a zombie has ended (whoever adopted them reaps it), so it is not
    # waited for (psutil.wait_procs would, until that reaping or the timeout)
    wait_stopped(list(targets.values()), timeout=5)
    if mapped:
        shared_memory.unlink_left_behind(mapped, psutil.process_iter())
    return killed


def record_shm(owner: int, seen: dict[int, float]) -> set[shared_memory.Mapped]:
    """The ``/dev/shm`` files the owner and its descendants map or hold open now."""
    procs = []
    for pid in (owner, *seen):
        with contextlib.suppress(psutil.Error):
            procs.append(psutil.Process(pid))
    return shared_memory.mapped(procs)


def parse_shm(line: bytes) -> shared_memory.Mapped | None:
    """``shm INODE PATH`` -> the file; anything else -> None."""
    parts = line.decode(errors="replace").split(" ", 2)
    if len(parts) == 3 and parts[0] == "shm" and parts[1].isdigit():
        return shared_memory.Mapped(int(parts[1]), parts[2])
    return None


def watch(owner: int, interval: float, token: str) -> int:
    """The watcher's loop: returns once the owner said bye or died."""
    seen: dict[int, float] = {}
    shm: set[shared_memory.Mapped] = set()  # read here
    told: set[shared_memory.Mapped] = set()  # what the worker sent
    shm_read_at = 0.0
    pending = b""
    stdin = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([stdin], [], [], interval)
        if readable:
            data = os.read(stdin, 65536)
            pending += data
            *lines, pending = pending.split(b"\n")
            if any(line + b"\n" == BYE for line in lines):
                return 0
            told.update(m for m in map(parse_shm, lines) if m is not None)
            if not data:  # EOF: the owner died without saying bye
                killed = kill_snapshot(seen | marked(token), shm | told)
                if killed:
                    print(
                        f"ichat reaper: worker {owner} died; killed {killed}",
                        file=sys.stderr,
                        flush=True,
                    )
                return 0
        now = snapshot(owner) or seen
        # read when the processes change and every SHM_REFRESH_S: a memory map can be
        # large, and an engine makes its files when it starts
        if now != seen or time.monotonic() - shm_read_at > SHM_REFRESH_S:
            shm = record_shm(owner, now) or shm
            shm_read_at = time.monotonic()
        seen = now


class Reaper:
    """The worker's handle on its watcher process."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = secrets.token_hex(16)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ichat.process.reaper",
                str(os.getpid()),
                str(self.interval),
                self.token,
            ],
            stdin=subprocess.PIPE,
            start_new_session=True,  # not in our process group
        )
        os.environ[TOKEN_ENV] = self.token  # inherited by every process started from now on

    def record_shm(self, files: Iterable[shared_memory.Mapped]) -> None:
        """Tell the watcher of ``/dev/shm`` files the engine's processes hold: unlinked
        if the worker dies without a clean stop and no process holds them then."""
        proc = self.proc
        if proc is None or proc.stdin is None:
            return
        lines = b"".join(f"shm {m.inode} {m.path}\n".encode() for m in files)
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.write(lines)
            proc.stdin.flush()

    def stop(self) -> None:
        """A clean stop: the watcher exits without killing anything."""
        proc, self.proc = self.proc, None
        if os.environ.get(TOKEN_ENV) == self.token:
            del os.environ[TOKEN_ENV]
        if proc is None or proc.stdin is None:
            return
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.write(BYE)
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def guarded(interval: float = 0.25) -> Iterator[Reaper]:
    reaper = Reaper(interval)
    reaper.start()
    try:
        yield reaper
    finally:
        reaper.stop()


if __name__ == "__main__":
    raise SystemExit(watch(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]))
