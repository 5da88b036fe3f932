"""The policy update of one step: --ppo-epochs passes, one AdamW update per mini-batch, micro-batches
accumulating gradients through the chunked log-prob path; plus the no-grad (old / reference) log-probs.

Several ranks: each rank's loss is its rows' share of the global normaliser and FSDP sums the gradients, so the
update equals one process's on the whole batch; a rank short of micro-batches runs zero-weight passes
(`distributed.pad_to_max` / `dummy_inputs`) so that every FSDP all-gather has its partner."""
from __future__ import annotations

import math

import torch

from rpt_train import distributed
from rpt_train.advantages import group_advantages
from rpt_train.collect import Groups
from rpt_train.logprobs import forward_logprobs
from rpt_train.loss import AGGREGATION, aggregate, clipped_surrogate, normalizer
from rpt_train.rollout import RolloutBatch, autocast_bf16

_SUMS = ("clipped", "tokens", "entropy", "ent_tokens", "kl")


def autocast(cfg, model):
    """bf16 autocast when --bf16 and the model is on CUDA; a no-op elsewhere."""
    return autocast_bf16(next(model.parameters()).device, cfg.bf16)


def logprobs(cfg, model, inputs, with_entropy: bool = False):
    """forward_logprobs under the run's autocast, temperature and chunk size; log-probs as float32 at least."""
    with autocast(cfg, model):
        lp, ent = forward_logprobs(model, *inputs, cfg.temperature, with_entropy, cfg.logprob_chunk_tokens)
    return lp.float(), ent


def micro_rows(rollouts: RolloutBatch, rows: list[int], device) -> tuple[torch.Tensor, ...]:
    """Rows of a batch with the columns that are padding in every one of them cut away."""
    pm, cm = rollouts.prompt_mask[rows], rollouts.completion_mask[rows]
    first = int(pm.any(0).nonzero()[0]) if pm.any() else 0
    width = int(cm.any(0).nonzero()[-1]) + 1 if cm.any() else 1
    return tuple(t.to(device) for t in (rollouts.prompt_ids[rows][:, first:], pm[:, first:],
                                        rollouts.completion_ids[rows][:, :width], cm[:, :width]))


@torch.no_grad()
def frozen_logprobs(cfg, model, rollouts: RolloutBatch, chunks: list[list[int]], with_entropy: bool = False):
    """[N, C] log-probs of `model` before any update (old policy or reference); entropy [N, C] too if asked."""
    N, C = rollouts.completion_ids.shape
    device = next(model.parameters()).device
    out, ent = torch.zeros(N, C, device=device), torch.zeros(N, C, device=device)
    for rows in distributed.pad_to_max(chunks):
        if rows is None:  # another rank has more chunks: a discarded forward keeps the FSDP all-gathers paired
            logprobs(cfg, model, distributed.dummy_inputs(device))
            continue
        lp, e = logprobs(cfg, model, micro_rows(rollouts, rows, device), with_entropy)
        out[rows, :lp.shape[1]] = lp
        if e is not None:
            ent[rows, :e.shape[1]] = e.float()
    return out, ent


