"""One vLLM worker with continuation on (`--continuation-limit 2`) and neither a standby
nor a gateway: kill -9 of its EngineCore while streams and non-streamed requests run.

What the death cut waits for the worker's next engine, restarted on the same port: the
dead engine's HTTP server keeps the clients' connections (SSE comments keep the streams
alive), and once the restarted engine serves, each stream is continued there
token-exactly and each request with no byte sent runs there again, within
`--continuation-timeout`. The worker's SIGTERM then leaves no process and frees the
port.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from ichat.process.processes import free_port, port_is_free
from tests.support import (
    MODEL_NAME,
    Stream,
    Worker,
    engine_core,
    start_worker,
    wait_all_streaming,
)

TOKENS = 400  # a few seconds on these 2 cores: the kill lands mid-way


@pytest.fixture(scope="module")
def wide_margin_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Greedy choices far from ties: the continued streams, run on a new engine in
    another batch, can be compared with an uninterrupted run token by token."""
    from ichat.commands.make_test_model import SHAPES, make_test_model

    return make_test_model(tmp_path_factory.mktemp("wide") / "tiny", SHAPES["tiny"],
                           wide_margins=True)  # fmt: skip


@dataclass
class StatusWorker(Worker):
    status_port: int = 0

    def status(self) -> dict[str, Any]:
        reply = httpx.get(f"http://127.0.0.1:{self.status_port}/status", timeout=10)
        return dict(reply.json())


@pytest.fixture(scope="module")
def worker(
    wide_margin_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StatusWorker]:
    status = free_port()
    args = ("--model-path", str(wide_margin_model), "--served-model-name", MODEL_NAME,
            "--continuation-limit", "2", "--continuation-timeout", "240",
            "--status-port", str(status), "--context-length", "1024")  # fmt: skip
    with start_worker(tmp_path_factory.mktemp("restart-continuation"), *args) as w:
        w.wait_ready(timeout=600, url=f"http://127.0.0.1:{status}", path="/readyz")
        yield StatusWorker(w.proc, w.port, w.log, status)


def completion(url: str) -> httpx.Response:
    body = {"model": MODEL_NAME, "prompt": "once upon a time", "max_tokens": TOKENS,
            "temperature": 0, "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    return httpx.post(f"{url}/v1/completions", json=body, timeout=600)


def test_what_the_death_cut_goes_on_on_the_restarted_engine(worker: StatusWorker) -> None:
    paths = ["/v1/chat/completions", "/v1/completions"] * 2
    streams = [Stream(p, max_tokens=TOKENS) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(len(streams) + 2) as pool:
        running = [pool.submit(s.run, worker.url) for s in streams]
        whole = [pool.submit(completion, worker.url) for _ in range(2)]
        at_kill = wait_all_streaming(streams)
        t_kill = time.monotonic()
        engine_core(worker.proc.pid).kill()
        for f in running:
            f.result(timeout=600)
        answers = [f.result(timeout=600) for f in whole]
    ended_s = time.monotonic() - t_kill
    status = worker.status()
    restart_s = status["last_restart_to_ready_s"]
    print(f"\nkill -9 EngineCore: streams at {at_kill} tokens; all answered {ended_s:.1f} s "
          f"after the kill; restart to ready {restart_s:.1f} s")  # fmt: skip
    assert all(n < TOKENS for n in at_kill), "streams ended before the kill"
    assert status["engine_deaths"] == 1 and status["restarts"] == 1, status
    for s in streams:  # complete, one id, one finish, one usage, [DONE] once, text = ids
        s.check_complete(worker.url)
    for path in set(paths):  # token-exact: the same request run without a kill
        reference = Stream(path, max_tokens=TOKENS)
        reference.run(worker.url)
        assert all(s.token_ids == reference.token_ids for s in streams if s.path == path)
        if path == "/v1/completions":
            for answer in answers:  # had no byte sent: run again on the restarted engine
                assert answer.status_code == 200, answer.text[:500]
                [choice] = answer.json()["choices"]
                assert choice["finish_reason"] == "length"
                assert choice["token_ids"] == reference.token_ids
    log = worker.output()
    assert log.count("continued on the restarted engine") == len(streams), log[-3000:]
    assert "sent to the restarted engine" in log
    assert status["continuations"].get("continued") == len(streams), status["continuations"]


def test_sigterm_after_the_restart_leaves_no_process_and_frees_the_port(worker: Worker) -> None:
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(120) == 0, worker.output()[-3000:]
    assert port_is_free("127.0.0.1", worker.port)
