"""Servers resident side by side, short load windows alternating between them: a ratio
with a confidence interval.

Throughput measured one server start after another swings ±20 % between starts on the
H200, so a ratio of two starts proves nothing. Here every configuration runs at once
(each with its share of the GPU memory: ``--gpu-memory-utilization`` in the engine
flags), and the same load (C concurrent streams of N tokens, R requests) goes to one of
them at a time, block after block: a block is one window per configuration, in an order
rotated block by block. Drift over minutes hits the windows of one block alike, so each
block gives a paired ratio (configuration / the first one); the report has, per
configuration, the mean ratio of throughput and the mean difference of TTFT and ITL p50/p99
with a bootstrap 95 % confidence interval over blocks, the within-start spread (CV of
its windows) and, with ``--starts`` > 1, the between-start spread. Configurations:
``native`` (the engine's own server), ``ichat`` (`ichat serve`), ``ichat+replay``
(`ichat serve --gateway-url` of a gateway that is not there: requests pass the middleware
that runs them again elsewhere after an engine death) and ``ichat+tracked`` (the same
with ``--continuation-limit 3``: each stream read event by event for its token ids).
``ichat+loginfo``: `ichat serve --log-level info`, which logs as vLLM's own server does by
default (an access-log line per request; iChat's default logs the engine's warnings only).
A ``+ids`` suffix (``native+ids``) makes the clients ask that server for the token ids
themselves (``return_token_ids``): what tracking costs the engine's own server, apart
from iChat's reading of the stream.

    python bench/bench_ab.py --model-path .cache/tiny-model --blocks 6 -- --max-model-len 512

``--engine sglang`` (run with SGLang's environment): SGLang's own launcher against
`ichat serve --backend sglang` (``native`` and ``ichat``; SGLang tracks no chat stream).

``--window-seconds S``: steady-state windows instead (``windows.py``): client processes
that live across windows (``--client-processes``), each stream closed-loop from a start
of its own, and only the ``S`` seconds after ``--warmup-seconds`` counted; the GPU's SM
clock, temperature and power are sampled in the middle of each window. With
``--client-cpus N`` the clients run on the last N CPUs and the servers on the others.
Configuration ``trivial`` (``trivial_server.py``, no engine) measures the load
generator itself: ``--configs trivial`` alone gives the throughput the clients reach
and the latency they add.

``--loadgen vllm-bench``: each window is vLLM's own load generator instead
(``vllm_bench.py``: ``vllm bench serve``'s code, ``--requests`` at ``--concurrency``,
one client process), the same paired design around it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_vllm import native_cmd
from common import (
    Load,
    bench_parser,
    ichat_serve_cmd,
    pyplot,
    run_facts,
    save_figure,
    save_report,
    streams,
)
from vllm_bench import vllm_bench_window
from windows import ClientPool, Window

from ichat.process.processes import free_port, stop_gracefully
from tests.probe import wait_healthy

METRICS = ("out_tok_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def command(config: str, engine: str, model: str, port: int, engine_args: list[str]) -> list[str]:
    config = config.removesuffix("+ids")
    if config == "trivial":  # no engine: the load generator's own limits
        return [sys.executable, str(Path(__file__).with_name("trivial_server.py")),
                "--port", str(port)]  # fmt: skip
    if config == "native":
        return native_cmd(engine, model, port, engine_args)
    extra = []
    if config == "ichat+loginfo":  # logging as vLLM's own server logs: an access-log line
        return ichat_serve_cmd(model, port, "--log-level", "info", *engine_args, backend=engine)
    if config.startswith("ichat+"):  # no gateway there: the worker serves directly
        extra = ["--gateway-url", f"http://127.0.0.1:{free_port()}"]
        extra += ["--continuation-limit", "3" if config == "ichat+tracked" else "0"]
    return ichat_serve_cmd(model, port, *extra, *engine_args, backend=engine)


@contextlib.contextmanager
def servers(configs: list[str], args: Any, start: int) -> Any:
    """Every configuration's server, started one after another (each engine sizes its
    KV cache from the memory free at its start), stopped together: their URLs and their
    processes' pids, by configuration."""
    procs: list[subprocess.Popen[bytes]] = []
    urls, pids = {}, {}
    try:
        for config in configs:
            port = free_port()
            log = args.out / f"ab-{config.replace('+', '-')}-start{start}.log"
            with log.open("wb") as out:
                procs.append(subprocess.Popen(command(config, args.engine, args.model_path,
                                                      port, args.engine_args),
                                              stdout=out, stderr=subprocess.STDOUT,
                                              preexec_fn=pin(server_cpus(args))))  # fmt: skip
            urls[config], pids[config] = f"http://127.0.0.1:{port}", procs[-1].pid
            t0 = time.monotonic()
            wait_healthy(urls[config], timeout=args.start_timeout, proc=procs[-1])
            print(f"start {start}: {config} ready in {time.monotonic() - t0:.1f} s", flush=True)
        yield urls, pids
    finally:
        for proc in procs:
            stop_gracefully(proc, 60)


