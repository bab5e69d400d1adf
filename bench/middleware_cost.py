"""What ``ReplayOnEngineDeath`` costs a request, without an engine or a network.

Every SGLang worker runs its answers through ``ReplayOnEngineDeath`` with ``death_of``
(each answer races the engine's death; docs/benchmarks.md), so its per-request cost
lands in the API process. Here a stand-in ASGI app streams a chat of ``--tokens``
chunks, called directly (bare) and through the middleware, alternately, ``--rounds``
times of ``--requests`` requests each, on uvloop as the worker runs: microseconds per
request, and per 1000 tokens.

    python bench/middleware_cost.py --out docs/results --tag cpu-2core
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from common import pyplot, run_facts, save_figure, save_report

from ichat.backends.replay import ReplayOnEngineDeath
from ichat.backends.sglang_backend import OneEngine

CHUNK = (b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,'
         b'"delta":{"content":" tok"}}]}\n\n')  # fmt: skip
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                   "stream": True, "max_tokens": 64}).encode()  # fmt: skip


def stand_in(tokens: int) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        for _ in range(tokens):
            await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    return app


async def per_request_us(asgi: Any, requests: int) -> float:
    async def sink(message: Any) -> None:
        pass

    t0 = time.perf_counter()
    for _ in range(requests):
        sent = False

        async def receive() -> Any:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": BODY, "more_body": False}
            await asyncio.Event().wait()  # the client stays

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
        await asgi(scope, receive, sink)
    return (time.perf_counter() - t0) / requests * 1e6


async def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    dead = asyncio.Event()
    app = stand_in(args.tokens)
    wrapped = ReplayOnEngineDeath(app, OneEngine(dead), wait_for_next_engine=0.0,
                                  takes_over_here=lambda: False, handing_off=lambda: False,
                                  death_of=lambda engine: dead.wait())  # fmt: skip
    out: dict[str, list[float]] = {"bare": [], "middleware": []}
    await per_request_us(wrapped, args.requests)  # warm
    for _ in range(args.rounds):
        out["bare"].append(await per_request_us(app, args.requests))
        out["middleware"].append(await per_request_us(wrapped, args.requests))
    return out


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = report["rounds_us"]
    ax.plot(rounds["bare"], "o-", label="stand-in app alone")
    ax.plot(rounds["middleware"], "o-", label="through ReplayOnEngineDeath (death_of)")
    ax.set_xlabel("round")
    ax.set_ylabel("µs per request")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title(f"{report['tag']}: {report['tokens']} chunks a request")
    save_figure(fig, path)


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="machine")
    args = parser.parse_args()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        rounds = runner.run(measure(args))
    added = [m - b for b, m in zip(rounds["bare"], rounds["middleware"], strict=True)]
    report = {**run_facts(), "tag": args.tag, "tokens": args.tokens, "requests": args.requests,
              "rounds_us": rounds, "added_us_per_request_mean": statistics.fmean(added),
              "added_us_per_request_range": [min(added), max(added)],
              "added_ms_per_1k_tokens": statistics.fmean(added) / args.tokens}  # fmt: skip
    save_report(report, args.out / f"middleware-cost-{args.tag}", plot)
    print(json.dumps({k: v for k, v in report.items() if k.startswith("added")}, indent=1))


if __name__ == "__main__":
    main()
