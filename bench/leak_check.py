"""Start/stop cycles of an in-process backend in one process: leaks show here.

Each cycle: start the backend, wait until ready, send one chat, stop it; all cycles run
in one event loop, as the supervisor restarts engines inside a worker. After each
stop it records this process's RSS, the engine processes left (must be 0) and whether
the port is free (must be). RSS is compared with the level after the first cycle
(the first start loads torch, vLLM and compiled kernels once per process).

    python bench/leak_check.py --model-path .cache/tiny-model --cycles 50 [--trace-malloc]
    python bench/leak_check.py --engine sglang --model-path M --cycles 5 -- --device cpu ...

A cycle stuck for 240 s prints where every asyncio task waits and every thread's stack.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import faulthandler
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from common import bench_parser, pyplot, save_figure, save_report

from ichat.backends.base_backend import BaseBackend, release_frozen_heap
from ichat.config import WorkerConfig
from ichat.process import reaper
from ichat.process.processes import free_port, is_python_helper, port_is_free, title
from ichat.process.shared_memory import SHM_DIR

# What one start builds in this process; none of it may outlive its stop.
ENGINE_OBJECTS = {
    "vllm": ("VLLMBackend", "AsyncLLM", "FastAPI", "NoSignalServer", "VllmConfig"),
    "sglang": ("SGLangBackend", "TokenizerManager", "TemplateManager", "ServerArgs"),
}


@dataclass(frozen=True)
class Setup:
    """What every cycle starts: the engine, its model and its extra flags."""

    engine: str
    model: str
    engine_args: tuple[str, ...] = ()

    def backend(self, config: WorkerConfig) -> BaseBackend:
        argv = ["--model-path", self.model, "--served-model-name", "m", *self.engine_args]
        if self.engine == "sglang":
            from ichat.backends.sglang_backend import SGLangBackend

            return SGLangBackend(config, argv)
        from ichat.backends.vllm_backend import VLLMBackend

        return VLLMBackend(config, argv)


STUCK_AFTER_S = 240.0


def dump_tasks() -> None:
    """Print where every asyncio task of this loop waits (runs on the loop)."""
    print(f"cycle stuck for {STUCK_AFTER_S:.0f} s; asyncio tasks:", file=sys.stderr)
    for task in asyncio.all_tasks():
        print(f"--- {task!r:.300}", file=sys.stderr)
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


def malloc_trim() -> None:
    """Ask glibc to give freed heap memory back to the OS (RSS then shows what is used)."""
    ctypes.CDLL(None).malloc_trim(0)


async def all_cycles(
    setup: Setup, cycles: int, guard_pid: int, trace: bool, trim: bool = False
) -> tuple[list[dict[str, Any]], tracemalloc.Snapshot | None]:
    """All cycles in one event loop, as the supervisor restarts engines in a worker."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(all_threads_started(min(32, (os.cpu_count() or 1) + 4)))
    port = free_port()
    results = []
    first = None
    shm_before = set(os.listdir(SHM_DIR))
    for i in range(cycles):
        # a stuck cycle prints where every task waits, and every thread's stack
        watchdog = threading.Timer(STUCK_AFTER_S, loop.call_soon_threadsafe, (dump_tasks,))
        watchdog.daemon = True
        watchdog.start()
        faulthandler.dump_traceback_later(STUCK_AFTER_S + 10, exit=False)
        try:
            result = await one_cycle(setup, port, guard_pid, trim)
            # left in /dev/shm by the stopped engine (a killed EngineCore cannot unlink)
            result["dev_shm_files_left"] = sorted(set(os.listdir(SHM_DIR)) - shm_before)
        finally:
            watchdog.cancel()
            faulthandler.cancel_dump_traceback_later()
        if trace and i == 0:  # after the first cycle: imports and caches are done
            tracemalloc.start(10)
        if trace and i == 1:
            gc.collect()
            first = tracemalloc.take_snapshot()
        results.append(result)
        gpu = f", GPU {result['gpu_memory_used_mib']:.0f} MiB" if "gpu_processes" in result else ""
        print(
            f"cycle {i + 1}/{cycles}: ready {result['ready_s']:.1f} s, stop "
            f"{result['stop_s']:.2f} s, RSS {result['rss_mib']:.0f} MiB "
            f"({', '.join(f'{k} {v:.0f}' for k, v in result['rss_by_mapping_mib'].items())}), "
            f"threads {result['threads']}, fds {result['open_fds']}, "
            f"tokenizers {result['tokenizers_alive']}, "
            f"/dev/shm files left {len(result['dev_shm_files_left'])}, "
            f"left {result['engine_processes_left']}, port free {result['port_free']}{gpu}",
            flush=True,
        )
    return results, first


