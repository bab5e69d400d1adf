"""Where the API process's CPU time goes: vLLM's own server against `ichat serve`.

On an H100 a 1 B model at 256 streams is limited by the API process (one Python event
loop: requests in, tokens detokenized and streamed out), not by the GPU, and a
throughput ratio of two servers swings by 7-20 % from window to window
(docs/benchmarks.md). What iChat adds to that process can be counted instead of timed:
the CPU seconds the API process itself (not its engine process) spends per 1000 tokens
it streams. Both servers run at once; block after block, each gets the same load
window (``common.streams``) in turn, and the process's own CPU time (user + system, from
``psutil``) before and after gives its CPU per 1000 tokens; the paired ratio over blocks
has a bootstrap 95 % interval.

With ``--py-spy PATH`` (the py-spy binary), one more window per configuration, of four
times the requests, is sampled (``py-spy record --threads --format raw``, active
samples): the share of the API process's samples per thread and per package (each
sample charged to the innermost frame of a known package: iChat's own code vs vLLM,
uvicorn, ...), and iChat's functions.

    python bench/profile_worker.py --model-path .cache/tiny-model --blocks 6 \\
        --py-spy /path/to/py-spy -- --max-model-len 512
"""

from __future__ import annotations

import collections
import json
import statistics
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
from bench_ab import bootstrap, servers
from common import Load, bench_parser, pyplot, run_facts, save_figure, save_report, streams


