"""Steady-state load windows from client processes that live across windows.

``common.streams`` measures a window as R requests from cold: client processes spawned
for it, every stream released at once, the throughput taken from the first request's
start to the last one's end. Such a window includes the burst of C prefills at its start
and the tail where fewer and fewer streams are left, and both move with the phase of the
engine's batches: at 256 streams x 128 tokens on an H100 the windows of one server start
spread by a CV of 7-10 % (docs/benchmarks.md), too much to resolve a 2 % ratio.

Here each client process is started once (``ClientPool``) and keeps its connections. A
window is time-based and closed-loop: every stream starts at a moment of its own within
the first ``stagger`` seconds (so that equal-length requests do not finish, and prefill,
in lockstep) and sends its next request as soon as the last one ends; only what happens
between ``warmup`` and ``warmup + seconds`` after the window's start counts: the tokens
that arrive then (throughput = tokens / ``seconds``), the TTFT of the requests sent then,
the gaps between tokens that end then. At the end no new request is sent and those in
flight run to their end (uncounted), so that the next window starts on an idle server.
All processes start a window at one CLOCK_MONOTONIC instant (system-wide on Linux).

With ``cpus``, the client processes are pinned to those CPUs (``os.sched_setaffinity``),
so that they and the servers do not take each other's cores.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, replace
from typing import Any

from common import Load, content_arrivals, latencies


@dataclass(frozen=True)
class Window:
    """One window: ``load.concurrency`` streams of ``load.max_tokens`` tokens to ``url``
    (``load.requests`` is not used: the window is timed)."""

    url: str
    load: Load
    warmup: float
    seconds: float
    stagger: float
    start_at: float = 0.0  # CLOCK_MONOTONIC; set by the pool


async def _window(sessions: dict[str, Any], window: Window) -> dict[str, Any]:
    import aiohttp

    load = window.load
    if window.url not in sessions:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=900)
        sessions[window.url] = aiohttp.ClientSession(window.url, connector=connector,
                                                     timeout=timeout)  # fmt: skip
    session = sessions[window.url]
    counted_from = window.start_at + window.warmup
    counted_to = counted_from + window.seconds
    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    sent = 0

    async def stream(i: int) -> None:
        nonlocal tokens, sent
        await asyncio.sleep(max(0.0, window.start_at - time.monotonic())
                            + window.stagger * i / max(1, load.concurrency))  # fmt: skip
        while time.monotonic() < counted_to:
            t0 = time.monotonic()
            counted = counted_from <= t0 < counted_to
            sent += counted
            last = None
            async for now in content_arrivals(session, load):
                inside = counted_from <= now < counted_to
                if last is None:
                    if counted:
                        ttft.append(now - t0)
                elif inside:
                    itl.append(now - last)
                tokens += inside
                last = now

    await asyncio.gather(*(stream(i) for i in range(load.concurrency)))
    return {"ttft": ttft, "itl": itl, "tokens": tokens, "sent": sent}


def _client(conn: Any, cpus: list[int] | None) -> None:
    """One client process: windows from ``conn`` until None, each one's samples back."""
    if cpus:
        os.sched_setaffinity(0, cpus)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        sessions: dict[str, Any] = {}
        try:
            while (window := await loop.run_in_executor(None, conn.recv)) is not None:
                try:
                    conn.send(await _window(sessions, window))
                except Exception as exc:  # the coordinator raises it
                    conn.send({"error": f"{type(exc).__name__}: {exc}"})
        finally:
            for session in sessions.values():
                await session.close()

    asyncio.run(serve())


def gpu_clocks() -> dict[str, float] | None:
    """The GPU's SM clock (MHz), temperature (°C) and power (W) now; None without
    nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = "clocks.sm,temperature.gpu,power.draw"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=10).stdout  # fmt: skip
    try:
        sm, temp, power = (float(x) for x in out.splitlines()[0].split(","))
    except (ValueError, IndexError):
        return None
    return {"sm_clock_mhz": sm, "temperature_c": temp, "power_w": power}


class ClientPool:
    """``processes`` client processes, started once, that run windows together."""

    def __init__(self, processes: int, cpus: list[int] | None = None) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conns = []
        self._procs = []
        for _ in range(processes):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_client, args=(theirs, cpus), daemon=True)
            proc.start()
            self._conns.append(mine)
            self._procs.append(proc)

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc: object) -> None:
        for conn in self._conns:
            conn.send(None)
        for proc in self._procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()

    def run(self, window: Window) -> dict[str, Any]:
        """``window``'s streams split over the processes: throughput, TTFT and ITL."""
        parts = len(self._conns)
        start_at = time.monotonic() + 0.5  # every process has its window by then
        for i, conn in enumerate(self._conns):
            conn.send(replace(window, load=window.load.share(parts, i), start_at=start_at))
        middle = start_at + window.warmup + window.seconds / 2
        time.sleep(max(0.0, middle - time.monotonic()))
        clocks = gpu_clocks()
        samples = [conn.recv() for conn in self._conns]
        errors = [s["error"] for s in samples if "error" in s]
        if errors:
            raise RuntimeError(f"a client process failed: {errors[0]}")
        tokens = sum(s["tokens"] for s in samples)
        return {
            "out_tok_per_s": tokens / window.seconds,
            "req_per_s": sum(s["sent"] for s in samples) / window.seconds,
            **latencies(samples),
            "tokens": tokens,
            "client_processes": parts,
            **({"gpu": clocks} if clocks else {}),
        }
