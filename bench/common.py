"""What the benchmark scripts share: the worker command line, the streaming load, plots.

The scripts run as ``python bench/NAME.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

MODEL_NAME = "bench-model"


def ichat_serve_cmd(model: str, port: int, *extra: str) -> list[str]:
    """`ichat serve` on ``model`` as a user starts it, serving ``MODEL_NAME``."""
    return [
        sys.executable, "-m", "ichat", "serve", "--backend", "vllm", "--port", str(port),
        "--model-path", model, "--served-model-name", MODEL_NAME, *extra,
    ]  # fmt: skip


def chat_body(max_tokens: int, *, stream: bool = False) -> dict[str, Any]:
    """A chat request that generates exactly ``max_tokens`` tokens (vLLM's extras)."""
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Write a long story about a model."}],
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


def save_figure(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def streams(url: str, requests: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    """C concurrent streaming chats: TTFT, inter-token latency, throughput."""
    import aiohttp

    body = chat_body(max_tokens, stream=True)
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as session:
        sem = asyncio.Semaphore(concurrency)

        async def one(record: bool) -> None:
            nonlocal tokens
            async with sem:
                t0 = time.perf_counter()
                last = None
                async with session.post("/v1/chat/completions", json=body) as r:
                    r.raise_for_status()
                    async for line in r.content:
                        if not line.startswith(b"data: {") or b'"content"' not in line:
                            continue
                        now = time.perf_counter()
                        if record:
                            if last is None:
                                ttft.append(now - t0)
                            else:
                                itl.append(now - last)
                            tokens += 1
                        last = now

        await asyncio.gather(*(one(False) for _ in range(concurrency)))  # warm connections
        t0 = time.perf_counter()
        await asyncio.gather(*(one(True) for _ in range(requests)))
        seconds = time.perf_counter() - t0
    return {
        "ttft_p50_ms": 1000 * percentile(ttft, 50),
        "ttft_p99_ms": 1000 * percentile(ttft, 99),
        "itl_p50_ms": 1000 * percentile(itl, 50),
        "itl_p99_ms": 1000 * percentile(itl, 99),
        "req_per_s": requests / seconds,
        "out_tok_per_s": tokens / seconds,
    }
