"""RPT reward: the answer is the last `\\boxed{}` after `</think>`; it scores when its bytes equal the
ground-truth continuation cut at one of its token boundaries (prefix match). Reward functions are plain callables."""
from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rpt_common.errors import UserError

THINK_END = "</think>"
ANSWER_FORMATS = ("boxed", "answer_tag")
ANSWER_OPENINGS = {"boxed": "\\boxed{", "answer_tag": "<answer>"}  # what an answer of each format starts with
ANSWER_CLOSINGS = {"boxed": "}", "answer_tag": "</answer>"}


def _utf8(s: str | bytes) -> bytes:
    return s if isinstance(s, bytes) else s.encode("utf-8", "surrogatepass")


def prefix_match(answer: str | bytes | None, label_tokens: Sequence[str | bytes]) -> bool:
    """True iff `answer` (UTF-8 bytes) is non-empty and equals label_tokens[0] + ... + label_tokens[j-1]
    for some j >= 1. No stripping or normalisation: a leading space is part of the token."""
    if answer is None:
        return False
    target = _utf8(answer)
    if not target:
        return False
    prefix = b""
    for token in label_tokens:
        prefix += _utf8(token)
        if len(prefix) == len(target):
            return prefix == target
        if len(prefix) > len(target) or not target.startswith(prefix):
            return False
    return False


def _last_boxed(text: str) -> str | None:
    """Content of the `\\boxed{...}` that closes last, braces balanced; None when none closes. One pass."""
    found, stack, key = None, [], "\\boxed{"
    for i, ch in enumerate(text):
        if ch == "{":
            boxed = i >= len(key) - 1 and text.startswith(key, i - len(key) + 1)
            stack.append(i + 1 if boxed else -1)
        elif ch == "}" and stack:
            start = stack.pop()
            if start >= 0:
                found = text[start:i]
    return found


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str, fmt: str = "boxed") -> str | None:
    """The answer inside the last complete `\\boxed{...}` (or `<answer>...</answer>` with fmt="answer_tag")
    after the last `</think>` when the completion has one; None when there is no answer."""
    if completion is None:
        return None
    if THINK_END in completion:
        completion = completion[completion.rindex(THINK_END) + len(THINK_END):]
    if fmt == "boxed":
        return _last_boxed(completion)
    if fmt == "answer_tag":
        found = _ANSWER_TAG.findall(completion)
        return found[-1] if found else None
    raise UserError(f"unknown answer format '{fmt}'; use one of {', '.join(ANSWER_FORMATS)}")


@dataclass(kw_only=True, slots=True)
class RewardInput:
    """What a reward function sees for one rollout."""

    completion: str
    answer: str | None  # extracted answer, None when there is none
    label_tokens: list[str]  # ground-truth continuation in policy tokens (boundaries that count)
    context: str


RewardFn = Callable[[list[RewardInput]], list[float]]


def rpt_reward(correct: float = 1.0, wrong: float = 0.0, no_answer: float = 0.0) -> RewardFn:
    """The paper's reward: `correct` on a prefix match, `wrong` otherwise, `no_answer` without an answer."""

    def reward(items: list[RewardInput]) -> list[float]:
        return [no_answer if it.answer is None else correct if prefix_match(it.answer, it.label_tokens) else wrong
                for it in items]

    return reward


def format_reward(bonus: float = 0.1) -> RewardFn:
    """Shaping example: `bonus` for any extractable answer (add it to the RPT reward with `--reward format`)."""
    return lambda items: [bonus if it.answer is not None else 0.0 for it in items]


BUILTIN = {"format": format_reward}


def load_reward_fn(spec: str) -> RewardFn:
    """A built-in shaping reward by name, or `module:function` returning a list of floats per batch."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    module, _, attr = spec.partition(":")
    if not attr:
        raise UserError(f"reward '{spec}' is neither a built-in ({', '.join(BUILTIN)}) nor 'module:function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import reward function '{spec}': {e}")


def combine(fns: Sequence[RewardFn]) -> RewardFn:
    """Sum of several reward functions, checked to return one finite float per rollout."""

    def reward(items: list[RewardInput]) -> list[float]:
        total = [0.0] * len(items)
        for fn in fns:
            values = list(fn(items))
            if len(values) != len(items):
                raise UserError(f"reward function {getattr(fn, '__name__', fn)} returned {len(values)} values "
                                f"for {len(items)} rollouts")
            total = [t + float(v) for t, v in zip(total, values)]
        return total

    return reward
