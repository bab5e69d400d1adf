"""The record of where a backend reaches into its engine's internals."""

from __future__ import annotations

import asyncio
import logging
from typing import ClassVar

import pytest

from ichat.backends.compat import Workaround, Workarounds
from ichat.config import WorkerConfig
from ichat.process.processes import free_port
from ichat.worker.metrics import exposition
from ichat.worker.status_server import StatusServer
from ichat.worker.supervisor import Supervisor

from .fake_backend import FakeBackend

KNOWN = (
    Workaround("private_cache", "memory grows with each restart"),
    Workaround("process_title", "deaths are noticed in seconds"),
)


def test_a_missing_workaround_is_logged_once_with_what_degrades(
    caplog: pytest.LogCaptureFixture,
) -> None:
    record = Workarounds("engine", KNOWN)
    with caplog.at_level(logging.WARNING, logger="ichat.backend"):
        assert record.record("private_cache", True) is True
        assert record.record("process_title", False) is False
        record.record("process_title", False)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "process_title" in warnings[0] and "deaths are noticed in seconds" in warnings[0]
    assert record.status() == {
        "private_cache": "resolved",
        "process_title": "missing: deaths are noticed in seconds",
    }


def test_an_unknown_workaround_name_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        Workarounds("engine", KNOWN).record("not_listed", True)


class ReachingBackend(FakeBackend):
    WORKAROUNDS: ClassVar[tuple[Workaround, ...]] = KNOWN

    async def start_engine(self, stack):  # type: ignore[no-untyped-def]
        await super().start_engine(stack)
        self.workarounds.record("private_cache", True)
        self.workarounds.record("process_title", False)


def test_status_and_metrics_show_each_workaround_once_a_backend_is_ready() -> None:
    backend = ReachingBackend(WorkerConfig(port=free_port(), health_interval=0.05))
    supervisor = Supervisor(lambda: backend)

    async def main() -> None:
        task = asyncio.create_task(supervisor.run())
        await backend.wait_for_server_ready(timeout=30)
        await asyncio.sleep(0.05)  # the supervisor's on-ready step
        supervisor.request_stop()
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    status = StatusServer(supervisor.stats, "127.0.0.1", 0).answer("/status")[1]
    assert status["workarounds"] == {
        "private_cache": "resolved",
        "process_title": "missing: deaths are noticed in seconds",
    }
    text = exposition(supervisor.stats)[0].decode()
    assert 'ichat_worker_workaround_missing{workaround="process_title"} 1.0' in text
    assert 'ichat_worker_workaround_missing{workaround="private_cache"} 0.0' in text
