"""The clipped surrogate with separate low/high clip (clip-higher), optional k3 KL to a frozen reference,
and the three aggregations (the forward pass giving per-token log-probs and entropy is rpt_train/logprobs.py)."""
from __future__ import annotations

import torch

AGGREGATION = {"grpo": "sequence", "dapo": "token", "dr_grpo": "constant"}


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, normalizer: float) -> torch.Tensor:
    """Sum of this micro-batch's share of the mini-batch loss, so micro-batches add up to the full-batch value.
    token (DAPO): sum / tokens in the mini-batch; sequence (GRPO): sum of per-sequence means / sequences;
    constant (Dr. GRPO): sum / (sequences x max_new_tokens). `normalizer` is that mini-batch denominator."""
    mask = mask.to(per_token.dtype)
    if mode == "sequence":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / normalizer
    if mode in ("token", "constant"):
        return (per_token * mask).sum() / normalizer
    raise ValueError(f"unknown aggregation {mode}")


def normalizer(mode: str, masks: torch.Tensor, max_new_tokens: int) -> float:
    """Denominator of `aggregate` for a mini-batch with completion masks [B, C]."""
    if mode == "token":
        return float(masks.sum().clamp(min=1))
    if mode == "sequence":
        return float(masks.shape[0])
    return float(masks.shape[0] * max_new_tokens)


def clipped_surrogate(logp, old_logp, advantages, *, clip_low: float, clip_high: float, beta: float = 0.0,
                      ref_logp=None):
    """Per-token loss -min(r A, clip(r, 1-clip_low, 1+clip_high) A) + beta * k3(ref || policy), with r = exp(logp - old),
    and a bool tensor of tokens where the clip is active. k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    clipped = ((ratio > 1 + clip_high) & (adv > 0)) | ((ratio < 1 - clip_low) & (adv < 0))
    kl = None
    if beta > 0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    return per_token, clipped, kl
