"""What the worker shows of its engine's flags: secrets masked.

``/status`` is readable without a key (probes read it), so the values of flags that
name a key, token, secret or password are shown as ``***``.
"""

from __future__ import annotations

import re

# --api-key, --hf-token, --admin-key ...; not --max-num-batched-tokens or --ssl-keyfile
SECRET_FLAG = re.compile(r"^--?([\w-]*[-_])?(key|token|secret|password)$", re.IGNORECASE)
MASK = "***"


def masked_argv(argv: list[str]) -> list[str]:
    """``argv`` with every secret flag's value (``--flag v`` or ``--flag=v``) masked;
    a flag taking several values (``--api-key k1 k2``) has each masked."""
    shown: list[str] = []
    masking = False
    for arg in argv:
        if arg.startswith("-"):
            flag, eq, _ = arg.partition("=")
            secret = bool(SECRET_FLAG.match(flag))
            shown.append(f"{flag}={MASK}" if secret and eq else arg)
            masking = secret and not eq
        else:
            shown.append(MASK if masking else arg)
    return shown
