"""What the benchmark scripts share: the worker command line and the plot set-up.

The scripts run as ``python bench/NAME.py``, so this folder is on ``sys.path``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

MODEL_NAME = "bench-model"


def ichat_serve_cmd(model: str, port: int, *extra: str) -> list[str]:
    """`ichat serve` on ``model`` as a user starts it, serving ``MODEL_NAME``."""
    return [
        sys.executable, "-m", "ichat", "serve", "--backend", "vllm", "--port", str(port),
        "--model-path", model, "--served-model-name", MODEL_NAME, *extra,
    ]  # fmt: skip


def chat_body(max_tokens: int, *, stream: bool = False) -> dict[str, Any]:
    """A chat request that generates exactly ``max_tokens`` tokens (vLLM's extras)."""
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "Write a long story about a model."}],
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (no display on these machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """The scripts' parser: their docstring as help, and the model every one needs."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", required=True)
    return parser


def save_figure(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
