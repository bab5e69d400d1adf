"""`ichat reload` under load: how long a reload takes, and what the load sees meanwhile.

One worker (``--status-port``, an admin key); ``--concurrency`` client threads stream
chats of ``--max-tokens`` tokens back to back. After ``--settle`` seconds of load alone
(the "before" window), ``--reloads`` reloads in a row, each ``--merge`` with
``--reload-flags`` (default: none, i.e. the same configuration, the weights read again)
by ``--method`` (default swap: a second engine; in_place: the serving engine reloads
its weights), with ``--settle`` seconds of load between them. Per request: when it was sent, its
outcome, time to first token and total latency. Reported: each reload's time and phases
(the worker's own), the failed requests, and TTFT / latency percentiles of the requests
sent before the first reload against those sent during reloads.

    python bench/bench_reload.py --model-path M --reloads 3 [--tag cpu] [-- ENGINE FLAGS]

Writes JSON and PNG (``--out``). Numbers only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (
    bench_parser,
    chat_body,
    percentile,
    pyplot,
    run_facts,
    save_figure,
    save_report,
)

from ichat.process.processes import free_port
from tests.support import MODEL_NAME, start_worker

ADMIN_KEY = "bench-admin"


class StreamingLoad:
    """``concurrency`` threads streaming chats back to back; times relative to ``t0``."""

    def __init__(
        self, url: str, concurrency: int, max_tokens: int, t0: float, key: str | None = None
    ) -> None:
        self.url, self.max_tokens, self.t0 = url, max_tokens, t0
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.results: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(concurrency)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=600, headers=self.headers) as client:
            while not self._stop.is_set():
                result = self._one(client)
                with self._lock:
                    self.results.append(result)

    def _one(self, client: httpx.Client) -> dict[str, Any]:
        body = {**chat_body(self.max_tokens, stream=True), "model": MODEL_NAME}
        sent = time.monotonic()
        row: dict[str, Any] = {"sent_s": sent - self.t0}
        try:
            with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    return {**row, "outcome": f"HTTP {reply.status_code}"}
                first: float | None = None
                outcome = "cut"
                for line in reply.iter_lines():
                    if line.startswith("data:"):
                        first = first or time.monotonic() - sent
                        if '"error"' in line:
                            outcome = "error event"
                        elif line.strip() == "data: [DONE]" and outcome == "cut":
                            outcome = "ok"
        except httpx.HTTPError as exc:
            return {**row, "outcome": type(exc).__name__}
        return {**row, "outcome": outcome, "ttft_s": first, "latency_s": time.monotonic() - sent}

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        for thread in self._threads:
            thread.join(600)
        return sorted(self.results, key=lambda r: r["sent_s"])


def reload(status_url: str, flags: list[str], method: str) -> dict[str, Any]:
    reply = httpx.post(
        f"{status_url}/reload",
        json={"engine_args": flags, "merge": True, "method": method},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        timeout=1800,
    )
    return {"status": reply.status_code, **reply.json()}


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["outcome"] == "ok"]
    ttft = [r["ttft_s"] for r in ok]
    latency = [r["latency_s"] for r in ok]
    stats: dict[str, Any] = {"requests": len(rows), "ok": len(ok), "failed": len(rows) - len(ok)}
    for name, values in (("ttft", ttft), ("latency", latency)):
        for q in (50, 90, 99):
            stats[f"{name}_p{q}_s"] = percentile(values, q) if values else None
    return stats


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The streaming load's flags (this benchmark's and bench_roll.py's)."""
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--settle", type=float, default=20.0, help="seconds of load between")


def before_and_during(
    rows: list[dict[str, Any]], windows: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The requests sent before the first window, and those sent during one."""
    before = [r for r in rows if r["sent_s"] < windows[0]["start_s"]]
    during = [r for r in rows if any(w["start_s"] <= r["sent_s"] <= w["end_s"] for w in windows)]
    return before, during


def plot_ttft(
    ax: Any, rows: list[dict[str, Any]], windows: list[dict[str, Any]], what: str
) -> None:
    """Each request's TTFT by when it was sent, the failed ones at 0, the windows shaded."""
    ok = [r for r in rows if r["outcome"] == "ok"]
    ax.plot([r["sent_s"] for r in ok], [r["ttft_s"] for r in ok], ".", ms=3, label="TTFT")
    bad = [r for r in rows if r["outcome"] != "ok"]
    if bad:
        ax.plot([r["sent_s"] for r in bad], [0] * len(bad), "rx", label="failed")
    for i, window in enumerate(windows):
        ax.axvspan(window["start_s"], window["end_s"], color="orange", alpha=0.25,
                   label=what if i == 0 else None)  # fmt: skip
    ax.set_ylabel("time to first token (s)")
    ax.legend()


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    plot_ttft(ax, report["requests"], report["reloads"], "reload")
    ax.set_xlabel("request sent (s)")
    ax.set_title(f"ichat reload under load ({report['concurrency']} streams, {report['tag']})")
    save_figure(fig, path)


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--reloads", type=int, default=3)
    add_load_arguments(parser)
    parser.add_argument("--reload-flags", default="", help="flags each reload adds (--merge)")
    parser.add_argument("--method", default="swap", choices=("swap", "in_place", "auto"))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("engine_args", nargs="*", help="after --: the engine's own flags")
    args = parser.parse_args()
    status_port = free_port()
    status_url = f"http://127.0.0.1:{status_port}"
    worker_args = ("--model-path", args.model_path, "--served-model-name", MODEL_NAME,
                   "--status-port", str(status_port), "--admin-key", ADMIN_KEY,
                   *args.engine_args)  # fmt: skip
    windows = []
    with tempfile.TemporaryDirectory() as tmp, start_worker(Path(tmp), *worker_args) as worker:
        worker.wait_ready(timeout=1800)
        t0 = time.monotonic()
        load = StreamingLoad(worker.url, args.concurrency, args.max_tokens, t0)
        for i in range(args.reloads):
            time.sleep(args.settle)
            start = time.monotonic() - t0
            answer = reload(status_url, args.reload_flags.split(), args.method)
            end = time.monotonic() - t0
            windows.append({"start_s": start, "end_s": end, **answer})
            print(f"reload {i + 1}: HTTP {answer['status']} in {end - start:.2f} s; "
                  f"phases {answer.get('phases')}", flush=True)  # fmt: skip
        time.sleep(args.settle)
        rows = load.stop()
        final = httpx.get(f"{status_url}/status", timeout=10).json()
        worker_status = {k: final.get(k) for k in ("state", "reloads", "standby", "engines",
                         "served_model_names", "engine_args")}  # fmt: skip
    before, during = before_and_during(rows, windows)
    report = {**run_facts(),
              "tag": args.tag, "method": args.method, "concurrency": args.concurrency,
              "max_tokens": args.max_tokens,
              "reloads": windows, "before": summary(before), "during": summary(during),
              "all": summary(rows), "worker_at_end": worker_status,
              "requests": rows}  # fmt: skip
    print(f"before: {report['before']}\nduring: {report['during']}\n"
          f"failed requests in all: {report['all']['failed']}\nworker: {worker_status}",
          flush=True)  # fmt: skip
    save_report(report, args.out / f"reload-{args.tag}", plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
