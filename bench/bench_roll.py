"""`ichat up --workers 2` rolled under load: each worker reloaded in turn, one at a time.

`ichat up` with two workers behind SMG (status ports, an API key); ``--concurrency``
client threads stream chats of ``--max-tokens`` tokens through the gateway back to
back. After ``--settle`` seconds of load alone (the "before" window), ``--rolls`` rolls,
each ``ichat reload STATUS_A STATUS_B --merge -- FLAGS`` with the next of
``--roll-flags`` in turn (a real change of configuration each time), with ``--settle``
seconds of load between them. The gateway's healthy workers are counted every 0.1 s.
Reported: each roll's time and each worker's reload (the worker's own answer), the
failed requests, the fewest healthy workers seen during a roll, and TTFT / latency
percentiles of the requests sent before the first roll against those sent during rolls.

    python bench/bench_roll.py --model-path M --rolls 2 [--tag cpu] [-- ENGINE FLAGS]

Writes JSON and PNG (``--out``). Numbers only: nothing here asserts a speed.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_reload import (
    StreamingLoad,
    add_load_arguments,
    before_and_during,
    plot_ttft,
    summary,
)
from common import bench_parser, pyplot, run_facts, save_figure, save_report

from ichat.process.processes import free_port
from tests.support import MODEL_NAME, ichat_cmd, two_free_ports

KEY = "bench-key"


class HealthyWorkers:
    """How many healthy workers the gateway lists, every 0.1 s (times from ``t0``)."""

    def __init__(self, gateway: str, t0: float) -> None:
        self.gateway, self.t0 = gateway, t0
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=5, headers={"Authorization": f"Bearer {KEY}"}) as client:
            while not self._stop.is_set():
                try:
                    workers = client.get(f"{self.gateway}/workers").json()["workers"]
                    healthy = sum(1 for w in workers if w.get("is_healthy"))
                except (httpx.HTTPError, ValueError, KeyError):
                    healthy = -1  # the gateway did not answer
                self.samples.append((time.monotonic() - self.t0, healthy))
                time.sleep(0.1)

    def stop(self) -> list[tuple[float, int]]:
        self._stop.set()
        self._thread.join(10)
        return self.samples


def wait_for_line(log: Path, line: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while line not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise SystemExit(f"`ichat up` did not print {line!r}:\n{tail}")
        time.sleep(0.5)


def answers(stdout: str) -> list[dict[str, Any]]:
    """The workers' JSON answers `ichat reload` printed, one after another."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while (i := stdout.find("{", i)) >= 0:
        value, i = decoder.raw_decode(stdout, i)
        found.append(value)
    return found


def roll(status_urls: list[str], flags: list[str]) -> dict[str, Any]:
    cmd = ichat_cmd("reload", *status_urls, "--api-key", KEY, "--merge", "--", *flags)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    workers = [{k: a.get(k) for k in ("method", "seconds", "phases", "served_model_names")}
               for a in answers(done.stdout)]  # fmt: skip
    return {"flags": flags, "exit_code": done.returncode, "workers": workers,
            "stderr_tail": done.stderr[-1000:]}  # fmt: skip


def plot(report: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    fig, (ax, healthy) = plt.subplots(2, 1, figsize=(9, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})  # fmt: skip
    plot_ttft(ax, report["requests"], report["rolls"], "roll")
    for window in report["rolls"]:
        healthy.axvspan(window["start_s"], window["end_s"], color="orange", alpha=0.25)
    ax.set_title(f"ichat up --workers 2 rolled under load ({report['concurrency']} streams, "
                 f"{report['tag']})")  # fmt: skip
    samples = report["healthy_workers"]
    healthy.step([t for t, _ in samples], [n for _, n in samples], where="post")
    healthy.set_ylim(-1.5, 2.5)
    healthy.set_ylabel("healthy in SMG")
    healthy.set_xlabel("request sent (s)")
    save_figure(fig, path)


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--rolls", type=int, default=2)
    add_load_arguments(parser)
    parser.add_argument("--roll-flags", nargs="+",
                        default=["--max-num-seqs 64", "--max-num-seqs 128"],
                        help="the flags each roll adds (--merge), in turn")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default="cpu")
    parser.add_argument("engine_args", nargs="*", help="after --: the engine's own flags")
    args = parser.parse_args()
    port, worker_port, status_port = free_port(), two_free_ports(), two_free_ports()
    gateway = f"http://127.0.0.1:{port}"
    status_urls = [f"http://127.0.0.1:{status_port + i}" for i in range(2)]
    up_args = ["--workers", "2", "--port", str(port), "--worker-port", str(worker_port),
               "--status-port", str(status_port), "--prometheus-port", str(free_port()),
               "--api-key", KEY, "--model-path", args.model_path,
               "--served-model-name", MODEL_NAME, *args.engine_args]  # fmt: skip
    windows = []
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "up.log"
        with log.open("wb") as out:
            up = subprocess.Popen(ichat_cmd("up", *up_args), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_line(log, "OpenAI endpoint:", up, timeout=1800)
            t0 = time.monotonic()
            healthy = HealthyWorkers(gateway, t0)
            load = StreamingLoad(gateway, args.concurrency, args.max_tokens, t0, key=KEY)
            for i in range(args.rolls):
                time.sleep(args.settle)
                flags = args.roll_flags[i % len(args.roll_flags)].split()
                start = time.monotonic() - t0
                answer = roll(status_urls, flags)
                end = time.monotonic() - t0
                windows.append({"start_s": start, "end_s": end, **answer})
                print(f"roll {i + 1} ({' '.join(flags)}): exit {answer['exit_code']} in "
                      f"{end - start:.2f} s; workers {answer['workers']}", flush=True)  # fmt: skip
            time.sleep(args.settle)
            rows = load.stop()
            samples = healthy.stop()
        finally:
            up.send_signal(signal.SIGINT)
            code = up.wait(600)
    before, during = before_and_during(rows, windows)
    in_rolls = [n for t, n in samples if any(w["start_s"] <= t <= w["end_s"] for w in windows)]
    report = {**run_facts(),
              "tag": args.tag, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "rolls": windows, "fewest_healthy_during_rolls": min(in_rolls, default=None),
              "up_exit_code": code,
              "before": summary(before), "during": summary(during), "all": summary(rows),
              "healthy_workers": samples, "requests": rows}  # fmt: skip
    print(f"before: {report['before']}\nduring: {report['during']}\n"
          f"failed requests in all: {report['all']['failed']}; fewest healthy workers "
          f"during a roll: {report['fewest_healthy_during_rolls']}; ichat up exit {code}",
          flush=True)  # fmt: skip
    save_report(report, args.out / f"roll-{args.tag}", plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
