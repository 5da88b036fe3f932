"""Per-token log-probs of the sampled tokens (with autograd) and the policy entropy (no grad), without ever
materialising the [B, C, V] logits: the model's trunk gives the last hidden states, then the head (its weight,
bias, scale and soft-cap from rpt_common.heads) runs on the completion tokens only, per checkpointed chunk.
The whole computation runs as the root module's forward, so under FSDP2 the tensor the loss uses is the one the
root's hooks see (every family, scaled and soft-capped heads included).

Why our own and not a library's: TRL's `selective_log_softmax` still takes the full [B, C, V] logits, and
Liger's fused linear cross-entropy returns a reduced loss (no per-token log-probs nor entropy) and needs Triton
on CUDA. `rpt_data`'s fused stats kernel has no backward. A checkpointed chunk of plain torch gives exact values
and gradients on every device with peak extra memory O(chunk_tokens x V) in forward and backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rpt_common.heads import head_spec
from rpt_train import packing

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


def _root_call(model, fn):
    """fn() run as `model`'s forward: under FSDP2 the root's hooks wrap it, so the root's parameters (embeddings,
    final norm, head) are gathered while it runs and again for the backward of its output, which is the very
    tensor the loss uses. (The model's forward is an instance attribute for the call: module tree, parameter
    names and hooks stay as they are.)"""
    own = "forward" in vars(model)  # e.g. an accelerate hook already replaced it
    original = model.forward
    model.forward = fn
    try:
        return model()
    finally:
        if own:
            model.forward = original
        else:
            del model.forward


def _trunk_logprobs(model, ids, attention_mask, positions, where: torch.Tensor, targets: torch.Tensor,
                    rows: torch.Tensor, cols: torch.Tensor, shape, temperature: float, with_entropy: bool,
                    chunk_tokens: int):
    """Trunk hidden states of `ids`, then the head (rpt_common.heads: bias, scale, soft-cap) on the rows `where`
    of the flattened [B * T, H] states only; log p(targets) and entropies scattered to `shape` at (rows, cols)."""
    trunk = model.get_decoder()
    head = model.get_output_embeddings()
    spec = head_spec(model)

    def linear(h):  # the head's parameters read at call time: gathered ones under FSDP2, in forward and backward
        return F.linear(h, head.weight, head.bias if getattr(head, "bias", None) is not None else None)

    def run():
        hidden = trunk(input_ids=ids, attention_mask=attention_mask, position_ids=positions,
                       use_cache=False).last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, where)
        lp, ent = chunk_logprobs(linear, h, targets, temperature, with_entropy, max(1, chunk_tokens),
                                 spec.softcap, spec.scale)
        logp = lp.new_zeros(shape).index_put((rows, cols), lp)
        entropy = ent.new_zeros(shape).index_put((rows, cols), ent) if ent is not None else None
        return logp, entropy

    return _root_call(model, run)


def forward_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, temperature: float,
                     with_entropy: bool = False, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, share_prefix: bool = False):
    """Per-token log p(completion token) under logits / temperature, [B, C], 0 where completion_mask is 0; entropy
    (nats, no grad) too if asked. share_prefix: rows with the same prompt run as one packed row (rpt_train/packing)
    when the model's family allows it, else as separate rows; the values and gradients are the same."""
    shape = completion_ids.shape
    if share_prefix and packing.mask_kind(model) is not None:
        packed = packing.pack(prompt_ids, prompt_mask, completion_ids, completion_mask)
        dtype = torch.promote_types(model.get_input_embeddings().weight.dtype, torch.float32)
        return _trunk_logprobs(model, packed.ids, packing.attention_masks(model, packed, dtype), packed.positions,
                               packed.source, packed.targets, packed.rows, packed.cols, shape, temperature,
                               with_entropy, chunk_tokens)
    # one row each: prompt + completion but its last token (which predicts nothing asked for)
    ids, mask, positions = sequence_inputs(prompt_ids, prompt_mask, completion_ids[:, :-1], completion_mask[:, :-1])
    rows, cols = completion_mask.nonzero(as_tuple=True)
    where = rows * ids.shape[1] + prompt_ids.shape[1] - 1 + cols
    return _trunk_logprobs(model, ids, mask, positions, where, completion_ids[rows, cols], rows, cols, shape,
                           temperature, with_entropy, chunk_tokens)


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
