"""The drain deadline with streams that outlast it (real vLLM on CPU): at
``--drain-timeout`` the worker aborts them in the engine, so each stream still ends
well-formed (its final chunk with finish_reason "abort", then [DONE]) instead of being
cut mid-body, and the worker exits 0 with nothing left."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from pathlib import Path

import pytest

from ichat.process.processes import port_is_free
from tests.support import (
    CONTEXT_LENGTH,
    MODEL_NAME,
    Worker,
    our_processes,
    start_worker,
    stream_once,
)

STREAMS = 16
DRAIN_TIMEOUT_S = 2
# the tiny model's whole context: 16 streams of 960 tokens (CONTEXT_LENGTH) once all
# finished within the 3 s from their start to the drain deadline
LONG_CONTEXT = 4 * CONTEXT_LENGTH


def worker_args(model_dir: Path, drain_timeout: float) -> list[str]:
    return ["--model-path", str(model_dir), "--served-model-name", MODEL_NAME,
            "--context-length", str(LONG_CONTEXT),
            "--drain-timeout", f"{drain_timeout:g}"]  # fmt: skip


def start_long_streams(
    pool: concurrent.futures.ThreadPoolExecutor, worker: Worker
) -> list[concurrent.futures.Future[str]]:
    """STREAMS streams as long as the context allows, all still running on return."""
    streams = [pool.submit(stream_once, worker.url, LONG_CONTEXT - 64) for _ in range(STREAMS)]
    time.sleep(1.0)
    assert not any(s.done() for s in streams), "streams should still be running"
    return streams


def test_streams_that_outlast_the_drain_timeout_end_with_abort_not_a_cut(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    args = worker_args(model_dir, DRAIN_TIMEOUT_S)
    with start_worker(tmp_path_factory.mktemp("drain"), *args) as worker:
        worker.wait_ready()
        with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
            streams = start_long_streams(pool, worker)
            t0 = time.monotonic()
            worker.proc.send_signal(signal.SIGTERM)
            outcomes = [s.result(timeout=120) for s in streams]
        assert worker.proc.wait(60) == 0, worker.output()[-3000:]
        elapsed = time.monotonic() - t0
        out = worker.output()
    # every stream ended well-formed: finished, or aborted at the deadline; none cut
    assert set(outcomes) <= {"finished", "ended:abort"}, outcomes
    assert "ended:abort" in outcomes, outcomes  # the deadline was reached
    assert "drain timeout (2 s) reached: aborting" in out
    assert "Traceback" not in out, out[-3000:]
    assert port_is_free("127.0.0.1", worker.port)
    assert not our_processes()
    print(f"{outcomes.count('ended:abort')} of {STREAMS} streams aborted at the drain "
          f"deadline, exit 0 {elapsed:.2f} s after SIGTERM")  # fmt: skip


def test_a_second_signal_forces_the_stop_while_streams_drain(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with start_worker(tmp_path_factory.mktemp("force"), *worker_args(model_dir, 120)) as worker:
        worker.wait_ready()
        with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
            streams = start_long_streams(pool, worker)
            worker.proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert worker.proc.poll() is None, "still draining after the first signal"
            worker.proc.send_signal(signal.SIGTERM)  # the second: force
            code = worker.proc.wait(60)  # well before the 120 s drain timeout
            outcomes = [s.result(timeout=120) for s in streams]
        out = worker.output()
    assert code == 0, out[-3000:]
    assert "received again: forcing the stop" in out
    assert "finished" not in outcomes  # cut by the forced stop, not drained to the end
    assert port_is_free("127.0.0.1", worker.port)
    assert not our_processes()
