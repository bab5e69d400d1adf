"""Two SGLang workers behind a real SMG with continuation on (`--continuation-limit 2`)
and no standby (SGLang cannot keep one): kill -9 of b's scheduler while b runs streamed
completions, non-streamed requests and a chat stream.

SGLang's answers stall at a scheduler's death (they never end with an error); b stops
them as soon as it has found the death, and what they were doing goes on on a through the
gateway: each completion stream under way is continued there token-exactly, each
request with no byte sent yet runs there again, and the chat stream -- SGLang streams no
token ids for chat, so it cannot be continued -- ends with an error event and ``[DONE]``
instead of hanging.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from ichat.process.processes import free_port, title
from tests.support import MODEL_NAME, Stream, Worker, start_worker, wait_all_streaming

from .conftest import CPU_FLAGS, running_gateway

KEY = "sk-ichat-sglang-continuation"
AUTH = {"Authorization": f"Bearer {KEY}"}
TOKENS = 900  # each request: several seconds on these 2 cores, the kill lands mid-way


@dataclass
class Pair:
    gateway_url: str
    a: Worker
    b: Worker
    b_status: str  # b's status server (it stays up while b's engine restarts)

    def routable(self, worker: Worker) -> bool:
        reply = httpx.get(f"{self.gateway_url}/workers", headers=AUTH, timeout=5)
        records = {w["url"]: w for w in reply.json()["workers"]}
        record = records.get(worker.url)
        return bool(record and record["is_healthy"] and record["status"] == "ready")


@pytest.fixture(scope="module")
def pair(wide_margin_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    model_dir = wide_margin_model
    with running_gateway(KEY) as (_, gateway_url), contextlib.ExitStack() as stack:
        started = []
        for name in ("a", "b"):  # both engines start at once
            status = free_port()
            args = ("--model-path", str(model_dir), "--served-model-name", MODEL_NAME,
                    "--api-key", KEY, "--gateway-url", gateway_url, "--gateway-api-key", KEY,
                    "--continuation-limit", "2", "--status-port", str(status),
                    *CPU_FLAGS)  # fmt: skip
            folder = tmp_path_factory.mktemp(f"sglang-{name}")
            worker = stack.enter_context(start_worker(folder, *args, backend="sglang"))
            started.append((worker, f"http://127.0.0.1:{status}"))
        for worker, status in started:
            worker.wait_ready(timeout=400, url=status, path="/readyz")
        (a, _), (b, b_status) = started
        yield Pair(gateway_url, a, b, b_status)


def wait_for(check: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s: {what}"
        time.sleep(0.02)
    return time.monotonic() - t0


def completion(url: str) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": "once upon a time", "max_tokens": TOKENS,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    return httpx.post(f"{url}/v1/completions", json=body, headers=AUTH, timeout=300)


@dataclass
class ChatStream:
    """A streamed chat (no token ids: SGLang refuses them there); its events."""

    events: list[Any]

    def run(self, url: str) -> None:
        body = {"model": MODEL_NAME, "max_tokens": TOKENS, "stream": True, "ignore_eos": True,
                "messages": [{"role": "user", "content": "tell me a story"}]}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH,
                          timeout=300) as reply:  # fmt: skip
            assert reply.status_code == 200
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    data = line.removeprefix("data: ")
                    self.events.append(data if data == "[DONE]" else json.loads(data))


def scheduler(worker: Worker) -> psutil.Process:
    children = psutil.Process(worker.proc.pid).children(recursive=True)
    return next(p for p in children if "sglang::scheduler" in title(p))


def test_kill_9_of_the_scheduler_what_it_ran_goes_on_on_the_other_worker(pair: Pair) -> None:
    wait_for(lambda: pair.routable(pair.a) and pair.routable(pair.b), 60, "both routable")
    streams = [Stream("/v1/completions", max_tokens=TOKENS) for _ in range(3)]
    chat_stream = ChatStream([])
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        running = [pool.submit(s.run, pair.b.url, KEY) for s in streams]
        chatting = pool.submit(chat_stream.run, pair.b.url)
        whole = [pool.submit(completion, pair.b.url) for _ in range(2)]  # no byte until done
        at_kill = wait_all_streaming(streams)
        wait_for(lambda: len(chat_stream.events) >= 3, 60, "the chat stream under way")
        t_kill = time.monotonic()
        scheduler(pair.b).kill()
        for f in [*running, chatting]:
            f.result(timeout=240)
        answers = [f.result(timeout=240) for f in whole]
    ended_s = time.monotonic() - t_kill
    print(f"\nkill -9 of b's scheduler: streams at the kill {at_kill} tokens; all ended "
          f"{ended_s:.1f} s after it")  # fmt: skip
    assert all(n < TOKENS for n in at_kill), "b's streams ended before the kill"
    for s in streams:  # complete, one id, one finish, one usage, [DONE] once, text = ids
        s.check_complete(pair.a.url, KEY)
    reference = Stream("/v1/completions", max_tokens=TOKENS)  # greedy, without a kill
    reference.run(pair.a.url, KEY)
    assert all(s.token_ids == reference.token_ids for s in streams)
    for answer in answers:  # had no byte sent: run again on a, whole
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == TOKENS
        assert answer.json()["choices"][0]["finish_reason"] == "length"
    # the chat stream under way: not continuable with SGLang, ended well-formed
    assert chat_stream.events[-1] == "[DONE]" and chat_stream.events.count("[DONE]") == 1
    assert "error" in chat_stream.events[-2], chat_stream.events[-3:]
    log = pair.b.output()
    assert "continued on another worker" in log and "sent to another worker" in log
    status = httpx.get(f"{pair.b_status}/status", timeout=10).json()
    assert status["continuations"]["continued"] == len(streams), status["continuations"]
    assert status["continuation_reprefilled_tokens"] > 0
    wait_for(lambda: pair.routable(pair.b), 300, "b back in the gateway after its restart")


def test_sigterm_hands_what_outlasts_the_drain_off_to_the_other_worker(pair: Pair) -> None:
    """b's drain timeout set to 1 s (a settings-only reload), then SIGTERM under
    completion streams and non-streamed completions: at the deadline SGLang aborts them,
    and instead of ending with finish "abort" the streams are continued on a and the
    non-streamed requests (no byte sent yet) run there again, whole."""
    wait_for(lambda: pair.routable(pair.a) and pair.routable(pair.b), 300, "both routable")
    reply = httpx.post(f"{pair.b_status}/reload", json={"settings": {"drain_timeout": 1}},
                       headers=AUTH, timeout=30)  # fmt: skip
    assert reply.status_code == 200, reply.text
    streams = [Stream("/v1/completions", max_tokens=TOKENS) for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        running = [pool.submit(s.run, pair.b.url, KEY) for s in streams]
        whole = [pool.submit(completion, pair.b.url) for _ in range(2)]
        at_stop = wait_all_streaming(streams)
        code = pair.b.stop()
        for f in running:
            f.result(timeout=240)
        answers = [f.result(timeout=240) for f in whole]
    assert code == 0
    log = pair.b.output()
    handed_off = log.count("aborted at the drain deadline after")  # streams continued
    run_again = log.count("aborted at the drain deadline, before any byte")
    print(f"\nSIGTERM of b (streams at {at_stop} tokens): {handed_off} of {len(streams)} "
          f"streams continued on a, {run_again} of 2 non-streamed run again there")  # fmt: skip
    assert handed_off >= 1 and run_again >= 1, log[-4000:]
    reference = Stream("/v1/completions", max_tokens=TOKENS)
    reference.run(pair.a.url, KEY)
    for s in streams:  # complete, never "abort", and as if run on one worker
        s.check_complete(pair.a.url, KEY)
        assert s.token_ids == reference.token_ids
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["finish_reason"] == "length"
        assert answer.json()["usage"]["completion_tokens"] == TOKENS
