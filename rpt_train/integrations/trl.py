"""TRL reward: `make_rpt_reward(tokenizer=<the policy's tokenizer>)` for `GRPOTrainer(reward_funcs=[...])` on a
`rpt-train export --format trl` dataset, whose `label_tokens`, `response_prefix` and `rpt_reward` (the export's
reward settings) columns TRL passes to reward functions as keyword arguments."""
from __future__ import annotations

from rpt_train.decoding import LEFT_TOKENS
from rpt_train.integrations import decode_completions, score, settings_of, with_prefix


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


def _prompt_tail(tokenizer, prompt) -> list[int]:
    """The last token ids of the prompt TRL generated from (rendered with the chat template when conversational)."""
    if not isinstance(prompt, str):
        prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"][-LEFT_TOKENS:]


def make_rpt_reward(correct: float | None = None, wrong: float | None = None, no_answer: float | None = None,
                    answer_format: str | None = None, tokenizer=None):
    """`rpt_reward` with other reward values (default: RPT_REWARD_* env vars, else the export's `rpt_reward`
    column, else 1/0/0). `tokenizer` (the policy's; GRPOTrainer's processing_class): completions are decoded
    from TRL's `completion_ids` after their prompt, as `rpt-train run` decodes them. Without it a row whose
    prompt was prefilled with a response prefix is refused: TRL decodes the completion alone, and a SentencePiece
    tokenizer then drops the answer's leading space (a right answer would score as wrong)."""

    def rpt_reward(prompts, completions, label_tokens, response_prefix=None, completion_ids=None, rpt_reward=None,
                   **kwargs) -> list[float]:
        """One prefix-match reward per completion. A string prompt that ends with the row's response prefix was
        prefilled: the prefix is put back in front of the completion."""
        n = len(completions)
        prefixes = response_prefix if response_prefix is not None else [None] * n
        settings = rpt_reward if rpt_reward is not None else [None] * n
        prefilled = [bool(rp) and isinstance(p, str) and p.endswith(rp) for p, rp in zip(prompts, prefixes)]
        if tokenizer is not None and completion_ids is not None:
            texts = decode_completions(tokenizer, [_prompt_tail(tokenizer, p) for p in prompts], completion_ids)
        elif any(prefilled) and completion_ids is not None:
            raise ValueError("rpt_reward: this dataset prefills a response prefix, and TRL decodes completions "
                             "alone (a Llama-2/Mistral tokenizer then drops the answer's leading space); use "
                             "make_rpt_reward(tokenizer=<the policy's tokenizer>) so that they are decoded after "
                             "the prompt as `rpt-train run` decodes them")
        else:
            texts = [_text(c) for c in completions]
        return [score(with_prefix(t, p if isinstance(p, str) else "", rp), labels, correct=correct,
                      wrong=wrong, no_answer=no_answer, answer_format=answer_format, settings=settings_of(s))
                for p, t, labels, rp, s in zip(prompts, texts, label_tokens, prefixes, settings)]

    return rpt_reward


rpt_reward = make_rpt_reward()
