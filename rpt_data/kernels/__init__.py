"""Fused Triton kernels. Owned by issue 3; `token_stats_triton` is the entry point entropy.py calls."""
from __future__ import annotations


def token_stats_triton(logits, targets, top_k):  # pragma: no cover - replaced by the kernel issue
    raise NotImplementedError("the fused Triton token_stats kernel is not built yet (issue 3)")