def client_cpus(args: Any) -> list[int] | None:
    """The last ``--client-cpus`` CPUs of this process's, for the clients; None: unpinned."""
    if not getattr(args, "client_cpus", 0):  # a script without the flag: unpinned
        return None
    return sorted(os.sched_getaffinity(0))[-args.client_cpus :]


def server_cpus(args: Any) -> list[int] | None:
    """The CPUs the clients leave to the servers; None: unpinned."""
    clients = client_cpus(args)
    return None if clients is None else sorted(set(os.sched_getaffinity(0)) - set(clients))


def pin(cpus: list[int] | None) -> Any:
    """A ``preexec_fn`` that pins a server (and the processes it starts) to ``cpus``."""
    return None if cpus is None else lambda: os.sched_setaffinity(0, cpus)


def bootstrap(values: list[float], resamples: int = 5000, seed: int = 0) -> tuple[float, float]:
    """The 95 % percentile-bootstrap interval of the mean of ``values``."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choice(values) for _ in values) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def cv(values: list[float]) -> float:
    return statistics.stdev(values) / statistics.fmean(values) if len(values) > 1 else 0.0


def summarise(windows: list[dict[str, Any]], configs: list[str]) -> dict[str, Any]:
    """Paired per block against ``configs[0]``: throughput as a ratio, latencies as a
    difference in ms; mean and bootstrap 95 % CI; the spreads."""
    base = configs[0]
    blocks: dict[tuple[int, int], dict[str, dict[str, float]]] = {}
    for w in windows:
        blocks.setdefault((w["start"], w["block"]), {})[w["config"]] = w
    out: dict[str, Any] = {}
    for config in configs:
        mine = [w for w in windows if w["config"] == config]
        starts = sorted({w["start"] for w in mine})
        per_start = [statistics.fmean(w["out_tok_per_s"] for w in mine if w["start"] == s)
                     for s in starts]  # fmt: skip
        entry: dict[str, Any] = {
            "windows": len(mine),
            "out_tok_per_s_mean": statistics.fmean(w["out_tok_per_s"] for w in mine),
            "within_start_cv": statistics.fmean(
                cv([w["out_tok_per_s"] for w in mine if w["start"] == s]) for s in starts
            ),
            "between_start_cv": cv(per_start),
        }
        if config != base:
            paired = [b for b in blocks.values() if base in b and config in b]
            for metric in METRICS:
                if metric == "out_tok_per_s":
                    values = [b[config][metric] / b[base][metric] for b in paired]
                    name = "throughput_ratio"
                else:
                    values = [b[config][metric] - b[base][metric] for b in paired]
                    name = f"{metric}_diff"
                low, high = bootstrap(values)
                entry[name] = {"mean": statistics.fmean(values), "ci95": [low, high],
                               "half_width": (high - low) / 2, "blocks": len(values)}  # fmt: skip
        out[config] = entry
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    configs = report["configs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for config in configs:
        mine = [w for w in report["windows"] if w["config"] == config]
        left.plot([w["index"] for w in mine], [w["out_tok_per_s"] for w in mine], "o-",
                  label=config, markersize=3)  # fmt: skip
    left.set_xlabel("window (in run order)")
    left.set_ylabel("output tokens/s")
    left.set_title("each window's throughput")
    left.legend()
    others = configs[1:]
    for i, config in enumerate(others):
        ratio = report["summary"][config]["throughput_ratio"]
        low, high = ratio["ci95"]
        right.errorbar([i], [ratio["mean"]], yerr=[[ratio["mean"] - low], [high - ratio["mean"]]],
                       fmt="o", capsize=6)  # fmt: skip
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xticks(range(len(others)), [f"{c} / {configs[0]}" for c in others])
    right.set_ylabel("throughput ratio (95 % CI)")
    right.set_title("paired by block")
    per_window = (f"{report['window_seconds']:g}-s windows" if report.get("window_seconds")
                  else f"{report['load']['requests']} requests per window")  # fmt: skip
    fig.suptitle(f"{report['tag']}: C={report['load']['concurrency']}, "
                 f"{report['load']['max_tokens']} tokens, {per_window}")  # fmt: skip
    save_figure(fig, path)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument(
        "--configs", nargs="+", default=["native", "ichat", "ichat+replay", "ichat+tracked"]
    )
    parser.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--starts", type=int, default=1)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument("--loadgen", choices=("ichat", "vllm-bench"), default="ichat",
                        help="the load generator: ours, or vLLM's `vllm bench serve`")  # fmt: skip
    parser.add_argument("--window-seconds", type=float, default=0.0,
                        help="steady-state windows of S s (0: --requests a window)")  # fmt: skip
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument("--stagger-seconds", type=float, default=1.5)
    parser.add_argument("--client-cpus", type=int, default=0,
                        help="clients on the last N CPUs, servers on the rest")  # fmt: skip
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="machine")
    parser.add_argument("engine_args", nargs="*", help="engine flags for every server, after --")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    load = Load(args.requests, args.concurrency, args.max_tokens, distinct=True)
    windows: list[dict[str, Any]] = []

    def report() -> dict[str, Any]:
        return {**run_facts(), "tag": args.tag, "engine": args.engine, "configs": args.configs,
                "engine_args": args.engine_args, "load": load.__dict__,
                "window_seconds": args.window_seconds, "warmup_seconds": args.warmup_seconds,
                "stagger_seconds": args.stagger_seconds, "loadgen": args.loadgen,
                "client_cpus": client_cpus(args), "server_cpus": server_cpus(args),
                "blocks": args.blocks, "starts": args.starts, "windows": windows,
                "summary": summarise(windows, args.configs)}  # fmt: skip

    def measure(pool: ClientPool | None, url: str, asked: Load) -> dict[str, Any]:
        if args.loadgen == "vllm-bench":
            return vllm_bench_window(url, asked, args.model_path, seed=len(windows))
        if pool is None:
            return streams(url, asked, args.client_processes)
        return pool.run(Window(url, asked, args.warmup_seconds, args.window_seconds,
                               args.stagger_seconds))  # fmt: skip

    timed = args.window_seconds > 0 and args.loadgen == "ichat"
    for start in range(args.starts):
        with (servers(args.configs, args, start) as (urls, _),
              ClientPool(args.client_processes, client_cpus(args)) if timed
              else contextlib.nullcontext() as pool):  # fmt: skip
            for block in range(args.blocks):
                shift = block % len(args.configs)
                for config in args.configs[shift:] + args.configs[:shift]:
                    asked = dataclasses.replace(load, token_ids=config.endswith("+ids"))
                    result = measure(pool, urls[config], asked)
                    windows.append({"index": len(windows), "start": start, "block": block,
                                    "config": config, **result})  # fmt: skip
                    print(f"start {start} block {block} {config}: "
                          f"{result['out_tok_per_s']:.0f} tok/s, TTFT p50 "
                          f"{result['ttft_p50_ms']:.1f} ms", flush=True)  # fmt: skip
                # after every block: a run cut short by a time limit still leaves its file
                save_report(report(), args.out / f"ab-{args.tag}", plot)
    print(json.dumps(report()["summary"], indent=1))


if __name__ == "__main__":
    main()
