"""The RPT reward for other RL engines (verl, TRL, OpenRLHF): one definition, `rpt_train.reward`, behind each
engine's signature. Each setting comes from a keyword argument, else its RPT_* env var, else the export's settings
carried in each row (`settings`: the run recipe's reward values, answer format and think gate), else the paper's."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

from rpt_train.reward import THINK_END, RewardInput, extract_answer, rpt_reward

ENV_VALUES = {"correct": ("RPT_REWARD_CORRECT", 1.0), "wrong": ("RPT_REWARD_WRONG", 0.0),
              "no_answer": ("RPT_REWARD_NO_ANSWER", 0.0)}
ENV_PREFIX = "RPT_RESPONSE_PREFIX"  # the export's --response-prefix, for engines that cannot pass it per row
ENV_FORMAT = "RPT_ANSWER_FORMAT"
ENV_NAMES = [env for env, _ in ENV_VALUES.values()] + [ENV_FORMAT, ENV_PREFIX]


def reward_values(correct: float | None = None, wrong: float | None = None,
                  no_answer: float | None = None, settings: Mapping | None = None) -> tuple[float, float, float]:
    """(correct, wrong, no_answer): each from its argument, else its env var, else `settings` (the export's),
    else the paper's value."""
    given = {"correct": correct, "wrong": wrong, "no_answer": no_answer}
    settings = settings or {}
    return tuple(float(given[k]) if given[k] is not None else
                 float(os.environ[env]) if env in os.environ else float(settings.get(k, default))
                 for k, (env, default) in ENV_VALUES.items())


def decode_label(label) -> tuple[list[str], dict]:
    """(ground-truth tokens, reward settings) of an exported label: a JSON object {"label_tokens": [...],
    "rpt_reward": {...}} (verl, OpenRLHF), a JSON-encoded list of strings or the list itself (no settings)."""
    value = json.loads(label) if isinstance(label, (str, bytes)) else label
    settings = {}
    if isinstance(value, Mapping):
        settings = dict(value.get("rpt_reward") or {})
        value = value.get("label_tokens")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not hasattr(value, "tolist"):
        raise ValueError(f"an RPT label must be a JSON-encoded list of strings, got {str(label)[:80]!r}")
    value = value.tolist() if hasattr(value, "tolist") else list(value)
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"an RPT label must be a list of strings, got {str(label)[:80]!r}")
    return value, settings


def decode_labels(label) -> list[str]:
    """Ground-truth tokens from an exported label (see decode_label)."""
    return decode_label(label)[0]


def with_prefix(response: str, prompt: str | None, response_prefix: str | None) -> str:
    """The whole response: `response_prefix` put back in front when the engine prefilled it, i.e. when the
    prompt it generated from ends with it (or when the prompt is not known)."""
    if not response_prefix:
        return response
    if prompt is None or prompt.endswith(response_prefix):
        return response_prefix + response
    return response


def score(completion: str, label_tokens, *, correct: float | None = None, wrong: float | None = None,
          no_answer: float | None = None, answer_format: str | None = None, settings: Mapping | None = None) -> float:
    """rpt_train.reward.rpt_reward of one whole completion (response prefix already put back), as `rpt-train run`
    scores it with the export's settings: the label's own (verl, OpenRLHF) or `settings` (TRL's column). With the
    think gate (the run's --think-budget > 0) a completion without `</think>` gets the no-answer reward."""
    tokens, carried = decode_label(label_tokens)
    settings = {**carried, **(settings or {})}
    fmt = answer_format or os.environ.get(ENV_FORMAT) or settings.get("answer_format") or "boxed"
    correct, wrong, no_answer = reward_values(correct, wrong, no_answer, settings)
    if settings.get("think_required") and THINK_END not in completion:
        return no_answer
    item = RewardInput(completion=completion, answer=extract_answer(completion, fmt), label_tokens=tokens, context="")
    return float(rpt_reward(correct, wrong, no_answer)([item])[0])


def settings_of(value) -> dict:
    """Reward settings from a TRL `rpt_reward` cell: a JSON object string, a dict, or nothing."""
    if value is None or value == "":
        return {}
    return dict(json.loads(value) if isinstance(value, (str, bytes)) else value)


def decode_completions(tokenizer, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[str]:
    """Completions decoded as `rpt-train run` decodes them (rpt_train.rollout.completion_texts): after the last
    tokens of their prompt, without special tokens except the think tags. Decoded alone, a SentencePiece token
    (Llama-2, Mistral) drops its leading space: '\\boxed{' + '▁lazy}' would read '\\boxed{lazy}'."""
    from rpt_train.decoding import decode_batch_after
    from rpt_train.rollout import special_ids

    drop = special_ids(tokenizer)
    return decode_batch_after(tokenizer, prompt_ids, [[int(t) for t in ids if int(t) not in drop]
                                                      for ids in completion_ids])
