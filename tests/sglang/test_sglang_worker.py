"""`ichat serve --backend sglang` on real SGLang (CPU): one engine start for the module.

Order matters: serving checks first, then kill -9 of the scheduler (detected, restarted
in the same worker process), then SIGTERM (exit 0, no child, port free).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from ichat.process.processes import free_port, not_running, port_is_free, title
from tests.support import MODEL_NAME, Worker, check_restart_account, ichat_cmd, start_worker

from .conftest import CPU_FLAGS

API_KEY = "sglang-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
RESULTS: dict[str, float] = {}


@dataclass
class SGLangWorker(Worker):
    status_port: int = 0

    def status(self, path: str) -> httpx.Response:
        return httpx.get(f"http://127.0.0.1:{self.status_port}{path}", timeout=10)

    def wait_status_ready(self, timeout: float) -> None:
        self.wait_ready(timeout, url=f"http://127.0.0.1:{self.status_port}", path="/readyz")


@pytest.fixture(scope="module")
def own_model(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the test model: the reload test changes its weights on disk."""
    copy = tmp_path_factory.mktemp("sglang-model") / "model"
    shutil.copytree(model_dir, copy)
    return copy


@pytest.fixture(scope="module")
def worker(own_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SGLangWorker]:
    status_port = free_port()
    args = ("--status-port", str(status_port), "--model-path", str(own_model),
            "--served-model-name", MODEL_NAME, "--api-key", API_KEY, *CPU_FLAGS)  # fmt: skip
    t0 = time.monotonic()
    with start_worker(tmp_path_factory.mktemp("sglang"), *args, backend="sglang") as w:
        sw = SGLangWorker(w.proc, w.port, w.log, status_port)
        sw.wait_status_ready(timeout=400)
        RESULTS["start_to_ready_s"] = time.monotonic() - t0
        yield sw
    print(f"\nSGLang worker figures: {RESULTS}")


