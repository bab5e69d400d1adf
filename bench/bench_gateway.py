"""Direct vs through the gateway (SMG), side by side in one run, per gateway setting.

One `ichat serve` worker is started once. For each gateway configuration a fresh SMG
is started and the worker is registered with it; then, for each round (alternating
which path goes first): single-token requests one at a time (added latency), then for
each concurrency C concurrent streaming chats of N tokens (time to first token,
inter-token latency, throughput), once straight to the worker and once through the
gateway. With --side-by-side both paths stream at the same time, C streams each, so
they share the engine's load moment by moment: the engine's run-to-run noise (0.3 to 0.5 s
of TTFT p99 at 256 streams on the H200) then falls out of the difference.

    python bench/bench_gateway.py --model-path .cache/tiny-model --rounds 2 \\
        --concurrency 1 16 --requests 64 --max-tokens 32 --out docs/results/gateway-cpu

With --workers N (N > 1) the gateway balances N workers; the direct path splits the
same load evenly over them (what a client without a gateway does): throughput through
the gateway vs direct with several workers.

Configurations: `smg` (SMG's own defaults), `ichat` (`ichat gateway`'s defaults), and
`ichat` plus one candidate fix each for the streaming TTFT tail (see --configs).
Writes JSON and a PNG; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from common import (
    MODEL_NAME,
    Load,
    bench_parser,
    ichat_serve_cmd,
    percentile,
    pyplot,
    save_figure,
    save_report,
    side_by_side,
    spread,
    streams,
)

from ichat.commands.gateway import GatewayConfig
from ichat.process.processes import free_port, stop_gracefully
from tests.probe import wait_healthy


def smg_defaults(port: int, metrics_port: int) -> list[str]:
    return [sys.executable, "-m", "smg", "launch", "--host", "127.0.0.1", "--port", str(port),
            "--prometheus-port", str(metrics_port)]  # fmt: skip


def ichat_defaults(*extra: str) -> Callable[[int, int], list[str]]:
    def argv(port: int, metrics_port: int) -> list[str]:
        config = GatewayConfig(port=port, prometheus_port=metrics_port, extra=list(extra))
        return config.smg_argv()

    return argv


CONFIGS: dict[str, Callable[[int, int], list[str]]] = {
    "smg": smg_defaults,
    "ichat": ichat_defaults(),
    # keeps pooled upstream connections 60 s instead of 3 s; SMG requires it to stay
    # below the worker's keep-alive, so the worker runs with a 75 s keep-alive (below)
    "ichat+pool-idle-60s": ichat_defaults("--upstream-pool-idle-timeout-secs", "60"),
    "ichat+http2": ichat_defaults("--upstream-http2"),
    # SMG's own default policy (ichat's before 2026-11-30): one prompt stays on one worker
    "ichat+cache-aware": ichat_defaults("--policy", "cache_aware"),
    # cache-aware, but it turns to the shortest queue sooner (SMG: 64 requests and 1.5x)
    "ichat+balance-16": ichat_defaults(
        "--policy", "cache_aware", "--balance-abs-threshold", "16", "--balance-rel-threshold", "1.2"
    ),
}
WORKER_KEEP_ALIVE_S = "75"


def single_token(url: str, count: int) -> dict[str, float]:
    """One request at a time, one output token: the gateway's added latency shows here."""
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 1, "temperature": 0}
    times = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for i in range(count + 5):
            t0 = time.perf_counter()
            client.post("/v1/completions", json=body).raise_for_status()
            if i >= 5:  # warm
                times.append(time.perf_counter() - t0)
    return {"p50_ms": 1000 * percentile(times, 50), "p99_ms": 1000 * percentile(times, 99)}


def start_gateway(name: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    argv = CONFIGS[name](port, free_port())
    print(f"[{name}] {' '.join(argv[3:])}", flush=True)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, proc, timeout=60)
    return proc, url


