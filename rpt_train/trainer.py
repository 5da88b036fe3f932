"""The RPT loop, top to bottom: draw contexts, roll out G completions each, reward by prefix match, keep groups
whose rewards differ (dynamic sampling), group advantages, clipped-surrogate updates, log, evaluate, checkpoint.

Rollout collection is rpt_train/collect.py, the policy update rpt_train/update.py, the memory plan
rpt_train/plan.py. Under torchrun (WORLD_SIZE > 1) the policy (and reference) are FSDP2-sharded; every rank draws
the same global contexts and rolls out its stripe of whole groups; rank 0 writes (rpt_train/distributed.py)."""
from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

from rpt_common.errors import UserError
from rpt_common.models import enable_tf32, pick_device
from rpt_common.recipe import changed_options, differ
from rpt_train import distributed, objectives, plan, precision, rundir
from rpt_train.objectives import DEFAULTS as OBJECTIVE_DEFAULTS, Objective
from rpt_train.budget import eval_generation
from rpt_train.checkpoint import (base_model_identity, latest_checkpoint, load_trainer_state, restore_rng,
                                  save_checkpoint, tidy_checkpoints)
from rpt_train.collect import collect, rollout_groups, sample_records  # noqa: F401 (tests use these from here)
from rpt_train.config import RESUME_CHANGEABLE, EvalConfig, TrainConfig, to_dict
from rpt_train.evaluate import EVAL_BUCKETS, evaluate, select_positions, write_json
from rpt_train.metrics import MetricsLogger
from rpt_train.policy import eos_ids, freeze
from rpt_train.reward import RewardFn, combine, load_reward_fn, rpt_reward
from rpt_train.rollout import HFRollout, RolloutEngine, SamplingParams
from rpt_train.sampler import LearnabilityScorer, check_sampler
from rpt_train.samples import ShardSet, TrainSamples, heldout_line, resolve_shard_defaults
from rpt_train.templates import PromptBuilder
from rpt_train.update import autocast, no_update, update_policy

