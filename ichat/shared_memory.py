"""POSIX shared memory (``/dev/shm``) that an engine's killed processes leave behind.

vLLM's shutdown SIGKILLs its EngineCore (its default shutdown timeout is 0), and a dead
engine is killed by the worker: neither can unlink the shared memory it created
(multiprocessing's ``psm_*`` segments, ``sem.*`` semaphores). Python's resource tracker
unlinks them only when the worker process exits, so each in-process restart would add
one engine's set to ``/dev/shm`` (vLLM on CPU: two segments of 160 and 240 MiB, sparse,
and a semaphore; memory once written, in a container whose ``/dev/shm`` is often 64 MiB).

The worker records what the engine's processes map while they run and, once they are
gone, unlinks what no process of its own still maps. Nothing else in ``/dev/shm`` is
touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import psutil

logger = logging.getLogger("ichat.processes")

SHM_DIR = "/dev/shm/"


def mapped(procs: Iterable[psutil.Process]) -> set[str]:
    """The ``/dev/shm`` files that ``procs`` have mapped now."""
    found: set[str] = set()
    for proc in procs:
        try:
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
        except OSError:  # gone, or not ours to read
            continue
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith(SHM_DIR):
                found.add(fields[5].removesuffix(" (deleted)"))
    return found


def unlink_left_behind(paths: Iterable[str], survivors: Iterable[psutil.Process]) -> list[str]:
    """Unlink those of ``paths`` that none of ``survivors`` maps; return them."""
    in_use = mapped(survivors)
    removed = []
    for path in sorted(set(paths) - in_use):
        if not path.startswith(SHM_DIR) or "/" in path[len(SHM_DIR) :]:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    if removed:
        logger.info("removed shared memory the engine left: %s", ", ".join(removed))
    return removed
