"""Stream continuation with scripted engines (ASGI apps that stream vLLM's chunk format):
a stream cut by its engine's death is finished by the next engine from its last token,
and the client sees one well-formed stream."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from ichat.backends.continuation import Continued, TrackedStream, not_continuable
from ichat.backends.replay import ReplayOnEngineDeath

from .fakes import Engines

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
PROMPT = [1, 2, 3]


def sse(data: Any) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def chat_chunk(ids: list[int] | None, finish: str | None = None, **top: Any) -> dict[str, Any]:
    delta = {"role": "assistant", "content": ""} if ids is None else {"content": f"<{ids}>"}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish,
              "token_ids": ids}  # fmt: skip
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7,
            "model": "m", "choices": [choice], **top}  # fmt: skip


def completion_chunk(ids: list[int], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "text": f"<{ids}>", "logprobs": None, "finish_reason": finish,
              "stop_reason": None, "prompt_token_ids": None, "token_ids": ids}  # fmt: skip
    return {"id": "cmpl-X", "object": "text_completion", "created": 99, "model": "m",
            "choices": [choice]}  # fmt: skip


class Engine:
    """Streams ``events``; with ``dies_after`` it dies after that many of them: then
    vLLM's error event and [DONE] follow, and another engine (``e2``, ``e3`` …) serves."""

    def __init__(
        self, engines: Engines, scripts: list[tuple[list[Any], int | None]], takeover: float = 0
    ):
        self.engines, self.scripts, self.takeover = engines, scripts, takeover
        self.requests: list[tuple[str, dict[str, Any]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        self.requests.append((scope["path"], json.loads(message["body"])))
        events, dies_after = self.scripts.pop(0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i, event in enumerate(events):
            if i == dies_after:
                break
            await send({"type": "http.response.body", "body": sse(event), "more_body": True})
        if dies_after is not None:
            me = self.engines.serving
            self.engines.dead.add(me)
            successor = f"e{int(me[1:]) + 1}"
            loop = asyncio.get_running_loop()
            loop.call_later(self.takeover, setattr, self.engines, "serving", successor)
            error = {"error": {"message": "EngineCore encountered an issue", "code": 500}}
            await send({"type": "http.response.body", "body": sse(error), "more_body": True})
            await send({"type": "http.response.body", "body": sse("[DONE]"), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def call(app: Any, path: str, body: dict[str, Any]) -> list[Any]:
    """The client's events: parsed JSON, "[DONE]", or the raw comment lines."""
    sent: list[dict[str, Any]] = []
    request = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if request:
            return request.pop(0)
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app({"type": "http", "method": "POST", "path": path, "headers": []},
                    receive, send))  # fmt: skip
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    bodies = sent[1:]
    assert [m.get("more_body", False) for m in bodies][-1] is False
    assert all(m.get("more_body") for m in bodies[:-1]), "one end of the body, last"
    text = b"".join(m["body"] for m in bodies).decode()
    events: list[Any] = []
    for block in filter(None, text.split("\n\n")):
        if block.startswith(":"):
            events.append(block)
        else:
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def middleware(engine: Engine, engines: Engines, limit: int = 3) -> ReplayOnEngineDeath:
    return ReplayOnEngineDeath(engine, engines, continuation_limit=limit, max_model_len=lambda: 100)


def test_a_chat_stream_cut_by_the_death_is_continued_from_its_last_token() -> None:
    engines = Engines()
    first = [chat_chunk(None, prompt_token_ids=PROMPT), chat_chunk([10]), chat_chunk([11]),
             chat_chunk([12])]  # fmt: skip
    rest = [completion_chunk([12]), completion_chunk([13], "length"),
            {"id": "cmpl-X", "object": "text_completion", "created": 99, "model": "m",
             "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2,
                                      "total_tokens": 7}},
            "[DONE]"]  # fmt: skip
    engine = Engine(engines, [(first, 3), (rest, None)])
    body = {"model": "m", "messages": [], "stream": True, "max_tokens": 4,
            "temperature": 0, "stop": ["x"], "min_tokens": 3, "ignore_eos": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = call(middleware(engine, engines), CHAT, body)

    # the engines were asked: the client's request with token ids, then the rest
    assert engine.requests[0] == (CHAT, {**body, "return_token_ids": True})
    path, tail = engine.requests[1]
    assert path == COMPLETIONS
    assert tail["prompt"] == [*PROMPT, 10, 11] and tail["max_tokens"] == 2
    assert tail["min_tokens"] == 1 and tail["temperature"] == 0 and tail["stop"] == ["x"]
    assert tail["ignore_eos"] is True and tail["return_token_ids"] is True
    # the client: one stream, its id and format, no token ids it did not ask for
    comments = [e for e in events if isinstance(e, str) and e.startswith(":")]
    assert len(comments) == 1  # kept alive while it waited
    chunks = [e for e in events if isinstance(e, dict)]
    assert {(c["id"], c["object"], c["created"]) for c in chunks} == {
        ("chatcmpl-1", "chat.completion.chunk", 7)
    }
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert contents == ["", "<[10]>", "<[11]>", "<[12]>", "<[13]>"]
    assert all(c["choices"][0].get("token_ids") is None for c in chunks if c["choices"])
    assert chunks[0]["prompt_token_ids"] is None
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes == [None, None, None, None, "length"]
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "total_tokens": 7, "completion_tokens": 4}
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert not any("error" in c for c in chunks)


def test_token_ids_the_client_asked_for_are_its_own_then_the_continuations() -> None:
    engines = Engines()
    first = [{**completion_chunk([10]), "choices": [{**completion_chunk([10])["choices"][0],
                                                     "prompt_token_ids": PROMPT}]},
             completion_chunk([11])]  # fmt: skip
    rest = [completion_chunk([12]), completion_chunk([13], "length"), "[DONE]"]
    engine = Engine(engines, [(first, 2), (rest, None)])
    body = {"model": "m", "prompt": "hi", "stream": True, "max_tokens": 4,
            "return_token_ids": True}  # fmt: skip
    events = call(middleware(engine, engines), COMPLETIONS, body)
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == PROMPT
    ids = [i for c in chunks for i in c["choices"][0]["token_ids"]]
    assert ids == [10, 11, 12, 13]
    assert {c["id"] for c in chunks} == {"cmpl-X"} and {c["created"] for c in chunks} == {99}
    assert all(c["choices"][0]["prompt_token_ids"] is None for c in chunks[1:])
    assert "usage" not in chunks[-1]  # not asked for


def test_a_stream_waiting_for_the_next_engine_is_kept_alive_with_comments() -> None:
    engines = Engines()
    first = [chat_chunk(None, prompt_token_ids=PROMPT), chat_chunk([10])]
    rest = [completion_chunk([11], "length"), "[DONE]"]
    engine = Engine(engines, [(first, 2), (rest, None)], takeover=1.5)
    body = {"model": "m", "messages": [], "stream": True, "max_tokens": 2}
    events = call(middleware(engine, engines), CHAT, body)
    comments = [e for e in events if isinstance(e, str) and e.startswith(":")]
    assert len(comments) == 2  # at once, and a second later
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"


def test_a_second_death_is_continued_again_within_the_limit() -> None:
    engines = Engines()
    first = [chat_chunk(None, prompt_token_ids=PROMPT), chat_chunk([10])]
    second = [completion_chunk([11]), completion_chunk([12])]
    third = [completion_chunk([12], "length"), "[DONE]"]
    engine = Engine(engines, [(first, 2), (second, 1), (third, None)])
    body = {"model": "m", "messages": [], "stream": True, "max_tokens": 3}
    reports: list[Continued] = []
    app = middleware(engine, engines)
    app.on_continuation = reports.append
    events = call(app, CHAT, body)
    assert [(r.outcome, r.reprefilled_tokens) for r in reports] == [("cut", 4), ("continued", 5)]
    assert reports[0].stall_s is not None and reports[0].stall_s >= 0
    assert [r[1].get("prompt") for r in engine.requests[1:]] == [[*PROMPT, 10], [*PROMPT, 10, 11]]
    assert engine.requests[2][1]["max_tokens"] == 1
    contents = [c["choices"][0]["delta"]["content"] for c in events if isinstance(c, dict)]
    assert contents == ["", "<[10]>", "<[11]>", "<[12]>"] and events[-1] == "[DONE]"


def test_past_the_limit_the_stream_ends_with_an_error_event_and_done() -> None:
    engines = Engines()
    first = [chat_chunk(None, prompt_token_ids=PROMPT), chat_chunk([10])]
    second = [completion_chunk([11]), completion_chunk([12])]
    engine = Engine(engines, [(first, 2), (second, 1)])
    body = {"model": "m", "messages": [], "stream": True, "max_tokens": 5}
    reports: list[Continued] = []
    app = middleware(engine, engines, limit=1)
    app.on_continuation = reports.append
    events = call(app, CHAT, body)
    assert "error" in events[-2] and events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    assert [r.outcome for r in reports] == ["cut", "gave_up"]


def test_a_stream_that_cannot_be_continued_gets_the_engines_error_untouched() -> None:
    engines = Engines()
    first = [chat_chunk(None), chat_chunk([10])]
    engine = Engine(engines, [(first, 2)])
    body = {"model": "m", "messages": [], "stream": True, "n": 2}
    events = call(middleware(engine, engines), CHAT, body)
    assert len(engine.requests) == 1 and "return_token_ids" not in engine.requests[0][1]
    assert "error" in events[-2] and events[-1] == "[DONE]"


def test_the_death_after_the_last_token_closes_the_stream_itself() -> None:
    engines = Engines()
    first = [chat_chunk(None, prompt_token_ids=PROMPT), chat_chunk([10]), chat_chunk([11])]
    engine = Engine(engines, [(first, 3)])
    body = {"model": "m", "messages": [], "stream": True, "max_tokens": 2,
            "stream_options": {"include_usage": True}}  # fmt: skip
    events = call(middleware(engine, engines), CHAT, body)
    assert len(engine.requests) == 1  # nothing left to generate
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 2 and events[-1] == "[DONE]"


@pytest.mark.parametrize(
    ("body", "why"),
    [
        ({"stream": False}, "not streamed"),
        ({"stream": True, "n": 2}, "n or best_of > 1"),
        ({"stream": True, "logprobs": True}, "logprobs"),
        ({"stream": True, "tools": [{"type": "function"}]}, "tools"),
        ({"stream": True, "response_format": {"type": "json_object"}}, "response_format"),
        ({"stream": True, "structured_outputs": {"regex": "a"}}, "structured output"),
        ({"stream": True, "frequency_penalty": 0.5}, "presence or frequency penalty"),
        ({"stream": True, "response_format": {"type": "text"}}, None),
        ({"stream": True, "temperature": 0.7, "seed": 1}, None),
    ],
)
def test_what_can_be_continued(body: dict[str, Any], why: str | None) -> None:
    assert not_continuable(CHAT, {"messages": [], **body}) == why


def test_max_tokens_left_without_a_limit_comes_from_the_context_length() -> None:
    stream = TrackedStream.of(CHAT, {"messages": [], "stream": True})
    stream.prompt_ids, stream.generated = [1, 2, 3], [4, 5]
    body = stream.continuation_body(max_model_len=100)
    assert body is not None and body["max_tokens"] == 95
    completions = TrackedStream.of(COMPLETIONS, {"prompt": "x", "stream": True})
    completions.prompt_ids, completions.generated = [1], [2] * 16
    assert completions.continuation_body(max_model_len=100) is None  # the default 16


def test_a_cut_inside_a_character_gets_that_character_once_not_the_prompt() -> None:
    """Byte-fallback tokens 201, 202 are one character (text "é" once both arrived); the
    engine died between them. vLLM's detokenizer, primed with a prompt that ends
    mid-character, would flush the prompt's whole text: the text is decoded here."""
    vocab = {1: "a", 2: "b", 10: "x", 11: "y", 201: "\ufffd", 203: "z"}

    def decode(ids: list[int], skip: bool) -> str:
        text = "".join("é" if i == 202 else vocab[i] for i in ids)
        return text.replace("\ufffdé", "é")

    engines = Engines()
    first = [chat_chunk(None, prompt_token_ids=[1, 2]), chat_chunk([10]), chat_chunk([11]),
             {**chat_chunk([201]), "choices": [{**chat_chunk([201])["choices"][0],
                                                "delta": {"content": ""}}]}]  # fmt: skip
    flushed = {**completion_chunk([202]), "choices": [{**completion_chunk([202])["choices"][0],
                                                      "text": "abxyé"}]}  # fmt: skip
    rest = [flushed, completion_chunk([203], "length"), "[DONE]"]
    engine = Engine(engines, [(first, 4), (rest, None)])
    app = ReplayOnEngineDeath(
        engine, engines, continuation_limit=1, max_model_len=lambda: 100, decode=decode
    )
    body = {"model": "m", "messages": [], "stream": True, "max_tokens": 5}
    events = call(app, CHAT, body)
    contents = [c["choices"][0]["delta"]["content"] for c in events if isinstance(c, dict)]
    assert contents == ["", "<[10]>", "<[11]>", "", "é", "z"]  # decoded here from the cut on
    assert engine.requests[1][1]["prompt"] == [1, 2, 10, 11, 201]


def _with_delta(delta: dict[str, Any]) -> dict[str, Any]:
    chunk = chat_chunk([10])
    return {**chunk, "choices": [{**chunk["choices"][0], "delta": delta}]}


EMPTY_TEXT = _with_delta({"content": ""})  # a byte of a split character
ROLE_ONLY = _with_delta({"role": "assistant"})


def compact(event: dict[str, Any]) -> bytes:
    """An event as vLLM writes it (pydantic's compact JSON), without the SSE framing."""
    return b"data: " + json.dumps(event, separators=(",", ":")).encode()


@pytest.mark.parametrize("asked_ids", [False, True])
@pytest.mark.parametrize(
    ("path", "chunk"),
    [
        (CHAT, chat_chunk([10])),
        (CHAT, {**chat_chunk([10, 11]), "prompt_token_ids": None}),
        (CHAT, chat_chunk([])),
        (COMPLETIONS, completion_chunk([10])),
        (CHAT, EMPTY_TEXT),
    ],
)
def test_an_ordinary_chunk_read_from_its_bytes_is_read_as_when_parsed(
    path: str, chunk: dict[str, Any], asked_ids: bool
) -> None:
    """The fast path (token ids and empty text read from the bytes) gives the client the
    same event and notes the same ids as parsing the chunk."""
    body = {"stream": True, "return_token_ids": asked_ids, "messages": [], "prompt": "x"}
    fast, parsed = TrackedStream.of(path, body), TrackedStream.of(path, body)
    for stream in (fast, parsed):
        stream.id = "chatcmpl-1"
    raw = compact(chunk)
    sent = fast.from_engine_bytes(raw)
    assert sent is not None
    expected = parsed.from_engine(json.loads(raw[6:]))
    assert json.loads(sent[6:]) == expected
    assert fast.generated == parsed.generated


@pytest.mark.parametrize(
    "raw",
    [
        compact(chat_chunk([10], "length")),  # a finish
        compact({**chat_chunk(None), "prompt_token_ids": PROMPT}),  # the first
        compact({"id": "c", "choices": [], "usage": {"completion_tokens": 1}}),
        compact({"error": {"message": "EngineCore encountered an issue", "code": 500}}),
        b"data: [DONE]",
        b"data: " + json.dumps(chat_chunk([10])).encode(),  # another layout: spaces
        compact(ROLE_ONLY),  # no text field
    ],
)
def test_any_other_chunk_takes_the_parsed_path(raw: bytes) -> None:
    stream = TrackedStream.of(CHAT, {"stream": True, "messages": []})
    stream.id = "chatcmpl-1"
    assert stream.from_engine_bytes(raw) is None
    assert stream.generated == []
