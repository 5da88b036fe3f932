"""Fused Triton kernels, each with its plain-torch reference beside it (`token_stats_ref`).

`token_stats_triton` (in `token_stats`) is what `rpt_data.entropy.token_stats` calls for CUDA tensors
(and CPU tensors under TRITON_INTERPRET=1). Importing `rpt_data.kernels.token_stats` imports triton,
and triton decides at import time whether `@triton.jit` builds compiled or CPU-interpreted kernels: set
TRITON_INTERPRET=1 before the first import of triton to run the kernel on CPU tensors. This package
itself imports nothing, so the reference works without triton.
"""
from __future__ import annotations

__all__ = ["token_stats_triton"]


def __getattr__(name: str):
    if name == "token_stats_triton":  # lazily: only this import pulls in triton
        from rpt_data.kernels.token_stats import token_stats_triton

        return token_stats_triton
    raise AttributeError(name)
