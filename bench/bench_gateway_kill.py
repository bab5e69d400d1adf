"""kill -9 of one engine of two workers behind the gateway (SMG), without a standby:
what clients see.

Two supervised workers (``ichat serve --gateway-url --continuation-limit N``) and
``ichat gateway``; a prober sends a small streamed chat through the gateway every
50 ms for the whole run. ``--kills`` times: ``--streams`` greedy 200-token streams (half
straight to worker A, half through the gateway, chat and completions alternating), then
kill -9 of A's EngineCore once each has a few tokens. Per kill: the death's detection
(A's metric), when A left the gateway's healthy set and when it was back; each stream:
complete and well-formed (one finish, one usage, ``[DONE]`` once, its text the detokenized
ids) and token-exact against the same request run uninterrupted. Over the run: every
probe's outcome (the number that failed is the figure).

    python bench/bench_gateway_kill.py --model-path M --kills 3 --streams 8 [-- FLAGS]

``--backend sglang`` (run with SGLang's environment; the gateway with ``--gateway-python``,
one that has smg): kill -9 of A's scheduler; the streams are completions only (SGLang
streams no token ids for chat, so a chat stream cannot be continued); each worker's
``ichat_*`` metrics are read on its status port.

Writes JSON and PNG (``--out``). Numbers only: nothing here asserts a speed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_failover import Prober
from common import bench_parser, pyplot, run_facts, save_figure, save_report

from ichat.process.processes import free_port, stop_gracefully, title
from tests.probe import wait_healthy
from tests.support import (
    MODEL_NAME,
    Stream,
    Worker,
    engine_core,
    metric,
    start_worker,
    wait_all_streaming,
)


@contextlib.contextmanager
def gateway(tmp: Path, python: str) -> Iterator[str]:
    port = free_port()
    with (tmp / "gateway.log").open("w") as log:
        command = ["--port", str(port), "--prometheus-port", str(free_port())]
        proc = subprocess.Popen(
            [python, "-m", "ichat", "gateway", *command],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, timeout=60, proc=proc)
        yield url
    finally:
        stop_gracefully(proc, 60)


def healthy(gateway_url: str) -> set[str]:
    """The worker URLs the gateway lists healthy."""
    try:
        workers = httpx.get(f"{gateway_url}/workers", timeout=5).json()["workers"]
    except httpx.HTTPError:
        return set()
    return {w["url"] for w in workers if w["is_healthy"]}


def wait_for(check: Callable[[], bool], timeout: float) -> float:
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            return float("nan")
        time.sleep(0.02)
    return time.monotonic() - t0


def stream_outcome(stream: Stream, checker_url: str, reference: dict[str, list[int]]) -> str:
    """ "exact", or what is wrong with the stream."""
    try:
        stream.check_complete(checker_url)
    except AssertionError as exc:
        return f"incomplete: {str(exc)[:200]}"
    return "exact" if stream.token_ids == reference[stream.path] else "differs"


@dataclass(frozen=True)
class Pair:
    """The two workers, with where each one's ``ichat_*`` metrics are read."""

    a: Worker
    b: Worker
    backend: str
    metrics_a: Worker  # a itself (vLLM's port has them), or its status server (SGLang)

    def paths(self) -> list[str]:
        if self.backend == "sglang":
            return ["/v1/completions"]
        return ["/v1/chat/completions", "/v1/completions"]

    def engine(self) -> psutil.Process:
        """The process whose kill -9 is the engine's death."""
        if self.backend == "vllm":
            return engine_core(self.a.proc.pid)
        children = psutil.Process(self.a.proc.pid).children(recursive=True)
        return next(p for p in children if "sglang::scheduler" in title(p))


