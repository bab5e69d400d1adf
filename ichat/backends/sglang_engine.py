"""``SGLangEngine``: one SGLang engine of a worker and what belongs to it.

A worker with ``--standby`` holds two: the active engine, whose tokenizer manager
SGLang's app serves (its module-level ``_global_state``), and a standby, launched with
the same flags in a thread while the active one serves, idle until the active one dies.
On a GPU the standby sleeps: its weights kept in host memory, its GPU memory (weights,
KV cache, CUDA graphs) given back (SGLang's ``release_memory_occupation``) and taken again
at a failover. Each keeps the processes that appeared while it launched (its scheduler(s) and
detokenizer), its own death (an event the requests it served wait on), and an exit
stack: SGLang's app lifespan entered for it when it became active after a failover.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import psutil

from ichat.backends import sglang_compat, zmq_context
from ichat.process import processes


@dataclass(eq=False)
class SGLangEngine:
    launched: sglang_compat.Launched
    args: Any  # its own ServerArgs (SGLang resolves and publishes each once)
    processes: list[psutil.Process]  # appeared while it launched
    # its scheduler(s) and detokenizer (not multiprocessing's helpers): told apart once,
    # not at each of the health monitor's checks
    watched: list[psutil.Process]
    dead: asyncio.Event = field(default_factory=asyncio.Event)
    asleep: bool = False  # a standby's GPU memory released (SGLang's memory saver)
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    @classmethod
    def launch(cls, api: sglang_compat.SGLangServerAPI, args: Any) -> SGLangEngine:
        """SGLang's own launch (blocking: call it in a thread for a standby); the
        processes it started are noted, and killed if it fails."""
        before = {p.pid for p in processes.children()}
        try:
            launched = sglang_compat.launch(api, args)
        except BaseException:
            started = [p for p in processes.children() if p.pid not in before]
            processes.kill(processes.with_descendants(started), 10.0)
            raise
        started = [p for p in processes.children() if p.pid not in before]
        watched = [p for p in started if not processes.is_python_helper(p)]
        return cls(launched, args, started, watched)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.watched]

    def dead_processes(self) -> list[psutil.Process]:
        return processes.not_running(self.watched)

    async def kill(self, deadline: float) -> None:
        """Its processes (and theirs) killed and waited for, in a thread: whatever GPU
        memory they held is free once this returns."""
        procs = processes.with_descendants(self.processes)
        await asyncio.to_thread(processes.kill, procs, deadline)

    async def close(self, deadline: float) -> None:
        """Its tokenizer manager's loops cancelled, its processes killed (nothing of it
        can finish) and waited for in a thread, its ZMQ contexts ended, its lifespan
        left."""
        self.dead.set()
        sglang_compat.cancel_tokenizer_manager_tasks(self.launched)
        await self.kill(deadline)
        await zmq_context.end_contexts(zmq_context.find_contexts(self.launched.tokenizer_manager))
        await self.stack.aclose()
