"""/readyz, /livez, /status, /metrics of the worker: the verdicts and the real HTTP answers."""

from __future__ import annotations

import httpx

from ichat.process.processes import free_port
from ichat.worker.status_server import StatusServer, liveness, readiness
from ichat.worker.supervisor import WorkerState, WorkerStats


def test_ready_only_while_a_backend_serves() -> None:
    for state in WorkerState:
        assert readiness(WorkerStats(state=state))[0] is (state is WorkerState.READY)


def test_alive_while_restarting_within_the_grace_then_not() -> None:
    stats = WorkerStats(state=WorkerState.RESTARTING, last_death_detected_unix=1000.0)
    assert liveness(stats, now_unix=1000.0 + 599, grace=600)[0]
    ok, why = liveness(stats, now_unix=1000.0 + 601, grace=600)
    assert not ok and "down for 601 s" in why


def test_a_worker_that_gave_up_is_not_alive_a_first_start_is() -> None:
    assert not liveness(WorkerStats(state=WorkerState.FAILED), 0.0, 600)[0]
    assert liveness(WorkerStats(state=WorkerState.STARTING), 10**9, 600)[0]  # never died


def test_the_endpoints_answer_over_http() -> None:
    stats = WorkerStats(state=WorkerState.STARTING)
    server = StatusServer(stats, "127.0.0.1", free_port(), wall_clock=lambda: 5000.0)
    server.start()
    codes = {}
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as c:
            codes["starting /readyz"] = c.get("/readyz").status_code
            codes["starting /livez"] = c.get("/livez").status_code
            stats.state = WorkerState.READY
            codes["ready /readyz"] = c.get("/readyz").status_code
            assert c.get("/status").json()["state"] == "ready"
            stats.state, stats.last_death_detected_unix = WorkerState.RESTARTING, 1.0
            codes["stuck restart /livez"] = c.get("/livez").status_code
            codes["unknown"] = c.get("/nope").status_code
            scrape = c.get("/metrics")
    finally:
        server.stop()
    assert codes == {
        "starting /readyz": 503,
        "starting /livez": 200,
        "ready /readyz": 200,
        "stuck restart /livez": 503,
        "unknown": 404,
    }
    assert scrape.headers["content-type"].startswith("text/plain; version=")
    assert 'ichat_worker_state{state="restarting"} 1.0' in scrape.text
    assert "ichat_worker_last_death_detected_timestamp_seconds 1.0" in scrape.text


def test_the_metrics_come_from_their_own_registry_not_the_default_one() -> None:
    from prometheus_client import REGISTRY, generate_latest

    stats = WorkerStats(state=WorkerState.READY, restarts=3)
    text = StatusServer(stats, "127.0.0.1", 0).reply("/metrics")[1].decode()
    assert "ichat_worker_restarts_total 3.0" in text
    assert "python_gc_objects_collected_total" not in text  # the process' own: not here
    assert b"ichat_worker" not in generate_latest(REGISTRY)  # nothing left registered


def test_status_and_metrics_show_the_standby_and_the_failovers() -> None:
    stats = WorkerStats(state=WorkerState.READY, failovers=2, standby="asleep")
    stats.engines = {"active": [11, 12], "standby": [21, 22]}
    server = StatusServer(stats, "127.0.0.1", free_port())
    server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=5) as c:
            status = c.get("/status").json()
            scrape = c.get("/metrics").text
    finally:
        server.stop()
    assert (status["failovers"], status["standby"]) == (2, "asleep")
    assert status["engines"] == {"active": [11, 12], "standby": [21, 22]}
    assert "ichat_worker_failovers_total 2.0" in scrape
    assert 'ichat_worker_standby{state="asleep"} 1.0' in scrape
    assert 'ichat_worker_standby{state="ready"} 0.0' in scrape
