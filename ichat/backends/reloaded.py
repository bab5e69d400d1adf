"""What a reload did: the method that ran and its phases.

``swap``: a second engine was started with the new flags beside the serving one, and
the HTTP server switched to it (``AppSwitch``). ``in_place``: the flags were the same,
and the serving engine loaded its weights again itself (paused, reloaded, resumed).
``restart``: an engine that cannot run beside another (SGLang) was drained and stopped,
out of the gateway, and one with the new flags started (the supervisor's).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ReloadMethod(str, enum.Enum):
    AUTO = "auto"  # in place when the flags are the same and the engine can, else swap
    SWAP = "swap"
    IN_PLACE = "in_place"
    SETTINGS = "settings"  # framework settings only: no engine was touched
    RESTART = "restart"  # the engine stopped (drained), one with the new flags started


@dataclass(frozen=True)
class Reloaded:
    method: ReloadMethod
    phases: dict[str, float] = field(default_factory=dict)  # seconds