def one_kill(
    i: int, pair: Pair, gateway_url: str, streams_n: int, reference: dict[str, list[int]]
) -> dict[str, Any]:
    a, b = pair.a, pair.b
    paths = (pair.paths() * streams_n)[:streams_n]
    streams = [Stream(p) for p in paths]
    urls = [a.url, a.url, gateway_url, gateway_url] * (streams_n // 4 + 1)
    with concurrent.futures.ThreadPoolExecutor(len(streams)) as pool:
        running = [pool.submit(s.run, u) for u, s in zip(urls, streams, strict=False)]
        at_kill = wait_all_streaming(streams)
        wall_kill = time.time()
        os.kill(pair.engine().pid, signal.SIGKILL)
        out_s = wait_for(lambda: a.url not in healthy(gateway_url), 30)
        for future in running:
            future.result(timeout=300)
    back_s = wait_for(lambda: a.url in healthy(gateway_url), 900)
    detected = metric(pair.metrics_a, "ichat_worker_last_death_detected_timestamp_seconds")
    detected_s = detected - wall_kill
    outcomes = [stream_outcome(s, b.url, reference) for s in streams]
    row = {
        "kill": i + 1,
        "detected_s": detected_s,
        "out_of_gateway_s": out_s,
        "back_in_gateway_s": None if math.isnan(back_s) else time.time() - wall_kill,
        "streams": [
            {"path": s.path, "via": u, "tokens_at_kill": n, "outcome": o}
            for s, u, n, o in zip(streams, urls, at_kill, outcomes, strict=False)
        ],
        "streams_exact": outcomes.count("exact"),
    }
    print(
        f"kill {i + 1}: detected {detected_s:.3f} s, out of the gateway {out_s:.3f} s, back "
        f"after {row['back_in_gateway_s']} s; streams exact {row['streams_exact']}/"
        f"{len(streams)}",
        flush=True,
    )
    return row


def run(args: Any) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-kill-"))
    with gateway(tmp, args.gateway_python) as gateway_url:
        worker_args = [
            "--model-path", args.model_path, "--served-model-name", MODEL_NAME,
            "--gateway-url", gateway_url, "--continuation-limit", str(args.continuation_limit),
            *args.engine_args,
        ]  # fmt: skip
        status_a = free_port()
        with (
            start_worker(tmp, "--status-port", str(status_a), *worker_args,
                         backend=args.backend) as a,
            start_worker(tmp, *worker_args, backend=args.backend) as b,
        ):  # fmt: skip
            a.wait_ready(timeout=1800)
            b.wait_ready(timeout=1800)
            metrics_a = a
            if args.backend == "sglang":  # SGLang's /metrics lacks iChat's lines
                metrics_a = Worker(a.proc, status_a, a.log)
            pair = Pair(a, b, args.backend, metrics_a)
            wait_for(lambda: {a.url, b.url} <= healthy(gateway_url), 120)
            reference = {}
            for path in pair.paths():
                uncut = Stream(path)
                uncut.run(b.url)
                reference[path] = uncut.token_ids
            prober = Prober(gateway_url, time.monotonic())
            kills = []
            for i in range(args.kills):
                time.sleep(2.0)
                t_kill = time.monotonic() - prober.t0
                kills.append({"at_s": t_kill, **one_kill(i, pair, gateway_url, args.streams,
                                                         reference)})  # fmt: skip
            time.sleep(2.0)
            probes = prober.stop()
            continued = metric(metrics_a, 'ichat_worker_continuations_total{outcome="continued"}')
    failed = [p for p in probes if p["outcome"] != "ok"]
    print(f"probes: {len(probes)}, failed {len(failed)}; continued streams {continued:.0f}")
    return {
        **run_facts(),
        "backend": args.backend,
        "engine_args": args.engine_args,
        "continuation_limit": args.continuation_limit,
        "kills": kills,
        "probes": probes,
        "probes_total": len(probes),
        "probes_failed": len(failed),
        "continuations_continued": continued,
    }


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 4))
    probes = report["probes"]
    ok = [p for p in probes if p["outcome"] == "ok"]
    bad = [p for p in probes if p["outcome"] != "ok"]
    ax.plot([p["sent_s"] for p in ok], [p["ttft_s"] * 1000 for p in ok], ".", markersize=3,
            label=f"probe answered ({len(ok)})")  # fmt: skip
    ax.plot([p["sent_s"] for p in bad], [1 for _ in bad], "rx",
            label=f"probe failed ({len(bad)}; drawn at 1 ms)")  # fmt: skip
    for kill in report["kills"]:
        ax.axvline(kill["at_s"], color="red", linewidth=0.8)
    ax.set_xlabel("seconds (red: kill -9 of worker A's engine)")
    ax.set_ylabel("probe time to first token (ms)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(
        f"kill -9 of one engine of two behind SMG: {report['probes_failed']} of "
        f"{report['probes_total']} probes failed; streams exact: "
        f"{[k['streams_exact'] for k in report['kills']]} of {len(report['kills'][0]['streams'])}"
    )
    save_figure(fig, path)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--continuation-limit", type=int, default=3)
    parser.add_argument("--backend", choices=("vllm", "sglang"), default="vllm")
    parser.add_argument("--gateway-python", default=sys.executable,
                        help="the Python that runs `ichat gateway` (one with smg)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results/gateway-kill"))
    parser.add_argument("engine_args", nargs="*", help="engine flags for both workers, after --")
    args = parser.parse_args()
    save_report(run(args), args.out, plot)


if __name__ == "__main__":
    main()