async def one_cycle(setup: Setup, port: int, guard_pid: int, trim: bool = False) -> dict[str, Any]:
    config = WorkerConfig(port=port)
    backend = setup.backend(config)
    t0 = time.monotonic()
    task = asyncio.create_task(backend.run())
    await backend.wait_for_server_ready(timeout=600)
    ready_s = time.monotonic() - t0
    async with httpx.AsyncClient(base_url=config.base_url, timeout=60) as client:
        r = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        )
        r.raise_for_status()
    t1 = time.monotonic()
    backend.request_stop()
    await task
    stop_s = time.monotonic() - t1
    release_frozen_heap()  # what the supervisor does before it starts another engine,
    gc.collect()  # and the next start's own collection
    if trim:
        gc.collect()
        malloc_trim()
    me = psutil.Process()
    left = [
        f"{p.pid}:{title(p)[:60]}:{p.status()}"
        for p in me.children(recursive=True)
        if not is_python_helper(p) and p.pid != guard_pid
    ]
    if left:
        print("left:", left, flush=True)
    threads = native_threads()
    rss, rss_by_mapping_mib = me.memory_info().rss / 2**20, rss_by_mapping(me)
    return {
        "ready_s": ready_s,
        "stop_s": stop_s,
        "rss_mib": rss,
        "rss_by_mapping_mib": rss_by_mapping_mib,
        "tokenizers_alive": tokenizers_alive(),  # the backend's stop collected garbage
        "threads": sum(threads.values()),
        "frozen_objects": gc.get_freeze_count(),  # vLLM's gc.freeze(), not undone = leak
        "native_threads": threads,
        "python_threads": sorted(t.name for t in threading.enumerate()),
        "open_fds": me.num_fds(),
        "open_fd_kinds": open_fd_kinds(),
        "engine_processes_left": len(left),
        "port_free": port_is_free("127.0.0.1", port),
        **gpu_memory(),
    }


