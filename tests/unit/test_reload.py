"""Reload without a real engine: the app switch, the status port's ``POST /reload``
(its key, its body), ``ichat reload`` against it, the masked flags, and the gateway
registration following a new served model name."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from ichat.backends.app_switch import AppSwitch, InstalledApp
from ichat.commands import reload as reload_command
from ichat.process.processes import free_port
from ichat.worker.secrets import masked_argv
from ichat.worker.status_server import ReloadRequest, StatusServer
from ichat.worker.supervisor import WorkerStats
from tests.unit.test_registration import Gateway, scenario

# ------------------------------------------------------------------ the app switch


class Router:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    @contextlib.asynccontextmanager
    async def lifespan_context(self, app: Any) -> AsyncIterator[None]:
        self.log.append(f"{self.name} lifespan start")
        yield
        self.log.append(f"{self.name} lifespan end")


class EngineApp:
    """An ASGI app whose requests wait until released; its router has a lifespan."""

    def __init__(self, log: list[str], name: str) -> None:
        self.router = Router(log, name)
        self.name = name
        self.release = asyncio.Event()
        self.served: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.served.append(scope["path"])
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": self.name.encode()})


def test_the_switch_sends_new_requests_to_the_new_app_and_old_ones_finish_in_the_old() -> None:
    log: list[str] = []

    async def main() -> None:
        old_app, new_app = EngineApp(log, "old"), EngineApp(log, "new")
        old, new = InstalledApp(old_app, old_app), InstalledApp(new_app, new_app)
        await old.start_lifespan()
        switch = AppSwitch(old)
        transport = httpx.ASGITransport(app=switch)
        async with httpx.AsyncClient(transport=transport, base_url="http://w") as client:
            first = asyncio.create_task(client.get("/before"))
            while old.in_flight == 0:
                await asyncio.sleep(0)
            await new.start_lifespan()
            assert switch.switch_to(new) is old
            new_app.release.set()
            assert (await client.get("/after")).text == "new"
            assert not await old.idle(0.05)  # its request is still running
            old_app.release.set()
            assert (await first).text == "old"
            assert await old.idle(1) and old.in_flight == 0
            await old.end_lifespan()
        assert old_app.served == ["/before"] and new_app.served == ["/after"]

    asyncio.run(main())
    assert log == ["old lifespan start", "new lifespan start", "old lifespan end"]


def test_the_switch_answers_the_servers_lifespan_itself() -> None:
    log: list[str] = []
    app = EngineApp(log, "only")
    switch = AppSwitch(InstalledApp(app, app))
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[str] = []

    async def receive() -> dict[str, str]:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message["type"])

    asyncio.run(switch({"type": "lifespan"}, receive, send))
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert log == []  # the app's own lifespan is the backend's to run


# ------------------------------------------------------------- the masked flags


def test_secret_flags_are_masked_and_others_shown() -> None:
    argv = [
        "--model", "m", "--api-key", "k1", "k2", "--hf-token=t", "--max-num-batched-tokens",
        "512", "--ssl-keyfile", "/k.pem", "--admin-key", "a",
    ]  # fmt: skip
    assert masked_argv(argv) == [
        "--model", "m", "--api-key", "***", "***", "--hf-token=***", "--max-num-batched-tokens",
        "512", "--ssl-keyfile", "/k.pem", "--admin-key", "***",
    ]  # fmt: skip


# ---------------------------------------------------- POST /reload and the command


@pytest.fixture
def status() -> Iterator[tuple[StatusServer, list[tuple[list[str], bool, str]]]]:
    """A status server whose reloads are recorded; "--fail" fails, "--bad" is refused."""
    calls: list[tuple[list[str], bool, str]] = []

    def reload(request: ReloadRequest) -> tuple[int, dict[str, object]]:
        argv = request.argv or []
        calls.append((argv, request.merge, request.method.value))
        if "--bad" in argv:
            return 400, {"outcome": "failed", "error": "invalid vLLM arguments: --bad"}
        if "--fail" in argv:
            return 500, {"outcome": "failed", "error": "the new engine did not start (x)"}
        return 200, {"outcome": "ok", "phases": {"reload": 1.5}, "served_model_names": ["m"]}

    server = StatusServer(WorkerStats(), "127.0.0.1", free_port(), admin_key="sekret")
    server.reload = reload
    server.start()
    try:
        yield server, calls
    finally:
        server.stop()


def test_reload_needs_the_admin_key(status: tuple[StatusServer, list[Any]]) -> None:
    server, calls = status
    url = f"http://127.0.0.1:{server.port}/reload"
    body = {"engine_args": ["--model", "m"]}
    assert httpx.post(url, json=body).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(url, json=body, headers=wrong).status_code == 401
    assert calls == []  # nothing changed
    right = {"Authorization": "Bearer sekret"}
    reply = httpx.post(url, json=body, headers=right, timeout=5)
    assert reply.status_code == 200 and reply.json()["outcome"] == "ok"
    assert calls == [(["--model", "m"], False, "auto")]


def test_a_malformed_reload_body_is_refused(status: tuple[StatusServer, list[Any]]) -> None:
    server, calls = status
    url = f"http://127.0.0.1:{server.port}/reload"
    headers = {"Authorization": "Bearer sekret"}
    bodies = (b"not json", b'{"engine_args": "--model m"}', b"[1]",
              b'{"engine_args": [], "method": "sideways"}')  # fmt: skip
    for body in bodies:
        reply = httpx.post(url, content=body, headers=headers)
        assert reply.status_code == 400
        why = ("engine_args", "not JSON", "a JSON object", "in_place")
        assert any(reason in reply.text for reason in why), reply.text
    assert calls == []


def test_without_an_admin_key_reload_is_off() -> None:
    server = StatusServer(WorkerStats(), "127.0.0.1", free_port())
    code, answer = server.post("/reload", "Bearer anything", b'{"engine_args": []}')
    assert code == 403 and "--admin-key" in str(answer["error"])


def test_the_command_reports_success_refusal_and_failure_by_exit_code(
    status: tuple[StatusServer, list[Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    server, calls = status
    url = f"http://127.0.0.1:{server.port}"
    assert reload_command.main([url, "--api-key", "sekret", "--", "--model", "m"]) == 0
    assert reload_command.main([url, "--api-key", "sekret", "--merge", "--in-place"]) == 0
    assert reload_command.main([url, "--api-key", "sekret", "--", "--bad"]) == 2
    assert reload_command.main([url, "--api-key", "sekret", "--", "--fail"]) == 8
    assert reload_command.main([url, "--api-key", "wrong", "--", "--model", "m"]) == 2
    assert calls == [
        (["--model", "m"], False, "auto"),
        ([], True, "in_place"),
        (["--bad"], False, "auto"),
        (["--fail"], False, "auto"),
    ]
    err = capsys.readouterr().err
    assert "HTTP 500: the new engine did not start (x)" in err
    assert "HTTP 401" in err


def test_the_command_says_when_the_worker_cannot_be_reached(
    capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert reload_command.main([url, "--api-key", "k", "--", "--model", "m"]) == 1
    assert "cannot be reached" in capsys.readouterr().err


def test_a_roll_stops_at_the_first_worker_that_fails_and_says_which_ran_what(
    status: tuple[StatusServer, list[Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    server, calls = status
    ok, gone = f"http://127.0.0.1:{server.port}", f"http://127.0.0.1:{free_port()}"
    args = [ok, gone, ok, "--api-key", "sekret", "--", "--model", "m"]
    assert reload_command.main(args) == 1
    assert calls == [(["--model", "m"], False, "auto")]  # the third never reached
    out, err = capsys.readouterr()
    assert '"outcome"' in out  # the first worker's answer
    assert f"the roll stopped at {gone}; reloaded: ['{ok}']" in err


def test_the_command_needs_the_engine_flags_after_a_double_dash() -> None:
    with pytest.raises(SystemExit) as exited:
        reload_command.main(["http://127.0.0.1:1", "--model", "m"])
    assert exited.value.code == 2


def test_a_reload_request_blocks_only_its_own_thread(
    status: tuple[StatusServer, list[Any]],
) -> None:
    """Probes answer while a reload (minutes on a real engine) is in progress."""
    server, _ = status
    started, release = threading.Event(), threading.Event()
    slow = server.reload
    assert slow is not None

    def blocking(request: ReloadRequest) -> tuple[int, dict[str, object]]:
        started.set()
        release.wait(10)
        return slow(request)

    server.reload = blocking
    base = f"http://127.0.0.1:{server.port}"
    headers = {"Authorization": "Bearer sekret"}
    reloading = threading.Thread(
        target=httpx.post,
        args=(f"{base}/reload",),
        kwargs={"json": {"engine_args": []}, "headers": headers, "timeout": 10},
    )
    reloading.start()
    assert started.wait(5)
    assert httpx.get(f"{base}/livez", timeout=2).status_code == 200
    release.set()
    reloading.join(10)


# --------------------------------------------------------- the gateway follows


def test_a_new_served_model_name_is_registered_in_place_of_the_old() -> None:
    async def steps(reg: Any, gw: Gateway) -> None:
        reg.join()
        assert await reg.wait_settled(1)
        reg.serve_model("tiny-v2")
        assert await reg.wait_settled(1)
        reg.serve_model("tiny-v2")  # the same name again: nothing to do

    reg, gw, _ = scenario(steps)
    assert [w["models"] for w in gw.workers.values()] == [[{"id": "tiny-v2"}]]
    posts_and_deletes = [c for c in gw.calls if not c.startswith("GET")]
    assert len(posts_and_deletes) == 3 and posts_and_deletes[1].startswith("DELETE")
    assert reg.joins == 2 and reg.leaves == 1


def test_a_rename_while_out_of_the_gateway_registers_the_new_name_at_the_next_join() -> None:
    async def steps(reg: Any, gw: Gateway) -> None:
        reg.serve_model("tiny-v2")
        reg.join()
        assert await reg.wait_settled(1)

    _, gw, _ = scenario(steps)
    assert [w["models"] for w in gw.workers.values()] == [[{"id": "tiny-v2"}]]
    assert not any(c.startswith("DELETE") for c in gw.calls)


def test_an_engine_without_reload_refuses_it_clearly() -> None:
    from ichat.config import WorkerConfig
    from ichat.errors import ReloadError
    from tests.unit.fake_backend import FakeBackend

    backend = FakeBackend(WorkerConfig())
    with pytest.raises(ReloadError, match="not available with the fake engine") as raised:
        asyncio.run(backend.reload(["--model", "m"]))
    assert raised.value.status == 501


def test_settings_alone_are_sent_without_engine_flags() -> None:
    seen: list[ReloadRequest] = []

    def reload(request: ReloadRequest) -> tuple[int, dict[str, object]]:
        seen.append(request)
        return 200, {"outcome": "ok", "method": "settings"}

    server = StatusServer(WorkerStats(), "127.0.0.1", free_port(), admin_key="k")
    server.reload = reload
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}"
        args = [url, "--api-key", "k", "--drain-timeout", "60", "--log-level", "debug"]
        assert reload_command.main(args) == 0
    finally:
        server.stop()
    [request] = seen
    assert request.argv is None and not request.merge
    assert request.settings == {"drain_timeout": 60.0, "log_level": "debug"}
