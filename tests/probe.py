"""Blocking readiness waits for scripts, benchmarks and tests that start a server
process: poll ``/health`` fast, back off, fail at once if the process exits; or
follow its output until it prints that it is ready (``ichat up``)."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import TextIO

import httpx

from ichat.process.readiness import Backoff


def wait_healthy(
    url: str,
    proc: subprocess.Popen[bytes] | subprocess.Popen[str],
    timeout: float,
    path: str = "/health",
) -> float:
    """Seconds until ``url`` + ``path`` answered 200; raises if ``proc`` exits first."""
    t0 = time.monotonic()
    for delay in Backoff(initial=0.05, factor=1.5, maximum=1.0).delays():
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}{path}", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"the server was not ready within {timeout:.0f} s")
        time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


class OutputFollower:
    """Echo a process's piped output from a thread and notice a marker line in it."""

    def __init__(self, proc: subprocess.Popen[str], marker: str, sink: TextIO | None) -> None:
        self.proc = proc
        self.marker = marker
        self.sink = sink
        self.lines: list[str] = []
        self.seen = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if self.sink is not None:
                self.sink.write(line)
                self.sink.flush()
            if self.marker in line:
                self.seen.set()

    def wait(self, timeout: float) -> float:
        """Seconds until the marker was printed; raises if the process exits first."""
        t0 = time.monotonic()
        while not self.seen.wait(0.1):
            if self.proc.poll() is not None:
                raise RuntimeError(f"the process exited with {self.proc.returncode} first")
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{self.marker!r} not printed within {timeout:.0f} s")
        return time.monotonic() - t0

    def output(self) -> str:
        return "".join(self.lines)
