"""Per-position statistics of next-token distributions, computed without materialising [N, V] logits.

`token_stats` reduces a block of logits; `head_token_stats` runs the lm_head in row chunks and
reduces each chunk, so peak extra memory is O(chunk_rows x V). CUDA tensors (and CPU tensors under
TRITON_INTERPRET=1) use the fused Triton kernel in `rpt_data.kernels`; everything else uses the
pure-torch reference beside it (`rpt_data.kernels.token_stats_ref`), re-exported here.
"""
from __future__ import annotations

import os

import torch

from rpt_common.heads import logits_fp32
from rpt_data.kernels.token_stats_ref import DEFAULT_TOP_K, TokenStats, token_stats_torch

__all__ = ["DEFAULT_TOP_K", "TokenStats", "head_token_stats", "token_stats", "token_stats_torch", "triton_enabled"]
# Extra memory one head chunk may take on CPU (fp32 logits) when chunk_rows is not given.
_CHUNK_BYTES = 64 * 2**20


def triton_enabled(t: torch.Tensor) -> bool:
    """True when `t` should go through the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if not (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def token_stats(
    logits: torch.Tensor, targets: torch.Tensor | None = None, top_k: int = DEFAULT_TOP_K
) -> TokenStats:
    """Stats of softmax(logits) per row. logits [N, V] fp32/bf16/fp16, targets [N] ints or None."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if targets is not None and targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be [N]={logits.shape[0]}, got shape {tuple(targets.shape)}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if triton_enabled(logits):
        from rpt_data.kernels.token_stats import token_stats_triton

        return token_stats_triton(logits, targets, top_k)
    return token_stats_torch(logits, targets, top_k)


def default_chunk_rows(vocab_size: int, device: torch.device | None = None) -> int:
    """GPU: 2048 rows (big enough to keep the matmul efficient); CPU: ~64 MiB of fp32 logits."""
    if device is not None and device.type == "cuda":
        return 2048
    return max(1, _CHUNK_BYTES // (4 * vocab_size))


def head_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor | None = None,
    top_k: int = DEFAULT_TOP_K,
    chunk_rows: int | None = None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    logit_scale: float | None = None,
    vocab_size: int | None = None,
) -> TokenStats:
    """`token_stats(hidden @ weight.T + bias)` in row chunks; the full [N, V] logits never exist.

    `logit_scale` multiplies the logits (Cohere's logit_scale, Granite's 1 / logits_scaling: see
    rpt_common.heads), then `softcap` applies tanh soft-capping (Gemma-2 style: cap * tanh(logits / cap)).
    Tied embeddings just pass the embedding matrix as `weight`. `vocab_size`: only the head's first rows are
    scored (a head padded past the tokenizer's vocabulary: the padded ids are no tokens). The logits are float32
    whatever the hidden dtype (`rpt_common.heads.logits_fp32`): a bf16 rounding of a logit moves entropies.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, D] and weight [V, D] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if vocab_size is not None and vocab_size < weight.shape[0]:
        weight = weight[:vocab_size]
        bias = None if bias is None else bias[:vocab_size]
    if hidden.device.type == "cpu" and weight.dtype != torch.float32:
        weight = weight.float()  # once, not per chunk (CPU has no low-precision matmul with a float32 output)
    n, v = hidden.shape[0], weight.shape[0]
    rows = chunk_rows or default_chunk_rows(v, hidden.device)
    out = [torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3)]
    argmax = torch.empty(n, dtype=torch.int64, device=hidden.device)
    # One reused float32 buffer for the chunk's logits: peak extra memory is rows x V x 4 bytes.
    buf = torch.empty(min(rows, max(n, 1)), v, dtype=torch.float32, device=hidden.device)
    for s in range(0, n, rows):
        e = min(s + rows, n)
        logits = logits_fp32(hidden[s:e], weight, out=buf[: e - s])
        if bias is not None:
            logits += bias
        if logit_scale is not None:
            logits *= logit_scale
        if softcap is not None:
            logits.div_(softcap).tanh_().mul_(softcap)
        st = token_stats(logits, None if targets is None else targets[s:e], top_k)
        out[0][s:e], out[1][s:e], out[2][s:e], argmax[s:e] = st.entropy, st.topk_entropy, st.target_logprob, st.argmax
    return TokenStats(out[0], out[1], out[2], argmax)
