"""The RPT loop, top to bottom: draw contexts, roll out G completions each, reward by prefix match, keep groups
whose rewards differ (dynamic sampling), group advantages, clipped-surrogate updates, log, evaluate, checkpoint."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from rpt_common.errors import UserError
from rpt_train.advantages import group_advantages, group_std
from rpt_train.checkpoint import (latest_checkpoint, load_trainer_state, save_checkpoint, set_rng_state,
                                  tidy_checkpoints)
from rpt_train.config import EvalConfig, TrainConfig, to_dict
from rpt_train.evaluate import EVAL_BUCKETS, evaluate, select_positions, write_json
from rpt_train.loss import AGGREGATION, aggregate, clipped_surrogate, forward_logprobs, normalizer
from rpt_train.metrics import MetricsLogger
from rpt_train.policy import eos_ids, freeze, load_policy
from rpt_train.reward import RewardFn, RewardInput, combine, extract_answer, load_reward_fn, prefix_match, rpt_reward
from rpt_train.rollout import HFRollout, RolloutBatch, RolloutEngine, SamplingParams, concat_batches, select_rows
from rpt_train.samples import Sample, TrainSamples
from rpt_train.templates import PromptBuilder

# Options that may change between a run and its --resume without changing what is computed.
_RESUMABLE = {"steps", "save_every", "keep_checkpoints", "eval_every", "log_samples_every", "tensorboard", "resume",
              "out", "model", "eval_limit", "eval_samples", "on_bad_step", "bad_grad_norm", "max_bad_steps"}


@dataclass(kw_only=True, slots=True)
class Groups:
    """Rollouts of some contexts, G rows per context, group-contiguous."""

    samples: list[Sample]
    rollouts: RolloutBatch
    rewards: torch.Tensor  # [N]
    answers: list[str | None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def disable_dropout(model: torch.nn.Module) -> None:
    """RL needs log-probs that are a function of the weights: dropout off everywhere (as TRL does)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def lr_factor(cfg: TrainConfig):
    """Multiplier of --lr at training step i (0-based): linear warmup, then constant / linear / cosine to 0."""
    def factor(i: int) -> float:
        if i < cfg.warmup_steps:
            return (i + 1) / cfg.warmup_steps
        progress = (i - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.lr_schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    return factor


def prepare_out(cfg: TrainConfig) -> Path | None:
    """The checkpoint to resume from (None = fresh start); refuses to mix a new run into an old --out."""
    out = Path(cfg.out)
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if not cfg.resume and (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size:
        raise UserError(f"'{out}' already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        tidy_checkpoints(out, cfg.keep_checkpoints)
    if cfg.resume and ckpt is None:
        print(f"note: no checkpoint in '{out}' yet; starting from step 0", file=sys.stderr)
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return ckpt


def autocast(cfg: TrainConfig, model) -> contextlib.AbstractContextManager:
    if cfg.bf16 and next(model.parameters()).is_cuda:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def rollout_groups(samples: list[Sample], prompts: PromptBuilder, engine: RolloutEngine, reward_fn: RewardFn,
                   params: SamplingParams, answer_format: str) -> Groups:
    """G completions per context, their extracted answers and rewards."""
    rollouts = engine.generate([prompts.ids(s.context) for s in samples], params)
    answers = [extract_answer(t, answer_format) for t in rollouts.texts]
    per_row = [s for s in samples for _ in range(params.n)]
    items = [RewardInput(completion=t, answer=a, label_tokens=s.label_tokens, context=s.context)
             for t, a, s in zip(rollouts.texts, answers, per_row)]
    return Groups(samples=samples, rollouts=rollouts, rewards=torch.tensor(reward_fn(items), dtype=torch.float32),
                  answers=answers)


def collect(cfg: TrainConfig, data: TrainSamples, prompts: PromptBuilder, engine: RolloutEngine,
            reward_fn: RewardFn, params: SamplingParams) -> tuple[Groups | None, list[Groups], dict]:
    """One step's training groups. With dynamic sampling, groups whose rewards all agree (zero std, no signal)
    are dropped and new contexts drawn, at most --max-sampling-rounds rounds; stats cover every rollout made."""
    G, need, rounds, made, kept = cfg.group_size, cfg.batch_prompts, 0, [], []
    t0 = time.perf_counter()
    while need > 0 and rounds < (cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        rounds += 1
        groups = rollout_groups(data.next_batch(need), prompts, engine, reward_fn, params, cfg.answer_format)
        made.append(groups)
        keep = (group_std(groups.rewards, G) > 0).tolist() if cfg.dynamic_sampling else [True] * len(groups.samples)
        if any(keep):
            kept.append(take_groups(groups, [g for g, k in enumerate(keep) if k], G))
            need -= sum(keep)
    rollout_seconds = time.perf_counter() - t0
    rewards = torch.cat([g.rewards for g in made])
    answers = [a for g in made for a in g.answers]
    labels = [s.label_tokens for g in made for s in g.samples for _ in range(G)]
    lengths = torch.cat([g.rollouts.lengths for g in made]).float()
    tokens = float(lengths.sum())
    stats = {
        "reward": float(rewards.mean()),
        "reward_std": float(group_std(rewards, G).mean()),
        "frac_reward_zero_std": float((group_std(rewards, G) == 0).float().mean()),
        "ntr_accuracy": float(np.mean([prefix_match(a, lab) for a, lab in zip(answers, labels)])),
        "answer_rate": float(np.mean([a is not None for a in answers])),
        "completion_length": float(lengths.mean()),
        "sampling_rounds": rounds,
        "groups_kept": sum(len(g.samples) for g in kept),
        "rollout_tokens": int(tokens),
        "rollout_seconds": rollout_seconds,
        "rollout_tokens_per_s": tokens / max(rollout_seconds, 1e-9),
        "samples_skipped": data.build.skipped,
    }
    batch = None
    if kept:
        batch = Groups(samples=[s for g in kept for s in g.samples], answers=[a for g in kept for a in g.answers],
                       rollouts=concat_batches([g.rollouts for g in kept], pad=engine_pad(engine)),
                       rewards=torch.cat([g.rewards for g in kept]))
    return batch, made, stats


def engine_pad(engine) -> int:
    tok = getattr(engine, "tokenizer", None)
    return tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0


def take_groups(groups: Groups, keep: list[int], G: int) -> Groups:
    rows = [g * G + j for g in keep for j in range(G)]
    return Groups(samples=[groups.samples[g] for g in keep], rollouts=select_rows(groups.rollouts, rows),
                  rewards=groups.rewards[rows], answers=[groups.answers[r] for r in rows])


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
    for rows in chunks:
        p_ids, p_mask, c_ids, c_mask = micro_rows(rollouts, rows, device)
        with autocast(cfg, model):
            lp, e = forward_logprobs(model, p_ids, p_mask, c_ids, c_mask, cfg.temperature, with_entropy)
        out[rows, :lp.shape[1]] = lp.float()
        if e is not None:
            ent[rows, :e.shape[1]] = e.float()
    return out, ent


def update_policy(cfg: TrainConfig, model, ref, optimizer, batch: Groups) -> dict:
    """--ppo-epochs passes over the batch, one optimizer update per mini-batch, micro-batches accumulating grads.
    Rows with advantage 0 (and beta = 0) have exactly zero gradient: they count in the loss normaliser but skip
    the backward pass. Old log-probs are recomputed before the first update when there is more than one."""
    rollouts = batch.rollouts
    advantages = group_advantages(batch.rewards, cfg.group_size, scale=cfg.resolved_scale_rewards(),
                                  anchor=cfg.advantage_anchor)
    N, device, mode = len(batch.rewards), next(model.parameters()).device, AGGREGATION[cfg.loss]
    active = ((advantages != 0) | (cfg.beta > 0)).tolist()
    mini = cfg.mini_batch_size or N
    minis = [list(range(i, min(i + mini, N))) for i in range(0, N, mini)]

    def micro(rows: list[int], want: bool) -> list[list[int]]:
        rows = [r for r in rows if active[r] == want]
        return [rows[j:j + cfg.micro_batch_size] for j in range(0, len(rows), cfg.micro_batch_size)]

    trained = [c for m in minis for c in micro(m, True)]
    old = frozen_logprobs(cfg, model, rollouts, trained)[0] if cfg.ppo_epochs > 1 or len(minis) > 1 else None
    ref_lp = frozen_logprobs(cfg, ref, rollouts, trained)[0] if ref is not None else None
    params = [p for p in model.parameters() if p.requires_grad]
    sums = dict.fromkeys(("loss", "grad_norm", "clipped", "tokens", "entropy", "ent_tokens", "kl"), 0.0)
    updates, bad, grad_norm = 0, None, 0.0
    model.train()
    for epoch in range(cfg.ppo_epochs):
        for m in minis:
            norm = normalizer(mode, rollouts.completion_mask[m], cfg.max_new_tokens)
            optimizer.zero_grad(set_to_none=True)
            losses: list[float] = []
            for rows in micro(m, True):
                p_ids, p_mask, c_ids, c_mask = micro_rows(rollouts, rows, device)
                W = c_ids.shape[1]
                with autocast(cfg, model):
                    logp, ent = forward_logprobs(model, p_ids, p_mask, c_ids, c_mask, cfg.temperature, epoch == 0)
                logp = logp.float()
                old_lp = old[rows, :W] if old is not None else logp.detach()
                per_token, clipped, kl = clipped_surrogate(
                    logp, old_lp, advantages[rows].to(device), clip_low=cfg.clip_low,
                    clip_high=cfg.resolved_clip_high(), beta=cfg.beta,
                    ref_logp=ref_lp[rows, :W] if ref_lp is not None else None)
                loss = aggregate(per_token, c_mask, mode, norm)
                loss.backward()
                mask = c_mask.bool()
                losses.append(float(loss.detach()))
                sums["loss"] += losses[-1]
                sums["clipped"] += float(clipped[mask].sum())
                sums["tokens"] += float(mask.sum())
                if ent is not None:
                    sums["entropy"] += float(ent[mask].sum())
                    sums["ent_tokens"] += float(mask.sum())
                if kl is not None:
                    sums["kl"] += float(kl.detach()[mask].sum())
            for rows in micro(m, False):  # zero-advantage rows: never clipped; entropy measured without a graph
                sums["tokens"] += float(rollouts.completion_mask[rows].sum())
                if epoch == 0:
                    _, ent = frozen_logprobs(cfg, model, select_rows(rollouts, rows), [list(range(len(rows)))], True)
                    mask = rollouts.completion_mask[rows].bool().to(ent.device)
                    sums["entropy"] += float(ent[mask].sum())
                    sums["ent_tokens"] += float(mask.sum())
            for p in params:  # untouched parameters get an exact zero gradient, as a full backward would give
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            bad = bad_update(cfg, grad_norm, losses)
            if bad:  # no optimizer step: the weights and AdamW state stay as they were; the rest of the step is dropped
                optimizer.zero_grad(set_to_none=True)
                break
            sums["grad_norm"] += grad_norm
            optimizer.step()
            updates += 1
        if bad:
            break
    model.eval()
    n = max(updates, 1)
    stats = {
        "loss": sums["loss"] / n if updates else (losses[-1] if losses else 0.0),
        "grad_norm": sums["grad_norm"] / n if updates else grad_norm,
        "bad_step": bad,
        "clip_ratio": sums["clipped"] / max(sums["tokens"], 1.0),
        "entropy": sums["entropy"] / max(sums["ent_tokens"], 1.0),
        "advantage_abs": float(advantages.abs().mean()),
        "updates": updates,
    }
    if cfg.beta > 0:
        stats["kl"] = sums["kl"] / max(sums["tokens"], 1.0)
    return stats


def bad_update(cfg: TrainConfig, grad_norm: float, losses: list[float]) -> str | None:
    """Why an update must not be applied (NaN/inf loss or gradient, or a gradient norm above --bad-grad-norm)."""
    if not all(math.isfinite(x) for x in losses):
        return "non-finite loss"
    if not math.isfinite(grad_norm):
        return "non-finite gradient"
    if cfg.bad_grad_norm > 0 and grad_norm > cfg.bad_grad_norm:
        return f"gradient norm {grad_norm:.4g} > --bad-grad-norm {cfg.bad_grad_norm:g}"
    return None


def no_update(cfg: TrainConfig, model, made: list[Groups]) -> dict:
    """Every group had equal rewards after all rounds: no optimizer step; entropy still measured."""
    rollouts = made[0].rollouts
    N = rollouts.completion_ids.shape[0]
    chunks = [list(range(i, min(i + cfg.micro_batch_size, N))) for i in range(0, N, cfg.micro_batch_size)]
    _, ent = frozen_logprobs(cfg, model, rollouts, chunks, with_entropy=True)
    mask = rollouts.completion_mask.bool().to(ent.device)
    stats = {"loss": 0.0, "grad_norm": 0.0, "bad_step": None, "clip_ratio": 0.0, "advantage_abs": 0.0, "updates": 0,
             "entropy": float(ent[mask].mean()) if mask.any() else 0.0}
    if cfg.beta > 0:
        stats["kl"] = None
    return stats


def sample_records(step: int, made: list[Groups], prompts: PromptBuilder, limit: int) -> list[dict]:
    """The first rollouts of the step for samples.jsonl: prompt tail, completion, answer, label, reward."""
    records = []
    for groups in made:
        G = len(groups.answers) // len(groups.samples)
        for r, (text, answer) in enumerate(zip(groups.rollouts.texts, groups.answers)):
            s = groups.samples[r // G]
            records.append({"step": step, "key": s.key, "bucket": s.bucket, "entropy": s.entropy,
                            "prompt_tail": prompts.text(s.context)[-300:], "completion": text, "answer": answer,
                            "label": "".join(s.label_tokens), "label_tokens": s.label_tokens,
                            "correct": prefix_match(answer, s.label_tokens), "reward": float(groups.rewards[r])})
            if len(records) == limit:
                return records
    return records


def eval_config(cfg: TrainConfig) -> EvalConfig:
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EvalConfig) if hasattr(cfg, f.name)}
    shared.pop("out")
    return EvalConfig(**shared, limit=cfg.eval_limit, samples=cfg.eval_samples, split="auto")


def train(cfg: TrainConfig, *, reward_fns: list[RewardFn] = (), engine: RolloutEngine | None = None,
          quiet: bool = False) -> Path:
    """Run (or resume) `cfg.steps` RPT steps; returns the output directory."""
    out = Path(cfg.out)
    ckpt = prepare_out(cfg)
    seed_everything(cfg.seed)
    policy = load_policy(str(ckpt) if ckpt else cfg.model, cfg.device, cfg.dtype)
    model, tok = policy.model, policy.tokenizer
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = freeze(load_policy(cfg.model, cfg.device, cfg.dtype).model) if cfg.beta > 0 else None
    data = TrainSamples(cfg, tok)
    prompts = PromptBuilder(tok, cfg.template, cfg.chat_template)
    reward_fn = combine([rpt_reward(cfg.reward_correct, cfg.reward_wrong, cfg.reward_no_answer),
                         *[load_reward_fn(s) for s in cfg.reward], *reward_fns])
    engine = engine or HFRollout(model, tok, eos_ids(policy), cfg.rollout_batch_size)
    params = SamplingParams(n=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, top_k=cfg.top_k)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    start = 0
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        warn_changed(state.get("config", {}), to_dict(cfg))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        data.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        start = state["step"]
    if start >= cfg.steps:
        print(f"note: '{out}' is already at step {start} >= --steps {cfg.steps}; nothing to do", file=sys.stderr)
        return out
    logger = MetricsLogger(str(out), start_step=start, total_steps=cfg.steps, tensorboard=cfg.tensorboard, quiet=quiet)
    ecfg = eval_config(cfg) if cfg.eval_every else None
    if ecfg and cfg.heldout_fraction == 0:
        print("warning: --eval-every without --heldout-fraction evaluates on training documents", file=sys.stderr)
    eval_positions = select_positions(data.shards, tok, ecfg) if ecfg else None
    if not quiet:
        where = cfg.bucket if cfg.min_entropy is None else f"entropy > {cfg.min_entropy}"
        print(f"training on {len(data)} positions from '{cfg.shards}' ({where}), {cfg.batch_prompts} contexts x "
              f"{cfg.group_size} rollouts per step, steps {start + 1}..{cfg.steps}", flush=True)
    bad_run = 0
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        batch, made, stats = collect(cfg, data, prompts, engine, reward_fn, params)
        stats |= update_policy(cfg, model, ref, optimizer, batch) if batch else no_update(cfg, model, made)
        engine.sync(model)
        metrics = {"step": step, "lr": scheduler.get_last_lr()[0], **stats, "seconds": time.perf_counter() - t0}
        with warnings.catch_warnings():  # a step without an update (no informative group) is not a bug
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            scheduler.step()
        if ecfg and step % cfg.eval_every == 0:
            result = evaluate(model, tok, engine, ecfg, data.shards, eval_positions)
            write_json(result, out / "eval" / f"step-{step:06d}.json")
            metrics |= {f"eval/{b}/{k}": v for b in EVAL_BUCKETS for k, v in result[b].items()}
        logger.log(metrics)
        bad_run = bad_run + 1 if stats["bad_step"] else 0
        if bad_run:
            check_bad_step(cfg, step, stats["bad_step"], bad_run, out)
        if cfg.log_samples_every and step % cfg.log_samples_every == 0:
            logger.samples(sample_records(step, made, prompts, limit=2 * cfg.group_size))
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(out, step, model, tok, {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "sampler": data.state_dict(), "config": to_dict(cfg), "base_model": cfg.model,
            }, keep=cfg.keep_checkpoints)
    logger.close()
    return out


def check_bad_step(cfg: TrainConfig, step: int, reason: str, in_a_row: int, out: Path) -> None:
    """A bad update was dropped: warn and go on (--on-bad-step skip), or stop before anything is saved."""
    if cfg.on_bad_step == "skip" and in_a_row < cfg.max_bad_steps:
        print(f"warning: step {step}: {reason}; update skipped (weights unchanged)", file=sys.stderr, flush=True)
        return
    last = latest_checkpoint(out)
    why = "--on-bad-step stop" if cfg.on_bad_step == "stop" else f"{in_a_row} bad steps in a row (--max-bad-steps)"
    where = f"the last good checkpoint is '{last}'" if last else "no checkpoint was saved yet"
    raise UserError(f"step {step}: {reason}; stopped ({why}) and {where}: lower --lr or check the data, "
                    "then rerun with --resume")


def warn_changed(saved: dict, now: dict) -> None:
    changed = [k for k in now if k not in _RESUMABLE and k in saved and saved[k] != now[k]]
    if changed:
        print(f"warning: resuming with changed options ({', '.join(changed)}); "
              "the run will not equal an uninterrupted one", file=sys.stderr)
