"""Without a standby, what the dying engine was doing goes to another worker through the
gateway (a scripted gateway: httpx's mock transport): a cut stream is continued there
token-exactly, a request with no byte sent yet runs there again, a forwarded request is
never forwarded again, and a gateway that breaks ends the stream well-formed. Token ids
cross SMG as its ``/generate`` (its ``/v1/completions`` takes text only)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx

from ichat.backends.continuation import Continued
from ichat.backends.elsewhere import ThroughTheGateway, outbound
from ichat.backends.replay import ReplayOnEngineDeath

from .fakes import Engines
from .test_continuation import (
    CHAT,
    COMPLETIONS,
    PROMPT,
    Engine,
    call,
    chat_chunk,
    completion_chunk,
    sse,
)

GATEWAY = "http://gateway:8080"
KEY = "sk-gateway"


class Gateway:
    """Answers each request with the next scripted body; one given as a list of chunks
    followed by None breaks the connection after them."""

    def __init__(self, *answers: tuple[int, list[bytes | None]]) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        status, chunks = self.answers.pop(0)

        async def body() -> AsyncIterator[bytes]:
            for chunk in chunks:
                if chunk is None:
                    raise httpx.ReadError("connection reset by the gateway")
                yield chunk

        return httpx.Response(status, headers={"content-type": "text/event-stream"},
                              content=body())  # fmt: skip

    def body(self, i: int) -> dict[str, Any]:
        return json.loads(self.requests[i].content)


def without_a_standby(
    engine: Engine, engines: Engines, gateway: Gateway
) -> tuple[ReplayOnEngineDeath, list[Continued]]:
    reports: list[Continued] = []
    app = ReplayOnEngineDeath(
        engine,
        engines,
        continuation_limit=3,
        max_model_len=lambda: 100,
        on_continuation=reports.append,
        gateway=ThroughTheGateway(GATEWAY, KEY, httpx.MockTransport(gateway.handle)),
        takes_over_here=lambda: False,
    )
    return app, reports


def completion(ids: list[int], finish: str | None = None) -> bytes:
    choice = {"index": 0, "text": f"<{ids}>", "logprobs": None, "finish_reason": finish,
              "stop_reason": None, "prompt_token_ids": None, "token_ids": ids}  # fmt: skip
    return sse({"id": "cmpl-B", "object": "text_completion", "created": 5, "model": "m",
                "choices": [choice]})  # fmt: skip


def test_a_stream_cut_without_a_standby_is_continued_on_another_worker() -> None:
    engines = Engines()
    first = [chat_chunk(None, prompt_token_ids=PROMPT), chat_chunk([10]), chat_chunk([11])]
    engine = Engine(engines, [(first, 3)], takeover=3600)  # no engine of its own comes
    gateway = Gateway((200, [completion([12]), completion([13], "length") + sse("[DONE]")]))
    app, reports = without_a_standby(engine, engines, gateway)
    body = {"model": "m", "messages": [], "stream": True, "max_tokens": 4, "temperature": 0}
    events = call(app, CHAT, body)

    assert len(gateway.requests) == 1 and len(engine.requests) == 1
    sent = gateway.requests[0]
    assert str(sent.url) == f"{GATEWAY}/generate"  # SMG's route that takes token ids
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    carried = gateway.body(0)
    assert carried["input_ids"] == [*PROMPT, 10, 11] and carried["ichat_forwarded"] is True
    assert carried["model"] == "m" and carried["stream"] is True
    tail = carried["ichat_completion"]
    assert tail["max_tokens"] == 2 and tail["temperature"] == 0 and "prompt" not in tail
    # one stream: the client's id and format, no wait (no comment), one finish, [DONE] once
    assert not [e for e in events if isinstance(e, str) and e.startswith(":")]
    chunks = [e for e in events if isinstance(e, dict)]
    assert {c["id"] for c in chunks} == {"chatcmpl-1"}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks]
    assert contents == ["", "<[10]>", "<[11]>", "<[12]>", "<[13]>"]
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    assert [(r.outcome, r.reprefilled_tokens) for r in reports] == [("continued", 5)]
    assert app.forwarded == 1


def test_a_request_with_no_byte_sent_runs_again_on_another_worker() -> None:
    engines = Engines()
    engine = Engine(engines, [([], 0)], takeover=3600)  # dies before its first chunk
    answer = sse({"id": "chatcmpl-B", "choices": [{"delta": {"content": "hi"}}]})
    gateway = Gateway((200, [answer, sse("[DONE]")]))
    app, _ = without_a_standby(engine, engines, gateway)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
            "n": 2}  # fmt: skip
    events = call(app, CHAT, body)
    assert gateway.body(0) == {**body, "ichat_forwarded": True}  # the client's own request
    assert str(gateway.requests[0].url) == f"{GATEWAY}{CHAT}"
    assert events == [json.loads(answer[6:]), "[DONE]"]  # the other worker's answer
    assert app.replayed == 1


def test_a_forwarded_request_is_not_forwarded_again_but_refused_at_once() -> None:
    engines = Engines()
    engine = Engine(engines, [([], 0)], takeover=3600)
    gateway = Gateway()
    app, _ = without_a_standby(engine, engines, gateway)
    sent: list[dict[str, Any]] = []
    forwarded = {"model": "m", "messages": [], "stream": True, "ichat_forwarded": True}
    messages = [{"type": "http.request", "body": json.dumps(forwarded).encode(),
                 "more_body": False}]  # fmt: skip

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": CHAT, "headers": []}

    async def run() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await app(scope, receive, send)
        return loop.time() - t0

    seconds = asyncio.run(run())
    assert not gateway.requests
    mark_removed = {"model": "m", "messages": [], "stream": True, "return_token_ids": True}
    assert engine.requests == [(CHAT, mark_removed)]
    assert sent[0]["status"] == 503  # the gateway retries it on another worker
    assert seconds < 1.0  # not the wait for an engine of its own (10 s)


def test_a_gateway_that_breaks_mid_continuation_ends_the_stream_well_formed() -> None:
    engines = Engines()
    first = [chat_chunk(None, prompt_token_ids=PROMPT), chat_chunk([10])]
    engine = Engine(engines, [(first, 2)], takeover=3600)
    broken = (200, [completion([11]), None])
    gateway = Gateway(broken, broken, broken)
    app, reports = without_a_standby(engine, engines, gateway)
    body = {"model": "m", "messages": [], "stream": True, "max_tokens": 10}
    events = call(app, CHAT, body)
    # each continuation starts from the last token the client received
    assert [gateway.body(i)["input_ids"] for i in range(3)] == [
        [*PROMPT, 10], [*PROMPT, 10, 11], [*PROMPT, 10, 11, 11]
    ]  # fmt: skip
    contents = [e["choices"][0]["delta"]["content"] for e in events
                if isinstance(e, dict) and "choices" in e]  # fmt: skip
    assert contents == ["", "<[10]>", "<[11]>", "<[11]>", "<[11]>"]
    assert "error" in events[-2] and events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert [r.outcome for r in reports] == ["cut", "cut", "cut", "gave_up"]


def test_a_carried_continuation_runs_as_a_completion_on_the_receiving_worker() -> None:
    """What ``outbound`` sends is what the other worker's engine gets back: the same
    completion request, its prompt the token ids, the marks removed."""
    completion_request = {"model": "m", "prompt": [*PROMPT, 10], "max_tokens": 2,
                          "stream": True, "return_token_ids": True}  # fmt: skip
    path, carried = outbound(COMPLETIONS, json.dumps(completion_request).encode())
    assert path == "/generate"
    engines = Engines()
    engine = Engine(engines, [([completion_chunk([11], "length"), "[DONE]"], None)])
    app = ReplayOnEngineDeath(engine, engines, continuation_limit=3, max_model_len=lambda: 100)
    messages = [{"type": "http.request", "body": carried, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(b"content-length", str(len(carried)).encode())]}  # fmt: skip
    asyncio.run(app(scope, receive, send))
    assert engine.requests == [(COMPLETIONS, completion_request)]
    assert sent[0]["status"] == 200
    assert b'"finish_reason":"length"' in b"".join(m.get("body", b"") for m in sent[1:])
