"""The RPT reward for other RL engines (verl, TRL, OpenRLHF): one definition, `rpt_train.reward`, behind each
engine's signature. Reward values come from keyword arguments, else RPT_REWARD_* env vars, else 1/0/0."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence

from rpt_train.reward import RewardInput, extract_answer, rpt_reward

ENV_VALUES = {"correct": ("RPT_REWARD_CORRECT", 1.0), "wrong": ("RPT_REWARD_WRONG", 0.0),
              "no_answer": ("RPT_REWARD_NO_ANSWER", 0.0)}
ENV_PREFIX = "RPT_RESPONSE_PREFIX"  # the export's --response-prefix, for engines that cannot pass it per row
ENV_FORMAT = "RPT_ANSWER_FORMAT"


def reward_values(correct: float | None = None, wrong: float | None = None,
                  no_answer: float | None = None) -> tuple[float, float, float]:
    """(correct, wrong, no_answer): each from its argument, else its env var, else the paper's value."""
    given = {"correct": correct, "wrong": wrong, "no_answer": no_answer}
    return tuple(float(given[k]) if given[k] is not None else float(os.environ.get(env, default))
                 for k, (env, default) in ENV_VALUES.items())


def decode_labels(label) -> list[str]:
    """Ground-truth tokens from an exported label: a JSON-encoded list of strings, or the list itself."""
    value = json.loads(label) if isinstance(label, (str, bytes)) else label
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not hasattr(value, "tolist"):
        raise ValueError(f"an RPT label must be a JSON-encoded list of strings, got {str(label)[:80]!r}")
    value = value.tolist() if hasattr(value, "tolist") else list(value)
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"an RPT label must be a list of strings, got {str(label)[:80]!r}")
    return value


def with_prefix(response: str, prompt: str | None, response_prefix: str | None) -> str:
    """The whole response: `response_prefix` put back in front when the engine prefilled it, i.e. when the
    prompt it generated from ends with it (or when the prompt is not known)."""
    if not response_prefix:
        return response
    if prompt is None or prompt.endswith(response_prefix):
        return response_prefix + response
    return response


def score(completion: str, label_tokens, *, correct: float | None = None, wrong: float | None = None,
          no_answer: float | None = None, answer_format: str | None = None) -> float:
    """rpt_train.reward.rpt_reward of one whole completion (response prefix already put back)."""
    fmt = answer_format or os.environ.get(ENV_FORMAT, "boxed")
    item = RewardInput(completion=completion, answer=extract_answer(completion, fmt),
                       label_tokens=decode_labels(label_tokens), context="")
    return float(rpt_reward(*reward_values(correct, wrong, no_answer))([item])[0])