# Options that may change between a run and its --resume without changing what is computed (--steps: within the
# schedule's horizon, see schedule_horizon); any other change is refused, as `rpt-data tag` refuses its own, unless
# --allow-changed names it (RESUME_CHANGEABLE: lr, grad_clip; recorded in run.json). --gradient-checkpointing
# recomputes the same activations; --micro-batch-size only splits a mini-batch whose loss is normalised over the
# whole mini-batch (rpt_train.loss.aggregate, update.global_normalizer; NtpTerm divides by all its tokens; rlp's
# reward batches forwards), with position ids from the masks: the same update up to float rounding
# (tests/test_train_loop.py), as SFT's own rule already says (rpt_train.sft.SFT_OPTIONS).
RUNTIME_ONLY = {"steps", "save_every", "keep_checkpoints", "eval_every", "log_samples_every", "tensorboard", "resume",
                "out", "model", "eval_limit", "eval_samples", "on_bad_step", "bad_grad_norm", "max_bad_steps",
                "logprob_chunk_tokens", "device_memory", "device", "share_prefix", "rollout_gather",
                "gradient_checkpointing", "micro_batch_size", "allow_changed"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def disable_dropout(model: torch.nn.Module) -> None:
    """RL needs log-probs that are a function of the weights: dropout off everywhere (as TRL does)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def lr_factor(cfg: TrainConfig, horizon: int | None = None):
    """Multiplier of --lr at training step i (0-based): linear warmup, then constant / linear / cosine to 0 at step
    `horizon` (default --steps; a resumed run keeps the one it started with)."""
    horizon = horizon or cfg.steps

    def factor(i: int) -> float:
        if i < cfg.warmup_steps:
            return (i + 1) / cfg.warmup_steps
        progress = (i - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps)
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
    return ckpt


def eval_config(cfg: TrainConfig) -> EvalConfig:
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EvalConfig) if hasattr(cfg, f.name)}
    shared.pop("out")
    shared |= eval_generation(cfg)  # what the last step generated (as `rpt-train eval` of the run directory does)
    return EvalConfig(**shared, limit=cfg.eval_limit, samples=cfg.eval_samples, split="auto")


def rollout_engine(cfg: TrainConfig, model, policy) -> RolloutEngine:
    """HFRollout on the policy. Sharded: generation either inside one all-gather of the full weights per call
    (--rollout-gather) or through FSDP's per-layer all-gathers in lockstep; no torch.compile on a sharded model."""
    device = next(model.parameters()).device
    kw = {"static_cache": cfg.static_cache, "bf16": precision.compute_dtype(cfg, device) is not None}
    if not distributed.is_sharded(model):
        return HFRollout(model, policy.tokenizer, eos_ids(policy), cfg.rollout_batch_size, **kw)
    gather = distributed.broadcast_from_main(lambda: plan.gathers_rollouts(cfg, str(device), distributed.world_size()))
    engine = HFRollout(model, policy.tokenizer, eos_ids(policy), cfg.rollout_batch_size, compile=False,
                       lockstep=not gather, **kw)
    return distributed.GatheredEngine(engine, model) if gather else engine


def train(cfg: TrainConfig, *, reward_fns: list[RewardFn] = (), engine: RolloutEngine | None = None,
          quiet: bool = False) -> Path:
    """Run (or resume) `cfg.steps` RPT steps; returns the output directory. Under torchrun (WORLD_SIZE > 1) every
    rank runs this, the model FSDP2-sharded over all of them; rank 0 writes the logs."""
    device = distributed.init_from_env(cfg.device)
    try:
        out = _train(cfg, device, reward_fns, engine, quiet or not distributed.is_main())
        distributed.barrier()  # every rank done before any tears the group down (an early exit aborted another)
        return out
    finally:
        distributed.shutdown()


def _train(cfg: TrainConfig, device: str, reward_fns, engine: RolloutEngine | None, quiet: bool) -> Path:
    out = Path(cfg.out)
    shards = ShardSet(cfg.shards)  # the inputs are checked before anything is planned, written or loaded
    check_sampler(cfg)
    resolve_shard_defaults(cfg, shards)
    ckpt = distributed.broadcast_from_main(lambda: prepare_out(cfg))
    seed_everything(distributed.rank_seed(cfg.seed))
    state = load_trainer_state(ckpt) if ckpt else None  # read by rank 0, the optimizer state kept there only
    if state is not None:
        check_resumed_options(state, cfg, out)
    changes = option_changes(state, cfg)
    horizon = schedule_horizon(cfg, state, out)
    base = check_base_model(cfg, state, out)
    check_memory(cfg, str(pick_device(device)), quiet)
    enable_tf32(pick_device(device))
    model, ref, policy = build_models(cfg, device, ckpt, base)
    tok = policy.tokenizer
    objective = Objective.build(cfg, model, tok, device, ckpt, precision.compute_dtype(cfg, pick_device(device)),
                                prepare=disable_dropout)
    data = objectives.train_samples(cfg, tok, shards)
    prompts = objective.prompts(PromptBuilder(tok, cfg.template, cfg.chat_template, cfg.response_prefix))
    shaping = [load_reward_fn(s) for s in cfg.reward] + list(reward_fns)
    reward_fn = objective.reward(rpt_reward(cfg.reward_correct, cfg.reward_wrong, cfg.reward_no_answer), model,
                                 combine(shaping) if shaping else None)
    raw_engine = engine or rollout_engine(cfg, model, policy)  # the in-run eval applies its own overflow rule
    engine = objective.engine(raw_engine)  # --think-overflow close: budget forcing around it
    scorer = (LearnabilityScorer(model, tok, batch_size=plan.scorer_batch(cfg),
                                 bf16=precision.compute_dtype(cfg, pick_device(device)) is not None)
              if cfg.sampler == "learnability" else None)
    params = SamplingParams(n=cfg.group_size, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, top_k=cfg.top_k)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, horizon))
    start = resume(cfg, ckpt, state, model, optimizer, scheduler, data) if state is not None else 0
    if state is not None:
        objective.load(state, ckpt)
    # Loaded: on rank 0 this dict holds the full float32 AdamW state (and rlp's EMA copy), 2-3x the model in host
    # memory; no reference to it outlives this line (the plan's host line counts it at load and save only)
    state = None
    objective.attach(model, optimizer)
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
    if distributed.is_main():  # only now: a run refused before its first step leaves no config behind
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        rundir.write_record(out, rundir.provenance(cfg, horizon) | {"heldout": data.split, "changes": changes})
    if changes and changes[-1]["step"] == start and not quiet:
        print("resumed with " + ", ".join(f"--{c['option'].replace('_', '-')} {c['to']!r} (was {c['from']!r})"
                                          for c in changes if c["step"] == start)
              + f" from step {start + 1} on (--allow-changed; recorded in run.json)", flush=True)
    if not quiet:
        where = cfg.bucket if cfg.min_entropy is None else f"entropy > {cfg.min_entropy}"
        ranks = f" on {distributed.world_size()} ranks" if distributed.world_size() > 1 else ""
        print(f"training on {len(data)} positions from '{cfg.shards}' ({where}), {cfg.batch_prompts} contexts x "
              f"{cfg.group_size} rollouts per step{ranks}, steps {start + 1}..{cfg.steps}", flush=True)
        if cfg.heldout_fraction > 0:
            print(heldout_line(data.split), flush=True)
    bad_run = 0
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        params = objective.begin_step(step, data, params)
        batch, made, stats = collect(cfg, data, prompts, engine, reward_fn, params, scorer)
        logger.contexts(step, stats.pop("contexts"), stats.pop("context_keys"))
        stats |= (update_policy(cfg, model, ref, optimizer, objective.trained(batch), ntp=objective.ntp) if batch
                  else no_update(cfg, model, made))
        stats |= objective.step_stats()  # the reward's policy/EMA forwards and the NTP term (issue 34)
        # compute accounting (experiment reports): every token through a forward (rollout prefill and decode, the
        # sampler's scoring pass, the update's passes) and through a backward
        stats["forward_tokens"] = (stats["prompt_tokens"] + stats["rollout_tokens"] + stats.get("scored_tokens", 0)
                                   + stats["update_forward_tokens"] + stats["objective_forward_tokens"]
                                   + stats.get("overflow_forward_tokens", 0))
        stats["backward_tokens"] += stats["objective_backward_tokens"]
        engine.sync(model)
        metrics = {"step": step, "lr": scheduler.get_last_lr()[0], **stats, "seconds": time.perf_counter() - t0}
        with warnings.catch_warnings():  # a step without an update (no informative group) is not a bug
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            scheduler.step()
        if ecfg and step % cfg.eval_every == 0:
            with autocast(cfg, model):
                result = evaluate(model, tok, raw_engine, ecfg, data.shards, eval_positions)
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
                "sampler": data.state_dict(), "config": to_dict(cfg), "base_model": base, "horizon": horizon,
                "changes": changes, **objective.state(),
            }, keep=cfg.keep_checkpoints)
    logger.close()
    return out


