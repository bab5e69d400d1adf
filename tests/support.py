"""Helpers shared by the integration (CPU) and GPU suites: real workers as users run them."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil

from ichat.process.processes import (
    free_port,
    is_python_helper,
    port_is_free,
    stop_gracefully,
    title,
)
from tests.probe import wait_healthy

MODEL_NAME = "tiny-chat"
CONTEXT_LENGTH = 1024
PR_SET_CHILD_SUBREAPER = 36
LEAK_CHECK = Path(__file__).resolve().parents[1] / "bench" / "leak_check.py"


def become_subreaper() -> None:
    """Orphans of our workers become this process's children (Linux), so tests see them."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


@contextlib.contextmanager
def engine_env_set(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def running(proc: psutil.Process) -> bool:
    """Still running (a zombie has ended: only its parent must reap it)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def our_processes(exiting_grace: float = 2.0) -> list[psutil.Process]:
    """Live (non-zombie) descendants of this test process, but for Python's own
    multiprocessing helpers (this process's resource tracker lives as long as it).

    A process caught while it exits (its command line already empty: a worker's
    resource tracker ends when the worker's pipe closes, just after the worker) is
    given ``exiting_grace`` seconds to finish; it counts only if it is still there."""
    alive, exiting = [], []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if proc.status() == psutil.STATUS_ZOMBIE or is_python_helper(proc):
                continue
            (alive if proc.cmdline() else exiting).append(proc)
    _, still = psutil.wait_procs(exiting, timeout=exiting_grace)
    reap_zombies()
    return alive + [p for p in still if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def reap_zombies() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass


def two_free_ports() -> int:
    """A free port whose next one is free too (two workers listen on P and P + 1)."""
    while True:
        port = free_port()
        if port_is_free("127.0.0.1", port + 1):
            return port


def ichat_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ichat", *args]


@dataclass
class Worker:
    proc: subprocess.Popen[str]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(
        self, timeout: float = 600, url: str | None = None, path: str = "/health"
    ) -> None:
        """Handshake on ``path`` (default: the engine's /health at the worker's URL);
        fail at once (with the log) if the worker exits."""
        try:
            wait_healthy(url or self.url, self.proc, timeout, path)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}:\n{self.output()[-4000:]}") from exc

    def stop(self, timeout: float = 60) -> int:
        return stop_gracefully(self.proc, timeout)


@contextlib.contextmanager
def start_worker(tmp_path: Path, *args: str, backend: str = "vllm") -> Iterator[Worker]:
    port = free_port()
    log = tmp_path / f"worker-{port}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ichat_cmd("serve", "--backend", backend, "--port", str(port), *args),
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    worker = Worker(proc, port, log)
    tree: list[psutil.Process] = []
    try:
        yield worker
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            tree = psutil.Process(proc.pid).children(recursive=True)
        worker.stop()
        time.sleep(0.5)  # the worker's resource tracker ends once its pipe closed
        leftovers = [p for p in tree if running(p) and not is_python_helper(p)]
        for leftover in leftovers:  # never leave an engine behind for the next test
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()
        reap_zombies()
    # reached when the test passed: what the worker left running is a failure of its own
    assert not leftovers, f"left running after the worker stopped: {leftovers}"


ENGINE_INFO_LINE = re.compile(r"\) INFO \d\d-\d\d ")  # vLLM's "(EngineCore pid=1) INFO 12-01"


def console_noise(output: str) -> list[str]:
    """Lines a user should not see by default: leak reports at exit (triton's nanobind
    bindings, multiprocessing's resource tracker), the engine's info lines, the HTTP
    access log."""
    return [
        line
        for line in output.splitlines()
        if "nanobind" in line
        or "resource_tracker" in line
        or ENGINE_INFO_LINE.search(line)
        or 'HTTP/1.1" 200' in line
    ]


def vllm_processes(root_pid: int | None = None) -> list[psutil.Process]:
    """vLLM's own live processes (VLLM::EngineCore, VLLM::Worker...) under ``root_pid``.

    Zombies are skipped: this test process is a subreaper and adopts the exited
    grandchildren of earlier workers until it reaps them.
    """
    return [p for p in psutil.Process(root_pid).children(recursive=True) if "VLLM::" in title(p)]


def engine_core(worker_pid: int | None = None) -> psutil.Process:
    for proc in vllm_processes(worker_pid):
        if "EngineCore" in title(proc):
            return proc
    raise AssertionError("no EngineCore process under the worker")


def metric(worker: Worker, name: str) -> float:
    for line in httpx.get(f"{worker.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# A restart's phases in order, as the worker reports them (ichat_worker_phase_seconds)
RESTART_PHASES = ("death_cleanup", "restart_delay", "engine_start", "ready", "warmup")


def check_restart_account(
    detected_s: float, restart_s: float, phases: dict[str, float], serving_again_s: float
) -> None:
    """The worker's account of a restart against what a client saw: detection plus the
    worker's time from the detection to ready fit in the client's kill-to-serving time,
    and the restart's phases fit in the worker's time."""
    assert detected_s + restart_s <= serving_again_s + 0.1, (detected_s, restart_s, serving_again_s)
    assert sum(phases[k] for k in RESTART_PHASES) <= restart_s + 0.5, (phases, restart_s)


def phase_seconds(worker: Worker) -> dict[str, float]:
    """The worker's last duration of each lifecycle phase (``ichat_worker_phase_seconds``)."""
    prefix = 'ichat_worker_phase_seconds{phase="'
    text = httpx.get(f"{worker.url}/metrics", timeout=10).text
    return {
        line[len(prefix) :].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def metric_total(worker: Worker, name: str) -> float:
    """The sum over every label set of ``name`` (vLLM labels by model, reason, engine)."""
    text = httpx.get(f"{worker.url}/metrics", timeout=10).text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + " ") or line.startswith(name + "{")
    ]
    assert values, f"{name} not in /metrics"
    return sum(values)


def stream_once(url: str, max_tokens: int) -> str:
    """Stream one chat; return 'finished' or the error type (never hang)."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    try:
        stream = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": "go on"}],
            max_tokens=max_tokens,
            stream=True,
            extra_body={"ignore_eos": True, "min_tokens": max_tokens},
        )
        finish = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return "finished" if finish == "length" else f"ended:{finish}"
    except Exception as exc:  # the point: every stream ends, one way or the other
        return type(exc).__name__


def chat_ok(url: str) -> bool:
    try:
        r = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=30,
            json={
                "model": MODEL_NAME,
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
    except httpx.TransportError:
        return False
    return r.status_code == 200


@dataclass(frozen=True)
class KillResult:
    detected_s: float  # from the worker's own metric
    serving_again_s: float


def kill_and_wait_serving(worker: Worker, pid: int, timeout: float = 600) -> KillResult:
    """SIGKILL ``pid`` (an engine process of ``worker``); wait until it serves again."""
    t_kill, wall_kill = time.monotonic(), time.time()
    os.kill(pid, signal.SIGKILL)
    while not chat_ok(worker.url):
        assert worker.proc.poll() is None, worker.output()[-3000:]
        assert time.monotonic() - t_kill < timeout, "the worker did not serve again"
        time.sleep(0.1)
    serving = time.monotonic() - t_kill
    detected = metric(worker, "ichat_worker_last_death_detected_timestamp_seconds") - wall_kill
    return KillResult(detected, serving)


def cycle_timeout(cycles: int) -> int:
    return 120 * cycles + 300


def run_leak_check(model_dir: Path, cycles: int, tmp_path: Path, *extra: str) -> dict[str, Any]:
    """``bench/leak_check.py`` in a fresh process (``extra``: its engine and flags); its
    cycle lines printed, its JSON report returned."""
    out = tmp_path / "leak.json"
    cmd = [sys.executable, str(LEAK_CHECK), "--model-path", str(model_dir)]
    cmd += ["--cycles", str(cycles), "--out", str(out), *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=cycle_timeout(cycles))
    except subprocess.TimeoutExpired as exc:  # killed; its orphan guard kills its engine
        reap_zombies()
        output = (exc.stdout or b"")[-6000:] + (exc.stderr or b"")[-6000:]
        raise AssertionError(f"leak check timed out:\n{output.decode(errors='replace')}") from None
    reap_zombies()  # the cycles' exited model workers were adopted by this subreaper
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not our_processes()
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("cycle")))
    report: dict[str, Any] = json.loads(out.read_text())
    return report


@dataclass
class SteadyLoad:
    """Chats and streams on each ``(url, stream)`` target, back to back until stopped;
    every failure is kept (a stream fails unless it ends with one "length" finish)."""

    targets: list[tuple[str, bool]]
    key: str
    model: str = MODEL_NAME
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> SteadyLoad:
        for url, stream in self.targets:
            thread = threading.Thread(target=self._run, args=(url, stream), daemon=True)
            thread.start()
            self._threads.append(thread)
        t0 = time.monotonic()
        while self.ok < len(self.targets):
            assert time.monotonic() - t0 < 120, f"the load does not run: {self.failures[:3]}"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)

    def _run(self, url: str, stream: bool) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=self.key, max_retries=0, timeout=120)
        while not self._stop.is_set():
            try:
                self._one(client, stream)
                self.ok += 1
            except Exception as exc:  # every failure counts
                self.failures.append(f"{url} stream={stream}: {exc!r}"[:300])

    def _one(self, client: openai.OpenAI, stream: bool) -> None:
        messages: Any = [{"role": "user", "content": "hi"}]
        extra = {"ignore_eos": True}
        if not stream:
            reply = client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=8, extra_body=extra
            )
            assert reply.choices[0].finish_reason == "length", reply
            return
        finishes = []
        for chunk in client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=48, stream=True, extra_body=extra
        ):
            finishes += [c.finish_reason for c in chunk.choices if c.finish_reason]
        assert finishes == ["length"], finishes


STREAM_TOKENS = 200


@dataclass
class Stream:
    """One greedy streamed request with token ids asked by the client (the test's
    check of a stream that an engine death cut)."""

    path: str
    events: list[Any] = field(default_factory=list)
    status: int = 0
    max_tokens: int = STREAM_TOKENS

    @property
    def chunks(self) -> list[dict[str, Any]]:
        return [e for e in self.events if isinstance(e, dict)]

    @property
    def token_ids(self) -> list[int]:
        return [i for c in self.chunks for ch in c["choices"] for i in ch.get("token_ids") or ()]

    @property
    def text(self) -> str:
        key = "delta" if self.path.endswith("chat/completions") else None
        return "".join(
            (ch["delta"].get("content") or "") if key else ch["text"]
            for c in self.chunks
            for ch in c["choices"]
        )

    def run(self, url: str, key: str | None = None) -> None:
        body: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": self.max_tokens,
                                "stream": True, "ignore_eos": True, "temperature": 0,
                                "return_token_ids": True,
                                "stream_options": {"include_usage": True}}  # fmt: skip
        if self.path.endswith("chat/completions"):
            body["messages"] = [{"role": "user", "content": "tell me a story"}]
        else:
            body["prompt"] = "once upon a time"
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        with (
            httpx.Client(timeout=120, headers=headers) as client,
            client.stream("POST", url + self.path, json=body) as r,
        ):
            self.status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line.removeprefix("data: ")
                    self.events.append(data if data == "[DONE]" else json.loads(data))

    def check_complete(self, worker_url: str, key: str | None = None) -> None:
        """One well-formed stream of all its tokens: 200, no error, one id, one finish,
        one usage for the whole request, [DONE] once, and its text the detokenized ids
        (no token lost or repeated at a cut)."""
        assert self.status == 200
        errors = [c for c in self.chunks if "error" in c]
        assert errors == [], errors
        assert self.events.count("[DONE]") == 1 and self.events[-1] == "[DONE]"
        assert len(self.token_ids) == self.max_tokens
        assert len({c["id"] for c in self.chunks}) == 1
        finishes = [ch["finish_reason"] for c in self.chunks for ch in c["choices"]]
        assert [f for f in finishes if f] == ["length"] and finishes[-1] == "length"
        usage = [c["usage"] for c in self.chunks if c.get("usage")]
        assert len(usage) == 1 and usage[0]["completion_tokens"] == self.max_tokens
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        detokenized = {"model": MODEL_NAME, "tokens": self.token_ids}
        reply = httpx.post(f"{worker_url}/detokenize", json=detokenized, headers=headers,
                           timeout=30)  # fmt: skip
        answer = reply.json()
        whole = answer["prompt"] if "prompt" in answer else answer["text"]  # vLLM's, SGLang's
        assert whole == self.text, f"detokenized {whole!r} != streamed {self.text!r}"


def chats_until(
    url: str, stop: threading.Event, headers: dict[str, str] | None = None
) -> tuple[int, list[str]]:
    """Non-streamed chats one after another until ``stop``: (answered, failures)."""
    answered, failures = 0, []
    with httpx.Client(timeout=60, headers=headers) as client:
        while not stop.is_set():
            body = {"model": MODEL_NAME, "max_tokens": 8,
                    "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
            try:
                reply = client.post(f"{url}/v1/chat/completions", json=body)
            except httpx.HTTPError as exc:
                failures.append(type(exc).__name__)
                continue
            if reply.status_code == 200:
                answered += 1
            else:
                failures.append(f"HTTP {reply.status_code}: {reply.text[:200]}")
    return answered, failures


def wait_standby_ready(
    status: Callable[[], dict[str, Any]],
    proc: subprocess.Popen[str],
    output: Callable[[], str],
    timeout: float,
) -> dict[str, Any]:
    """The worker's ``/status`` once its standby is ready (its engines listed); fail at
    once if the standby failed or the process exited."""
    t0 = time.monotonic()
    while True:
        current = status()
        if current["standby"] == "ready" and current["engines"].get("standby"):
            return current
        assert current["standby"] != "failed", current
        assert proc.poll() is None, output()[-3000:]
        assert time.monotonic() - t0 < timeout, f"no standby ready: {current}"
        time.sleep(0.5)


def wait_all_streaming(streams: list[Stream], tokens: int = 3, timeout: float = 120) -> list[int]:
    """Wait until each stream has ``tokens`` token ids; how many each has then."""
    deadline = time.monotonic() + timeout
    while not all(len(s.token_ids) >= tokens for s in streams):
        assert time.monotonic() < deadline, [len(s.token_ids) for s in streams]
        time.sleep(0.01)
    return [len(s.token_ids) for s in streams]


def prometheus_binary(name: str = "prometheus") -> str:
    """Prometheus' ``prometheus`` or ``promtool``: $ICHAT_PROMETHEUS / $ICHAT_PROMTOOL
    (scripts/test.sh sets them), else scripts/setup-prometheus.sh's folder."""
    given = os.environ.get(f"ICHAT_{name.upper()}")
    if given:
        return given
    local = Path(__file__).resolve().parents[1] / ".tools" / "prometheus" / "usr" / "bin" / name
    if not local.exists():
        raise AssertionError(f"{name} not found: run scripts/setup-prometheus.sh")
    return str(local)


@dataclass
class PrometheusAPI:
    """A real Prometheus server's HTTP API (/api/v1)."""

    url: str

    def _get(self, path: str, **params: Any) -> Any:
        reply = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = reply.json()
        assert reply.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's series (``metric``, ``value``)."""
        return self._get("query", query=expr)["result"]  # type: ignore[no-any-return]

    def query_range(self, expr: str, seconds: float, step: float = 2.0) -> list[dict[str, Any]]:
        """A range query's series over the last ``seconds``."""
        now = time.time()
        data = self._get("query_range", query=expr, start=now - seconds, end=now, step=step)
        return data["result"]  # type: ignore[no-any-return]

    def alerts(self, name: str) -> list[dict[str, Any]]:
        """Active alerts (pending or firing) called ``name``."""
        return [a for a in self._get("alerts")["alerts"] if a["labels"]["alertname"] == name]

    def targets(self) -> list[dict[str, Any]]:
        return self._get("targets")["activeTargets"]  # type: ignore[no-any-return]


def scheduler_of(pids: list[int]) -> psutil.Process:
    """The SGLang scheduler among an engine's processes (``/status``'s ``engines``)."""
    for pid in pids:
        proc = psutil.Process(pid)
        if "sglang::scheduler" in title(proc):
            return proc
    raise AssertionError(f"no SGLang scheduler among {pids}")
