from __future__ import annotations

import asyncio
import gc
import socket
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import psutil
import pytest

from ichat.backends.base_backend import BackendState, freeze_before_fork, release_frozen_heap
from ichat.config import WorkerConfig
from ichat.errors import EngineDiedError, PortInUseError, ReadinessTimeoutError, StartupError
from ichat.process.processes import free_port, port_is_free

from .fake_backend import FakeBackend


def config(**kw: Any) -> WorkerConfig:
    base = dict(port=free_port(), health_interval=0.05, drain_timeout=5.0)
    base.update(kw)
    return WorkerConfig(**base)  # type: ignore[arg-type]


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


def assert_all_released(backend: FakeBackend) -> None:
    assert backend.child is not None
    assert backend.child.poll() is not None, "engine child still running"
    assert (
        not psutil.pid_exists(backend.child.pid)
        or psutil.Process(backend.child.pid).status() == psutil.STATUS_ZOMBIE
    )
    assert port_is_free("127.0.0.1", backend.framework_args.port)


def test_ready_serves_and_stops_cleanly() -> None:
    backend = FakeBackend(config())

    async def main() -> None:
        task = asyncio.create_task(backend.run())
        await backend.wait_for_server_ready(timeout=30)
        assert backend.state is BackendState.READY and backend.warmups == 1
        assert backend.get_backend_args() == {"argv": ["--fake-flag", "1"]}
        async with httpx.AsyncClient(base_url=backend.framework_args.base_url) as client:
            assert (await client.get("/health")).status_code == 200
        backend.request_stop()
        await asyncio.wait_for(task, 10)

    run(main)
    assert backend.state is BackendState.STOPPED and backend.failure is None
    assert_all_released(backend)
    backend.cleanup()  # idempotent
    backend.cleanup()


def test_cleanup_before_any_start_is_safe() -> None:
    backend = FakeBackend(config())
    backend.cleanup()
    backend.cleanup()
    assert backend.child is None


def test_engine_death_after_ready_ends_run_fast_and_kills_children() -> None:
    backend = FakeBackend(config(), engine_exits_cleanly=False)

    async def main() -> None:
        task = asyncio.create_task(backend.run())
        await backend.wait_for_server_ready(timeout=30)
        backend.dead = True
        t0 = time.monotonic()
        with pytest.raises(EngineDiedError, match="fake engine died"):
            await asyncio.wait_for(task, 10)
        assert backend.monitor is not None and backend.monitor.detected_at is not None
        assert backend.monitor.detected_at - t0 < 0.5

    run(main)
    assert backend.state is BackendState.FAILED
    assert_all_released(backend)


def test_failed_start_is_a_startup_error_and_wait_raises_at_once() -> None:
    backend = FakeBackend(config(), fail_start=True, engine_exits_cleanly=False)

    async def main() -> None:
        task = asyncio.create_task(backend.run())
        t0 = time.monotonic()
        with pytest.raises(StartupError, match="stopped before it became ready"):
            await backend.wait_for_server_ready(timeout=60)
        assert time.monotonic() - t0 < 10
        with pytest.raises(StartupError, match="model cannot load"):
            await task

    run(main)
    assert_all_released(backend)


def test_port_in_use_is_found_before_the_engine_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        backend = FakeBackend(config(port=taken.getsockname()[1]))
        with pytest.raises(PortInUseError, match="already in use"):
            run(backend.run)
    assert not backend.started_engine


def test_never_healthy_times_out_naming_the_timeout() -> None:
    backend = FakeBackend(config(ready_timeout=0.5), healthy=False)
    with pytest.raises(ReadinessTimeoutError, match=r"0\.5 s"):
        run(backend.run)
    assert_all_released(backend)


def test_the_engines_start_counts_towards_the_readiness_timeout() -> None:
    class SlowStart(FakeBackend):
        async def start_engine(self, stack: Any) -> None:
            await super().start_engine(stack)
            time.sleep(0.6)  # an engine start that blocks the loop, as vLLM's does

    backend = SlowStart(config(ready_timeout=0.5))  # healthy at once once started
    with pytest.raises(ReadinessTimeoutError, match=r"0\.5 s \(--ready-timeout\): its start"):
        run(backend.run)
    assert_all_released(backend)


def test_stop_during_start_up_returns_and_leaves_nothing() -> None:
    backend = FakeBackend(config(), hang_start=True, engine_exits_cleanly=False)

    async def main() -> None:
        task = asyncio.create_task(backend.run())
        while not backend.started_engine:
            await asyncio.sleep(0.01)
        backend.request_stop()
        await asyncio.wait_for(task, 10)

    run(main)
    assert backend.state is BackendState.STOPPED
    assert_all_released(backend)