def register(gateway_url: str, worker_url: str) -> None:
    body = {"url": worker_url, "models": [{"id": MODEL_NAME}]}
    httpx.post(f"{gateway_url}/workers", json=body, timeout=10).raise_for_status()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = httpx.get(f"{gateway_url}/workers", timeout=10).json()["workers"]
        if any(w["url"] == worker_url and w["is_healthy"] for w in workers):
            return
        time.sleep(0.2)
    raise TimeoutError("the worker did not become healthy in the gateway")


def stream_count(requests: int, concurrency: int) -> int:
    """Streams measured at ``concurrency``: at most 16 rounds of it (one stream at a time
    of 128 tokens would otherwise take minutes), never fewer than one full round."""
    return max(concurrency, min(requests, 16 * concurrency))


def measure_config(
    name: str, worker_urls: list[str], args: argparse.Namespace
) -> list[dict[str, Any]]:
    gateway, gateway_url = start_gateway(name)
    rows = []
    try:
        for worker_url in worker_urls:
            register(gateway_url, worker_url)
        for rnd in range(args.rounds):
            # single-token requests go to the first worker when there are several
            urls = {"direct": worker_urls[0], "gateway": gateway_url}
            order = list(urls) if rnd % 2 == 0 else list(urls)[::-1]
            by_path: dict[str, dict[str, Any]] = {
                path: {"config": name, "round": rnd, "path": path, "streams": {}} for path in order
            }
            for path in order:
                by_path[path]["single_token"] = single_token(urls[path], args.single)
            for c in args.concurrency:
                n = stream_count(args.requests, c)
                if args.side_by_side:
                    load = Load(n, c, args.max_tokens, args.distinct_prompts)
                    both = side_by_side(list(urls.values()), load, args.client_processes)
                    results = dict(zip(urls, both, strict=True))
                else:
                    results = {}
                    for path in order:
                        before = [served(url) for url in worker_urls]
                        results[path] = measure_streams(
                            worker_urls if path == "direct" else [gateway_url], n, c, args
                        )
                        results[path]["requests_per_worker"] = [
                            served(url) - b for url, b in zip(worker_urls, before, strict=True)
                        ]
                for path in order:
                    by_path[path]["streams"][str(c)] = results[path]
            for path in order:
                row = by_path[path]
                rows.append(row)
                top = row["streams"][str(args.concurrency[-1])]
                print(
                    f"[{name}] round {rnd} {path:7s}: 1-token p50 "
                    f"{row['single_token']['p50_ms']:.2f} ms; C={args.concurrency[-1]}: TTFT "
                    f"p50 {top['ttft_p50_ms']:.1f} p99 {top['ttft_p99_ms']:.1f} ms, "
                    f"{top['req_per_s']:.1f} req/s",
                    flush=True,
                )
    finally:
        stop_gracefully(gateway, 60)
    return rows


def served(worker_url: str) -> float:
    """Requests the worker's engine finished (vLLM's request_success_total, summed)."""
    text = httpx.get(f"{worker_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:request_success_total")
    )


def measure_streams(urls: list[str], n: int, c: int, args: argparse.Namespace) -> dict[str, Any]:
    """C streams to one URL, or (direct, several workers) split evenly over them."""
    load = Load(n, c, args.max_tokens, args.distinct_prompts)
    if len(urls) == 1:
        return streams(urls[0], load, args.client_processes)
    return spread(urls, load, args.client_processes)


