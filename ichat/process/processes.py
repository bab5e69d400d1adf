"""Process-tree helpers: find our children, kill a tree and verify, check a port."""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from typing import Any

import psutil

logger = logging.getLogger("ichat.processes")


def children(pid: int | None = None) -> list[psutil.Process]:
    """Every live descendant of ``pid`` (default: this process)."""
    try:
        found: list[psutil.Process] = psutil.Process(pid or os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return found


def with_descendants(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """``procs`` and everything below them, each once, parents first."""
    seen: dict[int, psutil.Process] = {}
    for proc in procs:
        seen.setdefault(proc.pid, proc)
        try:
            for child in proc.children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    return list(seen.values())


# Python's own helper processes: they ignore SIGTERM, exit by themselves when this
# process exits, and the resource tracker must outlive the engine to unlink what the
# engine leaked (shared memory, semaphores). Never ours to kill.
PYTHON_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


def is_python_helper(proc: psutil.Process) -> bool:
    try:
        cmdline = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any(helper in cmdline for helper in PYTHON_HELPERS)


def not_running(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` that exited (zombies included: they only await reaping)."""
    dead = []
    for proc in procs:
        try:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                dead.append(proc)
        except psutil.NoSuchProcess:
            dead.append(proc)
    return dead


def title(proc: psutil.Process) -> str:
    """Name and command line (where setproctitle names engine processes), or ''."""
    try:
        return f"{proc.name()} {' '.join(proc.cmdline())}"
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def terminate(procs: Iterable[psutil.Process], timeout: float = 5.0) -> list[psutil.Process]:
    """SIGTERM ``procs`` and their descendants, SIGKILL what is left after ``timeout``.

    Python's multiprocessing helpers are left alone (see ``PYTHON_HELPERS``).
    Returns the processes still alive after the kill (should be none).
    """
    targets = [
        p for p in with_descendants(procs) if p.pid != os.getpid() and not is_python_helper(p)
    ]
    if not targets:
        return []
    for proc in targets:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.terminate()
    alive = wait_stopped(targets, timeout)
    for proc in alive:
        logger.warning("process %d did not stop on SIGTERM; killing it", proc.pid)
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill()
    return wait_stopped(alive, timeout)


def kill(procs: Iterable[psutil.Process], timeout: float = 5.0) -> list[psutil.Process]:
    """SIGKILL ``procs`` and their descendants at once (for a process with nothing left
    to finish); return those still alive after ``timeout`` (should be none). Python's
    multiprocessing helpers are left alone, as by ``terminate``."""
    targets = [
        p for p in with_descendants(procs) if p.pid != os.getpid() and not is_python_helper(p)
    ]
    for proc in targets:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            proc.kill()
    return wait_stopped(targets, timeout)


def wait_stopped(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until each of ``procs`` exited; return those still running at ``timeout``.

    A zombie has exited: only its parent can reap it (our own children are reaped
    here), so it is never waited for. Where PID 1 does not reap orphans (some
    containers), waiting for zombies to vanish would stall every stop.
    """
    deadline = time.monotonic() + timeout
    while True:
        stopped = set(not_running(procs))
        running = [p for p in procs if p not in stopped]
        if not running or time.monotonic() >= deadline:
            reap(stopped)
            return running
        time.sleep(0.02)


def reap(procs: Iterable[psutil.Process], timeout: float = 2.0) -> None:
    """Collect the exit status of those of ``procs`` that are our exited children.

    A multi-threaded process shows as a zombie while its other threads still exit;
    waitpid() returns it only after that, so each of ours is waited for briefly.
    A child that ``multiprocessing`` started (vLLM's EngineCore, SGLang's scheduler)
    is joined through it: reaped behind its back, its Process object would count it
    as running for ever and keep it, with its two pipe descriptors, in
    ``multiprocessing``'s table of children (two descriptors a restart).
    """
    me = os.getpid()
    deadline = time.monotonic() + timeout
    # active_children() also joins those of them that already ended
    started_by_multiprocessing = {p.pid: p for p in multiprocessing.active_children()}
    for proc in procs:
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if proc.ppid() == me:
                remaining = max(0.0, deadline - time.monotonic())
                started = started_by_multiprocessing.get(proc.pid)
                if started is not None:
                    started.join(remaining)
                else:
                    proc.wait(timeout=remaining)


def stop_gracefully(proc: subprocess.Popen[Any], timeout: float) -> int:
    """SIGTERM ``proc`` (a child we started), SIGKILL it if it still runs after
    ``timeout`` seconds; return its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("pid %d still runs %.0f s after SIGTERM: killing it", proc.pid, timeout)
            proc.kill()
    return proc.wait()


def port_is_free(host: str, port: int) -> bool:
    """True when nothing listens on ``host:port`` (a bind succeeds)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (for tests and benchmarks)."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` different ports the OS says are free now: all bound at once, so none is
    given twice (two ``free_port()`` in a row can return the same port; seen in CI)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                 for _ in range(count)]  # fmt: skip
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