def client(url: str, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def sglang_processes(worker_pid: int) -> dict[str, psutil.Process]:
    found = {}
    for proc in psutil.Process(worker_pid).children(recursive=True):
        name = title(proc)
        for kind in ("scheduler", "detoken"):
            if f"sglang::{kind}" in name and proc.status() != psutil.STATUS_ZOMBIE:
                found[kind] = proc
    return found


def test_health_model_info_and_models(worker: SGLangWorker) -> None:
    assert httpx.get(f"{worker.url}/health", timeout=30).status_code == 200
    info = httpx.get(f"{worker.url}/model_info", headers=AUTH, timeout=10)
    assert info.status_code == 200 and info.json()["is_generation"] is True
    models = client(worker.url).models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_native_generate(worker: SGLangWorker) -> None:
    body = {"text": "Hello", "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}}
    r = httpx.post(f"{worker.url}/generate", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["completion_tokens"] == 4
    assert isinstance(r.json()["text"], str)


def test_chat_and_stream_through_the_openai_client(worker: SGLangWorker) -> None:
    c = client(worker.url)
    chat = c.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert chat.choices[0].message.content and chat.usage is not None
    assert chat.usage.completion_tokens <= 5
    stream = c.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "go on"}],
        max_tokens=16,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "length" and len([p for p in pieces if p]) >= 8


def test_requests_without_or_with_a_wrong_key_get_401(worker: SGLangWorker) -> None:
    for key in (None, "wrong-key"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{worker.url}/v1/chat/completions", json=body, headers=headers)
        assert r.status_code == 401, (key, r.status_code, r.text[:200])


def test_the_status_endpoints_report_ready(worker: SGLangWorker) -> None:
    assert worker.status("/readyz").status_code == 200
    assert worker.status("/livez").status_code == 200
    assert worker.status("/status").json()["state"] == "ready"
    assert "ichat_worker_restarts_total 0.0" in worker.status("/metrics").text


def greedy(worker: SGLangWorker) -> list[int]:
    body = {"text": "once upon a time", "sampling_params": {"max_new_tokens": 12,
            "temperature": 0, "ignore_eos": True}}  # fmt: skip
    r = httpx.post(f"{worker.url}/generate", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    ids: list[int] = r.json()["output_ids"]
    return ids


def ichat_reload(worker: SGLangWorker, *args: str) -> subprocess.CompletedProcess[str]:
    url = f"http://127.0.0.1:{worker.status_port}"
    cmd = ichat_cmd("reload", url, "--api-key", API_KEY, *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_reload_reads_new_weights_in_place_under_load_and_restarts_for_new_flags(
    worker: SGLangWorker, own_model: Path
) -> None:
    """`ichat reload --merge` (the same flags): SGLang reads the weights at the model
    path again (its update_weights_from_disk) while streams run: they all complete,
    and greedy output follows the weights on disk (changed, then restored). New flags
    restart the engine with them (SGLang runs one engine per process), and flags that
    parse but do not start give the old ones back; a flag SGLang refuses gets 400 and
    `--swap` 501, the engine serving on."""
    from safetensors.torch import load_file, save_file

    weights = own_model / "model.safetensors"
    original, before = weights.read_bytes(), greedy(worker)
    flipped = ("lm_head.", "model.embed_tokens.")  # new weights: another greedy output
    changed = {k: -v if k.startswith(flipped) else v for k, v in load_file(weights).items()}
    save_file(changed, weights, metadata={"format": "pt"})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream_chat, worker.url, 64) for _ in range(4)]
        time.sleep(0.5)
        done = ichat_reload(worker, "--merge")
        finishes = [s.result(timeout=120) for s in streams]
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["method"] == "in_place"
    assert finishes == ["length"] * 4
    after = greedy(worker)
    assert after != before  # the weights on disk now serve
    weights.write_bytes(original)
    assert ichat_reload(worker, "--merge", "--in-place").returncode == 0
    assert greedy(worker) == before
    bad = ichat_reload(worker, "--merge", "--", "--no-such-sglang-flag")
    assert bad.returncode == 2 and "HTTP 400" in bad.stderr, bad.stderr[-2000:]
    swap = ichat_reload(worker, "--merge", "--swap", "--", "--max-running-requests", "32")
    assert swap.returncode == 8 and "HTTP 501" in swap.stderr, swap.stderr[-2000:]
    pids = {p.pid for p in sglang_processes(worker.proc.pid).values()}
    restarted = ichat_reload(worker, "--merge", "--", "--max-running-requests", "32")
    assert restarted.returncode == 0, restarted.stderr[-2000:]
    answer = json.loads(restarted.stdout)
    assert answer["method"] == "restart" and answer["phases"]["reload_engine_start"] > 0
    status = worker.status("/status").json()
    assert status["reloads"] == {"ok": 3, "refused": 2} and status["state"] == "ready"
    assert status["engine_args"][-2:] == ["--max-running-requests", "32"]
    assert status["restarts"] == 0 and status["engine_deaths"] == 0  # a reload, not a crash
    assert not pids & {p.pid for p in sglang_processes(worker.proc.pid).values()}
    assert greedy(worker) == before
    # flags that parse but do not start: the worker starts again with those it had
    failed = ichat_reload(worker, "--merge", "--", "--tokenizer-path", str(own_model / "none"))
    assert failed.returncode == 8 and "did not start" in failed.stderr, failed.stderr[-2000:]
    worker.wait_status_ready(timeout=300)
    status = worker.status("/status").json()
    assert status["engine_args"][-2:] == ["--max-running-requests", "32"]
    assert status["reloads"]["failed"] == 1 and greedy(worker) == before


def stream_chat(url: str, max_tokens: int) -> str:
    """One streamed chat with ``ignore_eos``; its last finish reason."""
    stream = client(url).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens,
        stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    finish = ""
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
    return finish


def test_every_sglang_workaround_resolves_in_the_installed_release(
    worker: SGLangWorker,
) -> None:
    """Each place iChat reaches into SGLang's internals still resolves: an SGLang upgrade
    that moves one fails here instead of degrading silently."""
    from ichat.backends.sglang_compat import WORKAROUNDS

    workarounds = worker.status("/status").json()["workarounds"]
    assert workarounds == {w.name: "resolved" for w in WORKAROUNDS}


def orphan_guard(worker_pid: int) -> psutil.Process:
    """The worker's orphan guard (``ichat.process.reaper``), a child of the worker."""

    def cmdline(proc: psutil.Process) -> str:
        try:
            return " ".join(proc.cmdline())
        except psutil.Error:  # a zombie has none
            return ""

    children = psutil.Process(worker_pid).children()
    [guard] = [p for p in children if "ichat.process.reaper" in cmdline(p)]
    return guard


def chat_events(url: str, events: list[object]) -> None:
    """A long streamed chat; its events as they come (JSON or "[DONE]")."""
    body = {"model": MODEL_NAME, "max_tokens": 2000, "stream": True, "ignore_eos": True,
            "messages": [{"role": "user", "content": "go on"}]}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH,
                      timeout=120) as reply:  # fmt: skip
        for line in reply.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))


