"""End the ZMQ contexts an engine's client leaves behind when it shuts down.

vLLM's and SGLang's in-process clients talk to their engine processes over ZMQ. Their
shutdown leaves the context (SGLang: and its sockets) for the process exit to end: each
one keeps its I/O threads and reaper thread and their epoll/eventfd descriptors
(vLLM: 3 threads and 7 descriptors per engine start; SGLang: 3 threads, 9 descriptors).
Destroying a context also closes the sockets still open in it. A worker that restarts
its engine in-process would pile one up per restart, so the backend ends them after the
engine's own shutdown.

The contexts are found by type among the attributes of the objects the engine built,
not by name, so a release that renames the attribute is still covered. An asyncio
context usually *shadows* a plain one (``zmq.asyncio.Context(sync_ctx)``, as vLLM
does): the plain one owns the libzmq context and is the one terminated; terminating
through the shadow would leave the owner holding a freed handle that its ``__del__``
would terminate again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any

logger = logging.getLogger("ichat.backend")


def find_contexts(*owners: Any) -> list[Any]:
    """The open ``zmq.Context`` objects that own the contexts held by ``owners``'
    attributes, directly or as the context of a socket (SGLang's tokenizer manager keeps
    only its sockets), for a shadow the context it shadows; each once."""
    try:
        import zmq
    except ImportError:
        return []
    found: dict[int, Any] = {}
    for owner in owners:
        for value in getattr(owner, "__dict__", {}).values():
            if isinstance(value, zmq.Socket):
                value = value.context
            if not isinstance(value, zmq.Context):
                continue
            if getattr(value, "_shadow", False):  # pyzmq keeps what it shadows here
                value = getattr(value, "_shadow_obj", None)
                if not isinstance(value, zmq.Context) or getattr(value, "_shadow", False):
                    continue  # the owner cannot be reached: leave it to the process exit
            if not value.closed:
                found.setdefault(id(value), value)
    return list(found.values())


async def end_contexts(contexts: list[Any], timeout: float = 5.0) -> bool:
    """Terminate ``contexts`` (after the engine closed its sockets); bounded.

    Runs in a daemon thread of its own: terminating a context waits for every socket in
    it to close, and a socket the engine left open would block that wait for ever. Such
    a context is abandoned after ``timeout`` (left to the process exit) and False is
    returned; a thread of the loop's default executor would instead hold up the end of
    ``asyncio.run``, which waits for those threads."""
    if not contexts:
        return True
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[BaseException | None] = loop.create_future()

    def report(error: BaseException | None) -> None:
        if not ended.done():
            ended.set_result(error)

    def end_all() -> None:
        error: BaseException | None = None
        for ctx in contexts:  # one that fails does not keep the others open
            try:
                ctx.destroy(linger=0)
            except Exception as exc:
                error = error or exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(report, error)

    threading.Thread(target=end_all, name="ichat-zmq-term", daemon=True).start()
    done, _ = await asyncio.wait({ended}, timeout=timeout)
    if not done:
        logger.warning("the engine's ZMQ context did not end within %.0f s; left open", timeout)
        return False
    if ended.result() is not None:
        logger.warning("ending the engine's ZMQ context failed: %r", ended.result())
        return False
    return True


def shadow_names_its_owner() -> bool:
    """Whether this pyzmq's shadow context names the context it shadows (``_shadow_obj``),
    which :func:`find_contexts` follows to the owner; True without pyzmq (nothing to end)."""
    try:
        import zmq
        import zmq.asyncio
    except ImportError:
        return True
    owner = zmq.Context()
    try:
        shadow = zmq.asyncio.Context(owner)
        return bool(getattr(shadow, "_shadow", False)) and (
            getattr(shadow, "_shadow_obj", None) is owner
        )
    finally:
        owner.term()
