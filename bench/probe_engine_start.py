"""Where a vLLM engine's start goes, start after start in one process (a restart's case).

Starts ``AsyncLLM`` ``--starts`` times in this process (vLLM already imported, as in a
worker that restarts its engine), each with the environment named by ``--plans``
(``off``: vLLM's defaults; ``plan``: ``VLLM_ENABLE_STARTUP_PLAN=1``, vLLM's own
persisted memory-profiling result), answers one request, shuts it down, and writes per
start: the time to a ready engine, to the first request's end, and to a stopped engine as
JSON. vLLM's own timing lines (weights, compile, profiling, CUDA graphs, KV cache,
warmup) come from the engine process on stderr: keep the output (``2>&1 | tee``); each
start is marked there by a line ``=== start N (PLAN)``.

    python bench/probe_engine_start.py --model-path M --plans off plan plan --out DIR \
        -- --max-model-len 2048 --gpu-memory-utilization 0.4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any


async def one_start(model: str, engine_argv: list[str]) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.async_llm import AsyncLLM

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", model, *engine_argv])
    engine_args = AsyncEngineArgs.from_cli_args(args)
    t0 = time.monotonic()
    engine = AsyncLLM.from_engine_args(engine_args)
    ready = time.monotonic() - t0
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    t1 = time.monotonic()
    async for _ in engine.generate("hello", params, request_id=f"probe-{t0}"):
        pass
    first_request = time.monotonic() - t1
    t2 = time.monotonic()
    engine.shutdown()
    stopped = time.monotonic() - t2
    return {
        "ready_s": round(ready, 3),
        "first_request_s": round(first_request, 3),
        "shutdown_s": round(stopped, 3),
    }


async def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    ours, engine_argv = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--plans", nargs="+", default=["off", "plan", "plan"])
    parser.add_argument("--out", type=Path, required=True)
    opts = parser.parse_args(ours)
    results = []
    for i, plan in enumerate(opts.plans):
        os.environ["VLLM_ENABLE_STARTUP_PLAN"] = "1" if plan == "plan" else "0"
        print(f"=== start {i + 1} ({plan})", file=sys.stderr, flush=True)
        result = {"start": i + 1, "plan": plan, **await one_start(opts.model_path, engine_argv)}
        results.append(result)
        print(f"start {i + 1} ({plan}): ready {result['ready_s']} s, first request "
              f"{result['first_request_s']} s", flush=True)  # fmt: skip
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "engine-start-phases.json").write_text(
        json.dumps({"argv": sys.argv, "engine_argv": engine_argv, "starts": results}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