def long_chat(url: str) -> httpx.Response:
    body = {"model": MODEL_NAME, "max_tokens": 2000, "ignore_eos": True,
            "messages": [{"role": "user", "content": "go on"}]}  # fmt: skip
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=120)


def test_kill_9_of_the_scheduler_is_detected_within_1s_and_the_worker_serves_again(
    worker: SGLangWorker,
) -> None:
    """Requests in flight end at the death's detection, not at the drain timeout:
    SGLang's own answers would wait for the dead scheduler (no gateway here, so nothing
    takes them over: a stream under way gets an error event, a request with no byte
    sent a 503), and the restart waits for them."""
    before = sglang_processes(worker.proc.pid)
    assert set(before) == {"scheduler", "detoken"}, worker.output()[-3000:]
    guard = orphan_guard(worker.proc.pid)
    events: list[object] = []
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        streaming = pool.submit(chat_events, worker.url, events)
        whole = pool.submit(long_chat, worker.url)
        deadline = time.monotonic() + 60
        while len(events) < 3:
            assert time.monotonic() < deadline and not streaming.done(), events
            time.sleep(0.01)
        t_kill, wall_kill = time.monotonic(), time.time()
        os.kill(before["scheduler"].pid, signal.SIGKILL)
        while worker.status("/status").json()["engine_deaths"] == 0:
            assert time.monotonic() - t_kill < 10, "the death was not noticed within 10 s"
            time.sleep(0.05)
        streaming.result(timeout=60)
        answer = whole.result(timeout=60)
        ended_s = time.monotonic() - t_kill
    assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]  # type: ignore[operator]
    assert answer.status_code == 503, answer.text
    RESULTS["kill_to_requests_ended_s"] = ended_s
    assert ended_s < 10, f"requests in flight held {ended_s:.1f} s after the kill"
    assert worker.status("/readyz").status_code == 503  # restarting
    worker.wait_status_ready(timeout=400)
    RESULTS["kill_to_serving_again_s"] = time.monotonic() - t_kill
    stats = worker.status("/status").json()
    detected = stats["last_death_detected_unix"] - wall_kill
    RESULTS["kill_to_detection_s"] = detected
    assert 0 <= detected <= 1.0, stats
    assert stats["restarts"] == 1 and stats["engine_deaths"] == 1
    # the worker's account of the restart, from the detection on, phase by phase
    check_restart_account(
        detected,
        stats["last_restart_to_ready_s"],
        stats["phase_seconds"],
        RESULTS["kill_to_serving_again_s"],
    )
    scrape = worker.status("/metrics").text  # SGLang's own /metrics lacks iChat's lines
    assert "ichat_worker_restarts_total 1.0" in scrape
    assert 'ichat_worker_state{state="ready"} 1.0' in scrape
    after = sglang_processes(worker.proc.pid)
    assert set(after) == {"scheduler", "detoken"}
    assert after["scheduler"].pid != before["scheduler"].pid
    # the restart stopped exactly the engine's processes: the orphan guard still runs
    assert guard.status() != psutil.STATUS_ZOMBIE and orphan_guard(worker.proc.pid) == guard
    assert not_running([before["detoken"]]) == [before["detoken"]]  # cleaned up, not leaked
    chat = client(worker.url).chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert chat.choices[0].message.content is not None


