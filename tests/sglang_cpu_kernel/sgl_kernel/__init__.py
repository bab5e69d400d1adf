"""CPU TEST FIXTURE ONLY: a stand-in for SGLang's kernel package (``sgl_kernel``).

Never installed for users and never on iChat's import path: the SGLang test suite puts
this folder first on ``PYTHONPATH`` (so SGLang's spawned scheduler and detokenizer see
it too), in place of the CUDA-only ``sgl_kernel`` wheel that cannot import on a machine
without a GPU. SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) imports a few CPU kernel
names at import time, of which plain generation calls one:
``assign_req_to_token_pool_cpu``, implemented here in plain torch. Every other name
raises ``NotImplementedError`` when called (SGLang falls back to plain torch where
``torch.ops.sgl_kernel`` lacks an op). See ../shared/notes/sglang-cpu.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    max_context_len: int,
) -> None:
    """Request i's new KV slots: ``req_to_token[pool[i], start[i]:end[i]]`` takes the
    next ``end[i] - start[i]`` entries of ``out_cache_loc`` (offsets accumulate)."""
    offset = 0
    for i in range(req_pool_indices.numel()):
        start, end = int(start_offset[i]), int(end_offset[i])
        count = end - start
        row = int(req_pool_indices[i])
        req_to_token[row, start:end] = out_cache_loc[offset : offset + count].to(req_to_token.dtype)
        offset += count


def __getattr__(name: str) -> Callable[..., Any]:
    if name.startswith("__"):
        raise AttributeError(name)

    def missing(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"sgl_kernel.{name} is not in iChat's CPU test stand-in")

    return missing
