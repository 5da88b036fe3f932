"""OpenRLHF reward file: `--reward.remote_url <path of this file>` (older versions: `--remote_rm_url`), with
`--data.label_key label` on a `rpt-train export --format openrlhf` dataset (rendered prompts: no chat template flag)."""
from __future__ import annotations

import os

import torch

from rpt_train.integrations import ENV_PREFIX, score, with_prefix


def response_of(query: str, prompt: str) -> str | None:
    """The generated text: OpenRLHF's query is decode(prompt ids + response ids, skip_special_tokens=False), whose
    prompt part may differ from the prompt text in whitespace only (a SentencePiece decoder writes '<s>[INST]' as
    '<s> [INST]' and drops a leading space). None when the query does not start with the prompt that way."""
    if query.startswith(prompt):
        return query[len(prompt):]
    i = j = 0
    while j < len(prompt):
        if i < len(query) and query[i] == prompt[j]:
            i, j = i + 1, j + 1
        elif prompt[j].isspace():
            j += 1
        elif i < len(query) and query[i].isspace():
            i += 1
        else:
            return None
    return query[i:]


def reward_func(queries, prompts, labels) -> dict:
    """{"rewards", "scores", "extra_logs"} as OpenRLHF >= 0.8 expects: float tensors [batch] (`scores` feed its
    dynamic filtering). The response prefix (env RPT_RESPONSE_PREFIX) is put back when the prompt ends with it. A
    query whose prompt cannot be found in it gets the no-answer reward (counted in extra_logs), never a score of
    the prompt's own text."""
    prefix = os.environ.get(ENV_PREFIX, "")
    found = [response_of(q, p) for q, p in zip(queries, prompts)]
    texts = [with_prefix(r, p, prefix) if r is not None else "" for r, p in zip(found, prompts)]
    rewards = torch.tensor([score(t, lab) for t, lab in zip(texts, labels)], dtype=torch.float32)
    # scores: 1 for a prefix match, else 0, whatever the reward values (`--algo.dynamic_filtering_range 0 1`)
    correct = torch.tensor([score(t, lab, correct=1.0, wrong=0.0, no_answer=0.0) for t, lab in zip(texts, labels)])
    return {"rewards": rewards, "scores": correct,
            "extra_logs": {"rpt_accuracy": correct.mean().item() if len(texts) else 0.0,
                           "rpt_prompt_not_found": float(sum(r is None for r in found))}}
