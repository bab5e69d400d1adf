"""A blocking readiness wait for scripts, benchmarks and tests that start a server
process: poll ``/health`` fast, back off, fail at once if the process exits."""

from __future__ import annotations

import subprocess
import time

import httpx

from ichat.readiness import Backoff


def wait_healthy(
    url: str,
    proc: subprocess.Popen[bytes] | subprocess.Popen[str],
    timeout: float,
) -> float:
    """Seconds until ``url``/health answered 200; raises if ``proc`` exits first."""
    t0 = time.monotonic()
    for delay in Backoff(initial=0.05, factor=1.5, maximum=1.0).delays():
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return time.monotonic() - t0
        except httpx.TransportError:
            pass
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"the server was not ready within {timeout:.0f} s")
        time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