def build_models(cfg: TrainConfig, device: str, ckpt: Path | None, base: str):
    """(policy model, frozen reference or None, LoadedModel of the policy): the policy from the checkpoint when
    resuming, the reference from the run's base model; float32 weights (rpt_train.precision), FSDP2-sharded
    under torchrun with the compute dtype as FSDP's parameter dtype."""
    compute = precision.compute_dtype(cfg, pick_device(device))
    policy = distributed.load_sharded_policy(str(ckpt) if ckpt else cfg.model, device, compute,
                                             prepare=lambda m: prepare_policy(cfg, m))
    ref = distributed.load_sharded_policy(base, device, compute).model if cfg.beta > 0 else None
    return policy.model, freeze(ref) if ref is not None else None, policy


def prepare_policy(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """What the policy needs before sharding: dropout off, gradient checkpointing when asked."""
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def check_base_model(cfg: TrainConfig, state: dict | None, out: Path) -> str:
    """The run's base model (its KL reference): --model on a fresh start; on --resume the saved one, and with
    --beta > 0 a --model that resolves to another model is refused (the reference must not change mid-run)."""
    now = base_model_identity(cfg.model)
    if state is None or not state.get("base_model"):
        return now
    saved = state["base_model"]
    if cfg.beta > 0 and base_model_identity(saved) != now:
        raise UserError(f"--model '{cfg.model}' is not the base model '{saved}' of the run in '{out}', whose KL "
                        f"reference (--beta {cfg.beta:g}) it must stay; resume with --model '{saved}'")
    return saved


def check_memory(cfg: TrainConfig, device: str, quiet: bool) -> None:
    """Print the memory plan (rank 0) and stop with one sentence when it exceeds the device."""
    try:
        shapes = plan.load_shapes(cfg.model)
    except UserError:
        return  # the policy load below says what is wrong with --model
    size, source = plan.device_memory(cfg, device)
    memory = plan.plan_memory(cfg, shapes, world_size=distributed.world_size(), device_type=torch.device(device).type,
                              device_bytes=size, device_source=source)
    if not quiet:
        print(plan.render(memory), flush=True)
    plan.check(memory)


def resume(cfg: TrainConfig, ckpt: Path, state: dict, model, optimizer, scheduler, data: TrainSamples) -> int:
    """Optimizer (broadcast from rank 0 under FSDP2), scheduler, sampler and RNG states from a checkpoint; the step."""
    distributed.load_optimizer_state_dict(model, optimizer, state.get("optimizer", {}))
    scheduler.load_state_dict(state["scheduler"])
    if scheduler.base_lrs != [cfg.lr] * len(scheduler.base_lrs):  # --allow-changed lr (check_options refuses it else)
        set_base_lr(cfg.lr, optimizer, scheduler)
    data.load_state_dict(state["sampler"])
    if not restore_rng(state["rng"]):
        distributed.warn(f"'{ckpt}' holds the RNG states of another number of ranks; reseeding each rank from "
                         "(--seed, step, rank): the run goes on but will not equal an uninterrupted one")
        seed_everything(distributed.rank_seed(cfg.seed, state["step"]))
    return state["step"]


def set_base_lr(lr: float, optimizer, scheduler) -> None:
    """Make `lr` the schedule's base after a resume restored another: the optimizer's lr becomes lr x the schedule's
    factor at the step reached (warmup and decay go on where they were), from the next update on."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def option_changes(state: dict | None, cfg: TrainConfig) -> list[dict]:
    """The run's options changed on --resume (--allow-changed), oldest first: those the checkpoint recorded, and this
    resume's, each {"step": the checkpoint's step (the new value holds from the next one), "option", "from", "to"}.
    Saved in every checkpoint and in run.json (`changes`)."""
    if state is None:
        return []
    saved = state.get("config", {})
    now = [{"step": state["step"], "option": k, "from": saved[k], "to": getattr(cfg, k)}
           for k in RESUME_CHANGEABLE if k in cfg.allow_changed and k in saved and saved[k] != getattr(cfg, k)]
    return list(state.get("changes", [])) + now


def check_bad_step(cfg: TrainConfig, step: int, reason: str, in_a_row: int, out: Path) -> None:
    """A bad update was dropped: warn and go on (--on-bad-step skip), or stop before anything is saved."""
    if cfg.on_bad_step == "skip" and in_a_row < cfg.max_bad_steps:
        distributed.warn(f"step {step}: {reason}; update skipped (weights unchanged)")
        return
    last = latest_checkpoint(out)
    why = "--on-bad-step stop" if cfg.on_bad_step == "stop" else f"{in_a_row} bad steps in a row (--max-bad-steps)"
    where = f"the last good checkpoint is '{last}'" if last else "no checkpoint was saved yet"
    raise UserError(f"step {step}: {reason}; stopped ({why}) and {where}: check the data, or lower the learning "
                    f"rate: rerun the same command with --resume --allow-changed lr --lr X (X below {cfg.lr:g}), "
                    "which goes on from there with the new --lr")


def check_resumed_options(state: dict, cfg: TrainConfig, out: Path) -> None:
    """check_options of `cfg` against the options the checkpoint `state` saved (rpt-train run; the sft arm compares
    only its own, rpt_train.sft.SFT_OPTIONS)."""
    check_options({**OBJECTIVE_DEFAULTS, "split_block_windows": 0, **state.get("config", {})}, to_dict(cfg),
                  out, allowed=cfg.allow_changed)  # older runs: split by document, no issue-34 objective options


class OptionsChanged(UserError):
    """check_options' refusal; `details` names the options that differ and their saved values, for a caller that
    made those options itself (the experiment's warm start) and words the advice its own way."""

    def __init__(self, message: str, details: str):
        super().__init__(message)
        self.details = details


def check_options(saved: dict, now: dict, out: Path, allowed=(), changeable=RESUME_CHANGEABLE) -> None:
    """A --resume with other options than the run's (RUNTIME_ONLY ones aside, and those of `allowed` that are
    `changeable`: --allow-changed, RESUME_CHANGEABLE for `rpt-train run`, none for sft) is refused in one sentence
    (OptionsChanged), which names --allow-changed for a changeable one; a --think-close written out and `auto` are the same option when auto resolves to that text
    (rpt_train.budget)."""
    changed = changed_options(saved, now, RUNTIME_ONLY | (set(allowed) & set(changeable)))
    if "think_close" in changed and "answer_format" not in changed:
        resolved = [objectives.think_close(SimpleNamespace(think_close=c.get("think_close", "auto"),
                                                           answer_format=c.get("answer_format", "boxed")))
                    for c in (saved, now)]
        if resolved[0] == resolved[1]:
            changed.remove("think_close")
    if changed:
        details = f"{differ(changed)}: " + ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} there" for k in changed)
        can = [f"{k.replace('_', '-')}" for k in changed if k in changeable]
        allow = (f" (to change {' and '.join('--' + k for k in can)} from the resumed step on, add "
                 f"--allow-changed {','.join(can)})" if can else "")
        raise OptionsChanged(f"'{out}' holds a run with other options ({details}); resume with the same "
                             f"options{allow}, or start a new run in another --out", details)


def schedule_horizon(cfg: TrainConfig, state: dict | None, out: Path) -> int:
    """The step at which a linear / cosine schedule reaches 0: --steps on a fresh start, the run's own on --resume.
    A --steps beyond it would restart the decay (the lr would rise again): refused in one sentence."""
    if state is None or cfg.lr_schedule == "constant":
        return cfg.steps
    saved = int(state.get("horizon") or state.get("config", {}).get("steps") or cfg.steps)
    if cfg.steps > saved:
        raise UserError(f"--steps {cfg.steps} runs past the {saved} steps over which the {cfg.lr_schedule} "
                        f"--lr-schedule of '{out}' decays to 0; resume with --steps {saved} at most, or start a new "
                        f"run in another --out from --model '{out}'")
    if cfg.steps < saved and distributed.is_main():
        print(f"note: the {cfg.lr_schedule} --lr-schedule of '{out}' keeps its horizon of {saved} steps; this run "
              f"stops at step {cfg.steps}", file=sys.stderr)
    return saved
