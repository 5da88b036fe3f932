"""The supervised control of an RPT experiment: cross-entropy on the true continuation in the RPT answer format
(`\\boxed{label}` then EOS) after the same prompt, with rpt-train's optimizer, lr schedule, gradient clipping and
float32 masters. Checkpointed like `rpt-train run` (OUT/checkpoints/step-N), so a stopped arm resumes.

Which contexts each step trains on is the caller's `batches(data, step)`: the next ones of the training stream (a
warm start, a FLOP-matched arm) or exactly those an RPT run rolled out (its contexts.jsonl). `max_tokens` stops
before the first step that would pass a token budget (a FLOP-matched arm)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from rpt_common.errors import UserError
from rpt_train.config import TrainConfig, to_dict
from rpt_train.rundir import read_saved


# What an sft arm's result depends on, and nothing else: the options compared when it resumes or is asked again
# finished (check_sft_options). Not rpt's rule (everything but trainer.RUNTIME_ONLY): SFT reads none of the RL
# options (group size, loss, clipping, rewards, temperature, sampler, --objective: its targets are always answers,
# ...), and micro_batch_size, gradient_checkpointing, rollout_batch_size and static_cache change how, not what, it
# computes (the loss is a token mean over the whole step). The model's path is not compared on resume (as for rpt: a
# resume takes the weights from the checkpoint, and the path may move); a finished arm's is (check_asked). What it
# does read: the positions (TrainSamples: shards, split, bucket or curriculum stages, exclude_docs, seed of their
# order); the targets built from them (labels, context cut, prompt, answer format; label_tokens, sft_train's
# argument); the optimizer, lr schedule, clipping and compute dtype; batch_prompts (the caller's contexts per step).
# --steps: within the schedule's horizon (trainer.schedule_horizon).
OLDER = {"curriculum": [], "curriculum_steps": []}  # what an sft run saved before it read the curriculum
SFT_OPTIONS = ("shards", "entropy_metric", "bucket_thresholds", "heldout_fraction", "split_seed",
               "split_block_windows", "bucket", "curriculum", "curriculum_steps", "min_entropy", "exclude_docs",
               "seed", "labels_length", "max_context_tokens", "template", "chat_template", "response_prefix",
               "answer_format", "batch_prompts", "lr", "weight_decay", "warmup_steps", "lr_schedule", "grad_clip",
               "dtype", "bf16")


def sft_options(config: dict, label_tokens: int) -> dict:
    """The SFT_OPTIONS of a config dict (to_dict of a TrainConfig, or a checkpoint's saved one), and label_tokens;
    older checkpoints without split_block_windows split by document (0)."""
    config = {"split_block_windows": 0, **OLDER, **config}
    return {**{k: config.get(k) for k in SFT_OPTIONS}, "label_tokens": label_tokens}


def check_sft_options(saved: dict, cfg: TrainConfig, label_tokens: int, out: Path) -> None:
    """Refuse, in one sentence (trainer.OptionsChanged), to resume (or answer for a finished) `out` whose saved
    options (sft_options) differ from cfg's in any option the result depends on; saved options without the
    curriculum (before sft read it) had none."""
    from rpt_train.trainer import check_options

    check_options({**OLDER, **saved}, sft_options(to_dict(cfg), label_tokens), out, changeable=())  # no --allow-changed


def read_record(out: Path) -> dict:
    """OUT/sft.json, a JSON object; a damaged one (truncated, empty, not an object) is refused in one sentence
    (rundir.read_saved)."""
    return read_saved(out / "sft.json", "delete it to redo the arm's finish (the arm resumes from its last "
                                        "checkpoint and writes it again)")


def asked_options(cfg: TrainConfig, max_tokens: int | None) -> dict:
    """What a finished arm is also asked with, beyond sft_options: --steps (a constant schedule has no horizon to
    check), the model's path as given, and the token budget (max_tokens: a FLOP-matched arm's)."""
    return {"steps": cfg.steps, "model": cfg.model, "max_tokens": max_tokens}


def check_asked(saved: dict | None, now: dict, out: Path) -> None:
    """Refuse, in one sentence, to answer for a finished `out` asked with another --steps, --model or token budget
    than it ran with (asked_options); an sft.json written before it recorded them (None) cannot be checked."""
    if saved is None:
        return
    names = {"steps": "--steps", "model": "--model (its path as given; a moved model counts as another)",
             "max_tokens": "the token budget max_tokens (a FLOP-matched arm's)"}
    changed = [k for k in names if k in saved and saved[k] != now[k]]
    if changed:
        was = "; ".join(f"{names[k]}: {saved[k]!r} there, {now[k]!r} now" for k in changed)
        raise UserError(f"'{out}' holds a finished sft arm run with other options ({was}); ask it with the same "
                        "options, or train a new arm in another --out")


def finished_totals(cfg: TrainConfig, out: Path, label_tokens: int, max_tokens: int | None = None) -> dict:
    """A finished `out` asked again: its totals (sft.json), when asked with the options it ran with. sft.json records
    them (and the lr schedule's horizon, --steps, the model's path and the token budget); one written before it did:
    its last checkpoint's trainer_state.json. The checkpoint's trainer_state.pt (optimizer moments: ~112 GB at 14B) is
    never loaded, nor needed intact. A damaged sft.json is refused (read_record)."""
    from rpt_train.checkpoint import latest_checkpoint
    from rpt_train.trainer import schedule_horizon

    record = read_record(out)
    saved, state = record.pop("options", None), {"horizon": record.pop("horizon", None)}
    asked = record.pop("asked", None)
    if saved is None:
        ckpt = latest_checkpoint(out)
        try:
            config = json.loads((ckpt / "trainer_state.json").read_text())["config"] if ckpt else None
        except (OSError, ValueError, KeyError, TypeError):
            config = None
        if isinstance(config, dict):
            saved, state = sft_options(config, record.get("label_tokens", 1)), {"config": config}
    if saved is None:
        print(f"note: '{out / 'sft.json'}' records no options (an older arm without a readable checkpoint): its "
              "totals are given back unchecked", file=sys.stderr)
        return record
    check_sft_options(saved, cfg, label_tokens, out)
    schedule_horizon(cfg, state, out)
    check_asked(asked, asked_options(cfg, max_tokens), out)
    return record


def answer_target(label: str, response_prefix: str) -> str:
    """What the policy should generate after the prompt for `label`: the boxed answer minus the response prefix
    that the prompt already ends with."""
    answer = "\\boxed{" + label + "}"
    return answer[len(response_prefix):] if response_prefix and answer.startswith(response_prefix) else answer


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()] if Path(path).exists() else []


def same_contexts(path: Path):
    """`batches` for sft_train: step by step, the contexts an RPT run rolled out (its contexts.jsonl at `path`); None
    for one that gives the sft arm no sample (sft_train drops and counts it): an rlp arm's position whose label no
    \\boxed{} answer can express (rlp trains on uncut labels, SFT's targets are answers). The indices are into the
    table that run drew the step from: `data` must be built with its position options, its --curriculum included
    (sft_train moves a CurriculumSamples to the step's stage before calling this). Where the file records the
    positions' keys (runs since it does), each rebuilt sample is checked against its key: another table (other
    shards, split, bucket, exclusions) is refused in one sentence, never trained on silently."""
    records = {r["step"]: r for r in read_jsonl(path)}

    def batches(data, step: int) -> list:
        record = records.get(step, {})
        samples = data.build.many(record.get("contexts", []))
        keys = record.get("keys")
        if keys is not None:
            wrong = [(k, s.key) for k, s in zip(keys, samples) if s is not None and s.key != k]
            if wrong or len(keys) != len(samples):
                was, now = wrong[0] if wrong else (len(keys), len(samples))
                raise UserError(f"'{path}', step {step}: its context indices rebuild other positions here ({now!r} "
                                f"for {was!r}, {len(wrong)} of {len(samples)} differ): the sft arm's candidate table "
                                "(shards, held-out split, bucket or curriculum, exclude-docs) is not the one that "
                                "run drew from; give the sft arm that run's position options")
        return samples
    return batches


def next_contexts(k: int):
    """`batches` for sft_train: the next k contexts of the training stream at every step."""
    return lambda data, step: data.next_batch(k)


def sft_train(cfg: TrainConfig, batches, label_tokens: int = 1, max_tokens: int | None = None) -> dict:
    """Supervised cross-entropy (token mean over the step's targets) on the first `label_tokens` label tokens in the
    answer format, then EOS, of the contexts `batches(data, step)` gives at step 1..cfg.steps. Writes OUT/metrics.jsonl
    (per step: loss, lr, grad_norm, target_tokens, forward_tokens = backward_tokens = every token of every row,
    seconds), checkpoints every --save-every steps and at the end, and OUT/model. Resumes from OUT's latest checkpoint
    with the options it ran with: a change in one that its result depends on (SFT_OPTIONS, label_tokens; --steps
    beyond the lr schedule's horizon) is refused, for a finished OUT (sft.json) too; any other may change.
    `max_tokens`: stop before the first step whose tokens would bring the total past it; a resume or a finished OUT
    asked with another budget is refused, a finished OUT asked with another --steps or --model path too (a resume
    takes its weights from the checkpoint). The labels are always cut to what an answer can express, whatever
    --objective says; a context `batches` gives as None (no sample) is dropped, counted in the totals' `dropped` and
    said on stderr. Returns the totals."""
    from rpt_train.checkpoint import latest_checkpoint, load_trainer_state, restore_rng, save_checkpoint
    from rpt_train.metrics import MetricsLogger
    from rpt_train.policy import load_policy
    from rpt_train.precision import autocast
    from rpt_train.objectives import train_samples
    from rpt_train.samples import ShardSet, resolve_shard_defaults
    from rpt_train.templates import PromptBuilder
    from rpt_train.trainer import disable_dropout, lr_factor, schedule_horizon, seed_everything

    if cfg.answer_format != "boxed":
        raise UserError("the sft arm writes \\boxed{} answers; use --answer-format boxed")
    out = Path(cfg.out)
    shards = ShardSet(cfg.shards)
    resolve_shard_defaults(cfg, shards)  # as the run saved them: the shards' metric, buckets and split blocks
    if (out / "model" / "config.json").exists() and (out / "sft.json").exists():
        return finished_totals(cfg, out, label_tokens, max_tokens)
    ckpt = latest_checkpoint(out)
    state = load_trainer_state(ckpt) if ckpt else None
    if state is not None:  # a resume: with the options it ran with
        check_sft_options(sft_options(state.get("config", {}), state.get("totals", {}).get("label_tokens", 1)),
                          cfg, label_tokens, out)
        budget = state.get("totals", {}).get("budget_tokens", max_tokens)  # an older checkpoint's: not recorded
        if budget != max_tokens:
            raise UserError(f"'{out}' holds an sft run stopped with another token budget (max_tokens, a FLOP-matched "
                            f"arm's: {budget!r} there, {max_tokens!r} now); resume with the same budget (the matched "
                            "arm and model unchanged), or start a new run in another --out")
    horizon = schedule_horizon(cfg, state, out)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    # float32 masters; --dtype is the compute dtype only
    policy = load_policy(str(ckpt) if ckpt else cfg.model, cfg.device, "float32")
    model, tok = policy.model, policy.tokenizer
    disable_dropout(model)
    device = next(model.parameters()).device
    # the targets are answers, under --objective rlp too; under --curriculum one table per stage, the step's drawn from
    data = train_samples(cfg, tok, shards, answers=True)
    prompts = PromptBuilder(tok, cfg.template, cfg.chat_template, cfg.response_prefix)
    eos = tok.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, horizon))
    totals = {"steps": 0, "contexts": 0, "target_tokens": 0, "trained_tokens": 0, "label_tokens": label_tokens,
              "budget_tokens": max_tokens, "dropped": 0}
    start = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if cfg.curriculum and "curriculum" not in state["sampler"]:
            raise UserError(f"'{out}' holds an sft run stopped before sft read --curriculum (it drew from --bucket "
                            f"'{cfg.bucket}'); start a new run in another --out, or delete '{out}'")
        data.load_state_dict(state["sampler"])
        restore_rng(state["rng"])
        totals, start = {"dropped": 0, **state["totals"]}, state["step"]
    logger = MetricsLogger(str(out), start_step=start, total_steps=cfg.steps)
    model.train()
    for step in range(start + 1, cfg.steps + 1):
        t0 = time.perf_counter()
        if cfg.curriculum:  # the stage of this step (as the rpt trainer's Objective.begin_step)
            data.set_step(step)
        rows, given = [], batches(data, step)
        dropped = sum(s is None for s in given)
        for s in (s for s in given if s is not None):
            target = tok(answer_target("".join(s.label_tokens[:label_tokens]), cfg.response_prefix),
                         add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            rows.append((prompts.ids(s.context), target))
        if not rows:
            totals = {**totals, "dropped": totals["dropped"] + dropped}
            continue
        step_tokens = sum(len(p) + len(t) for p, t in rows)
        if max_tokens is not None and totals["trained_tokens"] + step_tokens > max_tokens:
            break  # the budget is spent: the next step would pass it
        n_target = sum(len(t) for _, t in rows)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i in range(0, len(rows), cfg.micro_batch_size):
            micro = rows[i:i + cfg.micro_batch_size]
            width = max(len(p) + len(t) for p, t in micro)
            ids = torch.full((len(micro), width), tok.pad_token_id, dtype=torch.long)
            attn = torch.zeros(len(micro), width, dtype=torch.long)
            labels = torch.full((len(micro), width), -100, dtype=torch.long)
            for r, (p, t) in enumerate(micro):  # right padding: positions stay 0..len-1 without position_ids
                ids[r, :len(p) + len(t)] = torch.tensor(p + t)
                attn[r, :len(p) + len(t)] = 1
                labels[r, len(p):len(p) + len(t)] = torch.tensor(t)
            with autocast(cfg, device):
                logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:].to(device),
                                                    ignore_index=-100, reduction="sum")
            (nll / n_target).backward()  # token mean over the whole step's targets
            loss_sum += float(nll.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
        opt.step()
        lr = sched.get_last_lr()[0]
        sched.step()
        totals = {**totals, "steps": step, "contexts": totals["contexts"] + len(rows),
                  "target_tokens": totals["target_tokens"] + n_target,
                  "trained_tokens": totals["trained_tokens"] + step_tokens, "dropped": totals["dropped"] + dropped}
        logger.log({"step": step, "loss": loss_sum / n_target, "lr": lr, "grad_norm": grad_norm,
                    "target_tokens": n_target, "tokens": totals["trained_tokens"], "contexts_drawn": len(rows),
                    "rollout_tokens": 0, "forward_tokens": step_tokens, "backward_tokens": step_tokens,
                    "seconds": time.perf_counter() - t0})
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(out, step, model, tok, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                                    "sampler": data.state_dict(), "totals": totals,
                                                    "config": to_dict(cfg), "horizon": horizon},
                            keep=cfg.keep_checkpoints)
    logger.close()
    if totals["dropped"]:
        print(f"note: sft '{out}': {totals['dropped']} of the contexts given gave no sample and were dropped (a label "
              "no \\boxed{} answer can express: an rlp arm trains on those)", file=sys.stderr)
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    # the options, horizon, --steps, model path and budget too: a finished arm asked again is checked without
    # loading a checkpoint. Atomically: a stop while writing leaves no truncated sft.json
    from rpt_train.evaluate import write_json

    record = {**totals, "options": sft_options(to_dict(cfg), label_tokens), "horizon": horizon,
              "asked": asked_options(cfg, max_tokens)}
    write_json(record, out / "sft.json")
    return totals
