"""OpenRLHF reward file: `--reward.remote_url <path of this file>` (older versions: `--remote_rm_url`), with
`--data.label_key label` on a `rpt-train export --format openrlhf` dataset (rendered prompts: no chat template flag)."""
from __future__ import annotations

import os

import torch

from rpt_train.integrations import ENV_PREFIX, score, with_prefix


MIN_TAIL = 16  # non-whitespace characters of the prompt's tail that must start a left-truncated query
MAX_LEAD = 4  # characters a left-truncated query may start with that are not the prompt's (a split UTF-8 byte)


def _after(query: str, i: int, prompt: str, j: int) -> int | None:
    """Where the query continues once prompt[j:] is matched from query[i] on, whitespace apart (either side may
    have whitespace the other does not), or None when it does not match."""
    while j < len(prompt):
        if i < len(query) and query[i] == prompt[j]:
            i, j = i + 1, j + 1
        elif prompt[j].isspace():
            j += 1
        elif i < len(query) and query[i].isspace():
            i += 1
        else:
            return None
    return i


def _overlap(tail_of: list[str], head_of: list[str]) -> int:
    """The length of the longest suffix of `tail_of` that is a prefix of `head_of` (KMP prefix function)."""
    seq = head_of + [None] + tail_of
    pi = [0] * len(seq)
    for k in range(1, len(seq)):
        n = pi[k - 1]
        while n and seq[k] != seq[n]:
            n = pi[n - 1]
        if seq[k] == seq[n]:
            n += 1
        pi[k] = n
    return pi[-1] if seq else 0


def response_of(query: str, prompt: str) -> str | None:
    """The generated text: OpenRLHF's query is decode(prompt ids + response ids, skip_special_tokens=False), whose
    prompt part may differ from the prompt text in whitespace only (a SentencePiece decoder writes '<s>[INST]' as
    '<s> [INST]' and drops a leading space). OpenRLHF keeps only a prompt's last max_len - max_new_tokens ids, so
    the query may start with the prompt's tail only (its BOS and template start cut off): then the response follows
    the longest tail of the prompt (at least MIN_TAIL non-whitespace characters, after at most MAX_LEAD characters
    of a token cut in two) the query starts with. None when the query starts with neither."""
    if query.startswith(prompt):
        return query[len(prompt):]
    end = _after(query, 0, prompt, 0)
    if end is not None:
        return query[end:]
    p_at = [k for k, c in enumerate(prompt) if not c.isspace()]
    q_at = [k for k, c in enumerate(query) if not c.isspace()]
    p_chars = [prompt[k] for k in p_at]
    for lead in range(min(MAX_LEAD, len(q_at)) + 1):
        n = _overlap(p_chars, [query[k] for k in q_at[lead:lead + len(p_chars)]])
        if n >= MIN_TAIL:
            end = _after(query, q_at[lead], prompt, p_at[len(p_chars) - n])
            if end is not None:
                return query[end:]
    return None


def reward_func(queries, prompts, labels) -> dict:
    """{"rewards", "scores", "extra_logs"} as OpenRLHF >= 0.8 expects: float tensors [batch] (`scores` feed its
    dynamic filtering). The response prefix (env RPT_RESPONSE_PREFIX) is put back when the prompt ends with it. A
    query whose prompt cannot be found in it gets the no-answer reward (counted in extra_logs), never a score of
    the prompt's own text (a query left-truncated by OpenRLHF is scored on its answer: response_of)."""
    prefix = os.environ.get(ENV_PREFIX, "")
    found = [response_of(q, p) for q, p in zip(queries, prompts)]
    texts = [with_prefix(r, p, prefix) if r is not None else "" for r, p in zip(found, prompts)]
    rewards = torch.tensor([score(t, lab) for t, lab in zip(texts, labels)], dtype=torch.float32)
    # scores: 1 for a prefix match, else 0, whatever the reward values (`--algo.dynamic_filtering_range 0 1`)
    correct = torch.tensor([score(t, lab, correct=1.0, wrong=0.0, no_answer=0.0) for t, lab in zip(texts, labels)])
    return {"rewards": rewards, "scores": correct,
            "extra_logs": {"rpt_accuracy": correct.mean().item() if len(texts) else 0.0,
                           "rpt_prompt_not_found": float(sum(r is None for r in found))}}
