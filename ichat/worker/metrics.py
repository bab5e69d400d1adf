"""The worker's own Prometheus metrics, served on the engine's ``/metrics`` and on the
status port's.

A custom collector reads the supervisor's stats at scrape time: no metric objects
live at module level. It is registered in prometheus_client's default registry,
which vLLM's ``/metrics`` serves (unless PROMETHEUS_MULTIPROC_DIR is set), so the
worker's lines sit next to the engine's. SGLang's ``/metrics`` serves only its own
multiprocess registry, and an engine's port is closed while it restarts -- just when
the restart counters matter -- so the status server renders the same collector from
a registry of its own (``exposition``). Names start with ``ichat_``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ichat.backends.continuation import CONTINUATION_OUTCOMES
from ichat.backends.failover import Standby
from ichat.worker.supervisor import RELOAD_OUTCOMES, WorkerState, WorkerStats


class WorkerCollector:
    def __init__(self, stats: WorkerStats) -> None:
        self._stats = stats

    def describe(self) -> list[Any]:
        return []  # collected lazily; nothing to pre-declare

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._stats
        yield CounterMetricFamily(
            "ichat_worker_restarts",
            "Backends started again after an engine death.",
            value=s.restarts,
        )
        yield CounterMetricFamily(
            "ichat_worker_engine_deaths",
            "Engine deaths detected by the health monitor.",
            value=s.engine_deaths,
        )
        yield CounterMetricFamily(
            "ichat_worker_failovers",
            "Engine deaths after which the standby engine served in the dead one's place.",
            value=s.failovers,
        )
        yield _by_outcome(
            "ichat_worker_continuations",
            "Streams cut by an engine death and continued on the next engine, by outcome "
            "(continued, cut, refused, closed, gave_up).",
            s.continuations,
            CONTINUATION_OUTCOMES,
        )
        yield CounterMetricFamily(
            "ichat_worker_continuation_reprefilled_tokens",
            "Prompt tokens (prompt + generated) the next engine prefilled to continue cut streams.",
            value=s.continuation_reprefilled_tokens,
        )
        yield _by_outcome(
            "ichat_worker_reloads",
            "Engine reloads (ichat reload) by outcome: ok, failed (the new engine did not "
            "start; the old served on), refused.",
            s.reloads,
            RELOAD_OUTCOMES,
        )
        standby = GaugeMetricFamily(
            "ichat_worker_standby",
            "1 for the standby engine's current state (off, starting, ready, asleep, failed).",
            labels=["state"],
        )
        for name in (member.value for member in Standby):
            standby.add_metric([name], 1.0 if s.standby == name else 0.0)
        yield standby
        info = GaugeMetricFamily(
            "ichat_worker_info",
            "1, labelled with what the worker serves (model), the URL the gateway reaches it "
            "at (url: SMG's worker label) and its gateway (gateway; empty: none).",
            labels=["model", "url", "gateway"],
        )
        model = s.served_model_names[0] if s.served_model_names else ""
        info.add_metric([model, s.url, s.gateway_url], 1.0)
        yield info
        state = GaugeMetricFamily(
            "ichat_worker_state", "1 for the worker's current state.", labels=["state"]
        )
        for member in WorkerState:
            state.add_metric([member.value], 1.0 if s.state is member else 0.0)
        yield state
        for name, value, text in (
            (
                "ichat_worker_last_ready_timestamp_seconds",
                s.last_ready_unix,
                "Unix time the backend last became ready.",
            ),
            (
                "ichat_worker_last_death_detected_timestamp_seconds",
                s.last_death_detected_unix,
                "Unix time an engine death was last detected.",
            ),
            (
                "ichat_worker_last_death_detection_window_seconds",
                s.last_death_detection_window_s,
                "Seconds from the dead engine's last passed health check to the detection "
                "of its death: the detection took at most this long.",
            ),
            (
                "ichat_worker_last_continuation_stall_seconds",
                s.last_continuation_stall_s,
                "Seconds from the last cut stream's cut to its first continued chunk.",
            ),
            (
                "ichat_worker_last_restart_to_ready_seconds",
                s.last_restart_to_ready_s,
                "Seconds from the detection of the last engine death to serving again.",
            ),
        ):
            if value is not None:
                yield GaugeMetricFamily(name, text, value=value)
        phases = GaugeMetricFamily(
            "ichat_worker_phase_seconds",
            "Duration of the last run of each lifecycle phase.",
            labels=["phase"],
        )
        for phase, seconds in sorted(s.phase_seconds.items()):
            phases.add_metric([phase], seconds)
        yield phases
        workarounds = GaugeMetricFamily(
            "ichat_worker_workaround_missing",
            "1 for an engine internal iChat reaches for that no longer resolves "
            "(see /status: workarounds), 0 for one that resolves.",
            labels=["workaround"],
        )
        for name, outcome in sorted(s.workarounds.items()):
            workarounds.add_metric([name], 0.0 if outcome == "resolved" else 1.0)
        yield workarounds


def _by_outcome(name: str, text: str, counts: dict[str, int], known: tuple[str, ...]) -> Any:
    """A counter with one series per outcome, every known outcome from the start (at
    0), so that ``increase()`` sees the first one happen."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, text, labels=["outcome"])
    for outcome in sorted(set(known) | set(counts)):
        family.add_metric([outcome], counts.get(outcome, 0))
    return family


@contextlib.contextmanager
def registered(stats: WorkerStats) -> Iterator[WorkerCollector]:
    """Register the worker's collector in the default registry while inside."""
    from prometheus_client import REGISTRY

    collector = WorkerCollector(stats)
    REGISTRY.register(collector)  # type: ignore[arg-type]
    try:
        yield collector
    finally:
        REGISTRY.unregister(collector)  # type: ignore[arg-type]


def exposition(stats: WorkerStats) -> tuple[bytes, str]:
    """The worker's metrics in Prometheus' text format, and that format's content type,
    from a registry of their own (the engine's metrics are not in it)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(stats))  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST
