"""Reward and answer extraction: the contract's examples and hypothesis properties."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rpt_common.errors import UserError
from rpt_train.reward import (RewardInput, combine, extract_answer, format_reward, load_reward_fn, prefix_match,
                              rpt_reward)


@pytest.mark.parametrize("completion,expected", [
    ("so the answer is \\boxed{ world}", " world"),
    ("\\boxed{a} then \\boxed{b}", "b"),
    ("nested \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("unclosed \\boxed{abc", None),
    ("complete \\boxed{x} then unclosed \\boxed{y", "x"),
    ("<think>maybe \\boxed{a}</think> final \\boxed{b}", "b"),
    ("<think>maybe \\boxed{a}</think> no answer after think", None),
    ("<think>\\boxed{a}</think><think>\\boxed{b}</think>\\boxed{c}", "c"),
    ("no box at all", None),
    ("\\boxed{}", ""),
    ("\\boxed{ 日本}", " 日本"),
    ("{ \\boxed{", None),
    ("", None),
])
def test_extract_answer_examples(completion, expected):
    assert extract_answer(completion) == expected


def test_extract_answer_tag_format():
    assert extract_answer("<answer>a</answer> <answer> b</answer>", fmt="answer_tag") == " b"
    assert extract_answer("<think><answer>a</answer></think>", fmt="answer_tag") is None
    with pytest.raises(UserError):
        extract_answer("x", fmt="nope")


@pytest.mark.parametrize("answer,labels,expected", [
    (" wor", [" w", "or", "ld"], True),
    (" world", [" w", "or", "ld"], True),
    (" w", [" w", "or", "ld"], True),
    (" wo", [" w", "or", "ld"], False),  # not at a token boundary
    ("world", [" w", "or", "ld"], False),  # spaces matter
    (" world!", [" w", "or", "ld"], False),  # longer than the label
    ("", [" w"], False),
    (None, [" w"], False),
    ("日", [b"\xe6", b"\x97\xa5", "本"], True),  # bytes tokens that split a character
    (b" w", [" w"], True),
])
def test_prefix_match_examples(answer, labels, expected):
    assert prefix_match(answer, labels) is expected


tokens = st.lists(st.text(min_size=0, max_size=4), min_size=0, max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.text(), tokens)
def test_prefix_match_iff_boundary_prefix(answer, labels):
    boundaries = {"".join(labels[:j]).encode("utf-8", "surrogatepass") for j in range(1, len(labels) + 1)}
    expected = answer != "" and answer.encode("utf-8", "surrogatepass") in boundaries
    assert prefix_match(answer, labels) is expected


@settings(max_examples=200, deadline=None)
@given(tokens.filter(lambda t: any(t)), st.integers(1, 6))
def test_every_boundary_prefix_matches(labels, j):
    answer = "".join(labels[:j])
    assert prefix_match(answer, labels) is (answer != "")


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec=None), max_size=200))
def test_extract_answer_never_crashes(text):
    out = extract_answer(text)
    assert out is None or isinstance(out, str)
    assert extract_answer(text, fmt="answer_tag") is None or True


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=50).filter(lambda s: s.count("{") == s.count("}") and "}" not in s.split("{")[0]
                                   and "\\boxed{" not in s),
       st.text(max_size=30).filter(lambda s: "\\boxed{" not in s and "{" not in s and "}" not in s
                                   and "</think>" not in s))
def test_extract_roundtrip(prefix, answer):
    assert extract_answer(f"{prefix}</think> \\boxed{{{answer}}}") == answer


def test_rpt_reward_values_are_configurable():
    items = [RewardInput(completion="", answer=a, label_tokens=[" a", "b"], context="c") for a in (" ab", " x", None)]
    assert rpt_reward()(items) == [1.0, 0.0, 0.0]
    assert rpt_reward(correct=2.0, wrong=-0.5, no_answer=-1.0)(items) == [2.0, -0.5, -1.0]
    both = combine([rpt_reward(), format_reward(0.1)])
    assert both(items) == pytest.approx([1.1, 0.1, 0.0])


def test_reward_fn_loading():
    assert load_reward_fn("format")([RewardInput(completion="", answer="x", label_tokens=["x"], context="")]) == [0.1]
    assert load_reward_fn("rpt_train.reward:format_reward") is format_reward
    with pytest.raises(UserError, match="neither a built-in"):
        load_reward_fn("nope")
    with pytest.raises(UserError, match="cannot import"):
        load_reward_fn("no_such_module_x:f")
    with pytest.raises(UserError, match="returned 1 values for 2"):
        combine([lambda items: [0.0]])([RewardInput(completion="", answer=None, label_tokens=[], context="")] * 2)
