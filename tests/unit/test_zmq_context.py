"""Ending the ZMQ context an engine client leaves behind (real pyzmq, no engine)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from ichat.backends.zmq_context import end_contexts, find_contexts

zmq = pytest.importorskip("zmq")
zmq_asyncio = pytest.importorskip("zmq.asyncio")


def zmq_threads() -> int:
    """This process's ZMQ threads (libzmq names them ZMQbg/...)."""
    names = (p.read_text() for p in Path("/proc/self/task").glob("*/comm"))
    return sum(name.startswith("ZMQbg") for name in names)


def wait_for_zmq_threads(count: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while zmq_threads() != count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def client_like_vllm() -> tuple[SimpleNamespace, object]:
    """What vLLM's engine-core client holds: an asyncio context shadowing a plain one."""
    sync_ctx = zmq.Context(io_threads=2)
    return SimpleNamespace(ctx=zmq_asyncio.Context(sync_ctx), other=object()), sync_ctx


def test_the_context_a_shadow_stands_for_is_found_once() -> None:
    core, sync_ctx = client_like_vllm()
    core.same = core.ctx  # held twice: ended once
    try:
        assert find_contexts(core, None) == [sync_ctx]
    finally:
        sync_ctx.destroy(linger=0)
    assert find_contexts(core) == []  # closed: nothing left to end


def test_ending_stops_the_threads_a_client_left_after_closing_its_sockets() -> None:
    before = zmq_threads()
    core, sync_ctx = client_like_vllm()
    sock = core.ctx.socket(zmq.PULL)
    sock.bind("inproc://engine-outputs")
    assert wait_for_zmq_threads(before + 3)  # 2 I/O threads and the reaper (named as they start)
    sock.close(linger=0)  # what the engine's own shutdown does

    assert asyncio.run(end_contexts(find_contexts(core))) is True

    assert sync_ctx.closed
    assert wait_for_zmq_threads(before)


def test_a_socket_left_open_cannot_hang_the_stop() -> None:
    core, sync_ctx = client_like_vllm()
    sock = core.ctx.socket(zmq.PULL)  # never closed by the "engine"
    t0 = time.monotonic()
    assert asyncio.run(end_contexts(find_contexts(core), timeout=0.3)) is False
    assert time.monotonic() - t0 < 2
    sock.close(linger=0)  # lets the abandoned termination finish
    deadline = time.monotonic() + 5
    while not sync_ctx.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sync_ctx.closed


def test_a_context_that_fails_to_end_does_not_keep_the_others_open() -> None:
    class Failing:
        def destroy(self, linger: int) -> None:
            raise RuntimeError("destroy failed")

    _, sync_ctx = client_like_vllm()
    assert asyncio.run(end_contexts([Failing(), sync_ctx])) is False  # the failure is told
    assert sync_ctx.closed


def test_a_context_held_only_through_its_sockets_is_found_and_its_sockets_closed() -> None:
    """SGLang's tokenizer manager keeps its sockets, not its context (an asyncio one)."""
    ctx = zmq_asyncio.Context(2)
    manager = SimpleNamespace(recv=ctx.socket(zmq.PULL), send=ctx.socket(zmq.PUSH))
    manager.recv.bind("inproc://detokenizer")
    assert find_contexts(manager) == [ctx]
    assert asyncio.run(end_contexts(find_contexts(manager))) is True
    assert ctx.closed and manager.recv.closed and manager.send.closed
