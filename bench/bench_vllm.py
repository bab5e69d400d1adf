"""In-process `ichat serve` vs the engine's own server (vLLM, or SGLang with
``--engine sglang``), side by side in one run.

Each round starts the native server and `ichat serve` on the same model (alternating
which goes first), measures time to ready (/health 200 from process start), the RSS of
the whole process tree, throughput under the same load (C concurrent chats, each
generating exactly N tokens) and, with the same load streamed, time to first token and
inter-token latency (p50/p99), then stops it. Writes JSON and a PNG.

    python bench/bench_vllm.py --model-path .cache/tiny-model --rounds 3

Performance is never asserted in tests: read the ratios here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx
import psutil
from common import (
    MODEL_NAME,
    Load,
    bench_parser,
    chat_body,
    ichat_serve_cmd,
    pyplot,
    save_figure,
    save_report,
    streams,
)

from ichat.process.processes import free_port, stop_gracefully
from tests.probe import wait_healthy


def native_cmd(engine: str, model: str, port: int, extra: list[str]) -> list[str]:
    """The engine's own server: vLLM's (same main as `vllm serve`) or SGLang's launcher."""
    if engine == "sglang":
        return [sys.executable, "-m", "sglang.launch_server", "--model-path", model,
                "--port", str(port), "--host", "127.0.0.1", "--served-model-name", MODEL_NAME,
                *extra]  # fmt: skip
    module = "vllm.entrypoints.launchers.api_server.entry"
    if importlib.util.find_spec("vllm.entrypoints.launchers") is None:  # vLLM 0.26
        module = "vllm.entrypoints.openai.api_server"
    return [
        sys.executable,
        "-m",
        module,
        "--model",
        model,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--served-model-name",
        MODEL_NAME,
        *extra,
    ]


