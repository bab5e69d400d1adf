"""`ichat up` as a user runs it: gateway + two workers, a chat through the gateway,
new engine flags rolled over both workers under load (`ichat reload`), Ctrl-C stops
everything (exit 0, no process left, ports free)."""

from __future__ import annotations

import concurrent.futures
import http.server
import json
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from ichat.process.processes import free_port, free_ports, port_is_free
from tests.probe import OutputFollower
from tests.support import (
    CONTEXT_LENGTH,
    MODEL_NAME,
    PrometheusAPI,
    SteadyLoad,
    console_noise,
    ichat_cmd,
    our_processes,
    prometheus_binary,
    reap_zombies,
    two_free_ports,
)

pytest.importorskip("smg", reason="`ichat up` needs smg (ichat[gateway])")


def test_ichat_up_serves_rolls_new_flags_under_load_and_ctrl_c_leaves_nothing(
    model_dir: Path, tmp_path: Path
) -> None:
    """Two workers through the gateway, arguments from a file; `ichat reload` rolls a new
    context length over both, one at a time, under a steady load: no failed request,
    both always routable, both on the new configuration; SIGHUP after the file changed
    rolls the next one the same way, and a flag the engine refuses stops the roll at the
    first worker with both still serving; then Ctrl-C stops everything."""
    port, worker_port, status_port = free_port(), two_free_ports(), two_free_ports()
    prometheus_port, metrics_port = free_ports(2)
    gateway = f"http://127.0.0.1:{port}"
    folders_before = set(Path(tempfile.gettempdir()).glob("ichat-prometheus-*"))
    status_urls = [f"http://127.0.0.1:{status_port + i}" for i in range(2)]
    args = tmp_path / "fleet.args"  # SIGHUP reads it again

    def write_args(*engine: str) -> None:
        args.write_text(
            f"--workers 2 --port {port} --worker-port {worker_port} "
            f"--status-port {status_port} --api-key k\n"
            f"--model-path {model_dir} --served-model-name {MODEL_NAME}\n"
            f"--prometheus-port {metrics_port} --prometheus {prometheus_port}\n"
            "# the engine's own flags\n" + " ".join(engine) + "\n"
        )

    write_args("--context-length", str(CONTEXT_LENGTH))
    up = subprocess.Popen(
        ichat_cmd("up", f"@{args}", "--prometheus-bin", prometheus_binary()),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    follower = OutputFollower(up, "OpenAI endpoint:", None)
    try:
        try:
            follower.wait(timeout=900)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}:\n{follower.output()[-4000:]}") from exc
        hint = f"ichat reload {' '.join(status_urls)} --api-key KEY -- FLAGS"
        t0 = time.monotonic()
        while hint not in follower.output():  # printed with the endpoint
            assert time.monotonic() - t0 < 10, follower.output()[-2000:]
            time.sleep(0.1)
        client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="k", max_retries=0)
        reply = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert reply.choices[0].finish_reason == "length"
        routable: list[int] = []
        watching = threading.Event()
        watcher = threading.Thread(target=count_routable, args=(gateway, routable, watching))
        with SteadyLoad([(gateway, False), (gateway, True)], "k") as load:
            watcher.start()
            new_context = str(CONTEXT_LENGTH // 2)
            roll = subprocess.run(
                ichat_cmd("reload", *status_urls, "--api-key", "k", "--merge", "--",
                          "--context-length", new_context),
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            served_during_roll = load.ok
            time.sleep(1)
            watching.set()
            watcher.join(30)
        assert roll.returncode == 0, roll.stderr[-4000:]
        assert load.failures == [] and load.ok > served_during_roll > 0
        assert routable and min(routable) == 2  # never fewer than N - 1; here: none left
        for i in range(2):
            models = httpx.get(
                f"http://127.0.0.1:{worker_port + i}/v1/models",
                headers={"Authorization": "Bearer k"},
            ).json()["data"]
            assert [m["max_model_len"] for m in models] == [int(new_context)]
            assert httpx.get(f"{status_urls[i]}/status").json()["reloads"] == {"ok": 1}

        # SIGHUP: the file read again, its new engine flags rolled the same way
        def max_model_lens() -> list[int]:
            return [
                model["max_model_len"]
                for i in range(2)
                for model in httpx.get(
                    f"http://127.0.0.1:{worker_port + i}/v1/models",
                    headers={"Authorization": "Bearer k"},
                ).json()["data"]
            ]

        def after_sighup(marker: str) -> str:
            seen = follower.output().count(marker)
            up.send_signal(signal.SIGHUP)
            t0 = time.monotonic()
            while follower.output().count(marker) == seen:
                assert up.poll() is None and time.monotonic() - t0 < 900, follower.output()[-3000:]
                time.sleep(0.2)
            return follower.output()

        quarter = CONTEXT_LENGTH // 4
        write_args("--context-length", str(quarter))
        with SteadyLoad([(gateway, False), (gateway, True)], "k") as load:
            after_sighup("SIGHUP: every worker reloaded")
            time.sleep(1)
        assert load.failures == [] and load.ok > 0
        assert max_model_lens() == [quarter, quarter]
        write_args("--context-length", str(quarter), "--no-such-engine-flag")
        out = after_sighup("SIGHUP: the roll stopped")
        stopped = out[out.rfind("SIGHUP: the roll stopped") :].splitlines()[0]
        assert f"{status_urls[0]}: HTTP 400" in stopped and "reloaded: []" in stopped, stopped
        assert max_model_lens() == [quarter, quarter]  # both serve their old engines
        again = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert again.choices[0].finish_reason == "length"
        # --prometheus: a real Prometheus scrapes both workers, their engines and the
        # gateway, and saw both reloads
        prometheus = PrometheusAPI(f"http://127.0.0.1:{prometheus_port}")
        assert f"Prometheus: {prometheus.url}" in follower.output()
        jobs = sorted((t["labels"]["job"], t["health"]) for t in prometheus.targets())
        assert jobs == sorted([(j, "up") for j in ("ichat-worker", "ichat-engine") * 2]
                              + [("ichat-gateway", "up")])  # fmt: skip
        t0 = time.monotonic()
        while len(prometheus.query('ichat_worker_reloads_total{outcome="ok"} == 2')) < 2:
            assert time.monotonic() - t0 < 30, prometheus.query("ichat_worker_reloads_total")
            time.sleep(1)
    finally:
        up.send_signal(signal.SIGINT)
        code = up.wait(120)
    reap_zombies()
    out = follower.output()
    assert code == 0, out[-3000:]
    assert console_noise(out) == []  # no leak report, engine info line or access log
    assert 0 <= out.find("deregistered") < out.find("gateway stopped")  # workers leave first
    assert not our_processes()
    assert port_is_free("127.0.0.1", port) and port_is_free("127.0.0.1", worker_port)
    assert port_is_free("127.0.0.1", prometheus_port)
    assert "Prometheus stopped" in out  # after the gateway: it saw the whole stop
    assert out.find("gateway stopped") < out.find("Prometheus stopped")
    # its configuration and data went with it
    assert set(Path(tempfile.gettempdir()).glob("ichat-prometheus-*")) == folders_before


def count_routable(gateway: str, seen: list[int], stop: threading.Event) -> None:
    """Note how many healthy workers the gateway lists, every 0.1 s until ``stop``."""
    while not stop.is_set():
        reply = httpx.get(f"{gateway}/workers", headers={"Authorization": "Bearer k"})
        seen.append(sum(1 for w in reply.json()["workers"] if w["is_healthy"]))
        time.sleep(0.1)


def test_a_worker_that_fails_to_boot_gives_ichat_up_its_exit_code(model_dir: Path) -> None:
    port, worker_port = free_ports(2)
    # the gateway's metrics port too: by default port + 1, which another process may hold
    args = ["--port", str(port), "--worker-port", str(worker_port),
            "--prometheus-port", str(free_port()),
            "--model-path", str(model_dir), "--no-such-engine-flag"]  # fmt: skip
    proc = subprocess.run(
        ichat_cmd("up", *args),
        capture_output=True,
        text=True,
        timeout=300,
    )
    reap_zombies()
    assert proc.returncode == 2, proc.stderr[-3000:]  # the worker's: configuration
    assert "worker 0 exited (exit code 2)" in proc.stderr
    assert not our_processes()
    assert port_is_free("127.0.0.1", port) and port_is_free("127.0.0.1", worker_port)


def test_ichat_gateway_on_a_busy_port_names_the_port_and_exits_3() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            ichat_cmd("gateway", "--port", str(port)), capture_output=True, text=True, timeout=60
        )
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"port {port} on 127.0.0.1 is already in use\n" in proc.stderr  # no "(None)"


def start_gateway() -> tuple[subprocess.Popen[str], OutputFollower, int, int]:
    """``ichat gateway`` on free ports: the process, its output, its port and metrics port."""
    port, metrics_port = free_ports(2)
    gateway = subprocess.Popen(
        ichat_cmd("gateway", "--port", str(port), "--prometheus-port", str(metrics_port)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return gateway, OutputFollower(gateway, "gateway ready", None), port, metrics_port


def test_ichat_gateway_stops_at_once_when_no_request_is_in_flight() -> None:
    gateway, follower, port, metrics_port = start_gateway()
    try:
        follower.wait(timeout=60)
    finally:
        gateway.send_signal(signal.SIGTERM)
        code = gateway.wait(60)
    out = follower.output()
    assert code == 0, out[-2000:]
    # ended by iChat once SMG had nothing in flight, not after SMG's 5 s settle window
    assert "(no request in flight)" in out, out[-2000:]
    assert port_is_free("127.0.0.1", port) and port_is_free("127.0.0.1", metrics_port)
    assert not our_processes()


class SlowWorker(http.server.BaseHTTPRequestHandler):
    """A stand-in worker for the gateway: models and health at once, chat after 2 s."""

    def _reply(self, body: dict[str, object]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.startswith("/v1/models"):
            self._reply({"object": "list", "data": [{"id": "slow", "object": "model"}]})
        else:
            self._reply({"version": "0.32.0"})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        time.sleep(2.0)
        message = {"role": "assistant", "content": "done"}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        self._reply({"id": "x", "object": "chat.completion", "created": 0, "model": "slow",
                     "choices": [choice], "usage": usage})  # fmt: skip

    def log_message(self, format: str, *args: object) -> None:
        return None


def test_ichat_gateway_lets_a_request_in_flight_finish_before_it_stops() -> None:
    worker = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowWorker)
    threading.Thread(target=worker.serve_forever, daemon=True).start()
    gateway, follower, port, _ = start_gateway()
    url = f"http://127.0.0.1:{port}"
    stopped = False
    try:
        follower.wait(timeout=60)
        worker_url = f"http://127.0.0.1:{worker.server_address[1]}"
        httpx.post(f"{url}/workers", json={"url": worker_url, "models": [{"id": "slow"}]})
        t0 = time.monotonic()
        # SMG adds a worker in the background: the listing may still be empty at first
        while not any(w["is_healthy"] for w in httpx.get(f"{url}/workers").json()["workers"]):
            assert time.monotonic() - t0 < 30
            time.sleep(0.1)
        body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            chat = pool.submit(httpx.post, f"{url}/v1/chat/completions", json=body, timeout=30)
            time.sleep(0.5)  # in flight at the gateway, answered 1.5 s later
            gateway.send_signal(signal.SIGTERM)
            stopped = True
            reply = chat.result()
    finally:
        if not stopped:  # the test failed before the stop: no gateway left running
            gateway.send_signal(signal.SIGTERM)
        code = gateway.wait(60)
        worker.shutdown()
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "done"
    assert code == 0, follower.output()[-2000:]
    assert port_is_free("127.0.0.1", port)
