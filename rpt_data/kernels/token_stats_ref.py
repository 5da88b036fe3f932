"""The plain-torch reference of the token_stats kernel, and the `TokenStats` result both return.

No triton import here: `rpt_data.entropy` uses this path wherever the kernel does not run, and the
kernel falls back to it for top-k wider than its registers hold.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

DEFAULT_TOP_K = 16


class TokenStats(NamedTuple):
    """Float32 `entropy`, `topk_entropy`, `target_logprob` (nats) and int64 `argmax`, each [N]."""

    entropy: torch.Tensor
    topk_entropy: torch.Tensor
    target_logprob: torch.Tensor
    argmax: torch.Tensor


def _entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax over the last dim; -inf entries contribute 0."""
    p = torch.softmax(logits, dim=-1)
    return -torch.special.xlogy(p, p).sum(-1)  # xlogy(0, 0) = 0: masked entries add nothing


def token_stats_torch(
    logits: torch.Tensor, targets: torch.Tensor | None = None, top_k: int = DEFAULT_TOP_K
) -> TokenStats:
    """Reference implementation: fp32 softmax / log_softmax / topk. NaN rows give NaN and argmax -1;
    all -inf rows give NaN entropies and target log-prob (argmax 0, as torch.argmax)."""
    x = logits.float()
    n, v = x.shape
    k = min(top_k, v)
    entropy = _entropy_of(x)
    top_vals, _ = torch.topk(x, k, dim=-1)
    topk_entropy = _entropy_of(top_vals)
    nan_row = torch.isnan(x).any(-1)
    argmax = torch.where(nan_row, -1, x.argmax(-1))
    if targets is None:
        target_logprob = torch.full((n,), float("nan"), device=x.device)
    else:
        lse = torch.logsumexp(x, dim=-1)
        target_logprob = x.gather(1, targets.long().view(-1, 1)).squeeze(1) - lse
    # A NaN row, or a row masked entirely to -inf (no distribution at all), has no entropy.
    undefined = nan_row | torch.isneginf(x).all(-1)
    entropy = torch.where(undefined, float("nan"), entropy)
    topk_entropy = torch.where(undefined, float("nan"), topk_entropy)
    return TokenStats(entropy.float(), topk_entropy.float(), target_logprob.float(), argmax.long())
