"""OpenRLHF reward file: `--reward.remote_url <path of this file>` (older versions: `--remote_rm_url`), with
`--data.label_key label` on a `rpt-train export --format openrlhf` dataset (rendered prompts: no chat template flag)."""
from __future__ import annotations

import os

import torch

from rpt_train.integrations import ENV_PREFIX, score, with_prefix


def response_of(query: str, prompt: str) -> str:
    """The generated text: OpenRLHF's query is decode(prompt ids + response ids, skip_special_tokens=False)."""
    at = query.find(prompt)
    if at >= 0:
        return query[at + len(prompt):]
    return query[len(os.path.commonprefix([query, prompt])):]


def reward_func(queries, prompts, labels) -> dict:
    """{"rewards", "scores", "extra_logs"} as OpenRLHF >= 0.8 expects: float tensors [batch] (`scores` feed its
    dynamic filtering). The response prefix (env RPT_RESPONSE_PREFIX) is put back when the prompt ends with it."""
    prefix = os.environ.get(ENV_PREFIX, "")
    texts = [with_prefix(response_of(q, p), p, prefix) for q, p in zip(queries, prompts)]
    rewards = torch.tensor([score(t, lab) for t, lab in zip(texts, labels)], dtype=torch.float32)
    # scores: 1 for a prefix match, else 0, whatever the reward values (`--algo.dynamic_filtering_range 0 1`)
    correct = torch.tensor([score(t, lab, correct=1.0, wrong=0.0, no_answer=0.0) for t, lab in zip(texts, labels)])
    return {"rewards": rewards, "scores": correct,
            "extra_logs": {"rpt_accuracy": correct.mean().item() if len(texts) else 0.0}}