def summarize(rows: list[dict[str, Any]], concurrency: list[int]) -> dict[str, Any]:
    """Per configuration: gateway minus direct (means over rounds), and the spread."""
    summary: dict[str, Any] = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        by_round: dict[int, dict[str, dict[str, Any]]] = {}
        for r in rows:
            if r["config"] == name:
                by_round.setdefault(r["round"], {})[r["path"]] = r
        rounds = list(by_round.values())
        entry: dict[str, Any] = {}
        for key in ("p50_ms", "p99_ms"):
            deltas = [
                x["gateway"]["single_token"][key] - x["direct"]["single_token"][key] for x in rounds
            ]
            entry[f"single_token_added_{key}"] = statistics.mean(deltas)
        for c in concurrency:
            s = str(c)
            for key in ("ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms"):
                deltas = [
                    x["gateway"]["streams"][s][key] - x["direct"]["streams"][s][key] for x in rounds
                ]
                entry[f"c{c}_{key}_added"] = statistics.mean(deltas)
                entry[f"c{c}_{key}_added_range"] = [min(deltas), max(deltas)]
            ratios = [
                x["gateway"]["streams"][s]["req_per_s"] / x["direct"]["streams"][s]["req_per_s"]
                for x in rounds
            ]
            entry[f"c{c}_throughput_ratio"] = statistics.mean(ratios)
        summary[name] = entry
    return summary


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    summary, conc = report["summary"], report["concurrency"]
    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(conc))]
        axes[0].bar(xs, [summary[name][f"c{c}_ttft_p99_ms_added"] for c in conc], width, label=name)
        axes[1].bar(xs, [summary[name][f"c{c}_throughput_ratio"] for c in conc], width, label=name)
    for ax, title in zip(
        axes, ("TTFT p99 added by the gateway (ms)", "throughput via / direct"), strict=True
    ):
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(conc))])
        ax.set_xticklabels([f"{c} streams" for c in conc])
        ax.set_title(title)
        ax.axhline(1.0 if "via" in title else 0.0, color="grey", lw=0.8)
    axes[0].legend(fontsize=8)
    how = "at the same time" if report.get("side_by_side") else "one after the other"
    fig.suptitle(
        f"{report['tag']}: direct vs through SMG, {report.get('workers', 1)} worker(s), {how} "
        f"({report['rounds']} rounds, means)"
    )
    save_figure(fig, path)


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--requests", type=int, default=64, help="streams per measurement")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--single", type=int, default=50, help="single-token requests")
    parser.add_argument(
        "--client-processes", type=int, default=1, help="client processes the streams share"
    )
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="stream to the worker and through the gateway at the same time (same engine "
        "load for both paths; each gets C streams) instead of one path after the other",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="workers behind the gateway; directly, the load is split evenly over them",
    )
    parser.add_argument(
        "--distinct-prompts",
        action="store_true",
        help="every request a prompt of its own, as from different users (default: one "
        "prompt for all: the worst case for cache-aware routing over several workers)",
    )
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--out", type=Path, required=True, help="folder for JSON and PNG")
    parser.add_argument("--tag", default=platform.node())
    parser.add_argument("worker_args", nargs="*", help="after --: engine flags for the worker")
    args = parser.parse_args()
    if args.side_by_side and args.workers != 1:
        parser.error("--side-by-side measures one worker")
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **os.environ}
    env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] = WORKER_KEEP_ALIVE_S
    ports = [free_port() for _ in range(args.workers)]
    worker_urls = [f"http://127.0.0.1:{port}" for port in ports]
    workers = [
        subprocess.Popen(ichat_serve_cmd(args.model_path, port, *args.worker_args), env=env)
        for port in ports
    ]
    try:
        for url, worker in zip(worker_urls, workers, strict=True):
            wait_healthy(url, worker, timeout=1800)
        rows = [row for name in args.configs for row in measure_config(name, worker_urls, args)]
    finally:
        for worker in workers:
            stop_gracefully(worker, 120)
    report = {
        "tag": args.tag,
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "client_processes": args.client_processes,
        "side_by_side": args.side_by_side,
        "workers": args.workers,
        "distinct_prompts": args.distinct_prompts,
        "configs": {name: CONFIGS[name](8080, 8081)[3:] for name in args.configs},
        "worker_keep_alive_s": WORKER_KEEP_ALIVE_S,
        "summary": summarize(rows, args.concurrency),
        "rows": rows,
    }
    print(json.dumps(report["summary"], indent=2))
    save_report(report, args.out / f"bench-gateway-{args.tag}", plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
