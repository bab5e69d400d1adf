"""A continued stream's text against vLLM's own incremental detokenizer, without an
engine: a stream cut after any chunk and continued on a "next engine" (a second
detokenizer primed with the prompt and the ids generated so far, as a continuation
request primes it) must give the client exactly the text the uncut stream gives.

vLLM's detokenizer emits a token's text only once its character is complete, several
tokens may share a chunk, and the random test model draws byte tokens that split
characters: the cases where the continuing engine's own text is wrong (it flushes the
prompt's text) and where a chunk's non-empty text hides a held-back byte."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ichat.backends.continuation import CHAT, COMPLETIONS, TrackedStream

vllm_detokenizer = pytest.importorskip("vllm.v1.engine.detokenizer")


class Detokenizer:
    """vLLM's incremental detokenizer for one request (the fast one, on the test
    model's tokenizer): the text the engine streams for each chunk of ids."""

    def __init__(self, tokenizer: Any, prompt: list[int]) -> None:
        from vllm import SamplingParams

        request = SimpleNamespace(
            request_id="r",
            prompt_token_ids=prompt,
            sampling_params=SamplingParams(max_tokens=1000, skip_special_tokens=True),
        )
        self._it = vllm_detokenizer.IncrementalDetokenizer.from_new_request(tokenizer, request)
        assert type(self._it).__name__ == "FastIncrementalDetokenizer"

    def chunk(self, ids: list[int]) -> str:
        self._it.update(ids, False)
        return str(self._it.get_next_output_text(False, True))


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from vllm.tokenizers import get_tokenizer

    return get_tokenizer(str(model_dir))


def chunked(rng: random.Random, ids: list[int]) -> list[list[int]]:
    """``ids`` in chunks of 1 to 3 (a busy server sends several tokens a chunk)."""
    chunks, i = [], 0
    while i < len(ids):
        size = rng.choice([1, 1, 2, 3])
        chunks.append(ids[i : i + size])
        i += size
    return chunks


def event(path: str, ids: list[int], text: str) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "token_ids": ids, "finish_reason": None}
    if path == CHAT:
        choice["delta"] = {"content": text}
    else:
        choice["text"] = text
    return {"id": "cmpl-1", "created": 1, "model": "m", "object": "x", "choices": [choice]}


def text_of(path: str, event: dict[str, Any]) -> str:
    choice = event["choices"][0]
    return str(choice["delta"]["content"] if path == CHAT else choice["text"])


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_a_stream_cut_after_any_chunk_gets_the_uncut_streams_text(
    tokenizer: Any, path: str
) -> None:
    def decode(ids: list[int], skip: bool) -> str:
        return str(tokenizer.decode(ids, skip_special_tokens=skip))

    rng = random.Random(0)
    prompt = list(tokenizer.encode("Hello world, what is the answer?"))
    vocab = len(tokenizer)
    wrong, cuts, split_characters = [], 0, 0
    for _ in range(120):
        chunks = chunked(rng, [rng.randrange(vocab) for _ in range(24)])
        first = Detokenizer(tokenizer, prompt)
        texts = [first.chunk(ids) for ids in chunks]
        uncut = "".join(texts)
        for cut in range(1, len(chunks)):
            stream = TrackedStream.of(path, {"stream": True, "messages": [], "prompt": "x"})
            stream.prompt_ids = prompt
            received = ""
            for ids, text in zip(chunks[:cut], texts[:cut], strict=True):
                received += text_of(path, stream.from_engine(event(path, ids, text)))
            stream.begin_continuation()
            done = [i for ids in chunks[:cut] for i in ids]
            split_characters += decode(done, True).endswith("\ufffd")
            following = Detokenizer(tokenizer, prompt + done)  # the continuation's engine
            for ids in chunks[cut:]:
                continued = event(COMPLETIONS, ids, following.chunk(ids))  # always
                sent = stream.from_continuation(continued, decode)
                assert sent is not None
                received += text_of(path, sent)
            cuts += 1
            if received != uncut:
                wrong.append((cut, received, uncut))
    assert split_characters > 0, "no cut fell inside a character: nothing was tested"
    assert wrong == [], f"{len(wrong)} of {cuts} cuts: {wrong[:2]}"
    print(f"\n{cuts} cuts ({split_characters} inside a character): every text exact")