def mini_batches(cfg, batch: Groups) -> list[list[int]]:
    """Local rows of each optimizer update. Update m takes the rows that one process would give it (global row
    // --mini-batch-size), so the updates do not depend on the number of ranks; each rank gets every update's list
    (possibly empty), so all ranks step together."""
    N, G = len(batch.rewards), cfg.group_size
    total = int(distributed.all_sum([N])[0])
    if not cfg.mini_batch_size or cfg.mini_batch_size >= total:
        return [list(range(N))]
    index = batch.index if batch.index is not None else range(N // G)
    update = [(index[r // G] * G + r % G) // cfg.mini_batch_size for r in range(N)]
    return [[r for r in range(N) if update[r] == m] for m in range(-(-total // cfg.mini_batch_size))]


def global_normalizer(mode: str, masks: torch.Tensor, max_new_tokens: int) -> float:
    """`loss.normalizer` of the mini-batch made of every rank's rows (token and sequence counts summed)."""
    if distributed.world_size() == 1:
        return normalizer(mode, masks, max_new_tokens)
    rows, tokens = distributed.all_sum([float(masks.shape[0]), float(masks.sum())])
    if mode == "token":
        return max(tokens, 1.0)
    return max(rows, 1.0) * (max_new_tokens if mode == "constant" else 1)


def micro_step(cfg, model, batch: Groups, rows, advantages, old, ref_lp, norm: float, first_epoch: bool,
               sums: dict) -> float:
    """Forward + backward of one micro-batch (rows None: a zero-weight pass for FSDP); its loss, sums updated."""
    device = next(model.parameters()).device
    if rows is None:  # another rank has more micro-batches: a zero-weight pass (its collectives pair up)
        logp, _ = logprobs(cfg, model, distributed.dummy_inputs(device))
        (logp.sum() * 0.0).backward()
        return 0.0
    inputs = micro_rows(batch.rollouts, rows, device)
    c_mask, W = inputs[3], inputs[3].shape[1]
    logp, ent = logprobs(cfg, model, inputs, first_epoch)
    per_token, clipped, kl = clipped_surrogate(
        logp, old[rows, :W] if old is not None else logp.detach(), advantages[rows].to(device),
        clip_low=cfg.clip_low, clip_high=cfg.resolved_clip_high(), beta=cfg.beta,
        ref_logp=ref_lp[rows, :W] if ref_lp is not None else None)
    loss = aggregate(per_token, c_mask, AGGREGATION[cfg.loss], norm)
    loss.backward()
    mask = c_mask.bool()
    sums["clipped"] += float(clipped[mask].sum())
    sums["tokens"] += float(mask.sum())
    if ent is not None:
        sums["entropy"] += float(ent[mask].sum())
        sums["ent_tokens"] += float(mask.sum())
    if kl is not None:
        sums["kl"] += float(kl.detach()[mask].sum())
    return float(loss.detach())


def idle_rows(cfg, model, batch: Groups, idle: list[list[int]], first_epoch: bool, sums: dict) -> None:
    """Zero-advantage rows (beta = 0): no backward, never clipped; their entropy measured without a graph."""
    masks = batch.rollouts.completion_mask
    sums["tokens"] += sum(float(masks[rows].sum()) for rows in idle)
    if first_epoch:
        _, ent = frozen_logprobs(cfg, model, batch.rollouts, idle, with_entropy=True)
        for rows in idle:
            mask = masks[rows].bool().to(ent.device)
            sums["entropy"] += float(ent[rows][mask].sum())
            sums["ent_tokens"] += float(mask.sum())


def update_policy(cfg, model, ref, optimizer, batch: Groups) -> dict:
    """--ppo-epochs passes over the batch, one optimizer update per mini-batch, micro-batches accumulating grads.
    Rows with advantage 0 (and beta = 0) have exactly zero gradient: they count in the loss normaliser but skip
    the backward pass. Old log-probs are recomputed before the first update when there is more than one."""
    rollouts = batch.rollouts
    advantages = group_advantages(batch.rewards, cfg.group_size, scale=cfg.resolved_scale_rewards(),
                                  anchor=cfg.advantage_anchor)
    active = ((advantages != 0) | (cfg.beta > 0)).tolist()
    minis = mini_batches(cfg, batch)

    def micro(rows: list[int], want: bool) -> list[list[int]]:
        rows = [r for r in rows if active[r] == want]
        return [rows[j:j + cfg.micro_batch_size] for j in range(0, len(rows), cfg.micro_batch_size)]

    trained = [c for m in minis for c in micro(m, True)]
    old = frozen_logprobs(cfg, model, rollouts, trained)[0] if cfg.ppo_epochs > 1 or len(minis) > 1 else None
    ref_lp = frozen_logprobs(cfg, ref, rollouts, trained)[0] if ref is not None else None
    params = [p for group in optimizer.param_groups for p in group["params"]]  # sharded ones under FSDP2
    sums = dict.fromkeys(("loss", "grad_norm") + _SUMS, 0.0)
    updates, bad, grad_norm, mini_loss = 0, None, 0.0, 0.0
    model.train()
    for epoch in range(cfg.ppo_epochs):
        for m in minis:
            norm = global_normalizer(AGGREGATION[cfg.loss], rollouts.completion_mask[m], cfg.max_new_tokens)
            optimizer.zero_grad(set_to_none=True)
            losses = [micro_step(cfg, model, batch, rows, advantages, old, ref_lp, norm, epoch == 0, sums)
                      for rows in distributed.pad_to_max(micro(m, True))]
            idle_rows(cfg, model, batch, micro(m, False), epoch == 0, sums)
            for p in params:  # untouched parameters get an exact zero gradient, as a full backward would give
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grad_norm = distributed.clip_grad_norm(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            mini_loss = distributed.all_sum([sum(losses)])[0]  # NaN/inf on any rank makes it non-finite on all
            bad = bad_update(cfg, grad_norm, mini_loss)
            if bad:  # no optimizer step: the weights and AdamW state stay as they were; the rest of the step is dropped
                break
            sums["loss"] += mini_loss
            sums["grad_norm"] += grad_norm
            optimizer.step()
            updates += 1
        if bad:
            break
    optimizer.zero_grad(set_to_none=True)  # gradients do not outlive the update (the next rollouts need the room)
    model.eval()
    n = max(updates, 1)
    sums |= dict(zip(_SUMS, distributed.all_sum([sums[k] for k in _SUMS])))
    stats = {
        "loss": sums["loss"] / n if updates else mini_loss,
        "grad_norm": sums["grad_norm"] / n if updates else grad_norm,
        "bad_step": bad,
        "clip_ratio": sums["clipped"] / max(sums["tokens"], 1.0),
        "entropy": sums["entropy"] / max(sums["ent_tokens"], 1.0),
        "advantage_abs": float(distributed.cat_from_ranks(advantages).abs().mean()),
        "updates": updates,
    }
    if cfg.beta > 0:
        stats["kl"] = sums["kl"] / max(sums["tokens"], 1.0)
    return stats


def bad_update(cfg, grad_norm: float, loss: float) -> str | None:
    """Why an update must not be applied (NaN/inf loss or gradient, or a gradient norm above --bad-grad-norm)."""
    if not math.isfinite(loss):
        return "non-finite loss"
    if not math.isfinite(grad_norm):
        return "non-finite gradient"
    if cfg.bad_grad_norm > 0 and grad_norm > cfg.bad_grad_norm:
        return f"gradient norm {grad_norm:.4g} > --bad-grad-norm {cfg.bad_grad_norm:g}"
    return None


def no_update(cfg, model, made: list[Groups]) -> dict:
    """Every group had equal rewards after all rounds: no optimizer step; entropy still measured."""
    rollouts = made[0].rollouts
    N = rollouts.completion_ids.shape[0]
    chunks = [list(range(i, min(i + cfg.micro_batch_size, N))) for i in range(0, N, cfg.micro_batch_size)]
    _, ent = frozen_logprobs(cfg, model, rollouts, chunks, with_entropy=True)
    ent = distributed.cat_from_ranks(ent[rollouts.completion_mask.bool().to(ent.device)])
    stats = {"loss": 0.0, "grad_norm": 0.0, "bad_step": None, "clip_ratio": 0.0, "advantage_abs": 0.0, "updates": 0,
             "entropy": float(ent.mean()) if len(ent) else 0.0}
    if cfg.beta > 0:
        stats["kl"] = None
    return stats
