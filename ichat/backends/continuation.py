"""A stream that its dying engine cut is continued on the next engine, token-exactly.

With ``--standby`` the worker serves a new engine a fraction of a second after the old
one died, but a stream whose answer had begun would still end in an error event. For a
continuable stream (``continuable()``) the worker asks the engine for token ids
(vLLM's ``return_token_ids``; the fields the client did not ask for are sent as the
nulls vLLM sends then), tracks the prompt's ids and every id generated, and when the
stream is cut by the death it sends ``/v1/completions`` to the next engine with the
prompt and generated ids as the prompt, the remaining ``max_tokens`` (and
``min_tokens``) and the same sampling parameters; the continuation's chunks reach the
client translated into its stream: the same ``id``, ``created``, ``model`` and chunk
format, one ``finish_reason``, one ``usage`` counting the whole request, ``[DONE]`` once.
Model: Dynamo's request migration (prompt + generated tokens, remaining ``max_tokens``).

The continuation's text is decoded here from its token ids (``decode``: the engine's
tokenizer), in a window rolling a few tokens behind, as vLLM's incremental detokenizer
would have decoded the whole stream: what reached the client before the cut is the
text of the ids up to it less a character still incomplete there (its bytes held back),
and the continuing engine's own text cannot be used -- its ``DecodeStream``, primed
with a prompt that ends mid-character, flushes the prompt's whole text -- nor can the
cut be placed by chunks, whose last token may have begun a character while their text
is not empty. Exact for greedy decoding. Sampled streams continue with a fresh draw (a ``seed``
restarts at the continuation); a stop string that would span the cut is not seen
there. Not continued (the error event passes as before): ``n`` or ``best_of`` > 1,
``echo``, logprobs, tools, a ``response_format`` or structured output, presence or
frequency penalties (they count the output only), continuous usage stats, and chat
when the server runs a reasoning parser.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's (and vLLM's) default there
# sampling parameters a continuation carries over as they are (vLLM's completion request)
CARRIED = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
    "ignore_eos", "repetition_penalty", "length_penalty", "logit_bias",
    "allowed_token_ids", "bad_words", "skip_special_tokens",
    "spaces_between_special_tokens", "include_stop_str_in_output", "priority", "user",
    "cache_salt", "vllm_xargs",
    # SGLang's
    "stop_regex", "no_stop_trim", "lora_path", "custom_params", "extra_key",
)  # fmt: skip
# tokens decoded before the cut with the continuation's (more than a character's bytes)
TEXT_WINDOW = 8
REPLACEMENT = "\ufffd"  # what a decoder gives for the bytes of an incomplete character
Decode = Callable[[list[int], bool], str]  # token ids, skip special tokens -> text
STRUCTURED = (
    "structured_outputs", "guided_json", "guided_regex", "guided_choice",
    "guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern",
    "json_schema", "regex", "ebnf",  # SGLang's
)  # fmt: skip


def not_continuable(path: str, body: dict[str, Any], *, reasoning: bool = False) -> str | None:
    """Why a streamed request of ``path`` could not be continued exactly; None if it can."""
    if not body.get("stream"):
        return "not streamed"
    if (body.get("n") or 1) > 1 or (body.get("best_of") or 1) > 1:
        return "n or best_of > 1"
    if body.get("echo"):
        return "echo"
    if body.get("logprobs") or body.get("top_logprobs") or body.get("prompt_logprobs"):
        return "logprobs"
    if body.get("tools") or body.get("functions"):
        return "tools"
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") not in (None, "text"):
        return "response_format"
    if any(body.get(key) is not None for key in STRUCTURED):
        return "structured output"
    if body.get("session_params") or body.get("return_hidden_states"):
        return "an SGLang session or hidden states"
    if body.get("presence_penalty") or body.get("frequency_penalty"):
        return "presence or frequency penalty"
    options = body.get("stream_options") or {}
    if options.get("continuous_usage_stats"):
        return "continuous usage stats"
    if path == CHAT and reasoning:
        return "a reasoning parser"
    prompt = body.get("prompt")
    if path == COMPLETIONS and not isinstance(prompt, (str, list)):
        return "prompt"
    if path == COMPLETIONS and isinstance(prompt, list) and prompt:
        return "several prompts" if isinstance(prompt[0], (str, list)) else None
    return None


@dataclass
class TrackedStream:
    """One continuable stream: what the client asked, what it has been sent."""

    path: str
    body: dict[str, Any]  # the client's
    asked_ids: bool = False  # the client asked for token ids itself
    # the engine omits the id fields a client did not ask for (SGLang), rather than
    # sending them as null (vLLM): removed here too, then
    unasked_absent: bool = False
    asked_usage: bool = False
    id: str | None = None
    created: int | None = None
    model: str | None = None
    object: str | None = None
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    finished: bool = False  # a finish_reason reached the client
    usage_sent: bool = False
    # a continuation's text, decoded here: where the stream was cut, where the decoded
    # window begins in ``generated`` and the text of that window the client received
    # (None: not read yet)
    cut: int | None = None
    window: int = 0
    known: str | None = None

    @classmethod
    def of(cls, path: str, body: dict[str, Any], unasked_absent: bool = False) -> TrackedStream:
        options = body.get("stream_options") or {}
        return cls(
            path,
            body,
            asked_ids=bool(body.get("return_token_ids")),
            asked_usage=bool(options.get("include_usage")),
            unasked_absent=unasked_absent,
        )

    def _unasked(self, holder: dict[str, Any], key: str) -> None:
        """An id field the client did not ask for, as its engine sends one."""
        if self.unasked_absent:
            holder.pop(key, None)
        else:
            holder[key] = None

    def engine_body(self) -> bytes:
        """The client's body, asking the engine for token ids."""
        return json.dumps({**self.body, "return_token_ids": True}).encode()

    def continuation_body(self, max_model_len: int) -> dict[str, Any] | None:
        """The ``/v1/completions`` request that continues this stream; None when
        nothing is left to generate."""
        assert self.prompt_ids is not None
        done = len(self.generated)
        if self.path == CHAT:
            limit = self.body.get("max_completion_tokens") or self.body.get("max_tokens")
        else:
            limit = self.body.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
        if limit is None:
            limit = max_model_len - len(self.prompt_ids)
        left = limit - done
        if left <= 0:
            return None
        body = {key: self.body[key] for key in CARRIED if key in self.body}
        if self.body.get("min_tokens"):
            body["min_tokens"] = max(0, self.body["min_tokens"] - done)
        body.update(
            model=self.model or self.body.get("model"),
            prompt=[*self.prompt_ids, *self.generated],
            max_tokens=left,
            stream=True,
            stream_options={"include_usage": True},
            return_token_ids=True,
        )
        return body

    # ------------------------------------------------------------- the engine's events

    def from_engine(self, event: dict[str, Any]) -> dict[str, Any]:
        """Note an event of the client's own stream; what the client receives of it."""
        if self.id is None:
            self.id, self.created = event.get("id"), event.get("created")
            self.model, self.object = event.get("model"), event.get("object")
        if "prompt_token_ids" in event and event["prompt_token_ids"] is not None:
            self.prompt_ids = list(event["prompt_token_ids"])  # chat: top level
            if not self.asked_ids:
                self._unasked(event, "prompt_token_ids")
        for choice in event.get("choices") or ():
            if choice.get("prompt_token_ids") is not None:  # completions: in the choice
                self.prompt_ids = list(choice["prompt_token_ids"])
                if not self.asked_ids:
                    self._unasked(choice, "prompt_token_ids")
            self._note_choice(choice)
        if event.get("usage") is not None:
            self.usage_sent = True
        return event

    def from_engine_bytes(self, raw: bytes) -> bytes | None:
        """``from_engine`` for an ordinary chunk, on its bytes (what the client receives
        of it); None when the chunk needs the parsed path: the first, one with a finish,
        usage, an error, or any layout not matched exactly.

        Parsing and re-serialising every chunk left 0.61 of native vLLM's throughput at
        256 streams on an H100, reading the bytes 0.771 (bench/bench_ab.py,
        docs/benchmarks.md): the chunk's token ids are read from the bytes. In
        vLLM's compact JSON a key pattern like ``"token_ids":[`` cannot occur inside a
        string (its quotes are escaped there)."""
        if self.id is None or b'"prompt_token_ids":[' in raw:
            return None  # an error event, usage or [DONE] has no "token_ids" (below)
        found = _TOKEN_IDS.findall(raw)
        if len(found) != 1 or raw.count(b'"finish_reason":null') != 1:
            return None
        if _TEXT_KEY[self.path] not in raw:  # no text field
            return None
        if found[0]:
            self.generated += map(int, found[0].split(b","))
        if self.asked_ids:
            return raw
        if self.unasked_absent:
            without, removed = _TOKEN_IDS_FIELD.subn(b"", raw)
            return without if removed == 1 else None
        return _TOKEN_IDS.sub(b'"token_ids":null', raw)

    def begin_continuation(self) -> None:
        """The next events are a continuation's: their text is decoded here."""
        self.cut, self.known = len(self.generated), None

    def _continued_text(self, text: str, new: int, decode: Decode | None) -> str:
        """The text of the continuation's chunk just noted (its ``new`` ids ending
        ``generated``), token by token as vLLM's ``DecodeStream`` gives it: a token whose
        text ends in an incomplete character gives none (held back) until one completes
        it. The engine's ``text`` only without a tokenizer, or for a decoder whose text
        of earlier ids changes with later ones."""
        if self.cut is None or decode is None:
            return text
        skip = bool(self.body.get("skip_special_tokens", True))
        if self.known is None:
            self.window, self.known = self._received(decode, skip)
        out = []
        for end in range(len(self.generated) - new + 1, len(self.generated) + 1):
            whole = decode(self.generated[self.window : end], skip)
            if whole.endswith(REPLACEMENT):
                continue
            if not whole.startswith(self.known):
                self.cut = None
                return text
            out.append(whole[len(self.known) :])
            self.window = max(0, end - TEXT_WINDOW)
            self.known = decode(self.generated[self.window : end], skip)
        return "".join(out)

    def _received(self, decode: Decode, skip: bool) -> tuple[int, str]:
        """Where a window of ids before the cut begins, and the text of that window the
        client received: up to the last token whose text was complete."""
        assert self.cut is not None
        window = self.cut
        while window > 0:
            window = max(0, window - TEXT_WINDOW)
            for end in range(self.cut, window, -1):
                text = decode(self.generated[window:end], skip)
                if not text.endswith(REPLACEMENT):
                    return window, text
        return 0, ""

    def from_continuation(
        self, event: dict[str, Any], decode: Decode | None = None
    ) -> dict[str, Any] | None:
        """A continuation's completion event in the client's format; None: nothing for
        the client (the usage it did not ask for)."""
        head = self._head()
        if "system_fingerprint" in event:
            head["system_fingerprint"] = event["system_fingerprint"]
        usage = event.get("usage")
        if not event.get("choices"):
            if usage is None or not self.asked_usage or self.prompt_ids is None:
                return None
            self.usage_sent = True
            return {**head, "choices": [], "usage": self.usage()}
        choices = []
        for choice in event["choices"]:
            ids = list(choice.get("token_ids") or ())
            self.generated.extend(ids)
            text = self._continued_text(choice.get("text", ""), len(ids), decode)
            self.finished = self.finished or choice.get("finish_reason") is not None
            out = self._with_text({"index": 0}, text)
            out["logprobs"] = None
            out["finish_reason"] = choice.get("finish_reason")
            if self.path == COMPLETIONS or choice.get("finish_reason") is not None:
                out["stop_reason"] = choice.get("stop_reason")
            if self.path == COMPLETIONS:
                self._unasked(out, "prompt_token_ids")
            if self.asked_ids:
                out["token_ids"] = ids
            else:
                self._unasked(out, "token_ids")
            choices.append(out)
        return {**head, "choices": choices}

    def _note_choice(self, choice: dict[str, Any]) -> None:
        ids = choice.get("token_ids")
        if ids:
            self.generated.extend(ids)
        if not self.asked_ids and "token_ids" in choice:
            self._unasked(choice, "token_ids")
        if choice.get("finish_reason") is not None:
            self.finished = True

    def _head(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model}

    def _with_text(self, choice: dict[str, Any], text: str) -> dict[str, Any]:
        """``choice`` with ``text`` where the client's format holds it."""
        if self.path == CHAT:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        return choice

    def usage(self) -> dict[str, int]:
        prompt, completion = len(self.prompt_ids or ()), len(self.generated)
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
        }

    def closing_events(self) -> list[dict[str, Any]]:
        """What the client still needs when the engine died after the last token:
        the final chunk (if it was not sent) and the usage it asked for."""
        head = self._head()
        events: list[dict[str, Any]] = []
        if not self.finished:
            choice = {"index": 0, "logprobs": None, "finish_reason": "length"}
            events.append({**head, "choices": [self._with_text(choice, "")]})
            self.finished = True
        if self.asked_usage and not self.usage_sent:
            events.append({**head, "choices": [], "usage": self.usage()})
            self.usage_sent = True
        return events


