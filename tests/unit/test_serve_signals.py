from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from ichat.backends.base_backend import BackendState
from ichat.config import WorkerConfig
from ichat.errors import EngineDiedError, IChatError
from ichat.process.processes import free_port
from ichat.worker.supervisor import Supervisor
from ichat.worker.worker import Worker

from .fake_backend import FakeBackend


def test_sigterm_stops_the_worker_and_restores_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    backend = FakeBackend(WorkerConfig(port=free_port(), health_interval=0.05))

    async def main() -> None:
        task = asyncio.create_task(Worker(Supervisor(lambda: backend)).serve())
        await backend.wait_for_server_ready(timeout=30)
        os.kill(os.getpid(), signal.SIGTERM)  # recorded by the handler, acted on by the loop
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert backend.state is BackendState.STOPPED
    assert signal.getsignal(signal.SIGTERM) is before


def test_engine_death_propagates_out_of_serve_without_restart() -> None:
    backend = FakeBackend(WorkerConfig(port=free_port(), health_interval=0.05))

    async def main() -> None:
        task = asyncio.create_task(Worker(Supervisor(lambda: backend, restart=False)).serve())
        await backend.wait_for_server_ready(timeout=30)
        backend.dead = True
        await asyncio.wait_for(task, 10)

    with pytest.raises(EngineDiedError) as info:
        asyncio.run(main())
    assert info.value.exit_code == 4


def test_exit_codes_are_distinct_per_error_kind() -> None:
    from ichat.errors import ConfigError, StartupError

    codes = [
        IChatError.exit_code,
        ConfigError.exit_code,
        StartupError.exit_code,
        EngineDiedError.exit_code,
    ]
    assert codes == [1, 2, 3, 4]


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    code = (
        "import sys, ichat.cli; rc = ichat.cli.main(sys.argv[1:]); "
        "assert not [m for m in sys.modules if m.split('.')[0] in ('vllm', 'sglang', "
        "'torch')], 'an engine was imported'; sys.exit(rc)"
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )
    return proc, time.monotonic() - t0


def test_ichat_help_imports_no_engine_and_is_fast() -> None:
    proc, seconds = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    assert "serve" in proc.stdout and "make-test-model" in proc.stdout
    assert seconds < 5  # a fresh interpreter; measured ~0.1 s


def test_serve_help_without_backend_lists_framework_flags_only() -> None:
    proc, seconds = run_cli("serve", "--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--backend", "--host", "--port", "--drain-timeout", "--ready-timeout"):
        assert flag in proc.stdout
    assert seconds < 5


def test_unknown_backend_is_a_usage_error() -> None:
    proc, _ = run_cli("serve", "--backend", "nonexistent")
    assert proc.returncode == 2 and "invalid choice: 'nonexistent'" in proc.stderr


def test_unknown_command_is_a_usage_error() -> None:
    proc, _ = run_cli("frobnicate")
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr


def test_first_signal_returns_the_signal_or_what_the_check_raises() -> None:
    import asyncio
    import signal

    from ichat.process.signals import first_signal

    async def main() -> None:
        received: asyncio.Queue[signal.Signals] = asyncio.Queue()
        received.put_nowait(signal.SIGTERM)
        assert await first_signal(received, lambda: None, poll=0.01) is signal.SIGTERM
        checks: list[int] = []

        def child_exits_on_third_check() -> None:
            checks.append(1)
            if len(checks) == 3:
                raise RuntimeError("child exited")

        try:
            await first_signal(received, child_exits_on_third_check, poll=0.01)
        except RuntimeError as exc:
            assert str(exc) == "child exited" and len(checks) == 3
        else:
            raise AssertionError("the check's exception did not end the wait")

    asyncio.run(main())


def test_a_second_signal_forces_the_stop() -> None:
    class Recording:
        def __init__(self) -> None:
            self.calls: list[bool] = []

        def request_stop(self, *, force: bool = False) -> None:
            self.calls.append(force)

    supervisor = Recording()
    worker = Worker(supervisor)  # type: ignore[arg-type]
    worker.handle_signal(signal.SIGTERM)
    assert (worker.should_exit, worker.force_exit, supervisor.calls) == (True, False, [])
    worker.handle_signal(signal.SIGINT)
    assert (worker.force_exit, supervisor.calls) == (True, [True])


def test_the_worker_leaves_the_gateway_before_it_drains() -> None:
    order: list[str] = []

    class Membership:
        def leave(self) -> None:
            order.append("leave")

        def join(self) -> None:
            order.append("join")

        async def wait_settled(self, timeout: float) -> bool:
            order.append("settled")
            return True

        async def run(self) -> None:
            await asyncio.Event().wait()

    backend = FakeBackend(WorkerConfig(port=free_port(), health_interval=0.05))
    original_stop = backend.request_stop

    def request_stop(*, force: bool = False) -> None:
        order.append("drain")
        original_stop(force=force)

    backend.request_stop = request_stop  # type: ignore[method-assign]
    membership = Membership()
    supervisor = Supervisor(lambda: backend, membership=membership)

    async def main() -> None:
        worker = Worker(supervisor, registration=membership)  # type: ignore[arg-type]
        task = asyncio.create_task(worker.serve())
        await backend.wait_for_server_ready(timeout=30)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert order.index("settled") < order.index("drain")
    assert order[order.index("join") :].count("leave") >= 1


FORK_AND_SIGTERM_THE_CHILD = """
import asyncio, os, signal, sys
from ichat.process.signals import forked_children_drop_our_handlers

async def main():
    got = []
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, got.append, "SIGTERM")
    if sys.argv[1] == "hook":
        forked_children_drop_our_handlers()
    pid = os.fork()
    if pid == 0:  # an engine process forked from the worker, sent SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)
        os._exit(0)  # only when SIGTERM did not end it
    _, status = os.waitpid(pid, 0)
    await asyncio.sleep(0.5)  # a signal byte in the shared wakeup socket arrives by then
    print(os.waitstatus_to_exitcode(status), got)

asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("hook", "-15 []"),  # the child dies of its SIGTERM; the worker hears nothing
        ("none", "0 ['SIGTERM']"),  # without it: the worker takes the child's SIGTERM
    ],
)
def test_a_forked_engine_process_does_not_pass_its_sigterm_to_the_worker(
    mode: str, expected: str
) -> None:
    out = subprocess.run(
        [sys.executable, "-c", FORK_AND_SIGTERM_THE_CHILD, mode],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == expected, out
