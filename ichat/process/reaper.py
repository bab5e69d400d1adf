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
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import subprocess
import sys
from collections.abc import Iterator

import psutil

from ichat.process import shared_memory
from ichat.process.processes import is_python_helper, wait_stopped

BYE = b"bye\n"
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


def kill_snapshot(seen: dict[int, float]) -> list[int]:
    """SIGKILL every process of ``seen`` still alive (same create time) and its tree,
    then unlink the ``/dev/shm`` files they mapped that no process maps any more.

    Python's multiprocessing helpers are spared: a worker's resource tracker, once every
    holder of its pipe is dead, unlinks the segments and semaphores registered with it
    (those of a worker that died with nothing else mapping them). Files not registered
    there (SGLang's ``sglang_loads_*``) are unlinked here."""
    targets: dict[int, psutil.Process] = {}
    for pid, created in seen.items():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                targets[pid] = proc
                targets.update(
                    (c.pid, c) for c in proc.children(recursive=True) if not is_python_helper(c)
                )
    mapped = shared_memory.mapped(targets.values())  # while they still map them
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


def watch(owner: int, interval: float, token: str) -> int:
    """The watcher's loop: returns once the owner said bye or died."""
    seen: dict[int, float] = {}
    stdin = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([stdin], [], [], interval)
        if readable:
            data = os.read(stdin, 64)
            if data.startswith(BYE):
                return 0
            if not data:  # EOF: the owner died without saying bye
                killed = kill_snapshot(seen | marked(token))
                if killed:
                    print(
                        f"ichat reaper: worker {owner} died; killed {killed}",
                        file=sys.stderr,
                        flush=True,
                    )
                return 0
        seen = snapshot(owner) or seen


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
