"""Per-token log-probs of the sampled tokens (with autograd) and the policy entropy (no grad), without ever
materialising the [B, C, V] logits: the lm_head runs per chunk of hidden states, each chunk checkpointed.

Why our own and not a library's: TRL's `selective_log_softmax` still takes the full [B, C, V] logits, and
Liger's fused linear cross-entropy returns a reduced loss (no per-token log-probs nor entropy) and needs Triton
on CUDA. `rpt_data`'s fused stats kernel has no backward. A checkpointed chunk of plain torch gives exact values
and gradients on every device with peak extra memory O(chunk_tokens x V) in forward and backward."""
from __future__ import annotations

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from rpt_common.heads import head_spec

DEFAULT_CHUNK_TOKENS = 1024


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """float32 for bf16/fp16 logits (as the loss needs), float64 kept (the exactness tests)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """(ids, mask, position ids) of left-padded prompt + right-padded completion as one sequence."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return ids, mask, (mask.cumsum(dim=1) - 1).clamp(min=0)


def chunk_logprobs(head, hidden, targets, temperature: float, with_entropy: bool, chunk_tokens: int,
                   softcap: float | None = None, scale: float | None = None):
    """log p(target) [N] of logits = softcap(scale * head(hidden)) / temperature for hidden [N, H], targets [N];
    entropy [N] (nats, no grad) if asked. `chunk_tokens` rows at a time; under autograd each chunk is recomputed
    in backward. `scale` and `softcap` are what the model's forward applies after its head (rpt_common.heads)."""
    entropies: dict[int, torch.Tensor] = {}

    def one(i: int, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        if scale is not None:  # Granite's 1 / logits_scaling, Cohere's logit_scale, ...
            logits = logits * scale
        if softcap:  # Gemma-2 style
            logits = torch.tanh(logits / softcap) * softcap
        logp = torch.log_softmax(at_least_fp32(logits) / temperature, dim=-1)
        if with_entropy and i not in entropies:  # not again when the backward recomputes the chunk
            with torch.no_grad():
                entropies[i] = -(logp.exp() * logp).sum(-1)
        return logp.gather(-1, t[:, None])[:, 0]

    grad = torch.is_grad_enabled()
    parts = []
    for i, start in enumerate(range(0, hidden.shape[0], chunk_tokens)):
        h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
        parts.append(checkpoint(one, i, h, t, use_reentrant=False) if grad else one(i, h, t))
    if not parts:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, (empty if with_entropy else None)
    entropy = torch.cat([entropies[i] for i in range(len(parts))]) if with_entropy else None
    return torch.cat(parts), entropy


@contextlib.contextmanager
def _head_replaced(head: torch.nn.Module, fn):
    """Inside the block, calling `head` runs fn(hidden, original_forward) instead (an instance attribute, so the
    module tree, parameter names and FSDP's hooks stay as they are)."""
    own = "forward" in vars(head)  # e.g. an accelerate hook already replaced it
    original = head.forward
    head.forward = lambda hidden: fn(hidden, original)
    try:
        yield
    finally:
        if own:
            head.forward = original
        else:
            del head.forward


def forward_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float,
                     with_entropy: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
    """Per-token log p(completion token) under logits / temperature, [B, C]; entropy (nats, no grad) too if asked.
    The model's forward runs as usual up to its lm_head, which is swapped for the chunked one for that call."""
    ids, mask, positions = sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    B, C = completion_ids.shape
    head = model.get_output_embeddings()
    spec = head_spec(model)  # the scale / soft-cap the model's forward applies after the head it calls
    found = {}

    def chunked(hidden, original):  # hidden [B, C + 1, H]: position t predicts completion token t
        h = hidden[:, :-1].reshape(B * C, hidden.shape[-1])
        lp, ent = chunk_logprobs(original, h, completion_ids.reshape(-1), temperature, with_entropy,
                                 max(1, chunk_tokens), spec.softcap, spec.scale)
        found["entropy"] = ent.view(B, C) if ent is not None else None
        found["logp"] = lp.view(B, C)
        return found["logp"]  # stands in for the logits; the model may only wrap it in its output

    with _head_replaced(head, chunked):
        model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False, logits_to_keep=C + 1)
    return found["logp"], found["entropy"]


def forward_logprobs_full(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float,
                          with_entropy: bool = False):
    """The reference: full [B, C, V] float32 log-softmax (O(B x C x V) memory); tests and bench/memory.py only."""
    ids, mask, positions = sequence_inputs(prompt_ids, prompt_mask, completion_ids, completion_mask)
    C = completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                   logits_to_keep=C + 1).logits[:, :-1]  # logits at t predict token t+1
    logp = torch.log_softmax(at_least_fp32(logits) / temperature, dim=-1)
    token_logp = logp.gather(-1, completion_ids[..., None])[..., 0]
    if not with_entropy:
        return token_logp, None
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return token_logp, entropy
