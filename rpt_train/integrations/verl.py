"""verl reward: `compute_score` for `reward.custom_reward_function.path=pkg://rpt_train.integrations.verl`
(verl >= 0.6; older versions: top-level `custom_reward_function.path=<this file>`), name `compute_score`."""
from __future__ import annotations

from rpt_train.integrations import score, with_prefix


def compute_score(data_source, solution_str, ground_truth, extra_info=None, *, correct=None, wrong=None,
                  no_answer=None, answer_format=None, response_prefix=None, **_) -> float:
    """Prefix-match reward of one response. verl passes the response alone (prompt excluded, decoded with
    skip_special_tokens=True); `ground_truth` is the exported JSON list of label strings. Keyword arguments come
    from `custom_reward_function.reward_kwargs`; a response prefix from there or from extra_info['response_prefix']."""
    if response_prefix is None and isinstance(extra_info, dict):
        response_prefix = extra_info.get("response_prefix")
    return score(with_prefix(solution_str, None, response_prefix), ground_truth, correct=correct, wrong=wrong,
                 no_answer=no_answer, answer_format=answer_format)
