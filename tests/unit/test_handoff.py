"""The drain deadline hands requests off to another worker (a scripted gateway): while
the worker hands off, the engine's "abort" finish counts as a cut -- a stream under way
is continued there token-exactly, a request with no byte sent yet runs there again --
and without a hand-off the abort reaches the client as before. A hand-off needs another
ready worker of the model in the gateway's list."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from ichat.backends.continuation import Continued
from ichat.backends.elsewhere import ThroughTheGateway
from ichat.backends.replay import ReplayOnEngineDeath

from .fakes import Engines
from .test_continuation import CHAT, PROMPT, Engine, call, chat_chunk, sse
from .test_elsewhere import GATEWAY, KEY, Gateway, completion

USAGE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m",
         "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                  "total_tokens": 7}}  # fmt: skip


def aborted_after(*ids: int) -> list[Any]:
    """A stream the engine aborted (vLLM: a last chunk with finish "abort", usage, [DONE])
    after ``ids``."""
    tokens = [chat_chunk([i]) for i in ids]
    return [chat_chunk(None, prompt_token_ids=PROMPT), *tokens, chat_chunk([], "abort"), USAGE,
            "[DONE]"]  # fmt: skip


def draining(
    app: Any, engines: Engines, gateway: Gateway, *, handing_off: bool, limit: int = 3
) -> tuple[ReplayOnEngineDeath, list[Continued]]:
    reports: list[Continued] = []
    middleware = ReplayOnEngineDeath(
        app,
        engines,
        continuation_limit=limit,
        max_model_len=lambda: 100,
        on_continuation=reports.append,
        gateway=ThroughTheGateway(GATEWAY, KEY, httpx.MockTransport(gateway.handle)),
        takes_over_here=lambda: True,  # the engine is alive: only the hand-off sends elsewhere
        handing_off=lambda: handing_off,
    )
    return middleware, reports


STREAM = {"model": "m", "messages": [], "stream": True, "max_tokens": 4, "temperature": 0,
          "stream_options": {"include_usage": True}}  # fmt: skip


def test_a_stream_aborted_at_the_drain_deadline_is_continued_on_another_worker() -> None:
    engines = Engines()
    engine = Engine(engines, [(aborted_after(10, 11), None)])
    tail_usage = sse({"id": "cmpl-B", "object": "text_completion", "created": 5, "model": "m",
                      "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2,
                                               "total_tokens": 9}})  # fmt: skip
    gateway = Gateway((200, [completion([12]), completion([13], "length"), tail_usage,
                             sse("[DONE]")]))  # fmt: skip
    app, reports = draining(engine, engines, gateway, handing_off=True)
    events = call(app, CHAT, STREAM)

    assert len(engine.requests) == 1 and len(gateway.requests) == 1
    assert str(gateway.requests[0].url) == f"{GATEWAY}/generate"
    carried = gateway.body(0)
    assert carried["input_ids"] == [*PROMPT, 10, 11]
    assert carried["ichat_completion"]["max_tokens"] == 2
    chunks = [e for e in events if isinstance(e, dict) and e["choices"]]
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == [
        "", "<[10]>", "<[11]>", "<[12]>", "<[13]>"
    ]  # fmt: skip
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert [f for f in finishes if f] == ["length"]  # never the abort
    usage = [e["usage"] for e in events if isinstance(e, dict) and e.get("usage")]
    assert usage == [
        {"prompt_tokens": len(PROMPT), "completion_tokens": 4, "total_tokens": len(PROMPT) + 4}
    ]  # the whole request, once
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    assert [r.outcome for r in reports] == ["continued"]


def test_without_a_hand_off_the_abort_reaches_the_client_as_before() -> None:
    engines = Engines()
    engine = Engine(engines, [(aborted_after(10, 11), None)])
    gateway = Gateway()
    app, reports = draining(engine, engines, gateway, handing_off=False)
    events = call(app, CHAT, STREAM)
    assert not gateway.requests and not reports
    finishes = [e["choices"][0]["finish_reason"] for e in events
                if isinstance(e, dict) and e["choices"]]  # fmt: skip
    assert finishes[-1] == "abort" and events[-1] == "[DONE]"


def test_a_stream_aborted_before_its_first_chunk_runs_again_on_another_worker() -> None:
    """Not continuable (continuation off) but nothing sent yet: the whole request again."""
    engines = Engines()
    engine = Engine(engines, [([chat_chunk([], "abort"), "[DONE]"], None)])
    answer = sse(chat_chunk([7], "length"))
    gateway = Gateway((200, [answer, sse("[DONE]")]))
    app, _ = draining(engine, engines, gateway, handing_off=True, limit=0)
    events = call(app, CHAT, STREAM)
    assert gateway.body(0) == {**STREAM, "ichat_forwarded": True}
    assert events == [json.loads(answer[6:]), "[DONE]"]
    assert app.replayed == 1


def test_a_stream_under_way_without_continuation_keeps_its_abort() -> None:
    engines = Engines()
    engine = Engine(engines, [(aborted_after(10), None)])
    gateway = Gateway()
    app, _ = draining(engine, engines, gateway, handing_off=True, limit=0)
    events = call(app, CHAT, STREAM)
    assert not gateway.requests  # its client has part of the answer: nothing to run again
    finishes = [e["choices"][0]["finish_reason"] for e in events
                if isinstance(e, dict) and e["choices"]]  # fmt: skip
    assert finishes[-1] == "abort"


class Answer:
    """An engine that answers one non-streamed request with ``finish``."""

    def __init__(self, finish: str) -> None:
        self.finish = finish
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await receive()
        self.calls += 1
        body = {"id": "chatcmpl-A", "object": "chat.completion", "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hal"},
                             "finish_reason": self.finish}]}  # fmt: skip
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps(body).encode(),
                    "more_body": False})  # fmt: skip


def answer_of(app: Any, body: dict[str, Any]) -> dict[str, Any]:
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "POST", "path": CHAT, "headers": []},
                    receive, send))  # fmt: skip
    assert sent[0]["status"] == 200
    answer: dict[str, Any] = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    return answer


@pytest.mark.parametrize("handing_off", [True, False])
def test_a_non_streamed_request_aborted_at_the_deadline_runs_again_elsewhere(
    handing_off: bool,
) -> None:
    engine = Answer("abort")
    full = {"id": "chatcmpl-B", "choices": [{"index": 0, "finish_reason": "length",
                                             "message": {"content": "hallo"}}]}  # fmt: skip
    gateway = Gateway((200, [json.dumps(full).encode()]))
    app, _ = draining(engine, Engines(), gateway, handing_off=handing_off)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
    answer = answer_of(app, body)
    if handing_off:
        assert answer == full and gateway.body(0) == {**body, "ichat_forwarded": True}
    else:  # as before: the engine's aborted answer
        assert answer["choices"][0]["finish_reason"] == "abort" and not gateway.requests


def listing(*workers: dict[str, Any]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/workers"
        assert request.headers["authorization"] == f"Bearer {KEY}"
        return httpx.Response(200, json={"workers": list(workers)})

    return httpx.MockTransport(handle)


def worker(url: str, *, healthy: bool = True, model: str = "m") -> dict[str, Any]:
    return {"id": url, "url": url, "is_healthy": healthy, "status": "ready",
            "models": [{"id": model}]}  # fmt: skip


@pytest.mark.parametrize(
    ("workers", "expected"),
    [
        ([worker("http://a:1"), worker("http://b:1")], True),
        ([worker("http://a:1")], False),  # only this worker itself
        ([worker("http://b:1", healthy=False)], False),
        ([worker("http://b:1", model="other")], False),
        ([], False),
    ],
)
def test_a_hand_off_needs_another_ready_worker_of_the_model(
    workers: list[dict[str, Any]], expected: bool
) -> None:
    gateway = ThroughTheGateway(GATEWAY, KEY, listing(*workers))
    assert asyncio.run(gateway.another_worker_serves("m", "http://a:1")) is expected


def test_no_hand_off_when_the_gateway_does_not_answer() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    gateway = ThroughTheGateway(GATEWAY, KEY, httpx.MockTransport(refuse))
    assert asyncio.run(gateway.another_worker_serves("m", "http://a:1")) is False