def gpu_memory() -> dict[str, Any]:
    """On a GPU machine: the memory used on the GPUs and the processes holding any (after
    a stop: none of the engine's may); nothing elsewhere."""
    if shutil.which("nvidia-smi") is None:
        return {}

    def query(what: str) -> list[str]:
        out = subprocess.run(
            ["nvidia-smi", f"--query-{what}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return [line.strip() for line in out.stdout.splitlines() if line.strip()]

    return {
        "gpu_memory_used_mib": sum(float(v) for v in query("gpu=memory.used")),
        "gpu_processes": query("compute-apps=pid,used_memory"),
    }


def all_threads_started(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool (the loop's default executor, which runs ``asyncio.to_thread``)
    with every thread running from the start. Python's pool starts a thread whenever a
    job comes before the previous job's thread is idle again (a race), up to
    ``workers``; a count of threads per cycle would take that bounded growth for a
    leak (seen once: 6, 6, 7, 7 threads over four SGLang cycles)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    barrier = threading.Barrier(workers)  # each job holds its thread until all started
    for job in [pool.submit(barrier.wait) for _ in range(workers)]:
        job.result()
    return pool


def native_threads() -> dict[str, int]:
    """This process's threads by OS name (ZMQ, OpenMP and tokenizer threads have no
    Python object, so `threading.enumerate` does not show them)."""
    names: collections.Counter[str] = collections.Counter()
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # ended meanwhile
            names[Path(f"/proc/self/task/{tid}/comm").read_text().strip()] += 1
    return dict(names)


def open_fd_kinds() -> dict[str, int]:
    """This process's open file descriptors by kind (socket, pipe, eventfd, file...)."""
    kinds: collections.Counter[str] = collections.Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        kinds[target.split(":", 1)[0] if ":" in target else "file"] += 1
    return dict(kinds)


def rss_by_mapping(proc: psutil.Process) -> dict[str, float]:
    """RSS by kind of mapping: the glibc heap, anonymous mappings (mmap'd arenas, thread
    stacks, large allocations), and file-backed ones (libraries, mapped files)."""
    kinds: collections.Counter[str] = collections.Counter()
    for m in proc.memory_maps(grouped=False):
        path = m.path
        if path == "[heap]":
            kind = "heap"
        elif path in ("", "[anon]") or path.startswith("[anon:"):
            kind = "anonymous"
        elif path.startswith("["):
            kind = "other"
        elif "/dev/shm" in path or "memfd:" in path or path.startswith("/SYSV"):
            kind = "shared-memory"
        else:
            kind = "file"
        kinds[kind] += m.rss / 2**20
    return dict(kinds)


def tokenizers_alive() -> int:
    """Tokenizer objects still in memory (each start loads one and deep-copies it for
    its chat-template pool; a cache keyed by the pool kept them after the stop).

    Found as the referrers of the tokenizer classes (an instance refers to its class):
    listing every object instead would allocate a list of millions of pointers after
    each cycle, and the allocator keeps that memory (+45 MiB of RSS, once)."""
    from transformers import PreTrainedTokenizerBase

    classes: set[type] = set()
    todo: list[type] = [PreTrainedTokenizerBase]
    while todo:
        cls = todo.pop()
        if cls not in classes:
            classes.add(cls)
            todo.extend(cls.__subclasses__())
    return sum(
        isinstance(o, PreTrainedTokenizerBase) and not isinstance(o, type)
        for o in gc.get_referrers(*classes)
    )


def top_growth(first: tracemalloc.Snapshot, last: tracemalloc.Snapshot, n: int = 15) -> list[str]:
    """Where Python memory grew between two snapshots (by source line)."""
    stats = last.compare_to(first, "lineno")
    return [str(stat) for stat in stats[:n]]


def run_cycles(
    setup: Setup, cycles: int, trace: bool = False, trim: bool = False
) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    with reaper.guarded() as guard:  # killed midway (a test's timeout): no orphan engine
        assert guard.proc is not None
        results, first = asyncio.run(all_cycles(setup, cycles, guard.proc.pid, trace, trim))
    baseline = results[0]["rss_mib"]
    # objects frozen by an engine (gc.freeze) are invisible to gc.get_objects(): the
    # count below is of everything reachable (frozen_objects says what stayed frozen)
    gc.unfreeze()
    gc.collect()
    growth = []
    if first is not None and cycles > 2:
        growth = top_growth(first, tracemalloc.take_snapshot())
        print("Python allocations grown since cycle 2:", *growth, sep="\n  ", flush=True)
    alive = collections.Counter(type(o).__name__ for o in gc.get_objects())
    return {
        "engine": setup.engine,
        "engine_objects_alive": {name: alive[name] for name in ENGINE_OBJECTS[setup.engine]},
        "tokenizers_alive": results[-1]["tokenizers_alive"],
        "tokenizers_growth": results[-1]["tokenizers_alive"]
        - results[min(1, cycles - 1)]["tokenizers_alive"],
        "rss_growth_per_cycle_after_4th_mib": (
            (results[-1]["rss_mib"] - results[3]["rss_mib"]) / (cycles - 4) if cycles > 4 else 0.0
        ),
        "python_allocation_growth": growth,
        "cycles": results,
        "rss_baseline_mib": baseline,
        "rss_growth_mib": results[-1]["rss_mib"] - baseline,
        "rss_growth_per_cycle_mib": (results[-1]["rss_mib"] - baseline) / max(cycles - 1, 1),
        "threads_growth": results[-1]["threads"] - results[0]["threads"],
        "open_fds_growth": results[-1]["open_fds"] - results[0]["open_fds"],
        "frozen_objects_after_stops": max(r["frozen_objects"] for r in results),
        "dev_shm_files_left": results[-1]["dev_shm_files_left"],
        "engine_processes_left_total": sum(r["engine_processes_left"] for r in results),
        "port_not_free_count": sum(not r["port_free"] for r in results),
        **(
            {
                "gpu_memory_used_after_stops_mib": [r["gpu_memory_used_mib"] for r in results],
                "gpu_processes_after_stops_max": max(len(r["gpu_processes"]) for r in results),
            }
            if "gpu_memory_used_mib" in results[0]
            else {}
        ),
    }


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--engine", choices=sorted(ENGINE_OBJECTS), default="vllm")
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="JSON (and PNG beside it)")
    parser.add_argument(
        "--trace-malloc", action="store_true", help="report where Python memory grew (slower)"
    )
    parser.add_argument(
        "--malloc-trim",
        action="store_true",
        help="after each stop, collect garbage and return freed heap to the OS first",
    )
    parser.add_argument("engine_args", nargs="*", help="after --: the engine's own flags")
    args = parser.parse_args()
    setup = Setup(args.engine, args.model_path, tuple(args.engine_args))
    report = run_cycles(setup, args.cycles, args.trace_malloc, args.malloc_trim)
    report["malloc_trim"] = args.malloc_trim
    print(json.dumps({k: v for k, v in report.items() if k != "cycles"}, indent=2))
    if args.out is not None:
        save_report(report, args.out.with_suffix(""), plot)
    return 0


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rss = [c["rss_mib"] for c in report["cycles"]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(range(1, len(rss) + 1), rss, marker="o")
    ax.set_xlabel("start/stop cycle")
    ax.set_ylabel("RSS of the ichat process (MiB)")
    ax.set_title(
        f"{len(rss)} in-process cycles: {report['rss_growth_mib']:+.0f} MiB in all, "
        f"{report.get('rss_growth_per_cycle_after_4th_mib', 0):+.2f} MiB a cycle after the "
        f"4th, {report['engine_processes_left_total']} processes left"
    )
    save_figure(fig, path)


if __name__ == "__main__":
    raise SystemExit(main())
