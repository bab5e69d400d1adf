"""Lifecycle figures of a supervised `ichat serve` worker: kill, restart, drain.

- kill -9 of the engine core, ``--kills`` times on one worker: time to detection (from
  the worker's own metric) and to serving again, next to the worker's first start;
- drain: for each in-flight count, a fresh worker gets that many streams, then SIGTERM;
  time from the signal to exit 0, and whether every stream finished.

    python bench/bench_faults.py --model-path .cache/tiny-model --kills 3 --inflight 0 4 16
    python bench/bench_faults.py --model-path M ... -- --gpu-memory-utilization 0.85

Writes JSON and PNG (``--out``). Numbers only: nothing here asserts a speed.
"""

from __future__ import annotations

import concurrent.futures
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import bench_parser, pyplot, save_figure, save_report

from tests.support import (
    MODEL_NAME,
    RESTART_PHASES,
    engine_core,
    kill_and_wait_serving,
    phase_seconds,
    start_worker,
    stream_once,
)


def kills(worker_args: tuple[str, ...], count: int, tmp: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    with start_worker(tmp, *worker_args) as w:
        w.wait_ready()
        first_start = time.monotonic() - t0
        print(f"first start: ready {first_start:.1f} s after the worker started", flush=True)
        rows = []
        for _ in range(count):
            result = kill_and_wait_serving(w, engine_core(w.proc.pid).pid)
            # where the time went: detection, then the dead engine's cleanup, the backoff,
            # the new engine's start, its readiness and warmup
            phases = phase_seconds(w)
            rows.append(
                {
                    "detect_s": result.detected_s,
                    "serving_again_s": result.serving_again_s,
                    "phases_s": {k: phases[k] for k in RESTART_PHASES if k in phases},
                }
            )
            print(
                f"kill: detected {rows[-1]['detect_s']:.3f} s, serving again "
                f"{rows[-1]['serving_again_s']:.1f} s; "
                + ", ".join(f"{k} {v:.2f} s" for k, v in rows[-1]["phases_s"].items()),
                flush=True,
            )
    return {"first_start_s": first_start, "kills": rows}


def drain(worker_args: tuple[str, ...], inflight: int, tmp: Path, tokens: int) -> dict[str, Any]:
    with start_worker(tmp, *worker_args, "--drain-timeout", "120") as w:
        w.wait_ready()
        with concurrent.futures.ThreadPoolExecutor(max(inflight, 1)) as pool:
            streams = [pool.submit(stream_once, w.url, tokens) for _ in range(inflight)]
            time.sleep(1.0 if inflight else 0)
            t0 = time.monotonic()
            w.proc.send_signal(signal.SIGTERM)
            outcomes = [s.result(timeout=300) for s in streams]
            code = w.proc.wait(300)
        seconds = time.monotonic() - t0
    row = {
        "inflight": inflight,
        "drain_s": seconds,
        "exit_code": code,
        "finished": outcomes.count("finished"),
    }
    print(
        f"drain: {inflight} in flight -> exit {code} after {seconds:.2f} s, "
        f"{row['finished']} finished",
        flush=True,
    )
    return row


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    kill_rows = report["kill"]["kills"]
    xs = range(1, len(kill_rows) + 1)
    a.bar([x - 0.2 for x in xs], [r["detect_s"] for r in kill_rows], 0.4, label="detected")
    a.bar(
        [x + 0.2 for x in xs], [r["serving_again_s"] for r in kill_rows], 0.4, label="serving again"
    )
    a.axhline(report["kill"]["first_start_s"], ls="--", c="gray", label="first start")
    a.set_title("kill -9 engine core (s after the kill)")
    a.set_xlabel("kill")
    a.legend()
    d = report["drain"]
    b.plot([r["inflight"] for r in d], [r["drain_s"] for r in d], marker="o")
    b.set_title("SIGTERM to exit 0 (s) vs streams in flight")
    b.set_xlabel("streams in flight")
    fig.suptitle(f"ichat serve lifecycle on {report['machine']}")
    save_figure(fig, path)


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--inflight", type=int, nargs="+", default=[0, 4, 16])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per drained stream")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("engine_args", nargs="*", help="after --: the engine's own flags")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    worker_args = ("--model-path", args.model_path, "--served-model-name", MODEL_NAME)
    worker_args += tuple(args.engine_args)
    with tempfile.TemporaryDirectory() as tmp:
        report = {
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "engine_args": args.engine_args,
            "kill": kills(worker_args, args.kills, Path(tmp)),
            "drain": [drain(worker_args, n, Path(tmp), args.tokens) for n in args.inflight],
        }
    stem = args.out / f"lifecycle-{args.tag}"
    save_report(report, stem, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