def test_kill_9_of_the_detokenizer_is_an_engine_death_too(worker: SGLangWorker) -> None:
    before = sglang_processes(worker.proc.pid)
    deaths = worker.status("/status").json()["engine_deaths"]
    t_kill, wall_kill = time.monotonic(), time.time()
    os.kill(before["detoken"].pid, signal.SIGKILL)
    while worker.status("/status").json()["engine_deaths"] == deaths:
        assert time.monotonic() - t_kill < 10, "the death was not noticed within 10 s"
        time.sleep(0.05)
    worker.wait_status_ready(timeout=400)
    stats = worker.status("/status").json()
    assert 0 <= stats["last_death_detected_unix"] - wall_kill <= 1.0, stats
    after = sglang_processes(worker.proc.pid)
    assert set(after) == {"scheduler", "detoken"}
    assert after["detoken"].pid != before["detoken"].pid
    assert not_running([before["scheduler"]]) == [before["scheduler"]]  # its engine went too


def stream_to_the_end(url: str, max_tokens: int) -> str:
    """'finished' when the stream ran to its length, else what ended it."""
    try:
        stream = client(url).chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "go on"}],
            max_tokens=max_tokens, stream=True,
            extra_body={"ignore_eos": True, "min_tokens": max_tokens},
        )  # fmt: skip
        finish = [c.choices[0].finish_reason for c in stream if c.choices]
        return "finished" if finish and finish[-1] == "length" else f"ended:{finish[-1:]}"
    except Exception as exc:  # the point: every stream ends, one way or the other
        return type(exc).__name__


def test_sigterm_drains_streams_in_flight_exits_0_no_child_left_port_free(
    worker: SGLangWorker,
) -> None:
    children = psutil.Process(worker.proc.pid).children(recursive=True)
    assert children
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        # long enough to be in flight a second later (400 tokens once ran out within it)
        streams = [pool.submit(stream_to_the_end, worker.url, 2000) for _ in range(4)]
        time.sleep(1.0)
        assert not any(s.done() for s in streams), "streams should still be running"
        t0 = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        outcomes = [s.result(timeout=120) for s in streams]
    assert outcomes == ["finished"] * 4  # in flight at SIGTERM, drained to the end
    assert worker.proc.wait(60) == 0, worker.output()[-3000:]
    RESULTS["sigterm_to_exit_s"] = time.monotonic() - t0
    _, alive = psutil.wait_procs(children, timeout=10)
    assert [p for p in alive if p.status() != psutil.STATUS_ZOMBIE] == []
    assert port_is_free("127.0.0.1", worker.port)


def run_ichat_sglang(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    done = subprocess.run(
        ichat_cmd("serve", "--backend", "sglang", "--port", str(free_port()), *args),
        capture_output=True,
        text=True,
        timeout=180,
    )
    return done, time.monotonic() - t0


def test_a_bad_flag_is_a_clear_error_before_any_launch(model_dir: Path) -> None:
    done, seconds = run_ichat_sglang("--model-path", str(model_dir), "--no-such-flag", "1")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "unrecognized arguments: --no-such-flag" in done.stderr
    assert "sglang::" not in done.stderr  # nothing was launched
    print(f"bad flag: exit 2 after {seconds:.1f} s")


def test_a_readiness_timeout_shorter_than_the_engines_start_is_a_boot_failure(
    model_dir: Path,
) -> None:
    shm_before = set(os.listdir("/dev/shm"))
    done, seconds = run_ichat_sglang(
        "--model-path", str(model_dir), "--ready-timeout", "5", *CPU_FLAGS
    )
    assert done.returncode == 3, done.stderr[-3000:]
    assert "not ready within the readiness timeout of 5 s (--ready-timeout)" in done.stderr
    assert "restart" not in done.stderr
    assert set(os.listdir("/dev/shm")) <= shm_before
    print(f"--ready-timeout 5: exit 3 after {seconds:.1f} s")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--enable-metrics",), "--standby with --enable-metrics"),
        (("--grpc-port", str(free_port())), "--standby with --grpc-port"),
    ],
)
def test_a_standby_that_cannot_share_the_process_is_refused_before_any_launch(
    model_dir: Path, flags: tuple[str, ...], message: str
) -> None:
    done, seconds = run_ichat_sglang("--model-path", str(model_dir), "--standby", *flags)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert "sglang::" not in done.stderr
    print(f"--standby {flags[0]}: exit 2 after {seconds:.1f} s")