def test_in_flight_request_finishes_during_a_graceful_stop() -> None:
    backend = FakeBackend(config())

    async def main() -> None:
        task = asyncio.create_task(backend.run())
        await backend.wait_for_server_ready(timeout=30)
        async with httpx.AsyncClient(base_url=backend.framework_args.base_url) as client:
            slow = asyncio.create_task(client.get("/slow"))
            await asyncio.sleep(0.2)
            backend.request_stop()
            response = await slow
        assert response.status_code == 200 and response.text == "/slow"
        await asyncio.wait_for(task, 10)

    run(main)
    assert_all_released(backend)


def test_a_backend_runs_once() -> None:
    backend = FakeBackend(config())

    async def main() -> None:
        task = asyncio.create_task(backend.run())
        await backend.wait_for_server_ready(timeout=30)
        backend.request_stop()
        await task
        with pytest.raises(RuntimeError, match="runs once"):
            await backend.run()

    run(main)


class Engine:
    """Stands for what an engine builds at start: objects in reference cycles."""

    def __init__(self) -> None:
        self.me = self


def test_what_a_stopped_engine_left_frozen_is_collectable_before_another_start() -> None:
    # vLLM's app start calls gc.freeze(): the engine's cycles go to the permanent
    # generation, which the collector never visits, and would outlive the engine.
    # The backend's stop leaves them (after the last stop the process exits, faster
    # with a frozen heap); whoever starts another engine unfreezes them first, and the
    # next full collection (the next app start's own) takes them.
    engines: list[weakref.ref[Engine]] = []

    class FreezingBackend(FakeBackend):
        async def build_app(self) -> Any:
            engines.append(weakref.ref(Engine()))  # garbage once unreferenced: a cycle
            gc.freeze()
            return await super().build_app()

    backend = FreezingBackend(config())

    async def main() -> None:
        task = asyncio.create_task(backend.run())
        await backend.wait_for_server_ready(timeout=30)
        backend.request_stop()
        await asyncio.wait_for(task, 10)

    try:
        run(main)
        gc.collect()
        assert engines and engines[0]() is not None  # frozen: out of the collector's reach
        release_frozen_heap()
        assert gc.get_freeze_count() == 0
        gc.collect()
        assert engines[0]() is None
    finally:
        gc.unfreeze()


def test_what_is_alive_before_an_engine_is_forked_is_out_of_the_collectors_walk() -> None:
    # an engine process forked next inherits the frozen heap: its own full
    # collections (vLLM runs about eight while it starts) walk only what it makes;
    # garbage is collected first, not frozen with it
    heap = [[i] for i in range(100_000)]  # the worker's objects, each tracked
    dead = weakref.ref(Engine())  # garbage in a cycle
    try:
        before = len(gc.get_objects())
        freeze_before_fork()
        assert dead() is None
        assert len(gc.get_objects()) < before - len(heap)  # frozen: not walked
        assert gc.get_freeze_count() >= len(heap)
        release_frozen_heap()  # the engine stopped: all back to the collector
        assert gc.get_freeze_count() == 0
        assert len(gc.get_objects()) >= len(heap)
    finally:
        gc.unfreeze()


def test_the_drain_phase_counts_from_the_stop_request() -> None:
    backend = FakeBackend(config())

    async def main() -> None:
        task = asyncio.create_task(backend.run())
        await backend.wait_for_server_ready(timeout=30)
        async with httpx.AsyncClient(base_url=backend.framework_args.base_url) as client:
            slow = asyncio.ensure_future(client.get("/slow"))  # answers after 1 s
            await asyncio.sleep(0.2)
            backend.request_stop()  # the server drains from here, before _shutdown runs
            assert (await slow).status_code == 200
        await asyncio.wait_for(task, 10)

    run(main)
    assert backend.phase_seconds["drain"] >= 0.5  # the in-flight request's last 0.8 s


class AbortingBackend(FakeBackend):
    """Records when the engine is told to abort what is in flight."""

    aborted_after: float | None = None

    async def abort_requests(self) -> None:
        assert self._stop_requested_at is not None
        self.aborted_after = time.monotonic() - self._stop_requested_at


def test_requests_still_in_flight_at_the_drain_timeout_are_aborted_in_the_engine() -> None:
    backend = AbortingBackend(config(drain_timeout=0.3))

    async def main() -> None:
        task = asyncio.create_task(backend.run())
        await backend.wait_for_server_ready(timeout=30)
        async with httpx.AsyncClient(base_url=backend.framework_args.base_url) as client:
            slow = asyncio.ensure_future(client.get("/slow"))  # answers after 1 s
            await asyncio.sleep(0.1)
            backend.request_stop()
            await slow
        await asyncio.wait_for(task, 10)

    run(main)
    assert backend.aborted_after is not None and backend.aborted_after >= 0.3


def test_a_drain_that_ends_in_time_aborts_nothing() -> None:
    backend = AbortingBackend(config(drain_timeout=0.3))

    async def main() -> None:
        task = asyncio.create_task(backend.run())
        await backend.wait_for_server_ready(timeout=30)
        backend.request_stop()
        await asyncio.wait_for(task, 10)
        await asyncio.sleep(0.5)  # past the drain timeout

    run(main)
    assert backend.aborted_after is None
