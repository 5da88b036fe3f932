"""What the policy knows before training (an experiment's `levers:` stage): on held-out positions, per model (the
base; the warm-started one when the spec has a warm start) and prompt variant, the policy's mean P(a right first
answer token) after the prompt, the share of positions where it exceeds 0.01, and the expected share of
informative groups of G uniform draws; `raw context`: P(the label's first token) right after the bare text (what
next-token prediction knows). This is what the learnability sampler and the warm start act on."""
from __future__ import annotations

import time

import numpy as np

PROMPTS = {"answer-only, chat template": ("answer-only", "on"), "answer-only, no chat template": ("answer-only", "off")}


def lever_summary(p, group_size: int) -> dict:
    from rpt_train.sampler import informative

    p = np.asarray(p, dtype=np.float64)
    return {"mean_p": round(float(p.mean()), 4), "share_p_above_0.01": round(float((p > 0.01).mean()), 4),
            "informative_groups": round(float(informative(p, group_size).mean()), 4)}


def measure_levers(models: dict[str, str], ecfg, group_size: int, response_prefix: str, positions: int) -> dict:
    """The levers table for `models` (label -> model) on the first `positions` positions of the eval's `all`
    bucket (held-out documents of the eval design `ecfg`)."""
    from rpt_train.config import EvalConfig, to_dict
    from rpt_train.evaluate import select_positions
    from rpt_train.metrics import machine
    from rpt_train.policy import load_policy
    from rpt_train.sampler import LearnabilityScorer
    from rpt_train.samples import ShardSet
    from rpt_train.templates import PromptBuilder

    limit = min(ecfg.limit, positions)
    result = {"positions": limit, "group_size": group_size, "response_prefix": response_prefix, "device": machine(),
              "models": {}}
    t0 = time.perf_counter()
    for label, spec in models.items():
        policy = load_policy(spec, ecfg.device, ecfg.dtype)
        tok = policy.tokenizer
        cfg = EvalConfig(**{**to_dict(ecfg), "model": spec, "limit": limit})
        chosen = select_positions(ShardSet(cfg.shards), tok, cfg)["all"]
        scorer = LearnabilityScorer(policy.model, tok)
        labels = ["".join(s.label_tokens) for s in chosen]
        row = {"raw context": lever_summary(scorer.probabilities([tok(s.context)["input_ids"] for s in chosen], labels),
                                            group_size)}
        for name, (template, chat) in PROMPTS.items():
            if chat == "on" and not getattr(tok, "chat_template", None):
                continue  # a tokenizer without one (the tests' tiny model)
            prompts = PromptBuilder(tok, template, chat, response_prefix)
            row[name] = lever_summary(scorer.probabilities([prompts.ids(s.context) for s in chosen], labels),
                                      group_size)
        result["models"][label] = row
        print(f"levers, {label}: " + "; ".join(f"{k} {v['mean_p']:.3f}" for k, v in row.items()), flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def levers_lines(lv: dict) -> list[str]:
    """The report's markdown table of a levers record."""
    names = list(next(iter(lv["models"].values())))
    out = ["## What the policy knows before training: P(a right first answer token)", "",
           f"{lv['positions']} held-out positions; after the prompt ending in `{lv['response_prefix']}`. Cells: mean P / "
           f"share of positions with P > 0.01 / expected share of groups of G = {lv['group_size']} uniform draws whose "
           "rewards differ (a gradient). `raw context`: the label's first token right after the bare text.", "",
           "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model, row in lv["models"].items():
        out.append(f"| {model} | " + " | ".join(f"{row[n]['mean_p']:.3f} / {row[n]['share_p_above_0.01']:.2f} / "
                                                f"{row[n]['informative_groups']:.2f}" if n in row else "-"
                                                for n in names) + " |")
    return out + [""]
