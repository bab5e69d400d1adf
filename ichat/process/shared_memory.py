"""POSIX shared memory (``/dev/shm``) that an engine's killed processes leave behind.

vLLM's shutdown SIGKILLs its EngineCore (its default shutdown timeout is 0), and a dead
engine is killed by the worker: neither can unlink the shared memory it created
(multiprocessing's ``psm_*`` segments, ``sem.*`` semaphores). Python's resource tracker
unlinks them only when the worker process exits, so each in-process restart would add
one engine's set to ``/dev/shm`` (vLLM on CPU: two segments of 160 and 240 MiB, sparse,
and a semaphore; memory once written, in a container whose ``/dev/shm`` is often 64 MiB).

The worker records what the engine's processes map while they run and, once they are
gone, unlinks what no process of its own still maps. Nothing else in ``/dev/shm`` is
touched. Files are told by inode as well as by name: glibc's ``sem_open`` creates a
semaphore under a temporary name, maps it, links it to its real name and unlinks the
temporary one, so the process that created a semaphore shows it in its memory map
only as ``/dev/shm/sem.XXXXXX (deleted)`` (vLLM's workers: tqdm's lock, one a start).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.resource_tracker
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import psutil

logger = logging.getLogger("ichat.processes")

SHM_DIR = "/dev/shm/"


class Mapped(NamedTuple):
    """A ``/dev/shm`` file as a memory map shows it (its name when mapped)."""

    inode: int
    path: str

    def names(self, entry: os.DirEntry[str]) -> bool:
        """Whether ``entry`` is this file: the same inode, and the same name, or a
        semaphore mapped under the temporary name ``sem_open`` created it with."""
        if entry.inode() != self.inode:
            return False
        if entry.path == self.path:
            return True
        return self.path.startswith(SEM_PREFIX) and entry.name.startswith("sem.")


SEM_PREFIX = SHM_DIR + "sem."


def mapped(procs: Iterable[psutil.Process]) -> set[Mapped]:
    """The ``/dev/shm`` files that ``procs`` have mapped or open now (a file written
    with plain writes, as SGLang's ``sglang_loads_*``, is open but never mapped)."""
    found: set[Mapped] = set()
    for proc in procs:
        found |= _mapped_by(proc.pid) | _open_in(proc.pid)
    return found


def _mapped_by(pid: int) -> set[Mapped]:
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:  # gone, or not ours to read
        return set()
    found = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(SHM_DIR) and fields[4].isdigit():
            found.add(Mapped(int(fields[4]), fields[5].removesuffix(" (deleted)")))
    return found


def _open_in(pid: int) -> set[Mapped]:
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return set()
    found = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{fd}")
            if target.startswith(SHM_DIR):
                inode = os.stat(f"{fd_dir}/{fd}").st_ino
                found.add(Mapped(inode, target.removesuffix(" (deleted)")))
    return found


def unlink_left_behind(
    recorded: Iterable[Mapped], survivors: Iterable[psutil.Process]
) -> list[str]:
    """Unlink the files of ``/dev/shm`` that are ``recorded`` and that none of
    ``survivors`` maps; return their paths."""
    in_use = {m.inode for m in mapped(survivors)}
    wanted: dict[int, list[Mapped]] = {}
    for m in recorded:
        if m.inode not in in_use:
            wanted.setdefault(m.inode, []).append(m)
    removed = []
    with os.scandir(SHM_DIR) as entries:  # only files directly in /dev/shm
        for entry in sorted(entries, key=lambda e: e.name):
            if not entry.is_file(follow_symlinks=False):
                continue
            if any(m.names(entry) for m in wanted.get(entry.inode(), ())):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.path)
    if removed:
        logger.info("removed shared memory the engine left: %s", ", ".join(removed))
        forget_in_resource_tracker(removed)
    return removed


def tracker_names(paths: Iterable[str]) -> list[tuple[str, str]]:
    """``(name, resource type)`` of those of ``paths`` that multiprocessing created and
    registered with its resource tracker: ``SharedMemory`` segments (``psm_*``) and its
    semaphores (``sem.mp-*``), under the names the tracker knows them by."""
    found = []
    for path in paths:
        name = path.removeprefix(SHM_DIR)
        if name.startswith("psm_"):
            found.append(("/" + name, "shared_memory"))
        elif name.startswith("sem.mp-"):
            found.append(("/" + name.removeprefix("sem."), "semaphore"))
    return found


def forget_in_resource_tracker(removed: Iterable[str]) -> None:
    """Tell this process's resource tracker that ``removed`` are gone: it would
    otherwise try to unlink them again when the worker exits and warn about each
    ("leaked semaphore objects", "No such file or directory"). Only a tracker that
    already runs as this process's child is told (telling would start one)."""
    if not any(_is_resource_tracker(p) for p in psutil.Process().children()):
        return
    for name, rtype in tracker_names(removed):
        multiprocessing.resource_tracker.unregister(name, rtype)


def _is_resource_tracker(proc: psutil.Process) -> bool:
    try:
        return "multiprocessing.resource_tracker" in " ".join(proc.cmdline())
    except psutil.Error:
        return False
