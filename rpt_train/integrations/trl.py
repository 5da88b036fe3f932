"""TRL reward: `rpt_reward` for `GRPOTrainer(reward_funcs=[rpt_reward])` on a `rpt-train export --format trl`
dataset, whose `label_tokens` (and `response_prefix`) columns TRL passes to reward functions as keyword arguments."""
from __future__ import annotations

from rpt_train.integrations import score, with_prefix


def _text(completion) -> str:
    """A completion as text: a string, or (conversational) the content of its messages."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content") or ""
        parts.append(content if isinstance(content, str) else
                     "".join(p.get("text", "") for p in content if isinstance(p, dict)))
    return "".join(parts)


def make_rpt_reward(correct: float | None = None, wrong: float | None = None, no_answer: float | None = None,
                    answer_format: str | None = None):
    """`rpt_reward` with other reward values (default: RPT_REWARD_* env vars, else 1/0/0)."""

    def rpt_reward(prompts, completions, label_tokens, response_prefix=None, **kwargs) -> list[float]:
        """One prefix-match reward per completion. TRL decodes completions with skip_special_tokens=True and
        passes them without the prompt; a string prompt that ends with the row's response prefix was prefilled."""
        prefixes = response_prefix if response_prefix is not None else [None] * len(completions)
        return [score(with_prefix(_text(c), p if isinstance(p, str) else "", rp), labels, correct=correct,
                      wrong=wrong, no_answer=no_answer, answer_format=answer_format)
                for p, c, labels, rp in zip(prompts, completions, label_tokens, prefixes)]

    return rpt_reward


rpt_reward = make_rpt_reward()