def test_a_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    done, _ = run_ichat_sglang("--model-path", str(tmp_path / "nowhere"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "model path does not exist" in done.stderr


def test_sglang_flags_reach_its_own_parser_unchanged(model_dir: Path) -> None:
    """SGLang's flags (and iChat's unified names, which are SGLang's own) arrive in its
    ServerArgs as SGLang parses them; iChat adds only host, port and log level. Parsed
    in a process of its own: SGLang imports its CPU kernel stand-in from PYTHONPATH."""
    argv = [*CPU_FLAGS, "--model-path", str(model_dir), "--served-model-name", "given-name",
            "--context-length", "512", "--max-running-requests", "7",
            "--chunked-prefill-size", "256", "--schedule-policy", "lpm"]  # fmt: skip
    code = (
        "import json, sys\n"
        "from ichat.backends.sglang_backend import SGLangBackend\n"
        "from ichat.config import WorkerConfig\n"
        "a = SGLangBackend(WorkerConfig(host='127.0.0.1', port=18123), sys.argv[1:])"
        ".get_backend_args()\n"
        "print(json.dumps([a.model_path, a.served_model_name, a.context_length,"
        " a.max_running_requests, a.chunked_prefill_size, a.schedule_policy, a.host,"
        " a.port, a.log_level]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    parsed = json.loads(done.stdout.strip().splitlines()[-1])
    assert parsed == [str(model_dir), "given-name", 512, 7, 256, "lpm", "127.0.0.1", 18123,
                      "warning"]  # fmt: skip


@pytest.mark.parametrize(
    ("cuda", "flags", "expected"),
    [
        (False, (), [False, False, False]),
        (True, (), [False, False, False]),
        (True, ("--enable-memory-saver",), [True, True, True]),
    ],
)
def test_a_standby_sleeps_with_sglangs_memory_saver(
    model_dir: Path, cuda: bool, flags: tuple[str, ...], expected: list[bool]
) -> None:
    """--standby with SGLang's --enable-memory-saver: the standby will give its GPU
    memory back, so every engine also keeps its weights' host copy; without it, on
    CUDA, a warning says the standby keeps its memory. Whether the engine runs on CUDA
    is replaced here (the machine has no GPU)."""
    code = (
        "import json, sys\n"
        "from ichat.backends import sglang_compat\n"
        f"sglang_compat.on_cuda = lambda args: {cuda}\n"
        "from ichat.backends.sglang_backend import SGLangBackend\n"
        "from ichat.config import WorkerConfig\n"
        "b = SGLangBackend(WorkerConfig(host='127.0.0.1', port=18123, standby=True),"
        " sys.argv[1:])\n"
        "a = b.get_backend_args()\n"
        "print(json.dumps([b._sleep, a.enable_memory_saver, a.enable_weights_cpu_backup]))\n"
    )
    argv = [*CPU_FLAGS, "--model-path", str(model_dir), *flags]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected
    warned = "--standby without --enable-memory-saver" in done.stderr
    assert warned == (cuda and not flags)


def test_sigkill_of_the_worker_leaves_no_engine_process(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    args = ("--model-path", str(model_dir), "--served-model-name", MODEL_NAME, *CPU_FLAGS)
    shm_before = set(os.listdir("/dev/shm"))
    with start_worker(tmp_path_factory.mktemp("sglang-kill"), *args, backend="sglang") as w:
        w.wait_ready(timeout=400)
        engine = list(sglang_processes(w.proc.pid).values())
        assert len(engine) == 2, w.output()[-3000:]
        w.proc.send_signal(signal.SIGKILL)
        w.proc.wait(10)
        t0 = time.monotonic()
        while [p for p in engine if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
            assert time.monotonic() - t0 < 10, "the orphan guard did not kill the engine"
            time.sleep(0.05)
        while set(os.listdir("/dev/shm")) - shm_before:  # sglang_loads_*: unlinked too
            assert time.monotonic() - t0 < 10, set(os.listdir("/dev/shm")) - shm_before
            time.sleep(0.05)
    assert port_is_free("127.0.0.1", w.port)