# every outcome of a continuation (Continued.outcome), each exported from the start
CONTINUATION_OUTCOMES = ("continued", "cut", "refused", "closed", "gave_up")


@dataclass(frozen=True)
class Continued:
    """One continuation of a cut stream, for the worker's metrics: ``outcome`` is
    "continued" (the next engine finished the stream), "cut" (that engine died too),
    "refused" (it answered an error), "closed" (nothing was left to generate: the
    worker ended the stream) or "gave_up" (no engine, or past the limit: an error event);
    the prompt tokens the next engine prefilled again, and the client-visible stall: from
    the cut to the first continued chunk it received."""

    outcome: str
    reprefilled_tokens: int = 0
    stall_s: float | None = None


_TOKEN_IDS = re.compile(rb'"token_ids":\[([0-9,]*)\]')
_TOKEN_IDS_FIELD = re.compile(rb',"token_ids":\[[0-9,]*\]')  # the field, removed
_TEXT_KEY = {CHAT: b'"content":"', COMPLETIONS: b'"text":"'}


def sse(event: dict[str, Any] | str) -> bytes:
    data = event if isinstance(event, str) else json.dumps(event, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def error_event(message: str, code: int = 503) -> bytes:
    return sse({"error": {"message": message, "type": "ServiceUnavailable", "code": code}})


DONE = sse("[DONE]")


class EventReader:
    """Splits a response's body messages into server-sent events (``data: …`` blocks)."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self._buffer += chunk
        *events, self._buffer = self._buffer.split(b"\n\n")
        return [e for e in events if e.strip()]


def parse(event: bytes) -> dict[str, Any] | str | None:
    """An event's data: its JSON object, ``"[DONE]"``, or None (a comment, or not JSON)."""
    text = event.strip()
    if not text.startswith(b"data:"):
        return None
    data = text[5:].strip()
    if data == b"[DONE]":
        return "[DONE]"
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
