"""verl reward: `compute_score` for `reward.custom_reward_function.path=pkg://rpt_train.integrations.verl`
(verl >= 0.6; older versions: top-level `custom_reward_function.path=<this file>`), name `compute_score`."""
from __future__ import annotations

from rpt_train.integrations import score


def compute_score(data_source, solution_str, ground_truth, extra_info=None, *, correct=None, wrong=None,
                  no_answer=None, answer_format=None, response_prefix=None, **_) -> float:
    """Prefix-match reward of one response. verl passes the response alone (prompt excluded, decoded with
    skip_special_tokens=True, no token ids); `ground_truth` is the exported label (JSON: label tokens and the
    export's reward settings). Keyword arguments come from `custom_reward_function.reward_kwargs`.

    A response prefix cannot be put back exactly: decoded alone, the first token of a SentencePiece tokenizer
    (Llama-2, Mistral) loses its leading space ('\\boxed{' + '▁lazy}' reads '\\boxed{lazy}'), and verl gives the
    reward no ids to decode it after the prompt. So a prefix (reward_kwargs or extra_info['response_prefix']) is
    refused rather than scored wrong; `rpt-train export --format verl` refuses --response-prefix too."""
    if response_prefix is None and isinstance(extra_info, dict):
        response_prefix = extra_info.get("response_prefix")
    if response_prefix:
        raise ValueError("rpt_train.integrations.verl cannot score a response prefilled with a response prefix: verl "
                         "decodes the response alone, which drops the leading space of a SentencePiece tokenizer's "
                         "first token; export without --response-prefix, or use --format trl or openrlhf")
    return score(solution_str, ground_truth, correct=correct, wrong=wrong, no_answer=no_answer,
                 answer_format=answer_format)
