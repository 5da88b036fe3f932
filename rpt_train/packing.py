"""Shared-prefix packing: the G completions of one context as one row [context, completion_1, ..., completion_G]
with a block attention mask (each completion sees the context and, causally, itself only) and position ids that
restart at len(context) for every completion, so the context's forward and backward run once per group.

Exact for the attention-only families of `MASK_KINDS` under eager or SDPA attention (tested in float64 against the
unshared path, tests/test_train_shared_prefix.py); other families (state-space layers, flash attention, which
takes no custom mask) keep the unshared path. Sliding windows are applied by position distance, as HF applies
them by index distance in an unpadded row."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# model_type -> how its trunk takes a custom 4D mask (transformers 5): "layer_types" = a dict keyed by
# config.layer_types ("full_attention" / "sliding_attention"); "sliding" = one mask, windowed when
# config.sliding_window is set; "full" = one causal mask.
MASK_KINDS = {
    "llama": "full", "qwen2": "layer_types", "qwen3": "layer_types", "mistral": "sliding", "gemma": "full",
    "gemma2": "layer_types", "gemma3_text": "layer_types", "granite": "full", "cohere": "full", "phi3": "sliding",
    "phi": "full", "olmo2": "full", "gpt2": "full", "gpt_neox": "full",
}
ATTENTION = ("eager", "sdpa")


def mask_kind(model) -> str | None:
    """How `model` takes a packed row's mask, or None when its family or attention kernel cannot (unshared then)."""
    config = model.config
    kind = MASK_KINDS.get(getattr(config, "model_type", ""))
    if kind is None or getattr(config, "_attn_implementation", None) not in ATTENTION:
        return None
    if kind == "layer_types" and not set(getattr(config, "layer_types", None) or ["full_attention"]) <= {
            "full_attention", "sliding_attention"}:
        return None
    return kind


def pays(prompt_tokens: int, completion_tokens: int, group: int, hidden: int, intermediate: int) -> bool:
    """Whether one packed row of `group` completions costs at most half the FLOPs of `group` separate rows: per
    token and layer ~2 x (4 d^2 + 3 d d_ff) for the linear layers, per attended pair ~4 d; the packed row's dense
    mask computes all T^2 pairs, the separate rows (P + R)^2 each. At most half, because a packed micro-batch
    holds G completions' activations at once: long completions (reasoning budgets), where the context is a
    small part of each row, stay unshared."""
    per_token = 2 * (4 * hidden * hidden + 3 * hidden * intermediate)
    per_pair = 4 * hidden
    packed = prompt_tokens + group * completion_tokens
    rows = prompt_tokens + completion_tokens
    return 2 * (packed * per_token + packed * packed * per_pair) <= group * (rows * per_token + rows * rows * per_pair)


@dataclass(slots=True)
class Packed:
    """Packed rows of a micro-batch and where each completion token's log-prob comes from."""

    ids: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, T]
    segment: torch.Tensor  # [B, T] 0 = context, j >= 1 = completion j of that row, -1 = padding
    source: torch.Tensor  # [n] flat index into [B * T] of the hidden state predicting each completion token
    targets: torch.Tensor  # [n] the completion tokens
    rows: torch.Tensor  # [n] their row in the input batch
    cols: torch.Tensor  # [n] their column in the input batch


def pack(prompt_ids, prompt_mask, completion_ids, completion_mask) -> Packed:
    """Rows with the same real prompt tokens share one packed row (in order of first appearance). A completion
    contributes its tokens but the last (whose hidden state predicts nothing asked for); its first token is
    predicted by the context's last hidden state."""
    groups: dict[tuple, list[int]] = {}
    prompts = [p[m.bool()] for p, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
    for r, p in enumerate(prompts):
        groups.setdefault(tuple(p.tolist()), []).append(r)
    lengths = completion_mask.cpu().sum(1).tolist()
    comp = completion_ids.cpu()
    ids, pos, seg, where, tgt, rows, cols = [], [], [], [], [], [], []
    for b, members in enumerate(groups.values()):
        context = prompts[members[0]]
        P = len(context)
        row_ids, row_pos, row_seg = [context], [torch.arange(P)], [torch.zeros(P, dtype=torch.long)]
        at = P
        for j, r in enumerate(members, start=1):
            R = int(lengths[r])
            if R == 0:
                continue
            # token 0 from the context's last state, token t from the state of token t - 1 of this completion
            where.append((b, torch.cat([torch.tensor([P - 1]), at + torch.arange(R - 1)])))
            tgt.append(comp[r, :R])
            rows.append(torch.full((R,), r))
            cols.append(torch.arange(R))
            row_ids.append(comp[r, :R - 1])
            row_pos.append(P + torch.arange(R - 1))
            row_seg.append(torch.full((R - 1,), j))
            at += R - 1
        ids.append(torch.cat(row_ids))
        pos.append(torch.cat(row_pos))
        seg.append(torch.cat(row_seg))
    T = max(len(x) for x in ids)
    device = prompt_ids.device

    def right(xs, value):
        return torch.stack([torch.nn.functional.pad(x, (0, T - len(x)), value=value) for x in xs]).to(device)

    def flat(xs):
        return (torch.cat(xs) if xs else torch.zeros(0, dtype=torch.long)).to(device)

    return Packed(ids=right(ids, 0), positions=right(pos, 0), segment=right(seg, -1),
                  source=flat([b * T + i for b, i in where]), targets=flat(tgt), rows=flat(rows), cols=flat(cols))


def block_mask(packed: Packed, window: int | None = None) -> torch.Tensor:
    """[B, 1, T, T] bool, True = may attend: a key before the query (or itself) in the context or in the query's own
    completion; within `window` positions when given; padding attends to itself only (no empty rows)."""
    seg, pos = packed.segment, packed.positions
    T = seg.shape[1]
    idx = torch.arange(T, device=seg.device)
    causal = idx[None, :, None] >= idx[None, None, :]
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    allowed = causal & same & (seg[:, :, None] >= 0) & (seg[:, None, :] >= 0)
    if window is not None:
        allowed &= (pos[:, :, None] - pos[:, None, :]) < window
    allowed |= torch.eye(T, dtype=torch.bool, device=seg.device)[None]
    return allowed[:, None]


def attention_masks(model, packed: Packed, dtype: torch.dtype):
    """The custom mask argument for `model`'s trunk: bool for SDPA, additive in `dtype` for eager attention; a dict
    per layer type where the trunk takes one."""
    config = model.config
    kind = mask_kind(model)
    window = getattr(config, "sliding_window", None)

    def form(mask: torch.Tensor) -> torch.Tensor:
        if config._attn_implementation == "sdpa":
            return mask
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, zero, torch.finfo(dtype).min)

    if kind == "layer_types":
        masks = {"full_attention": form(block_mask(packed))}
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            masks["sliding_attention"] = form(block_mask(packed, window))
        return masks
    return form(block_mask(packed, window if kind == "sliding" and window else None))
