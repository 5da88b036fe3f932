"""Thought-length probe (issue 34): how long does a policy think under a thinking template, before any RL?

Builds one experiment arm's training prompts exactly as `rpt-train run` does (the arm's options over the spec's
`base:`, the trainer's TrainSamples, PromptBuilder and HFRollout, the reward of rpt_train/reward.py gated on
`</think>` as rpt_train/objectives.py gates it), samples --rollouts completions per context at the arm's
temperature with a large budget (--new-tokens), and reports per rollout: the thought's length in tokens up to and
including the token that completes `</think>` (None: not closed), whether a `\\boxed{}` answer follows it, the
reward, and the reward the same rollout would get cut at each candidate budget + --answer-room tokens (a shorter
generation samples the same tokens up to its cut, so the cut is exact). Summary: closed share, percentiles of
closed thought lengths, share closed within 16/32/64/128/256 tokens, mean reward per budget.

A script beside pipelines/learn_check.py rather than an `rpt-train` subcommand: it reads an experiment spec's arm
(not a run's options) and writes a design note's evidence, not a training artifact.

Run: `.venv/bin/python pipelines/probe_thoughts.py --model demo --shards out/heatmap-demo --out
results/probe-thoughts.json` (32 contexts x 4 rollouts x 256 tokens of SmolLM2-135M: minutes on a CPU). Several
--model options are probed on the same contexts and written into one JSON; the last lines are one markdown line
per model (`--keep` adds to the models already in --out)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import numpy as np
import torch

from rpt_common.errors import UserError, user_errors
from rpt_train.config import TrainConfig, field_types, load_config

BUDGETS = (16, 32, 64, 128, 256)  # thinking budgets (tokens) the summary reports
PERCENTILES = (25, 50, 75, 90)
SPEC = "pipelines/experiments/smollm2-champ-objectives.yaml"


def probe_config(spec_path: str, arm: str, model: str, shards: str, overrides: dict) -> TrainConfig:
    """The arm's training options (spec base <- arm <- overrides) with `model` and `shards`; no warm start."""
    from rpt_train.experiment import load_spec

    spec = load_spec(spec_path)
    if arm not in spec.arms:
        raise UserError(f"spec '{spec_path}' has no arm '{arm}'; its arms: {', '.join(spec.arms)}")
    options = {**spec.train, **spec.arms[arm].options, **overrides, "model": model, "shards": shards}
    return load_config(TrainConfig, None, {k: v for k, v in options.items() if k in field_types(TrainConfig)})


def rollout_rows(cfg: TrainConfig, policy, samples, rollouts: int, new_tokens: int, budgets=BUDGETS,
                 engine=None) -> list[dict]:
    """Per rollout (group-contiguous): thought_tokens (None: `</think>` never written), answer_tokens (tokens after
    the thought up to the end of the first `\\boxed{}` after it; None: none), answered (a boxed answer follows the
    closed thought), reward (the trainer's, gated on `</think>`), length (tokens generated, EOS included) and
    reward_at {budget: reward of the rollout cut at budget + --answer-room tokens}. `engine`: the trainer's HFRollout
    on the policy unless given (tests script one)."""
    from rpt_train.collect import rollout_groups
    from rpt_train.objectives import Objective
    from rpt_train.policy import eos_ids
    from rpt_train.reward import THINK_END, RewardInput, extract_answer, rpt_reward
    from rpt_train.rollout import HFRollout, SamplingParams, completion_texts
    from rpt_train.templates import PromptBuilder

    tok = policy.tokenizer
    prompts = PromptBuilder(tok, cfg.template, cfg.chat_template, cfg.response_prefix)
    reward_fn = Objective(cfg, tok).reward(rpt_reward(cfg.reward_correct, cfg.reward_wrong, cfg.reward_no_answer),
                                           policy.model)
    engine = engine or HFRollout(policy.model, tok, eos_ids(policy), cfg.rollout_batch_size,
                                 static_cache=cfg.static_cache)
    params = SamplingParams(n=rollouts, max_new_tokens=new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k)
    groups = rollout_groups(samples, prompts, engine, reward_fn, params, cfg.answer_format)
    ids = [prompts.ids(s.context) for s in samples]
    comp, cmask = groups.rollouts.completion_ids, groups.rollouts.completion_mask
    per_row = [s for s in samples for _ in range(rollouts)]

    def texts_at(m: int) -> list[str]:  # every completion cut after m tokens, decoded as the trainer decodes
        return [prompts.completion(t) for t in completion_texts(tok, ids, rollouts, comp[:, :m], cmask[:, :m])]

    def rewards(texts: list[str]) -> list[float]:
        return reward_fn([RewardInput(completion=t, answer=extract_answer(t, cfg.answer_format),
                                      label_tokens=s.label_tokens, context=s.context) for t, s in zip(texts, per_row)])

    N = len(per_row)
    thought, answer_end = [None] * N, [None] * N
    for m in range(1, comp.shape[1] + 1):  # the first cut whose text closes the thought, then holds an answer
        for r, text in enumerate(texts_at(m)):
            if thought[r] is None and THINK_END in text:
                thought[r] = m
            if thought[r] is not None and answer_end[r] is None and extract_answer(text, cfg.answer_format) is not None:
                answer_end[r] = m
    cut = {b: rewards(texts_at(b + cfg.answer_room)) for b in budgets}
    full = groups.rollouts.texts
    return [{"key": per_row[r].key, "thought_tokens": thought[r],
             "answer_tokens": answer_end[r] - thought[r] if answer_end[r] is not None else None,
             "answered": thought[r] is not None and groups.answers[r] is not None,
             "reward": float(groups.rewards[r]), "length": int(groups.rollouts.lengths[r]),
             "reward_at": {b: float(cut[b][r]) for b in budgets}, "text": prompts.completion(full[r])[:400]}
            for r in range(N)]


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {f"p{q}": None for q in PERCENTILES} | {"max": None}
    return {f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES} | {"max": int(max(values))}


