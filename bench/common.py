"""What the benchmark scripts share: the worker command line and the plot set-up.

The scripts run as ``python bench/NAME.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import sys
from typing import Any

MODEL_NAME = "bench-model"


def ichat_serve_cmd(model: str, port: int, *extra: str) -> list[str]:
    """`ichat serve` on ``model`` as a user starts it, serving ``MODEL_NAME``."""
    return [
        sys.executable, "-m", "ichat", "serve", "--backend", "vllm", "--port", str(port),
        "--model-path", model, "--served-model-name", MODEL_NAME, *extra,
    ]  # fmt: skip


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display on these machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
