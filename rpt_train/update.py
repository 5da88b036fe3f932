"""The policy update of one step: --ppo-epochs passes, one AdamW update per mini-batch, micro-batches
accumulating gradients through the chunked log-prob path; plus the no-grad (old / reference) log-probs.

--share-prefix: a micro-batch is `--micro-batch-size` groups, each one packed row of its context and its trained
completions (rpt_train/packing.py), for the training pass and the old / reference passes alike. The policy
entropy comes from the rollouts' own sampling distributions (collect.rollout_stats); only an engine that gives
none has it measured here, on the trained rows, from the training pass itself: no forward runs to log.

Several ranks: each rank's loss is its rows' share of the global normaliser and FSDP sums the gradients, so the
update equals one process's on the whole batch; a rank short of micro-batches runs zero-weight passes
(`distributed.pad_to_max` / `dummy_inputs`) so that every FSDP all-gather has its partner."""
from __future__ import annotations

import itertools
import math

import torch

from rpt_train import distributed, packing, precision
from rpt_train.advantages import group_advantages
from rpt_train.collect import Groups
from rpt_train.logprobs import forward_logprobs
from rpt_train.loss import AGGREGATION, aggregate, clipped_surrogate, normalizer
from rpt_train.budget import sampled_new_tokens
from rpt_train.rollout import RolloutBatch

_SUMS = ("clipped", "tokens", "entropy", "ent_tokens", "kl", "pass_tokens", "frozen_tokens")


def autocast(cfg, model):
    """Autocast to the run's compute dtype over the float32 master weights (rpt_train.precision)."""
    return precision.autocast(cfg, next(model.parameters()).device)


def logprobs(cfg, model, inputs, with_entropy: bool = False, shared: bool = False):
    """forward_logprobs under the run's autocast, temperature and chunk size; log-probs as float32 at least."""
    with autocast(cfg, model):
        lp, ent = forward_logprobs(model, *inputs, cfg.temperature, with_entropy, cfg.logprob_chunk_tokens,
                                   share_prefix=shared)
    return lp.float(), ent


def sharing(cfg, model, rollouts: RolloutBatch) -> bool:
    """Whether this update packs each context with its completions: --share-prefix, a family that allows it, and
    the step's longest prompt and completions (over all ranks) short enough for the packed row to cost less."""
    if not cfg.share_prefix or packing.mask_kind(model) is None:
        return False
    prompt = distributed.all_max(float(rollouts.prompt_mask.sum(1).max()) if len(rollouts.texts) else 0.0)
    new = distributed.all_max(float(rollouts.completion_mask.shape[1]) if len(rollouts.texts) else 0.0)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return packing.pays(int(prompt), int(new), cfg.group_size, config.hidden_size,
                        getattr(config, "intermediate_size", None) or 4 * config.hidden_size)


def micro_rows(rollouts: RolloutBatch, rows: list[int], device) -> tuple[torch.Tensor, ...]:
    """Rows of a batch with the columns that are padding in every one of them cut away."""
    pm, cm = rollouts.prompt_mask[rows], rollouts.completion_mask[rows]
    first = int(pm.any(0).nonzero()[0]) if pm.any() else 0
    width = int(cm.any(0).nonzero()[-1]) + 1 if cm.any() else 1
    return tuple(t.to(device) for t in (rollouts.prompt_ids[rows][:, first:], pm[:, first:],
                                        rollouts.completion_ids[rows][:, :width], cm[:, :width]))


@torch.no_grad()
def frozen_logprobs(cfg, model, rollouts: RolloutBatch, chunks: list[list[int]], shared: bool = False):
    """[N, C] log-probs of `model` before any update (old policy or reference), the micro-batches `chunks`."""
    N, C = rollouts.completion_ids.shape
    device = next(model.parameters()).device
    out = torch.zeros(N, C, device=device)
    for rows in distributed.pad_to_max(chunks):
        if rows is None:  # another rank has more chunks: a discarded forward keeps the FSDP all-gathers paired
            logprobs(cfg, model, distributed.dummy_inputs(device), shared=shared)
            continue
        lp, _ = logprobs(cfg, model, micro_rows(rollouts, rows, device), shared=shared)
        out[rows, :lp.shape[1]] = lp
    return out


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


