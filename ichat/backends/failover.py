"""A standby engine and the failover to it: what a backend reports of them.

A backend started with ``standby`` keeps a second engine of the same configuration,
initialised and idle. When the active engine dies, the backend serves the standby on
the same socket (a *failover*: no new process, no new engine start, the gateway's URL
unchanged), then prepares a new standby in the background. Without a ready standby an
engine death ends the backend, and the supervisor restarts it as before.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Standby(str, enum.Enum):
    OFF = "off"  # not asked for
    STARTING = "starting"
    READY = "ready"  # idle, initialised, its app state prepared
    ASLEEP = "asleep"  # ready, and its weights and KV cache off the GPU (sleep mode)
    FAILED = "failed"  # could not be started (reason given); the next death restarts


@dataclass(frozen=True)
class StandbyReport:
    state: Standby
    reason: str | None = None  # why it failed
    # the engines' processes: {"active": [pid...], "standby": [pid...]}
    engines: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Failover:
    """One failover, reported once the standby serves."""

    cause: str  # the death, as the health monitor saw it
    detected_unix: float | None  # when the death was detected (wall clock)
    seconds: float  # from the detection to serving on the standby
    phases: dict[str, float]  # failover_wake, failover_switch (seconds)
    detection_window: float | None = None  # HealthMonitor.detection_window
