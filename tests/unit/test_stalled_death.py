"""An engine whose answers stall at its death (SGLang: its handlers wait for a scheduler
that is gone) instead of ending with an error: with ``death_of`` each answer races its
engine's death, and once the death is known the stalled handler is stopped and the
answer treated as cut -- a ``/v1/completions`` stream under way is continued on another
worker (a scripted gateway) token-exactly, a request with no byte sent yet runs there
again, a stream that cannot be continued (SGLang's streamed chat has no token ids) ends
with an error event and ``[DONE]``. The id fields a client did not ask for stay absent,
as SGLang sends them."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from ichat.backends.continuation import COMPLETIONS as COMPLETIONS_PATH
from ichat.backends.continuation import Continued
from ichat.backends.elsewhere import ThroughTheGateway
from ichat.backends.replay import ReplayOnEngineDeath

from .test_continuation import CHAT, COMPLETIONS, PROMPT, call, chat_chunk, sse
from .test_elsewhere import GATEWAY, KEY, Gateway, completion


def sglang_chunk(ids: list[int], finish: str | None = None, prompt: bool = False) -> bytes:
    """A completion chunk as SGLang streams it with ``return_token_ids``: compact JSON,
    ``matched_stop``, the prompt's ids in the first chunk's choice only."""
    choice: dict[str, Any] = {"index": 0, "text": f"<{ids}>", "logprobs": None,
                              "finish_reason": finish, "matched_stop": None,
                              "token_ids": ids}  # fmt: skip
    if prompt:
        choice["prompt_token_ids"] = PROMPT
    event = {"id": "cmpl-S", "object": "text_completion", "created": 3, "model": "m",
             "choices": [choice]}  # fmt: skip
    return f"data: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


class StallingEngine:
    """Sends ``chunks``, then the engine dies (``dead`` is set) and the handler waits
    forever, as SGLang's does for a scheduler that is gone; notes whether it was
    stopped."""

    def __init__(self, chunks: list[bytes], *, start: bool = True) -> None:
        self.chunks, self.start = chunks, start
        self.dead = asyncio.Event()
        self.requests: list[dict[str, Any]] = []
        self.stopped = False

    def current(self) -> Any:
        return self

    def died(self, engine: Any) -> bool:
        return self.dead.is_set()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.requests.append(json.loads((await receive())["body"]))
        if self.start:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        for chunk in self.chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        asyncio.get_running_loop().call_later(0.05, self.dead.set)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.stopped = True
            raise


def sglang_like(engine: StallingEngine, gateway: Gateway, limit: int = 3) -> ReplayOnEngineDeath:
    reports: list[Continued] = []
    app = ReplayOnEngineDeath(
        engine,
        engine,
        wait_for_next_engine=0.0,
        continuation_limit=limit,
        max_model_len=lambda: 100,
        on_continuation=reports.append,
        gateway=ThroughTheGateway(GATEWAY, KEY, httpx.MockTransport(gateway.handle)),
        takes_over_here=lambda: False,
        death_of=lambda e: e.dead.wait(),
        continuable_paths=frozenset({COMPLETIONS_PATH}),
        ids_unasked_absent=True,
    )
    app.reports = reports  # type: ignore[attr-defined]
    return app


BODY = {"model": "m", "prompt": "once", "stream": True, "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}  # fmt: skip


def test_a_stalled_completion_stream_is_continued_elsewhere_from_its_last_token() -> None:
    engine = StallingEngine([sglang_chunk([10], prompt=True), sglang_chunk([11])])
    gateway = Gateway((200, [completion([12]), completion([13], "length"), sse("[DONE]")]))
    app = sglang_like(engine, gateway)
    events = call(app, COMPLETIONS, BODY)

    assert engine.stopped, "the stalled handler was stopped at the death"
    assert engine.requests[0]["return_token_ids"] is True  # asked of the engine
    carried = gateway.body(0)
    assert carried["input_ids"] == [*PROMPT, 10, 11]
    assert carried["ichat_completion"]["max_tokens"] == 2
    assert carried["ichat_completion"]["ignore_eos"] is True
    chunks = [e for e in events if isinstance(e, dict)]
    assert [c["choices"][0]["text"] for c in chunks] == ["<[10]>", "<[11]>", "<[12]>", "<[13]>"]
    assert {c["id"] for c in chunks} == {"cmpl-S"}
    for choice in (c["choices"][0] for c in chunks):  # not asked: absent, as SGLang sends
        assert "token_ids" not in choice and "prompt_token_ids" not in choice, choice
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    assert [r.outcome for r in app.reports] == ["continued"]  # type: ignore[attr-defined]


def test_ids_the_client_asked_for_are_its_own_then_the_continuations() -> None:
    engine = StallingEngine([sglang_chunk([10], prompt=True)])
    gateway = Gateway((200, [completion([11, 12, 13], "length"), sse("[DONE]")]))
    events = call(sglang_like(engine, gateway), COMPLETIONS, {**BODY, "return_token_ids": True})
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == PROMPT
    assert [i for c in chunks for i in c["choices"][0]["token_ids"]] == [10, 11, 12, 13]


def test_a_stalled_request_with_no_byte_sent_runs_again_elsewhere() -> None:
    """A non-streamed chat (its start held until its body): the whole request again."""
    engine = StallingEngine([], start=False)
    answer = {"id": "chatcmpl-B", "object": "chat.completion", "model": "m",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                           "finish_reason": "stop"}]}  # fmt: skip
    gateway = Gateway((200, [json.dumps(answer).encode()]))
    app = sglang_like(engine, gateway)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "POST", "path": CHAT, "headers": []},
                    receive, send))  # fmt: skip
    assert engine.stopped
    assert gateway.body(0) == {**body, "ichat_forwarded": True}
    assert sent[0]["status"] == 200
    assert json.loads(b"".join(m.get("body", b"") for m in sent[1:])) == answer
    assert app.replayed == 1


def test_a_chat_stream_under_way_ends_with_an_error_event_and_done() -> None:
    """SGLang's streamed chat returns no token ids: not continued, never left hanging."""
    first = sse(chat_chunk(None)) + sse(chat_chunk([10]))
    engine = StallingEngine([first])
    gateway = Gateway()
    body = {"model": "m", "messages": [], "stream": True, "max_tokens": 4}
    events = call(sglang_like(engine, gateway), CHAT, body)
    assert engine.stopped and not gateway.requests
    assert "return_token_ids" not in engine.requests[0]  # SGLang refuses it on a chat stream
    assert "error" in events[-2] and events[-1] == "[DONE]"
    assert [e["choices"][0]["delta"].get("content") for e in events[:2]] == ["", "<[10]>"]


def test_an_answer_that_ends_before_the_death_is_untouched() -> None:
    class Quick(StallingEngine):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            done = sglang_chunk([10], "length", prompt=True) + b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": done, "more_body": False})

    engine = Quick([])
    gateway = Gateway()
    events = call(sglang_like(engine, gateway), COMPLETIONS, BODY)
    assert not gateway.requests and not engine.stopped
    assert events[0]["choices"][0]["text"] == "<[10]>" and events[-1] == "[DONE]"


def test_without_a_gateway_a_stalled_stream_ends_with_an_error_event_and_done() -> None:
    """Nothing of the worker takes over (no standby, no gateway): the client is not held
    until the drain timeout, its stream ends at the death."""
    engine = StallingEngine([sglang_chunk([10], prompt=True)])
    app = ReplayOnEngineDeath(
        engine, engine, wait_for_next_engine=0.0, continuation_limit=2,
        max_model_len=lambda: 100, takes_over_here=lambda: False,
        death_of=lambda e: e.dead.wait(), continuable_paths=frozenset({COMPLETIONS_PATH}),
        ids_unasked_absent=True,
    )  # fmt: skip
    events = call(app, COMPLETIONS, BODY)
    assert engine.stopped
    assert events[0]["choices"][0]["text"] == "<[10]>"
    assert "error" in events[-2] and events[-1] == "[DONE]"


def native_generate(app: ReplayOnEngineDeath) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"text": "hi"}', "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "POST", "path": "/generate", "headers": []},
                    receive, send))  # fmt: skip
    return sent


def test_the_engines_native_generate_ends_at_the_death_too() -> None:
    stream = StallingEngine([b'data: {"text": "a", "output_ids": [10]}\n\n'])
    sent = native_generate(sglang_like(stream, Gateway()))
    assert stream.stopped and sent[0]["status"] == 200
    tail = sent[-1]
    assert b'"error"' in tail["body"] and b"[DONE]" in tail["body"] and not tail["more_body"]

    silent = StallingEngine([], start=False)  # nothing sent before the death: a 503
    sent = native_generate(sglang_like(silent, Gateway()))
    assert silent.stopped and sent[0]["status"] == 503


def test_a_handler_still_running_after_its_answer_ended_adds_nothing_to_it() -> None:
    """Its answer is whole: no error event after it (uvicorn would close the connection,
    which the next request on it may be using already)."""

    class Lingering(StallingEngine):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            done = sse(chat_chunk([10], "length")) + b"data: [DONE]\n\n"
            await send({"type": "http.response.body", "body": done, "more_body": False})
            asyncio.get_running_loop().call_later(0.05, self.dead.set)
            try:
                await asyncio.sleep(3600)  # the handler's tail, after the answer
            except asyncio.CancelledError:
                self.stopped = True
                raise

    engine = Lingering([])
    gateway = Gateway()
    body = {"model": "m", "messages": [], "stream": True, "max_tokens": 1}
    events = call(sglang_like(engine, gateway), CHAT, body)  # one end of the body, last
    assert engine.stopped and not gateway.requests
    assert events[-1] == "[DONE]" and not any("error" in e for e in events if isinstance(e, dict))
