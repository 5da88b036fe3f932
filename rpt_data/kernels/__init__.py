"""Fused Triton kernels. `token_stats_triton` is the entry point `rpt_data.entropy.token_stats` calls
for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1).

Importing this package imports triton, and triton decides at import time whether `@triton.jit`
builds compiled kernels or CPU-interpreted ones: set TRITON_INTERPRET=1 before the first import of
triton to run the kernel on CPU tensors.
"""
from __future__ import annotations

from rpt_data.kernels.token_stats import token_stats_triton

__all__ = ["token_stats_triton"]
