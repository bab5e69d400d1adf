"""``VLLMEngine``: one vLLM engine client of a worker and what belongs to it.

A worker with ``--standby`` holds two: the active engine, whose client the HTTP app
serves, and a standby, started with the same flags and idle (asleep where the platform
allows). Each keeps its own exit stack (the client's shutdown, then its ZMQ contexts'
end), the processes that appeared while it started, and, for a standby, the app state
prepared for it and its Prometheus collectors (see ``VLLMBackend``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import psutil

from ichat.backends import vllm_compat, zmq_context
from ichat.process import processes


@dataclass(eq=False)
class VLLMEngine:
    client: Any
    stack: contextlib.AsyncExitStack
    processes: list[psutil.Process]  # appeared while it started
    watched: list[psutil.Process]  # vLLM's own among them (by their titles)
    zmq_contexts: list[Any]
    state: Any = None  # a standby's app state, prepared while it waits
    collectors: list[Any] | None = None  # a standby's vllm: metrics, served once active
    asleep: bool = False

    @classmethod
    async def launch(
        cls, client_context: contextlib.AbstractAsyncContextManager[Any]
    ) -> VLLMEngine:
        """Enter ``client_context`` (vLLM's engine-client context manager) on a stack of
        the engine's own; note the processes it started."""
        stack = contextlib.AsyncExitStack()
        contexts: list[Any] = []
        # runs after the client's own shutdown (the stack unwinds last-in first-out):
        # vLLM's shutdown closes its sockets but leaves the client's ZMQ context (2 I/O
        # threads, a reaper, 7 descriptors) to the process exit
        stack.push_async_callback(_end_contexts, contexts)
        before = {p.pid for p in processes.children()}
        try:
            client = await stack.enter_async_context(client_context)
        except BaseException:
            await stack.aclose()
            raise
        contexts.extend(vllm_compat.engine_core_contexts(client))
        started = [p for p in processes.children() if p.pid not in before]
        watched = vllm_compat.engine_processes(started, processes.title)
        return cls(client, stack, started, watched, contexts)

    def dead_processes(self) -> list[psutil.Process]:
        return processes.not_running(self.watched)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.watched]


async def _end_contexts(contexts: list[Any]) -> None:
    await zmq_context.end_contexts([c for c in contexts if not c.closed])
