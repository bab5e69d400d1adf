"""One SGLang worker with continuation on (`--continuation-limit 2`) and no gateway
(SGLang keeps no standby): kill -9 of its scheduler while completion streams, a chat
stream and non-streamed completions run.

SGLang's answers stall at the death; the worker stops them at once and what they were
doing waits for its restarted engine on the same port: each completion stream is
continued there token-exactly, each request with no byte sent runs there again, and the
chat stream (SGLang streams no token ids for chat) ends with an error event.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from ichat.process.processes import free_port, port_is_free
from tests.support import MODEL_NAME, Stream, Worker, start_worker, wait_all_streaming

from .conftest import CPU_FLAGS
from .test_sglang_continuation import TOKENS, ChatStream, completion, scheduler, wait_for

KEY = "sk-ichat-sglang-continuation"  # what the helpers of test_sglang_continuation send


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Worker, str]]:
    from ichat.commands.make_test_model import SHAPES, make_test_model

    model = make_test_model(tmp_path_factory.mktemp("wide") / "tiny", SHAPES["tiny"],
                            wide_margins=True)  # fmt: skip
    status = free_port()
    args = ("--model-path", str(model), "--served-model-name", MODEL_NAME, "--api-key", KEY,
            "--continuation-limit", "2", "--continuation-timeout", "240",
            "--status-port", str(status), *CPU_FLAGS)  # fmt: skip
    with start_worker(tmp_path_factory.mktemp("sglang-restart"), *args, backend="sglang") as w:
        w.wait_ready(timeout=400, url=f"http://127.0.0.1:{status}", path="/readyz")
        yield w, f"http://127.0.0.1:{status}"


def test_what_the_death_cut_goes_on_on_the_restarted_engine(worker: tuple[Worker, str]) -> None:
    w, status_url = worker
    streams = [Stream("/v1/completions", max_tokens=TOKENS) for _ in range(3)]
    chat_stream = ChatStream([])
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        running = [pool.submit(s.run, w.url, KEY) for s in streams]
        chatting = pool.submit(chat_stream.run, w.url)
        whole = [pool.submit(completion, w.url) for _ in range(2)]
        at_kill = wait_all_streaming(streams)
        wait_for(lambda: len(chat_stream.events) >= 3, 60, "the chat stream under way")
        t_kill = time.monotonic()
        scheduler(w).kill()
        for f in [*running, chatting]:
            f.result(timeout=400)
        answers = [f.result(timeout=400) for f in whole]
    ended_s = time.monotonic() - t_kill
    status = httpx.get(f"{status_url}/status", timeout=10).json()
    restart_s = status["last_restart_to_ready_s"]
    print(f"\nkill -9 of the scheduler: streams at {at_kill} tokens; all answered "
          f"{ended_s:.1f} s after it; restart to ready {restart_s:.1f} s")  # fmt: skip
    assert all(n < TOKENS for n in at_kill), "the streams ended before the kill"
    assert status["engine_deaths"] == 1 and status["restarts"] == 1, status
    reference = Stream("/v1/completions", max_tokens=TOKENS)  # greedy, without a kill
    reference.run(w.url, KEY)
    for s in streams:
        s.check_complete(w.url, KEY)
        assert s.token_ids == reference.token_ids
    for answer in answers:  # had no byte sent: run again on the restarted engine, whole
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == TOKENS
    assert chat_stream.events[-1] == "[DONE]" and "error" in chat_stream.events[-2]
    log = w.output()
    assert log.count("continued on the restarted engine") == len(streams), log[-3000:]
    assert "sent to the restarted engine" in log


def test_sigterm_after_the_restart_leaves_no_process_and_frees_the_port(
    worker: tuple[Worker, str],
) -> None:
    w, _ = worker
    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(120) == 0, w.output()[-3000:]
    assert port_is_free("127.0.0.1", w.port)