def summarize(rows: list[dict], budgets=BUDGETS) -> dict:
    """The distribution over rollouts: closed share, answered share, mean reward, percentiles (numpy's linear
    interpolation) of closed thought lengths and of answer lengths after them, share of all rollouts closed within
    each budget, mean reward when cut at each budget + answer room."""
    n = len(rows)
    if n == 0:
        raise UserError("no rollouts to summarize")
    closed = [r["thought_tokens"] for r in rows if r["thought_tokens"] is not None]
    answers = [r["answer_tokens"] for r in rows if r.get("answer_tokens") is not None]
    return {
        "rollouts": n,
        "closed_share": len(closed) / n,
        "answered_share": sum(bool(r["answered"]) for r in rows) / n,
        "mean_reward": float(np.mean([r["reward"] for r in rows])),
        "mean_length": float(np.mean([r["length"] for r in rows])),
        "closed_thought_tokens": _percentiles(closed),
        "answer_tokens_after_thought": _percentiles(answers),
        "closed_within": {str(b): sum(t <= b for t in closed) / n for b in budgets},
        "mean_reward_at_budget": {str(b): float(np.mean([r["reward_at"][b] for r in rows])) for b in budgets
                                  if all(b in r["reward_at"] for r in rows)},
    }


def markdown_line(label: str, s: dict) -> str:
    """One line for a design note: the closed share, percentiles and the share closed within each budget."""
    p = s["closed_thought_tokens"]
    lengths = ("no thought closed" if p["max"] is None else
               f"closed lengths p50 {p['p50']:.0f} / p75 {p['p75']:.0f} / p90 {p['p90']:.0f} / max {p['max']} tokens")
    within = ", ".join(f"{b}: {v:.0%}" for b, v in s["closed_within"].items())
    return (f"- `{label}`: {s['rollouts']} rollouts, `</think>` closed in {s['closed_share']:.0%} "
            f"({lengths}); closed within {within}; boxed answer after it {s['answered_share']:.0%}; "
            f"mean reward {s['mean_reward']:.3f}")


def parse_set(values: tuple[str, ...]) -> dict:
    out = {}
    for v in values:
        key, eq, value = v.partition("=")
        if not eq:
            raise UserError(f"--set '{v}' must be KEY=VALUE, e.g. --set exclude-docs=out/x/warm/docs.txt")
        out[key.strip().replace("-", "_")] = value
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "models", multiple=True, default=("demo",), show_default=True,
              help="policy to probe: HF directory, `demo` or a `rpt-train run` dir (repeat to probe several on the "
              "same contexts)")
@click.option("--shards", required=True, help="`rpt-data tag` output directory the training contexts come from")
@click.option("--spec", default=SPEC, show_default=True, help="experiment spec whose arm's options build the prompts")
@click.option("--arm", default="rpt-think", show_default=True, help="the spec's arm (its template, prompt and reward)")
@click.option("--contexts", default=32, show_default=True, help="training contexts (the arm's seeded order)")
@click.option("--rollouts", default=4, show_default=True, help="completions per context")
@click.option("--new-tokens", default=256, show_default=True, help="tokens each rollout may generate (large budget)")
@click.option("--set", "sets", multiple=True, help="override one of the arm's `rpt-train run` options, KEY=VALUE")
@click.option("--out", default="results/probe-thoughts.json", show_default=True, help="JSON written here")
@click.option("--keep/--no-keep", default=False, show_default=True,
              help="keep the other models already in --out (a probe of the same --spec and --arm)")
@user_errors
def main(models, shards, spec, arm, contexts, rollouts, new_tokens, sets, out, keep):
    """Probe how long a policy thinks under an arm's thinking template; writes the distribution as JSON."""
    from rpt_train.samples import TrainSamples
    from rpt_train.policy import load_policy
    from rpt_train.trainer import seed_everything

    if contexts < 1 or rollouts < 1 or new_tokens < 1:
        raise UserError("--contexts, --rollouts and --new-tokens must be at least 1")
    overrides = parse_set(sets)
    result = {"spec": spec, "arm": arm, "budgets": list(BUDGETS), "models": {}, "markdown": {}}
    if keep and Path(out).exists():
        kept = json.loads(Path(out).read_text())
        if (kept.get("spec"), kept.get("arm")) != (spec, arm):
            raise UserError(f"--keep: '{out}' probes arm '{kept.get('arm')}' of '{kept.get('spec')}', not '{arm}' of "
                            f"'{spec}'; write another --out")
        result |= {"models": kept["models"], "markdown": kept["markdown"]}
    for model in models:
        cfg = probe_config(spec, arm, model, shards, overrides)
        seed_everything(cfg.seed)
        policy = load_policy(model, cfg.device)
        samples = TrainSamples(cfg, policy.tokenizer).next_batch(contexts)
        t0 = time.perf_counter()
        rows = rollout_rows(cfg, policy, samples, rollouts, new_tokens)
        summary = summarize(rows) | {"seconds": round(time.perf_counter() - t0, 1)}
        result["models"][model] = {"summary": summary, "shards": shards, "contexts": contexts, "rollouts": rollouts,
                                   "new_tokens": new_tokens, "overrides": overrides, "answer_room": cfg.answer_room,
                                   "temperature": cfg.temperature, "rows": rows}
        result["markdown"][model] = markdown_line(model, summary)
        print(result["markdown"][model], file=sys.stderr, flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {out}")
    print("\n".join(result["markdown"].values()))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
