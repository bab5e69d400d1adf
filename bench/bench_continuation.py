"""Streams cut by kill -9 of the active engine, continued on the standby (``--standby``).

One supervised worker with ``--standby``; ``--kills`` times: ``--streams`` greedy
streams (chat and completions alternating, ``ignore_eos``, ``--max-tokens`` each, token
ids asked), a kill -9 of the active EngineCore once every stream has a quarter of its
tokens, then per stream: completed well (200, no error event, ``[DONE]`` once, exactly
``--max-tokens`` ids), its tokens at the kill, the client-visible stall (the longest gap
between two chunks, and from the kill to its next chunk), and whether its ids equal the
same request run uninterrupted afterwards, alone. Each next kill waits for the new
standby. ``--control``: first the same streams without a kill (on a GPU a request's
greedy tokens may depend on its batch: what that alone changes).

    python bench/bench_continuation.py --model-path M --kills 2 --streams 16 [-- FLAGS]

Writes JSON and PNG (``--out``). Numbers only: nothing here asserts a speed.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_failover import active_engine_core, status, wait_standby
from common import bench_parser, pyplot, run_facts, save_figure, save_report

from ichat.process.processes import free_port
from tests.support import MODEL_NAME, start_worker

PATHS = ("/v1/chat/completions", "/v1/completions")


def body(path: str, max_tokens: int) -> dict[str, Any]:
    request: dict[str, Any] = {"model": MODEL_NAME, "max_tokens": max_tokens, "stream": True,
                               "ignore_eos": True, "temperature": 0, "return_token_ids": True,
                               "stream_options": {"include_usage": True}}  # fmt: skip
    if path == PATHS[0]:
        request["messages"] = [{"role": "user", "content": "tell me a story"}]
    else:
        request["prompt"] = "once upon a time"
    return request


def run_stream(url: str, path: str, max_tokens: int, seen: list[float]) -> dict[str, Any]:
    """One stream: its ids, events and the arrival time of each chunk (``seen``)."""
    ids: list[int] = []
    events: list[Any] = []
    with httpx.stream("POST", url + path, json=body(path, max_tokens), timeout=600) as reply:
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            event = data if data == "[DONE]" else json.loads(data)
            events.append(event)
            if isinstance(event, dict):
                for choice in event.get("choices") or ():
                    ids.extend(choice.get("token_ids") or ())
                seen.append(time.monotonic())
        status_code = reply.status_code
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    return {"path": path, "status": status_code, "ids": ids, "errors": len(errors),
            "done": events.count("[DONE]")}  # fmt: skip


def one_kill(
    url: str, status_port: int, worker: Any, streams: int, max_tokens: int, kill: bool = True
) -> dict[str, Any]:
    seen: list[list[float]] = [[] for _ in range(streams)]
    paths = [PATHS[i % 2] for i in range(streams)]
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        pairs = zip(paths, seen, strict=True)
        futures = [pool.submit(run_stream, url, p, max_tokens, s) for p, s in pairs]
        while not all(len(s) >= max_tokens // 4 for s in seen):
            if any(f.done() for f in futures):
                break
            time.sleep(0.002)
        at_kill = [len(s) for s in seen]
        core = active_engine_core(worker, status_port)
        t_kill = time.monotonic()
        if kill:  # else: the control, the same streams uninterrupted
            os.kill(core.pid, signal.SIGKILL)
        results = [f.result() for f in futures]
    references = {p: run_stream(url, p, max_tokens, [])["ids"] for p in PATHS}
    rows = []
    for result, arrivals, n in zip(results, seen, at_kill, strict=True):
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        after = [t for t in arrivals if t > t_kill]
        rows.append({
            "path": result["path"], "status": result["status"], "errors": result["errors"],
            "done": result["done"], "tokens": len(result["ids"]), "chunks_at_kill": n,
            "complete": result["status"] == 200 and not result["errors"]
                        and result["done"] == 1 and len(result["ids"]) == max_tokens,
            "token_exact": result["ids"] == references[result["path"]],
            "longest_gap_s": max(gaps, default=None),
            "kill_to_next_chunk_s": after[0] - t_kill if after else None,
        })  # fmt: skip
    return {"streams": rows, "worker": {k: status(status_port).get(k) for k in (
        "failovers", "continuations", "continuation_reprefilled_tokens",
        "last_continuation_stall_s", "last_restart_to_ready_s")}}  # fmt: skip


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--kills", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="cpu")
    parser.add_argument(
        "--control",
        action="store_true",
        help="first the same streams without a kill: how many equal the reference "
        "(run alone) uninterrupted, i.e. what batching alone changes",
    )
    parser.add_argument("engine_args", nargs="*", help="after --: the engine's own flags")
    args = parser.parse_args()
    status_port = free_port()
    worker_args = ("--model-path", args.model_path, "--served-model-name", MODEL_NAME,
                   "--standby", "--continuation-limit", "3",
                   "--status-port", str(status_port), *args.engine_args)  # fmt: skip
    kills = []
    with tempfile.TemporaryDirectory() as tmp, start_worker(Path(tmp), *worker_args) as worker:
        worker.wait_ready(timeout=1800)
        if args.control:
            result = one_kill(
                worker.url, status_port, worker, args.streams, args.max_tokens, kill=False
            )
            kills.append({"kill": 0, "control": True, **result})
            rows = result["streams"]
            print(f"control (no kill): {sum(r['complete'] for r in rows)}/{len(rows)} "
                  f"complete, {sum(r['token_exact'] for r in rows)} equal to the reference",
                  flush=True)  # fmt: skip
        for k in range(args.kills):
            standby = wait_standby(status_port)
            result = one_kill(worker.url, status_port, worker, args.streams, args.max_tokens)
            kills.append({"kill": k + 1, "standby_before": standby, **result})
            rows = result["streams"]
            print(f"kill {k + 1}: {sum(r['complete'] for r in rows)}/{len(rows)} complete, "
                  f"{sum(r['token_exact'] for r in rows)} token-exact, longest gap "
                  f"{max(r['longest_gap_s'] or 0 for r in rows):.3f} s; {result['worker']}",
                  flush=True)  # fmt: skip
    report = {**run_facts(), "streams": args.streams, "max_tokens": args.max_tokens,
              "kills": kills}  # fmt: skip
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for kill in kills:
        gaps = [r["longest_gap_s"] or 0 for r in kill["streams"]]
        ax.plot(range(len(gaps)), gaps, "o", label=f"kill {kill['kill']}")
    ax.set_xlabel("stream")
    ax.set_ylabel("longest gap between chunks (s)")
    ax.set_title("streams cut by kill -9 of the active engine, continued on the standby")
    ax.legend()
    stem = args.out / f"continuation-{args.tag}"
    save_report(report, stem, lambda _, path: save_figure(fig, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