def pass_tokens(rollouts: RolloutBatch, rows: list[int], shared: bool, G: int) -> int:
    """Tokens one forward over `rows` runs through the model: prompt + completion of each row, or with a shared
    prefix each group's prompt once (rows are group-contiguous) and every completion. The compute accounting of
    experiment reports (`forward_tokens`, `backward_tokens` in metrics.jsonl) counts these."""
    pm, cm = rollouts.prompt_mask[rows], rollouts.completion_mask[rows]
    if not shared:
        return int(pm.sum() + cm.sum())
    firsts = [i for i, r in enumerate(rows) if i == 0 or rows[i - 1] // G != r // G]
    return int(pm[firsts].sum() + cm.sum())


def global_normalizer(mode: str, masks: torch.Tensor, max_new_tokens: int) -> float:
    """`loss.normalizer` of the mini-batch made of every rank's rows (token and sequence counts summed)."""
    if distributed.world_size() == 1:
        return normalizer(mode, masks, max_new_tokens)
    rows, tokens = distributed.all_sum([float(masks.shape[0]), float(masks.sum())])
    if mode == "token":
        return max(tokens, 1.0)
    return max(rows, 1.0) * (max_new_tokens if mode == "constant" else 1)


def micro_step(cfg, model, batch: Groups, rows, advantages, old, ref_lp, norm: float, with_entropy: bool,
               sums: dict, shared: bool = False) -> float:
    """Forward + backward of one micro-batch (rows None: a zero-weight pass for FSDP); its loss, sums updated."""
    device = next(model.parameters()).device
    if rows is None:  # another rank has more micro-batches: a zero-weight pass (its collectives pair up)
        logp, _ = logprobs(cfg, model, distributed.dummy_inputs(device), shared=shared)
        (logp.sum() * 0.0).backward()
        return 0.0
    inputs = micro_rows(batch.rollouts, rows, device)
    W = inputs[3].shape[1]
    c_mask = batch.rollouts.trained_mask[rows][:, :W].to(device)  # forced tokens (--think-overflow close): no loss
    logp, ent = logprobs(cfg, model, inputs, with_entropy, shared)
    per_token, clipped, kl = clipped_surrogate(
        logp, old[rows, :W] if old is not None else logp.detach(), advantages[rows].to(device),
        clip_low=cfg.clip_low, clip_high=cfg.resolved_clip_high(), beta=cfg.beta,
        ref_logp=ref_lp[rows, :W] if ref_lp is not None else None)
    loss = aggregate(per_token, c_mask, AGGREGATION[cfg.loss], norm)
    loss.backward()
    sums["pass_tokens"] += pass_tokens(batch.rollouts, rows, shared, cfg.group_size)
    mask = c_mask.bool()
    sums["clipped"] += float(clipped[mask].sum())
    sums["tokens"] += float(mask.sum())
    if ent is not None:
        sums["entropy"] += float(ent[mask].sum())
        sums["ent_tokens"] += float(mask.sum())
    if kl is not None:
        sums["kl"] += float(kl.detach()[mask].sum())
    return float(loss.detach())


def update_policy(cfg, model, ref, optimizer, batch: Groups, ntp=None) -> dict:
    """--ppo-epochs passes over the batch, one optimizer update per mini-batch, micro-batches accumulating grads;
    `ntp` (--ntp-weight, rpt_train.objectives.NtpTerm) adds its next-token loss and gradient to each update.
    Rows with advantage 0 (and beta = 0) have exactly zero gradient: they count in the loss normaliser but skip
    every pass. Old log-probs are recomputed before the first update when there is more than one."""
    rollouts = batch.rollouts
    G = cfg.group_size
    advantages = group_advantages(batch.rewards, G, scale=cfg.resolved_scale_rewards(), anchor=cfg.advantage_anchor)
    active = ((advantages != 0) | (cfg.beta > 0)).tolist()
    minis = mini_batches(cfg, batch)
    shared = sharing(cfg, model, rollouts)
    measure = rollouts.entropy is None  # no sampler entropy: take it from the training pass (trained rows)

    def micro(rows: list[int]) -> list[list[int]]:
        """The trained rows of a mini-batch in micro-batches: --micro-batch-size rows, or groups when shared."""
        rows = [r for r in rows if active[r]]
        if not shared:
            return [rows[j:j + cfg.micro_batch_size] for j in range(0, len(rows), cfg.micro_batch_size)]
        groups = [list(rows_of) for _, rows_of in itertools.groupby(rows, key=lambda r: r // G)]  # group-contiguous
        return [sum(groups[j:j + cfg.micro_batch_size], []) for j in range(0, len(groups), cfg.micro_batch_size)]

    trained = [c for m in minis for c in micro(m)]
    old = frozen_logprobs(cfg, model, rollouts, trained, shared) if cfg.ppo_epochs > 1 or len(minis) > 1 else None
    ref_lp = frozen_logprobs(cfg, ref, rollouts, trained, shared) if ref is not None else None
    params = [p for group in optimizer.param_groups for p in group["params"]]  # sharded ones under FSDP2
    sums = dict.fromkeys(("loss", "grad_norm") + _SUMS, 0.0)
    sums["frozen_tokens"] = sum(pass_tokens(rollouts, c, shared, G) for c in trained) * ((old is not None) +
                                                                                          (ref_lp is not None))
    updates, bad, grad_norm, mini_loss = 0, None, 0.0, 0.0
    model.train()
    for epoch in range(cfg.ppo_epochs):
        for m in minis:
            # dr_grpo's constant: the most tokens a completion samples (--max-new-tokens, or the run's largest
            # thinking budget + answer room; --think-overflow close's forced ids are not samples: not counted)
            norm = global_normalizer(AGGREGATION[cfg.loss], rollouts.trained_mask[m], sampled_new_tokens(cfg))
            optimizer.zero_grad(set_to_none=True)
            losses = [micro_step(cfg, model, batch, rows, advantages, old, ref_lp, norm, measure and epoch == 0,
                                 sums, shared) for rows in distributed.pad_to_max(micro(m))]
            if ntp is not None:  # the next-token term of the mini-batch's contexts, before clipping
                losses.append(ntp(model, batch, m))
            # zero-advantage rows run no pass; their tokens count in the clip ratio's denominator
            sums["tokens"] += float(rollouts.trained_mask[[r for r in m if not active[r]]].sum())
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
        "advantage_abs": float(distributed.cat_from_ranks(advantages).abs().mean()),
        "updates": updates,
        "shared_prefix": shared,
        "update_forward_tokens": int(sums["pass_tokens"] + sums["frozen_tokens"]),  # training + old/ref passes
        "backward_tokens": int(sums["pass_tokens"]),
    }
    if measure:
        stats["entropy"] = sums["entropy"] / sums["ent_tokens"] if sums["ent_tokens"] else None
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
    """Every group had equal rewards after all rounds: no optimizer step and no forward (the entropy, when the
    engine gives it, is already in the rollout stats)."""
    stats = {"loss": 0.0, "grad_norm": 0.0, "bad_step": None, "clip_ratio": 0.0, "advantage_abs": 0.0, "updates": 0,
             "update_forward_tokens": 0, "backward_tokens": 0}
    if cfg.beta > 0:
        stats["kl"] = None
    return stats
