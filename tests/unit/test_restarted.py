"""Neither a standby nor a gateway, continuation on: what the dying engine cut waits for
this worker's next engine on its own port (scripted: httpx's mock transport answers
for the worker's URL) -- a stream under way is continued there once ``/health`` answers
200, kept alive by SSE comments meanwhile; a request with no byte sent runs there
again; a restart that does not come within the timeout ends them cleanly."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from ichat.backends.elsewhere import ThisWorkerAgain
from ichat.backends.replay import ReplayOnEngineDeath

from .fakes import Engines
from .test_continuation import CHAT, PROMPT, Engine, call, chat_chunk, sse
from .test_elsewhere import completion

OWN = "http://127.0.0.1:8000"


class Restarting:
    """The worker's port: ``/health`` 503 ``down`` times (the engine restarting), then
    200; each POST answered with the next scripted body."""

    def __init__(self, down: int, *answers: list[bytes]) -> None:
        self.down = down
        self.answers = list(answers)
        self.posts: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            self.down -= 1
            return httpx.Response(503 if self.down >= 0 else 200)
        self.posts.append(request)
        chunks = self.answers.pop(0)

        async def body() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return httpx.Response(200, headers={"content-type": "text/event-stream"},
                              content=body())  # fmt: skip


def with_a_restart(engine: Engine, engines: Engines, port: Restarting, timeout: float = 10):
    return ReplayOnEngineDeath(
        engine,
        engines,
        wait_for_next_engine=timeout,
        continuation_limit=2,
        max_model_len=lambda: 100,
        restarted=ThisWorkerAgain(OWN, "sk-engine", httpx.MockTransport(port.handle)),
        takes_over_here=lambda: False,  # no standby: the engine is dead for good
    )


STREAM = {"model": "m", "messages": [], "stream": True, "max_tokens": 4, "temperature": 0}


def test_a_cut_stream_is_continued_on_the_restarted_engine_once_it_serves() -> None:
    engines = Engines()
    first = [chat_chunk(None, prompt_token_ids=PROMPT), chat_chunk([10]), chat_chunk([11])]
    engine = Engine(engines, [(first, 3)], takeover=3600)
    port = Restarting(2, [completion([12]), completion([13], "length"), sse("[DONE]")])
    events = call(with_a_restart(engine, engines, port), CHAT, STREAM)

    [post] = port.posts
    assert str(post.url) == f"{OWN}/generate"  # as to another worker: token ids, marked
    assert post.headers["authorization"] == "Bearer sk-engine"
    carried = json.loads(post.content)
    assert carried["input_ids"] == [*PROMPT, 10, 11] and carried["ichat_forwarded"] is True
    assert any(isinstance(e, str) and e.startswith(":") for e in events)  # kept alive
    chunks = [e for e in events if isinstance(e, dict)]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == [
        "", "<[10]>", "<[11]>", "<[12]>", "<[13]>"
    ]  # fmt: skip
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1


def test_a_request_with_no_byte_sent_runs_again_on_the_restarted_engine() -> None:
    engines = Engines()
    engine = Engine(engines, [([], 0)], takeover=3600)  # dies before its first chunk
    answer = chat_chunk([7], "length")
    port = Restarting(1, [sse(answer), sse("[DONE]")])
    events = call(with_a_restart(engine, engines, port), CHAT, STREAM)
    assert json.loads(port.posts[0].content) == {**STREAM, "ichat_forwarded": True}
    assert events == [answer, "[DONE]"]


def test_a_restart_that_does_not_come_in_time_ends_the_stream_cleanly() -> None:
    engines = Engines()
    first = [chat_chunk(None, prompt_token_ids=PROMPT), chat_chunk([10])]
    engine = Engine(engines, [(first, 2)], takeover=3600)
    port = Restarting(10**6)  # never healthy
    events = call(with_a_restart(engine, engines, port, timeout=0.3), CHAT, STREAM)
    assert not port.posts
    assert "error" in events[-2] and events[-1] == "[DONE]"


def test_a_forwarded_request_whose_engine_died_too_is_not_sent_again() -> None:
    """It came from this worker's dead engine already: no loop, a clean error."""
    engines = Engines()
    engine = Engine(engines, [([], 0)], takeover=3600)
    port = Restarting(0)
    app = with_a_restart(engine, engines, port)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        body = json.dumps({**STREAM, "ichat_forwarded": True}).encode()
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "POST", "path": CHAT, "headers": []},
                    receive, send))  # fmt: skip
    assert not port.posts and sent[0]["status"] == 503
