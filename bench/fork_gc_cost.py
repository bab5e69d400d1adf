"""What a full garbage collection costs a process forked from the worker, its heap
frozen first or not (``base_backend.freeze_before_fork``).

A vLLM engine process forked from the worker inherits the worker's whole heap (vLLM's
server, torch, transformers, iChat: ~600 k tracked objects) and runs about nine full
collections while it starts (vLLM 0.26, V2 model runner: device init, three around the
model load, three around memory profiling, CUDA-graph capture, its heap freeze). Each
walks every tracked object it did not freeze, inherited ones included, and writes
their headers, so their pages are copied. This forks a child ``--forks`` times per
condition from a process with the worker's imports, and times ``--collections`` full
collections in each child, with the parent's heap frozen before the fork or not.

    python bench/fork_gc_cost.py --forks 5 --collections 3 --out docs/results --tag cpu-2core

Writes JSON and PNG. Numbers only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import pyplot, run_facts, save_figure, save_report


def child_collections(collections: int) -> list[float]:
    """Fork; in the child time ``collections`` full collections; their seconds."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: time, report, leave without the parent's exit handlers
        os.close(read)
        seconds = []
        for _ in range(collections):
            t0 = time.perf_counter()
            gc.collect()
            seconds.append(time.perf_counter() - t0)
        os.write(write, json.dumps(seconds).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        seconds: list[float] = json.loads(pipe.read())
    os.waitpid(pid, 0)
    return seconds


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, entry in enumerate(report["conditions"].values()):
        ms = [1000 * s for s in entry["collection_s"]]
        ax.scatter([i] * len(ms), ms, alpha=0.6)
    ax.set_xticks(range(len(report["conditions"])), list(report["conditions"]))
    ax.set_ylabel("one full collection in the forked child (ms)")
    ax.set_title(f"{report['tag']}: parent's heap {report['parent_tracked_objects']} objects")
    save_figure(fig, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forks", type=int, default=5)
    parser.add_argument("--collections", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="machine")
    args = parser.parse_args()

    import vllm.entrypoints.openai.api_server  # noqa: F401  the worker's heap

    import ichat.backends.vllm_backend  # noqa: F401
    from ichat.backends.base_backend import freeze_before_fork, release_frozen_heap

    gc.collect()
    tracked = len(gc.get_objects())
    conditions: dict[str, Any] = {}
    for frozen in (False, True, False, True):  # alternated: the machine's drift on both
        name = "frozen" if frozen else "unfrozen"
        t0 = time.perf_counter()
        if frozen:
            freeze_before_fork()
        freeze_s = time.perf_counter() - t0
        runs = [child_collections(args.collections) for _ in range(args.forks)]
        release_frozen_heap()
        entry = conditions.setdefault(name, {"freeze_s": [], "collection_s": []})
        entry["freeze_s"].append(freeze_s)
        entry["collection_s"].extend(s for run in runs for s in run)
    for name, entry in conditions.items():
        seconds = entry["collection_s"]
        entry["median_s"] = statistics.median(seconds)
        entry["range_s"] = [min(seconds), max(seconds)]
        low, high = (1000 * s for s in entry["range_s"])
        print(f"{name}: a child's full collection {entry['median_s'] * 1000:.1f} ms (median "
              f"of {len(seconds)}, {low:.1f}-{high:.1f}); the parent's freeze "
              f"{max(entry['freeze_s']) * 1000:.0f} ms", flush=True)  # fmt: skip
    report = {**run_facts(), "tag": args.tag, "parent_tracked_objects": tracked,
              "forks": args.forks, "collections": args.collections,
              "conditions": conditions}  # fmt: skip
    save_report(report, args.out / f"fork-gc-cost-{args.tag}", plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
