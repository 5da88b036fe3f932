"""The RPT loop, top to bottom: draw contexts, roll out G completions each, reward by prefix match, keep groups
whose rewards differ (dynamic sampling), group advantages, clipped-surrogate updates, log, evaluate, checkpoint.

Under torchrun (WORLD_SIZE > 1) the policy (and reference) are FSDP2-sharded; every rank draws the same global
contexts and rolls out its stripe of whole groups; loss normalisers and metrics are global; rank 0 writes.
The collective bookkeeping lives in rpt_train/distributed.py."""
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
from rpt_train import distributed
from rpt_train.advantages import group_advantages, group_std
from rpt_train.checkpoint import latest_checkpoint, load_trainer_state, restore_rng, save_checkpoint, tidy_checkpoints
from rpt_train.config import EvalConfig, TrainConfig, to_dict
from rpt_train.evaluate import EVAL_BUCKETS, evaluate, select_positions, write_json
from rpt_train.loss import AGGREGATION, aggregate, clipped_surrogate, forward_logprobs, normalizer
from rpt_train.metrics import MetricsLogger
from rpt_train.policy import eos_ids, freeze, load_policy
from rpt_train.reward import RewardFn, RewardInput, combine, extract_answer, load_reward_fn, prefix_match, rpt_reward
from rpt_train.rollout import (HFRollout, RolloutBatch, RolloutEngine, SamplingParams, concat_batches, empty_batch,
                               select_rows)
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
    index: list[int] | None = None  # per group: its place in the step's global batch (all ranks), None = in order


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
    texts = [prompts.completion(t) for t in rollouts.texts]
    answers = [extract_answer(t, answer_format) for t in texts]
    per_row = [s for s in samples for _ in range(params.n)]
    items = [RewardInput(completion=t, answer=a, label_tokens=s.label_tokens, context=s.context)
             for t, a, s in zip(texts, answers, per_row)]
    rewards = reward_fn(items) if items else []
    return Groups(samples=samples, rollouts=rollouts, rewards=torch.tensor(rewards, dtype=torch.float32),
                  answers=answers)


