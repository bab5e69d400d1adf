"""`ichat serve --backend vllm` as users run it: one engine start for the module."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from ichat.process.processes import port_is_free, title
from tests.support import (
    CONTEXT_LENGTH,
    MODEL_NAME,
    Worker,
    console_noise,
    our_processes,
    start_worker,
    stream_once,
)


@pytest.fixture(scope="module")
def worker(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    with start_worker(
        tmp_path_factory.mktemp("worker"),
        "--model-path",
        str(model_dir),
        "--served-model-name",
        MODEL_NAME,
        "--context-length",
        str(CONTEXT_LENGTH),
    ) as w:
        w.wait_ready()
        yield w


@pytest.fixture(scope="module")
def client(worker: Worker) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0)


def test_health(worker: Worker) -> None:
    assert httpx.get(f"{worker.url}/health").status_code == 200


def test_models_lists_served_name_and_context_length(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].model_extra["max_model_len"] == CONTEXT_LENGTH


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Hello there"}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.model == MODEL_NAME
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    assert reply.choices[0].message.content


def test_streaming_chat_completion(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Tell me more"}],
        max_tokens=16,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True, "min_tokens": 16},
    )
    chunks = [c for c in stream if c.choices and c.choices[0].delta.content]
    assert len(chunks) >= 2  # tokens arrived incrementally
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_engine_runs_inside_our_process(worker: Worker) -> None:
    """The API server is the ichat process itself; vLLM's engine is its child."""
    me = psutil.Process(worker.proc.pid)
    listening = [
        c
        for c in me.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == worker.port
    ]
    assert listening, "the ichat process itself must hold the listening socket"
    children = me.children(recursive=True)
    titles = [title(p) for p in children]
    assert any("EngineCore" in t for t in titles), titles
    for t in titles:
        assert "vllm serve" not in t and "api_server" not in t, t  # no vLLM CLI child
        assert "ichat serve" not in t, t  # and no second worker


def test_sigterm_drains_in_flight_streams_exits_0_no_child_port_free(worker: Worker) -> None:
    # Last in this module: it stops the shared worker.
    children = psutil.Process(worker.proc.pid).children(recursive=True)
    assert children
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream_once, worker.url, 800) for _ in range(4)]
        time.sleep(1.0)
        assert not any(s.done() for s in streams), "streams should still be running"
        t0 = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        outcomes = [s.result(timeout=60) for s in streams]
    assert outcomes == ["finished"] * 4  # in-flight requests completed during the drain
    assert worker.proc.wait(60) == 0, worker.output()[-3000:]
    elapsed = time.monotonic() - t0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"left running: {alive}"
    assert port_is_free("127.0.0.1", worker.port)
    assert not our_processes()
    out = worker.output()
    assert "backend stopped" in out
    # by default: iChat's lines and the engine's warnings; no info, access log or leak report
    assert console_noise(out) == []
    print(f"SIGTERM with 4 streams in flight: all finished, exit 0 after {elapsed:.2f} s")
