"""Where a vLLM engine's start goes, start after start in one process (a restart's case).

Starts ``AsyncLLM`` once per entry of ``--plans`` in this process (vLLM's server and
iChat imported, as in a worker that restarts its engine; the engine process forked, as
the worker has it), each with the environment named by the plan (``off``: vLLM's
defaults; ``plan``: ``VLLM_ENABLE_STARTUP_PLAN=1``, vLLM's own persisted
memory-profiling result; ``frozen``: vLLM's defaults, this process's heap collected and
frozen first, as the worker does before it starts an engine; ``mega``: ``frozen`` with
``VLLM_USE_MEGA_AOT_ARTIFACT=1``, vLLM's compiled graph loaded from one standalone
artifact, its compile cache keyed apart), answers one request, shuts
it down, and writes per start: the time to a ready engine, to the first request's end,
and to a stopped engine, and the full (generation 2) garbage collections the forked
engine processes ran and their seconds (a ``gc.callbacks`` entry, which a forked child
inherits), as JSON. vLLM's own timing lines (weights, compile, profiling, CUDA graphs, KV cache,
warmup) come from the engine process on stderr: keep the output (``2>&1 | tee``); each
start is marked there by a line ``=== start N (PLAN)``.

    python bench/probe_engine_start.py --model-path M --plans off frozen off frozen --out DIR \
        -- --max-model-len 2048 --gpu-memory-utilization 0.4
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import run_facts


class FullCollections:
    """Each process's generation-2 collections, appended to a file by a ``gc.callbacks``
    entry that forked children inherit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.began: dict[int, float] = {}

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        pid = os.getpid()
        if phase == "start":
            self.began[pid] = time.perf_counter()
        elif info["generation"] == 2 and pid in self.began:
            with self.path.open("a") as f:
                f.write(f"{pid} {time.perf_counter() - self.began[pid]:.4f}\n")

    def take(self) -> dict[int, list[float]]:
        """The collections recorded since the last call, by process."""
        seen: dict[int, list[float]] = collections.defaultdict(list)
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                pid, seconds = line.split()
                seen[int(pid)].append(float(seconds))
            self.path.unlink()
        return seen


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
    parser.add_argument("--plans", nargs="+", default=["off", "frozen", "off", "frozen"],
                        choices=("off", "plan", "frozen", "mega"))  # fmt: skip
    parser.add_argument("--out", type=Path, required=True)
    opts = parser.parse_args(ours)
    results = []
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"  # as the worker starts it
    import vllm.entrypoints.openai.api_server  # noqa: F401  the worker's heap

    import ichat.backends.vllm_backend  # noqa: F401
    from ichat.backends.base_backend import freeze_before_fork, release_frozen_heap

    opts.out.mkdir(parents=True, exist_ok=True)  # the collections' file, emptied by take()
    collections_of = FullCollections(opts.out / "engine-full-collections.txt")
    gc.callbacks.append(collections_of)
    for i, plan in enumerate(opts.plans):
        os.environ["VLLM_ENABLE_STARTUP_PLAN"] = "1" if plan == "plan" else "0"
        os.environ["VLLM_USE_MEGA_AOT_ARTIFACT"] = "1" if plan == "mega" else "0"
        print(f"=== start {i + 1} ({plan})", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        if plan in ("frozen", "mega"):
            freeze_before_fork()
        frozen_s = time.monotonic() - t0
        collections_of.take()
        result = {"start": i + 1, "plan": plan, "freeze_s": round(frozen_s, 3),
                  **await one_start(opts.model_path, engine_argv)}  # fmt: skip
        release_frozen_heap()
        children = {pid: s for pid, s in collections_of.take().items() if pid != os.getpid()}
        result["engine_full_collections"] = sum(len(s) for s in children.values())
        result["engine_full_collection_s"] = round(sum(sum(s) for s in children.values()), 3)
        results.append(result)
        print(f"start {i + 1} ({plan}): ready {result['ready_s']} s, first request "
              f"{result['first_request_s']} s, freeze {frozen_s:.2f} s, engine's full "
              f"collections {result['engine_full_collections']} in "
              f"{result['engine_full_collection_s']} s", flush=True)  # fmt: skip
    gc.callbacks.remove(collections_of)
    collections_of.take()  # what came after the last start: its file goes
    (opts.out / "engine-start-phases.json").write_text(
        json.dumps({**run_facts(), "engine_argv": engine_argv, "starts": results}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
