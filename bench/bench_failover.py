"""Serving again after kill -9 of the active engine: a cold restart vs ``--standby``.

For each mode, one supervised worker (``ichat serve --status-port``; ``--standby`` in
the standby mode): its memory once ready (GPU: nvidia-smi; host: RSS of the worker's
process tree), then ``--kills`` times a kill -9 of the active EngineCore while a prober
sends a small streamed chat every 50 ms. Per kill: detection (the worker's metric),
serving again (the first chat answered 200 after the kill), the worker's phases, and
each probe's outcome and time to first token against when it was sent. In the standby
mode each next kill waits until the new standby is ready.

    python bench/bench_failover.py --model-path M --kills 3 --modes restart standby
    python bench/bench_failover.py --model-path M ... -- --gpu-memory-utilization 0.4

Writes JSON and PNG (``--out``). Numbers only: nothing here asserts a speed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import bench_parser, chat_body, pyplot, save_figure, save_report

from ichat.process.processes import free_port, title
from tests.support import MODEL_NAME, Worker, chat_ok, start_worker

PROBE_EVERY_S = 0.05


def status(port: int) -> dict[str, Any]:
    return httpx.get(f"http://127.0.0.1:{port}/status", timeout=10).json()  # type: ignore[no-any-return]


def gpu_memory_mib() -> int | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    ).stdout
    return sum(int(v) for v in out.split())


def tree_rss_mib(pid: int) -> float:
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    total = 0
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += proc.memory_info().rss
    return total / 2**20


class Prober:
    """Sends ``probe`` every 50 ms from threads of its own, times relative to ``t0``."""

    def __init__(self, url: str, t0: float) -> None:
        self.url, self.t0 = url, t0
        self.results: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(64)
        self._futures: list[concurrent.futures.Future[dict[str, Any]]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(PROBE_EVERY_S):
            self._futures.append(self._pool.submit(self._probe))

    def _probe(self) -> dict[str, Any]:
        """One small streamed chat: its outcome and time to its first chunk."""
        sent = time.monotonic()
        try:
            with httpx.stream(
                "POST",
                f"{self.url}/v1/chat/completions",
                json={**chat_body(4, stream=True), "model": MODEL_NAME},
                timeout=120,
            ) as reply:
                if reply.status_code != 200:
                    return {"sent_s": sent - self.t0, "outcome": f"HTTP {reply.status_code}"}
                first: float | None = None
                outcome = "ok"
                for line in reply.iter_lines():
                    if line.startswith("data:"):
                        first = first or time.monotonic() - sent
                        if '"error"' in line:
                            outcome = "error event"
                return {"sent_s": sent - self.t0, "outcome": outcome, "ttft_s": first}
        except httpx.HTTPError as exc:
            return {"sent_s": sent - self.t0, "outcome": type(exc).__name__}

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join()
        results = [f.result() for f in self._futures]
        self._pool.shutdown()
        return sorted(results, key=lambda r: r["sent_s"])


# the process a kill -9 ends the active engine with: vLLM's engine core, SGLang's scheduler
ENGINE_PROCESS = {"vllm": "EngineCore", "sglang": "sglang::scheduler"}


def active_engine_core(worker: Worker, status_port: int, engine: str = "vllm") -> psutil.Process:
    pids = status(status_port)["engines"].get("active") or [
        p.pid for p in psutil.Process(worker.proc.pid).children(recursive=True)
    ]
    for pid in pids:
        if ENGINE_PROCESS[engine] in title(psutil.Process(pid)):
            return psutil.Process(pid)
    raise RuntimeError(f"no {ENGINE_PROCESS[engine]} among {pids}")


def wait_standby(status_port: int, timeout: float = 900) -> str:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        state = str(status(status_port)["standby"])
        if state in ("ready", "asleep", "failed", "off"):
            return state
        time.sleep(0.5)
    return "timeout"


def run_mode(
    mode: str, worker_args: tuple[str, ...], kills: int, tmp: Path, engine: str = "vllm"
) -> dict[str, Any]:
    status_port = free_port()
    extra = ("--status-port", str(status_port)) + (("--standby",) if mode == "standby" else ())
    gpu_before = gpu_memory_mib()
    t0 = time.monotonic()
    with start_worker(tmp, *worker_args, *extra, backend=engine) as w:
        w.wait_ready(timeout=1800)
        standby_state = wait_standby(status_port) if mode == "standby" else "off"
        first_start = time.monotonic() - t0
        memory = {
            "gpu_mib_before": gpu_before,
            "gpu_mib_ready": gpu_memory_mib(),
            "host_rss_mib_ready": tree_rss_mib(w.proc.pid),
        }
        print(f"[{mode}] ready {first_start:.1f} s (standby {standby_state}); {memory}", flush=True)
        rows = []
        for i in range(kills):
            if mode == "standby":
                standby_state = wait_standby(status_port)
            core = active_engine_core(w, status_port, engine)
            prober = Prober(w.url, time.monotonic() + 1.0)
            time.sleep(1.0)  # probes before the kill: the baseline
            t_kill, wall_kill = prober.t0, time.time()
            os.kill(core.pid, signal.SIGKILL)
            while not chat_ok(w.url):
                assert w.proc.poll() is None, w.output()[-3000:]
                time.sleep(0.02)
            serving = time.monotonic() - t_kill
            time.sleep(2.0)  # probes after: back to normal
            probes = prober.stop()
            after = status(status_port)
            detected = (after["last_death_detected_unix"] or wall_kill) - wall_kill
            row = {
                "kill": i + 1,
                "standby_before": standby_state,
                "detect_s": detected,
                "serving_again_s": serving,
                "worker_restart_to_ready_s": after["last_restart_to_ready_s"],
                "failovers": after["failovers"],
                "restarts": after["restarts"],
                "phases_s": after["phase_seconds"],
                "probes": probes,
                "probes_failed": sum(1 for p in probes if p["outcome"] != "ok"),
            }
            rows.append(row)
            print(
                f"[{mode}] kill {i + 1}: detected {detected:.3f} s, serving again "
                f"{serving:.3f} s (worker: {row['worker_restart_to_ready_s']:.3f} s), "
                f"failovers {row['failovers']}, restarts {row['restarts']}, "
                f"probes failed {row['probes_failed']}/{len(probes)}",
                flush=True,
            )
        final = status(status_port)
    return {
        "mode": mode,
        "first_start_s": first_start,
        "memory": memory,
        "kills": rows,
        "standby_after": final["standby"],
        "standby_reason": final["standby_reason"],
        "gpu_mib_after_stop": gpu_memory_mib(),
    }


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    modes = report["modes"]
    fig, axes = plt.subplots(1, 1 + len(modes), figsize=(5 * (1 + len(modes)), 4.5))
    bars = axes[0]
    width = 0.8 / max(len(modes), 1)
    for j, m in enumerate(modes):
        color = f"C{j}"
        xs = [r["kill"] + (j - (len(modes) - 1) / 2) * width for r in m["kills"]]
        bars.bar(xs, [r["serving_again_s"] for r in m["kills"]], width, color=color,
                 label=m["mode"])  # fmt: skip
        probes = axes[1 + j]
        for r in m["kills"]:
            ok = [p for p in r["probes"] if p["outcome"] == "ok" and p.get("ttft_s")]
            bad = [p for p in r["probes"] if p["outcome"] != "ok"]
            first = r["kill"] == 1
            probes.scatter([p["sent_s"] for p in ok], [p["ttft_s"] for p in ok], s=6,
                           color=color, label="answered" if first else None)  # fmt: skip
            probes.scatter([p["sent_s"] for p in bad], [1e-3] * len(bad), marker="x", s=14,
                           color="red", label="failed (at 1 ms)" if first else None)  # fmt: skip
        probes.set_yscale("log")
        probes.set_title(f"{m['mode']}: probes' first chunk (s)")
        probes.set_xlabel("sent, s after the kill (every 50 ms; all kills)")
        probes.legend(fontsize=7)
    bars.set_yscale("log")
    bars.set_title("kill -9 of the active engine → serving again (s)")
    bars.set_xlabel("kill")
    bars.legend()
    engine = f"{report.get('engine', 'vllm')} {report.get('version', report['vllm'])}"
    fig.suptitle(f"failover, {engine}, {report['machine']}, {report['date']}")
    save_figure(fig, path)


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["restart", "standby"])
    parser.add_argument("--engine", choices=sorted(ENGINE_PROCESS), default="vllm")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("engine_args", nargs="*", help="after --: the engine's own flags")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    worker_args: tuple[str, ...] = ("--model-path", args.model_path)
    worker_args += ("--served-model-name", MODEL_NAME, *args.engine_args)
    with tempfile.TemporaryDirectory() as tmp:
        modes = [run_mode(m, worker_args, args.kills, Path(tmp), args.engine) for m in args.modes]
        args.out.mkdir(parents=True, exist_ok=True)
        for log in Path(tmp).glob("worker-*.log"):  # the engine's own timing lines
            shutil.copy(log, args.out / f"failover-{args.tag}-{log.name}")
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    versions = {}
    for name in ("vllm", "sglang"):
        try:
            versions[name] = dist_version(name)
        except PackageNotFoundError:
            versions[name] = "?"
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "engine": args.engine,
        "version": versions[args.engine],
        "vllm": versions["vllm"],
        "command": " ".join(sys.argv),
        "engine_args": args.engine_args,
        "modes": modes,
    }
    save_report(report, args.out / f"failover-{args.tag}-{'-'.join(args.modes)}", plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
