"""The parts of ``--standby`` that need no engine: vLLM's engine-error handler must not
end the HTTP server while a standby waits to take over."""

from __future__ import annotations

from types import SimpleNamespace

from ichat.backends.vllm_backend import _StopUnlessStandingBy


def test_vllm_cannot_stop_the_server_while_a_standby_waits() -> None:
    server = SimpleNamespace(should_exit=False, force_exit=False, config="cfg")
    standing_by = [True]
    handle = _StopUnlessStandingBy(server, lambda: standing_by[0])
    handle.should_exit = True  # what vLLM's handler does when it sees the engine dead
    assert server.should_exit is False
    assert handle.config == "cfg"  # everything else is the server's
    handle.force_exit = True
    assert server.force_exit is True
    standing_by[0] = False  # no standby (none asked for, or it is still starting)
    handle.should_exit = True
    assert server.should_exit is True
    assert handle.should_exit is True