def collect(cfg: TrainConfig, data: TrainSamples, prompts: PromptBuilder, engine: RolloutEngine,
            reward_fn: RewardFn, params: SamplingParams) -> tuple[Groups | None, list[Groups], dict]:
    """One step's training groups. With dynamic sampling, groups whose rewards all agree (zero std, no signal)
    are dropped and new contexts drawn, at most --max-sampling-rounds rounds; stats cover every rollout made.
    Several ranks: each round every rank draws the same global contexts (the sampler state stays global) and rolls
    out contexts rank, rank + W, ...; the keep flags are shared so that every rank knows the global count still
    needed and where its kept groups sit in the batch one process would have built. The batch is None when no
    rank kept a group, and empty on a rank that kept none while others did."""
    G, need, rounds, made, kept, index = cfg.group_size, cfg.batch_prompts, 0, [], [], []
    rank, world, kept_before = distributed.rank(), distributed.world_size(), 0
    t0 = time.perf_counter()
    while need > 0 and rounds < (cfg.max_sampling_rounds if cfg.dynamic_sampling else 1):
        rounds += 1
        drawn = data.next_batch(need)
        groups = rollout_groups(drawn[rank::world], prompts, engine, reward_fn, params, cfg.answer_format)
        made.append(groups)
        keep = (group_std(groups.rewards, G) > 0).tolist() if cfg.dynamic_sampling else [True] * len(groups.samples)
        stripes = distributed.all_gather_objects(keep)
        flags = [stripes[i % world][i // world] for i in range(len(drawn))]  # every rank's keep flags, draw order
        if any(keep):
            mine = [g for g, k in enumerate(keep) if k]
            kept.append(take_groups(groups, mine, G))
            before = np.cumsum([0] + flags)
            index += [kept_before + int(before[rank + g * world]) for g in mine]
        kept_before += sum(flags)
        need -= sum(flags)
    rollout_seconds = distributed.all_max(time.perf_counter() - t0)
    rewards = distributed.cat_from_ranks(torch.cat([g.rewards for g in made]))  # whole groups: still contiguous
    answers = [a for g in made for a in g.answers]
    labels = [s.label_tokens for g in made for s in g.samples for _ in range(G)]
    correct = distributed.cat_from_ranks(torch.tensor([prefix_match(a, lab) for a, lab in zip(answers, labels)],
                                                      dtype=torch.bool))
    answered = distributed.cat_from_ranks(torch.tensor([a is not None for a in answers], dtype=torch.bool))
    lengths = distributed.cat_from_ranks(torch.cat([g.rollouts.lengths for g in made]).float())
    tokens = float(lengths.sum())
    stats = {
        "reward": float(rewards.mean()),
        "reward_std": float(group_std(rewards, G).mean()),
        "frac_reward_zero_std": float((group_std(rewards, G) == 0).float().mean()),
        "ntr_accuracy": float(np.mean(correct.numpy())),
        "answer_rate": float(np.mean(answered.numpy())),
        "completion_length": float(lengths.mean()),
        "sampling_rounds": rounds,
        "groups_kept": kept_before,
        "rollout_tokens": int(tokens),
        "rollout_seconds": rollout_seconds,
        "rollout_tokens_per_s": tokens / max(rollout_seconds, 1e-9),
        "samples_skipped": data.build.skipped,
    }
    batch = None
    if kept:
        batch = Groups(samples=[s for g in kept for s in g.samples], answers=[a for g in kept for a in g.answers],
                       rollouts=concat_batches([g.rollouts for g in kept], pad=engine_pad(engine)),
                       rewards=torch.cat([g.rewards for g in kept]), index=index)
    elif kept_before:
        batch = Groups(samples=[], answers=[], rollouts=empty_batch(), rewards=torch.zeros(0), index=[])
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
    for rows in distributed.pad_to_max(chunks):
        if rows is None:  # another rank has more chunks: a discarded forward keeps the FSDP all-gathers paired
            forward_logprobs(model, *distributed.dummy_inputs(device), cfg.temperature)
            continue
        p_ids, p_mask, c_ids, c_mask = micro_rows(rollouts, rows, device)
        with autocast(cfg, model):
            lp, e = forward_logprobs(model, p_ids, p_mask, c_ids, c_mask, cfg.temperature, with_entropy)
        out[rows, :lp.shape[1]] = lp.float()
        if e is not None:
            ent[rows, :e.shape[1]] = e.float()
    return out, ent


def mini_batches(cfg: TrainConfig, batch: Groups) -> list[list[int]]:
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


def update_policy(cfg: TrainConfig, model, ref, optimizer, batch: Groups) -> dict:
    """--ppo-epochs passes over the batch, one optimizer update per mini-batch, micro-batches accumulating grads.
    Rows with advantage 0 (and beta = 0) have exactly zero gradient: they count in the loss normaliser but skip
    the backward pass. Old log-probs are recomputed before the first update when there is more than one.
    Several ranks: each rank's loss is its rows' share of the global normaliser and FSDP sums the gradients, so
    the update equals one process's on the whole batch; a rank short of micro-batches runs zero-weight passes."""
    rollouts = batch.rollouts
    advantages = group_advantages(batch.rewards, cfg.group_size, scale=cfg.resolved_scale_rewards(),
                                  anchor=cfg.advantage_anchor)
    device, mode = next(model.parameters()).device, AGGREGATION[cfg.loss]
    active = ((advantages != 0) | (cfg.beta > 0)).tolist()
    minis = mini_batches(cfg, batch)

    def micro(rows: list[int], want: bool) -> list[list[int]]:
        rows = [r for r in rows if active[r] == want]
        return [rows[j:j + cfg.micro_batch_size] for j in range(0, len(rows), cfg.micro_batch_size)]

    trained = [c for m in minis for c in micro(m, True)]
    old = frozen_logprobs(cfg, model, rollouts, trained)[0] if cfg.ppo_epochs > 1 or len(minis) > 1 else None
    ref_lp = frozen_logprobs(cfg, ref, rollouts, trained)[0] if ref is not None else None
    params = [p for group in optimizer.param_groups for p in group["params"]]  # sharded ones under FSDP2
    sums = dict.fromkeys(("loss", "grad_norm", "clipped", "tokens", "entropy", "ent_tokens", "kl"), 0.0)
    updates, bad, grad_norm, mini_loss = 0, None, 0.0, 0.0
    model.train()
    for epoch in range(cfg.ppo_epochs):
        for m in minis:
            norm = global_normalizer(mode, rollouts.completion_mask[m], cfg.max_new_tokens)
            optimizer.zero_grad(set_to_none=True)
            losses: list[float] = []
            for rows in distributed.pad_to_max(micro(m, True)):
                if rows is None:  # another rank has more micro-batches: a zero-weight pass (its collectives pair up)
                    with autocast(cfg, model):
                        logp, _ = forward_logprobs(model, *distributed.dummy_inputs(device), cfg.temperature)
                    (logp.float().sum() * 0.0).backward()
                    continue
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
                sums["clipped"] += float(clipped[mask].sum())
                sums["tokens"] += float(mask.sum())
                if ent is not None:
                    sums["entropy"] += float(ent[mask].sum())
                    sums["ent_tokens"] += float(mask.sum())
                if kl is not None:
                    sums["kl"] += float(kl.detach()[mask].sum())
            idle = micro(m, False)  # zero-advantage rows: never clipped; entropy measured without a graph
            sums["tokens"] += sum(float(rollouts.completion_mask[rows].sum()) for rows in idle)
            if epoch == 0:
                _, ent = frozen_logprobs(cfg, model, rollouts, idle, with_entropy=True)
                for rows in idle:
                    mask = rollouts.completion_mask[rows].bool().to(ent.device)
                    sums["entropy"] += float(ent[rows][mask].sum())
                    sums["ent_tokens"] += float(mask.sum())
            for p in params:  # untouched parameters get an exact zero gradient, as a full backward would give
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            grad_norm = distributed.clip_grad_norm(params, max_norm)  # of the global gradient
            mini_loss = distributed.all_sum([sum(losses)])[0]  # NaN/inf on any rank makes it non-finite on all
            bad = bad_update(cfg, grad_norm, mini_loss)
            if bad:  # no optimizer step: the weights and AdamW state stay as they were; the rest of the step is dropped
                optimizer.zero_grad(set_to_none=True)
                break
            sums["loss"] += mini_loss
            sums["grad_norm"] += grad_norm
            optimizer.step()
            updates += 1
        if bad:
            break
    model.eval()
    n = max(updates, 1)
    keys = ("clipped", "tokens", "entropy", "ent_tokens", "kl")
    sums |= dict(zip(keys, distributed.all_sum([sums[k] for k in keys])))
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


def bad_update(cfg: TrainConfig, grad_norm: float, loss: float) -> str | None:
    """Why an update must not be applied (NaN/inf loss or gradient, or a gradient norm above --bad-grad-norm)."""
    if not math.isfinite(loss):
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
    ent = distributed.cat_from_ranks(ent[rollouts.completion_mask.bool().to(ent.device)])
    stats = {"loss": 0.0, "grad_norm": 0.0, "bad_step": None, "clip_ratio": 0.0, "advantage_abs": 0.0, "updates": 0,
             "entropy": float(ent.mean()) if len(ent) else 0.0}
    if cfg.beta > 0:
        stats["kl"] = None
    return stats


def sample_records(step: int, made: list[Groups], prompts: PromptBuilder, limit: int) -> list[dict]:
    """The first rollouts of the step for samples.jsonl: prompt tail, completion, answer, label, reward (under
    torchrun: those of rank 0)."""
    records = []
    for groups in (g for g in made if g.samples):  # a rank's share of a refill round may be empty
        G = len(groups.answers) // len(groups.samples)
        for r, (text, answer) in enumerate(zip(groups.rollouts.texts, groups.answers)):
            s = groups.samples[r // G]
            records.append({"step": step, "key": s.key, "bucket": s.bucket, "entropy": s.entropy,
                            "prompt_tail": prompts.text(s.context)[-300:], "answer": answer,
                            "completion": prompts.completion(text),
                            "label": "".join(s.label_tokens), "label_tokens": s.label_tokens,
                            "correct": prefix_match(answer, s.label_tokens), "reward": float(groups.rewards[r])})
            if len(records) == limit:
                return records
    return records


def eval_config(cfg: TrainConfig) -> EvalConfig:
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EvalConfig) if hasattr(cfg, f.name)}
    shared.pop("out")
    return EvalConfig(**shared, limit=cfg.eval_limit, samples=cfg.eval_samples, split="auto")


def rollout_engine(cfg: TrainConfig, model, policy) -> RolloutEngine:
    """HFRollout on the policy. Sharded: generation either inside one all-gather of the full weights per call
    (--rollout-gather) or through FSDP's per-layer all-gathers in lockstep; no torch.compile on a sharded model."""
    if not distributed.is_sharded(model):
        return HFRollout(model, policy.tokenizer, eos_ids(policy), cfg.rollout_batch_size)
    engine = HFRollout(model, policy.tokenizer, eos_ids(policy), cfg.rollout_batch_size, compile=False,
                       lockstep=not cfg.rollout_gather)
    return distributed.GatheredEngine(engine, model) if cfg.rollout_gather else engine


def train(cfg: TrainConfig, *, reward_fns: list[RewardFn] = (), engine: RolloutEngine | None = None,
          quiet: bool = False) -> Path:
    """Run (or resume) `cfg.steps` RPT steps; returns the output directory. Under torchrun (WORLD_SIZE > 1) every
    rank runs this, the model FSDP2-sharded over all of them; rank 0 writes the logs."""
    device = distributed.init_from_env(cfg.device)
    try:
        return _train(cfg, device, reward_fns, engine, quiet or not distributed.is_main())
    finally:
        distributed.shutdown()


def _train(cfg: TrainConfig, device: str, reward_fns, engine: RolloutEngine | None, quiet: bool) -> Path:
    out = Path(cfg.out)
    ckpt = distributed.broadcast_from_main(lambda: prepare_out(cfg))
    seed_everything(distributed.rank_seed(cfg.seed))
    policy = load_policy(str(ckpt) if ckpt else cfg.model, device, cfg.dtype)
    model, tok = policy.model, policy.tokenizer
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref = load_policy(cfg.model, device, cfg.dtype).model if cfg.beta > 0 else None
    if distributed.world_size() > 1:
        model = distributed.shard_model(model, device)
        ref = distributed.shard_model(ref, device) if ref is not None else None
    ref = freeze(ref) if ref is not None else None
    data = TrainSamples(cfg, tok)
    prompts = PromptBuilder(tok, cfg.template, cfg.chat_template, cfg.response_prefix)
    reward_fn = combine([rpt_reward(cfg.reward_correct, cfg.reward_wrong, cfg.reward_no_answer),
                         *[load_reward_fn(s) for s in cfg.reward], *reward_fns])
    engine = engine or rollout_engine(cfg, model, policy)
    params = SamplingParams(n=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, top_k=cfg.top_k)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg))
    start = 0
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        if distributed.is_main():
            warn_changed(state.get("config", {}), to_dict(cfg))
        distributed.load_optimizer_state_dict(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        data.load_state_dict(state["sampler"])
        start = state["step"]
        if not restore_rng(state["rng"]):
            distributed.warn(f"'{ckpt}' holds the RNG states of another number of ranks; reseeding each rank from "
                             "(--seed, step, rank): the run goes on but will not equal an uninterrupted one")
            seed_everything(distributed.rank_seed(cfg.seed, start))
    if start >= cfg.steps:
        if distributed.is_main():
            print(f"note: '{out}' is already at step {start} >= --steps {cfg.steps}; nothing to do", file=sys.stderr)
        return out
    logger = MetricsLogger(str(out), start_step=start, total_steps=cfg.steps, tensorboard=cfg.tensorboard, quiet=quiet,
                           write=distributed.is_main())
    ecfg = eval_config(cfg) if cfg.eval_every else None
    if ecfg and cfg.heldout_fraction == 0:
        distributed.warn("--eval-every without --heldout-fraction evaluates on training documents")
    eval_positions = select_positions(data.shards, tok, ecfg) if ecfg else None
    if not quiet:
        where = cfg.bucket if cfg.min_entropy is None else f"entropy > {cfg.min_entropy}"
        ranks = f" on {distributed.world_size()} ranks" if distributed.world_size() > 1 else ""
        print(f"training on {len(data)} positions from '{cfg.shards}' ({where}), {cfg.batch_prompts} contexts x "
              f"{cfg.group_size} rollouts per step{ranks}, steps {start + 1}..{cfg.steps}", flush=True)
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
            if distributed.is_main():
                write_json(result, out / "eval" / f"step-{step:06d}.json")
            metrics |= {f"eval/{b}/{k}": v for b in EVAL_BUCKETS for k, v in result[b].items()}
        logger.log(metrics)
        bad_run = bad_run + 1 if stats["bad_step"] else 0
        if bad_run:
            check_bad_step(cfg, step, stats["bad_step"], bad_run, out)
        if cfg.log_samples_every and step % cfg.log_samples_every == 0 and distributed.is_main():  # rank 0's rollouts
            logger.samples(sample_records(step, made, prompts, limit=2 * cfg.group_size))
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(out, step, model, tok, {
                "optimizer": distributed.optimizer_state_dict(model, optimizer), "scheduler": scheduler.state_dict(),
                "sampler": data.state_dict(), "config": to_dict(cfg), "base_model": cfg.model,
            }, keep=cfg.keep_checkpoints)
    logger.close()
    return out


def check_bad_step(cfg: TrainConfig, step: int, reason: str, in_a_row: int, out: Path) -> None:
    """A bad update was dropped: warn and go on (--on-bad-step skip), or stop before anything is saved."""
    if cfg.on_bad_step == "skip" and in_a_row < cfg.max_bad_steps:
        distributed.warn(f"step {step}: {reason}; update skipped (weights unchanged)")
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