def api_cpu_seconds(pid: int) -> float:
    """The CPU time (user + system) of process ``pid`` alone, without its children."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def window(pid: int, url: str, load: Load, processes: int) -> dict[str, Any]:
    before = api_cpu_seconds(pid)
    result = streams(url, load, processes)
    cpu = api_cpu_seconds(pid) - before
    return {**result, "api_cpu_s": cpu, "api_cpu_ms_per_1k_tokens": 1e6 * cpu / result["tokens"]}


# packages a sample is charged to: the innermost frame of one of them on its stack
PACKAGES = frozenset({"ichat", "vllm", "uvicorn", "starlette", "fastapi", "pydantic",
                      "pydantic_core", "transformers", "tokenizers", "zmq", "msgspec",
                      "prometheus_client", "prometheus_fastapi_instrumentator", "psutil",
                      "httpx", "httpcore", "h11", "httptools", "torch", "sglang"})  # fmt: skip


# a stack that ends in one of these is the event loop's own work; uvloop's is C code, so
# its work shows as the Python frame that started the loop (vLLM's own, or iChat's)
LOOP_FILES = ("asyncio/runners.py", "asyncio/base_events.py", "uvloop/", "selectors.py")
LOOP_RUNNERS = ("run_event_loop (ichat/commands/serve.py",)


def charged_to(frames: list[str]) -> tuple[str, str]:
    """The package a sample's stack is charged to, and that frame's function: from the
    leaf down, the first frame of one of ``PACKAGES`` (the standard library's frames go
    to their caller), or the event loop when its own code comes first (a callback of
    the standard library's, or uvloop's C code); ``("other", "")`` when neither."""
    for frame in reversed(frames):  # "function (path/file.py:line)", leaf last
        function, _, where = frame.partition(" (")
        if where.startswith(LOOP_FILES) or frame.startswith(LOOP_RUNNERS):
            return "event loop", ""
        top = where.split("/", 1)[0] if "/" in where else ""
        if top in PACKAGES:
            return top, f"{function} ({where.rpartition(':')[0]})"
    return "other", ""


def sample(py_spy: str, pid: int, url: str, load: Load, processes: int) -> dict[str, Any]:
    """One window under py-spy (active samples only): the share of the samples per
    thread and per package charged (``charged_to``), and iChat's functions charged most."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as raw:
        spy = subprocess.Popen([py_spy, "record", "--pid", str(pid), "--threads", "--format",
                                "raw", "--rate", "200", "--nonblocking", "-o", raw.name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(2)  # py-spy attached
        streams(url, replace(load, requests=4 * load.requests), processes)  # more samples
        spy.send_signal(2)  # SIGINT: py-spy writes what it has
        spy.wait(60)
        lines = Path(raw.name).read_text().splitlines()
    threads: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    ichat: collections.Counter[str] = collections.Counter()
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        threads[frames[0].partition(": ")[2]] += n  # "thread (TID): NAME"
        package, function = charged_to(frames[1:])
        packages[package] += n
        if package == "ichat":
            ichat[function] += n
    total = sum(threads.values()) or 1
    return {
        "samples": sum(threads.values()),
        "thread_shares": {t: n / total for t, n in threads.most_common(8)},
        "package_shares": {p: n / total for p, n in packages.most_common()},
        "ichat_functions": {f: n / total for f, n in ichat.most_common(15)},
    }


def summarise(windows: list[dict[str, Any]], configs: list[str]) -> dict[str, Any]:
    base = configs[0]
    out: dict[str, Any] = {}
    for config in configs:
        mine = [w["api_cpu_ms_per_1k_tokens"] for w in windows if w["config"] == config]
        out[config] = {"api_cpu_ms_per_1k_tokens_mean": statistics.fmean(mine),
                       "windows": len(mine)}  # fmt: skip
        if config != base:
            by_block: dict[int, dict[str, float]] = collections.defaultdict(dict)
            for w in windows:
                by_block[w["block"]][w["config"]] = w["api_cpu_ms_per_1k_tokens"]
            ratios = [b[config] / b[base] for b in by_block.values() if config in b and base in b]
            low, high = bootstrap(ratios)
            entry = {"mean": statistics.fmean(ratios), "ci95": [low, high], "blocks": len(ratios)}
            out[config]["cpu_per_token_ratio"] = entry
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config in report["configs"]:
        mine = [w for w in report["windows"] if w["config"] == config]
        ax.plot([w["block"] for w in mine], [w["api_cpu_ms_per_1k_tokens"] for w in mine], "o-",
                label=config)  # fmt: skip
    ax.set_xlabel("block")
    ax.set_ylabel("API process CPU ms per 1000 tokens")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(f"{report['tag']}: API process CPU per token")
    save_figure(fig, path)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--configs", nargs="+", default=["native", "ichat"])
    parser.add_argument("--engine", choices=("vllm", "sglang"), default="vllm")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument("--py-spy", help="the py-spy binary: sample one window per server")
    parser.add_argument("--start-timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="machine")
    parser.add_argument("engine_args", nargs="*", help="engine flags for every server, after --")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    load = Load(args.requests, args.concurrency, args.max_tokens, distinct=True)
    windows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    with servers(args.configs, args, 0) as (urls, pids):
        for block in range(args.blocks):
            shift = block % len(args.configs)
            for config in args.configs[shift:] + args.configs[:shift]:
                result = window(pids[config], urls[config], load, args.client_processes)
                windows.append({"block": block, "config": config, **result})
                cpu, rate = result["api_cpu_ms_per_1k_tokens"], result["out_tok_per_s"]
                print(f"block {block} {config}: {cpu:.1f} CPU ms / 1k tokens, {rate:.0f} tok/s",
                      flush=True)  # fmt: skip
        if args.py_spy:
            for config in args.configs:
                profiles[config] = sample(args.py_spy, pids[config], urls[config], load,
                                          args.client_processes)  # fmt: skip
    report = {**run_facts(), "tag": args.tag, "configs": args.configs, "load": load.__dict__,
              "engine_args": args.engine_args, "windows": windows, "profiles": profiles,
              "summary": summarise(windows, args.configs)}  # fmt: skip
    save_report(report, args.out / f"profile-worker-{args.tag}", plot)
    print(json.dumps({"summary": report["summary"], "profiles": profiles}, indent=1))


if __name__ == "__main__":
    main()