def tree_rss_mib(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 2**20


async def load(url: str, requests: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    """aiohttp (vLLM's own dependency): a single httpx client is the bottleneck at 256."""
    import aiohttp

    body = chat_body(max_tokens)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
        sem = asyncio.Semaphore(concurrency)
        tokens: list[int] = []

        async def one() -> None:
            async with sem, session.post("/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                tokens.append((await r.json())["usage"]["completion_tokens"])

        await asyncio.gather(*(one() for _ in range(min(concurrency, requests))))  # warm
        tokens.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "req_per_s": requests / seconds,
        "out_tok_per_s": sum(tokens) / seconds,
        "tokens_per_request": tokens[0],
    }


def run_client(coro: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """The load generator on uvloop where installed (as vLLM's own benchmarks)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def measure(kind: str, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(args.out / f"{kind}-{port}.log", "w")  # noqa: SIM115 - closed below
    status_port = free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        native_cmd(args.engine, args.model_path, port, args.engine_args)
        if kind == "native"
        else ichat_serve_cmd(
            args.model_path,
            port,
            "--status-port",
            str(status_port),
            *args.engine_args,
            backend=args.engine,
        ),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_healthy(url, proc, timeout=900)
        ready_s = time.monotonic() - t0
        result = run_client(load(url, args.requests, args.concurrency, args.max_tokens))
        chats = Load(args.requests, args.concurrency, args.max_tokens)
        stream = streams(url, chats, args.client_processes)
        result.update({k: v for k, v in stream.items() if k.startswith(("ttft", "itl"))})
        result.update(kind=kind, ready_s=ready_s, rss_mib=tree_rss_mib(proc.pid))
        if kind == "ichat" and args.kill_test:
            result.update(kill_test(proc, f"http://127.0.0.1:{status_port}"))
    finally:
        stop_gracefully(proc, 120)
        log.close()
    gpu = gpu_memory_used_mib()
    if gpu is not None:
        time.sleep(1)
        result["gpu_mib_after_stop"] = gpu_memory_used_mib()
    print(
        f"  {kind:6s} ready {result['ready_s']:6.1f} s  {result['req_per_s']:7.2f} req/s  "
        f"{result['out_tok_per_s']:8.0f} tok/s  TTFT p50/p99 {result['ttft_p50_ms']:.1f}/"
        f"{result['ttft_p99_ms']:.1f} ms  ITL p50/p99 {result['itl_p50_ms']:.1f}/"
        f"{result['itl_p99_ms']:.1f} ms  RSS {result['rss_mib']:6.0f} MiB",
        flush=True,
    )
    return result


ENGINE_PROCESS_TITLES = ("VLLM::EngineCore", "sglang::scheduler")


def kill_test(proc: subprocess.Popen[bytes], status_url: str) -> dict[str, float]:
    """kill -9 the engine's core process (EngineCore / the scheduler): seconds to the
    worker's detection (its /status) and until /readyz answers 200 again."""
    core = next(
        p for p in psutil.Process(proc.pid).children(recursive=True)
        if any(t in " ".join([p.name(), *p.cmdline()]) for t in ENGINE_PROCESS_TITLES)
    )  # fmt: skip
    t_kill, wall_kill = time.monotonic(), time.time()
    os.kill(core.pid, signal.SIGKILL)
    with httpx.Client(base_url=status_url, timeout=5) as client:
        while client.get("/status").json()["engine_deaths"] == 0:
            if time.monotonic() - t_kill > 30:
                raise TimeoutError("the engine death was not detected within 30 s")
            time.sleep(0.02)
        detected = client.get("/status").json()["last_death_detected_unix"] - wall_kill
        while client.get("/readyz").status_code != 200:
            if time.monotonic() - t_kill > 600 or proc.poll() is not None:
                raise TimeoutError("the worker did not serve again")
            time.sleep(0.1)
    again = time.monotonic() - t_kill
    print(f"  kill -9 {core.pid}: detected {detected:.3f} s, serving again {again:.1f} s")
    return {"kill_to_detection_s": detected, "kill_to_serving_again_s": again}


def gpu_memory_used_mib() -> float | None:
    """Memory used on the GPUs this process may use (nvidia-smi), or None without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        query += ["-i", visible]
    out = subprocess.run(query, capture_output=True, text=True, check=False).stdout
    return sum(float(x) for x in out.split() if x.strip())


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def values(kind: str, key: str) -> list[float]:
        return [r[key] for r in runs if r["kind"] == kind]

    ratios = [
        i / n
        for i, n in zip(values("ichat", "req_per_s"), values("native", "req_per_s"), strict=True)
    ]
    ready_delta = [
        i - n for i, n in zip(values("ichat", "ready_s"), values("native", "ready_s"), strict=True)
    ]

    def delta(key: str) -> list[float]:
        return [i - n for i, n in zip(values("ichat", key), values("native", key), strict=True)]

    rss_delta = delta("rss_mib")

    def stats(xs: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs)}

    return {
        "throughput_ratio_ichat_over_native": stats(ratios),
        "ready_s_ichat_minus_native": stats(ready_delta),
        "rss_mib_ichat_minus_native": stats(rss_delta),
        **{
            f"{key}_ichat_minus_native": stats(delta(key))
            for key in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
            if all(key in r for r in runs)
        },
        "goals": {"throughput_ratio_min": 0.99, "ready_s_delta_max": 0.5, "rss_mib_delta_max": 50},
    }


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    runs = report["runs"]
    fig, axes = plt.subplots(1, 5, figsize=(21, 4))
    for ax, key, label in zip(
        axes,
        ("req_per_s", "ready_s", "rss_mib", "ttft_p99_ms", "itl_p99_ms"),
        (
            "throughput (req/s)",
            "time to ready (s)",
            "RSS of tree (MiB)",
            "streaming TTFT p99 (ms)",
            "inter-token p99 (ms)",
        ),
        strict=True,
    ):
        for i, kind in enumerate(("native", "ichat")):
            ys = [r.get(key, 0.0) for r in runs if r["kind"] == kind]
            xs = [j + (i - 0.5) * 0.35 for j in range(len(ys))]
            ax.bar(xs, ys, width=0.35, label=kind)
        ax.set_title(label)
        ax.set_xlabel("round")
        ax.set_xticks(range(len(runs) // 2))
    axes[0].legend()
    ratio = report["summary"]["throughput_ratio_ichat_over_native"]
    fig.suptitle(
        f"ichat serve vs native {report['engine']} {report['engine_version']} on "
        f"{report['machine']}: "
        f"throughput ratio {ratio['mean']:.3f} (min {ratio['min']:.3f})"
    )
    save_figure(fig, path)


def _vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    parser.add_argument(
        "--kill-test", action="store_true", help="kill -9 the engine once in each ichat run"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--client-processes", type=int, default=1, help="client processes the streams share"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default=platform.node() or "machine")
    parser.add_argument("engine_args", nargs="*", help="extra engine flags, after --")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
    runs = []
    for round_ in range(args.rounds):
        order = ("native", "ichat") if round_ % 2 == 0 else ("ichat", "native")
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
        for kind in order:
            runs.append({"round": round_, **measure(kind, args, env)})
    from importlib.metadata import version

    engine_version = version(args.engine) if args.engine == "sglang" else _vllm_version()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "engine": args.engine,
        "engine_version": engine_version,
        "load": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "client_processes": args.client_processes,
        },
        "engine_args": args.engine_args,
        "runs": runs,
        "summary": summarize(runs),
    }
    print(json.dumps(report["summary"], indent=2))
    save_report(report, args.out / f"{args.engine}-inprocess-vs-native-{args.tag}", plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
