"""``ReplayOnEngineDeath`` with scripted ASGI apps: what a dying engine failed before the
first byte is run again on the next engine; everything else passes untouched."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ichat.backends.replay import ReplayOnEngineDeath

from .fakes import Engines

CHAT = "/v1/chat/completions"


def json_response(status: int, payload: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"type": "http.response.start", "status": status, "headers": []},
        {"type": "http.response.body", "body": json.dumps(payload).encode()},
    ]


def stream_response(*events: bytes) -> list[dict[str, Any]]:
    start = {"type": "http.response.start", "status": 200, "headers": []}
    bodies = [{"type": "http.response.body", "body": e, "more_body": True} for e in events]
    return [start, *bodies, {"type": "http.response.body", "body": b"", "more_body": False}]


class ScriptedApp:
    """Answers each call with the next script; records the bodies it received."""

    def __init__(self, engines: Engines, scripts: list[tuple[str | None, list[dict[str, Any]]]]):
        self.engines = engines
        self.scripts = scripts
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        self.bodies.append(message["body"])
        kill, messages = self.scripts.pop(0)
        if kill is not None:  # the engine dies; its request fails; another takes over
            self.engines.dead.add(kill)
        for m in messages:
            await send(m)
        if kill is not None:
            self.engines.serving = "e2"


def call(app: Any, path: str = CHAT, method: str = "POST") -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    body = [{"type": "http.request", "body": b'{"x"', "more_body": True},
            {"type": "http.request", "body": b": 1}", "more_body": False}]  # fmt: skip

    async def receive() -> dict[str, Any]:
        if body:
            return body.pop(0)
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path}
    asyncio.run(app(scope, receive, send))
    return sent


def status_and_body(sent: list[dict[str, Any]]) -> tuple[int, bytes]:
    assert sent[0]["type"] == "http.response.start"
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_a_non_streamed_request_the_dying_engine_failed_is_answered_by_the_next() -> None:
    engines = Engines()
    app = ScriptedApp(
        engines,
        [
            ("e1", json_response(500, {"error": {"message": "EngineCore died"}})),
            (None, json_response(200, {"answer": 2})),
        ],
    )
    middleware = ReplayOnEngineDeath(app, engines, wait_for_next_engine=1.0)
    assert status_and_body(call(middleware)) == (200, b'{"answer": 2}')
    assert app.bodies == [b'{"x": 1}', b'{"x": 1}']  # the same body, both times
    assert middleware.replayed == 1


def test_a_stream_whose_first_chunk_is_the_deaths_error_is_run_again() -> None:
    engines = Engines()
    error = b'data: {"error": {"message": "EngineDeadError"}}\n\n'
    app = ScriptedApp(
        engines,
        [
            ("e1", stream_response(error, b"data: [DONE]\n\n")),
            (None, stream_response(b'data: {"choices": []}\n\n', b"data: [DONE]\n\n")),
        ],
    )
    middleware = ReplayOnEngineDeath(app, engines, wait_for_next_engine=1.0)
    status, body = status_and_body(call(middleware))
    assert status == 200
    assert body == b'data: {"choices": []}\n\ndata: [DONE]\n\n'  # nothing of the first


def test_a_failure_of_a_live_engine_passes_through() -> None:
    engines = Engines()
    app = ScriptedApp(engines, [(None, json_response(500, {"error": {"message": "bug"}}))])
    sent = call(ReplayOnEngineDeath(app, engines, wait_for_next_engine=1.0))
    assert status_and_body(sent) == (500, b'{"error": {"message": "bug"}}')
    assert len(app.bodies) == 1


def test_a_stream_that_had_begun_is_not_run_again() -> None:
    engines = Engines()
    error = b'data: {"error": {"message": "EngineDeadError"}}\n\n'
    app = ScriptedApp(engines, [("e1", stream_response(b'data: {"choices": []}\n\n', error))])
    status, body = status_and_body(call(ReplayOnEngineDeath(app, engines)))
    assert status == 200 and body.endswith(error)  # the client saw the start: no replay
    assert len(app.bodies) == 1


def test_no_next_engine_in_time_is_a_clean_503() -> None:
    engines = Engines()

    class DiesAlone(ScriptedApp):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await super().__call__(scope, receive, send)
            engines.serving = "e1"  # nothing took over

    app = DiesAlone(engines, [("e1", json_response(500, {"error": {"message": "dead"}}))])
    middleware = ReplayOnEngineDeath(app, engines, wait_for_next_engine=0.1)
    status, body = status_and_body(call(middleware))
    assert status == 503
    assert json.loads(body)["error"]["code"] == 503


def test_other_routes_are_untouched() -> None:
    engines = Engines()
    app = ScriptedApp(engines, [(None, json_response(200, {"ok": True}))])
    sent = call(ReplayOnEngineDeath(app, engines), path="/v1/models", method="GET")
    assert status_and_body(sent) == (200, b'{"ok": true}')
