"""pipelines/probe_thoughts.py (issue 34's thinking-budget probe): the summary against hand-computed statistics,
thought and answer lengths measured on scripted completions of the tiny tokenizer, and the whole probe (spec arm ->
prompts -> HFRollout -> JSON) on the tiny model."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from shard_fixtures import train_shards, tiny_tok  # noqa: F401

from rpt_train.config import TrainConfig
from rpt_train.policy import load_policy
from rpt_train.rollout import RolloutBatch
from rpt_train.samples import TrainSamples

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("probe_thoughts", REPO / "pipelines" / "probe_thoughts.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def row(thought, answered=False, reward=0.0, length=10, answer=None, at=None):
    return {"thought_tokens": thought, "answered": answered, "reward": reward, "length": length,
            "answer_tokens": answer, "reward_at": at or {b: 0.0 for b in probe.BUDGETS}}


def test_summary_equals_hand_computed_statistics():
    at = {b: float(b >= 64) for b in probe.BUDGETS}  # a rollout that scores once the budget reaches 64
    rows = [row(10, True, 1.0, 12, 2, at), row(20, True, 0.0, 23, 3), row(40, False, 0.0, 60), row(100, True, 1.0,
            104, 4, at), row(None, length=256), row(None, length=256), row(None, length=256), row(None, length=256)]
    s = probe.summarize(rows)
    assert s["rollouts"] == 8 and s["closed_share"] == 0.5 and s["answered_share"] == 3 / 8
    assert s["mean_reward"] == 0.25 and s["mean_length"] == (12 + 23 + 60 + 104 + 4 * 256) / 8
    # closed lengths 10, 20, 40, 100: linear interpolation at (n - 1) q = 0.75, 1.5, 2.25, 2.7
    assert s["closed_thought_tokens"] == pytest.approx({"p25": 17.5, "p50": 30.0, "p75": 55.0, "p90": 82.0,
                                                          "max": 100})
    assert s["answer_tokens_after_thought"] == pytest.approx({"p25": 2.5, "p50": 3.0, "p75": 3.5, "p90": 3.8,
                                                                "max": 4})
    # shares of all 8 rollouts, not of the closed ones
    assert s["closed_within"] == {"16": 1 / 8, "32": 2 / 8, "64": 3 / 8, "128": 4 / 8, "256": 4 / 8}
    assert s["mean_reward_at_budget"] == {"16": 0.0, "32": 0.0, "64": 0.25, "128": 0.25, "256": 0.25}
    none = probe.summarize([row(None)])
    assert none["closed_share"] == 0 and none["closed_thought_tokens"]["p50"] is None
    assert "no thought closed" in probe.markdown_line("m", none)
    assert "closed in 50%" in probe.markdown_line("m", s) and "p75 55" in probe.markdown_line("m", s)


class Scripted:
    """Each prompt's n completions are the token ids of `pieces` (lists of strings, encoded piece by piece), so the
    token where `</think>` completes is known by construction."""

    def __init__(self, tokenizer, pieces):
        self.tok, self.pieces = tokenizer, pieces

    def generate(self, prompts, params):
        rows = [sum((self.tok(p, add_special_tokens=False)["input_ids"] for p in self.pieces[j % len(self.pieces)]),
                    []) for j in range(len(prompts) * params.n)]
        width = max(map(len, rows))
        ids = torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        ones = torch.ones(len(rows), 2, dtype=torch.long)
        return RolloutBatch(prompt_ids=ones, prompt_mask=ones, completion_ids=ids, completion_mask=mask,
                            logprobs=None, texts=["".join(p) for p in (self.pieces[j % len(self.pieces)]
                                                                      for j in range(len(rows)))])

    def sync(self, model):
        pass


def test_thought_and_answer_lengths_and_cut_rewards_on_scripted_completions(tiny_llama, train_shards):
    policy = load_policy(str(tiny_llama), "cpu")
    tok = policy.tokenizer
    cfg = TrainConfig(shards=str(train_shards), bucket="all", template="think", think_budget=8, answer_room=4,
                      reward_no_answer=-0.5, reward_wrong=-0.25)
    sample = TrainSamples(cfg, tok).next_batch(1)[0]
    label = sample.label_tokens[0]
    n = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    pieces = [["a b c d e", "</think>", " \\boxed{", label, "}"],  # closes, right answer
              ["x", "</think>", "\\boxed{ zzqq}"],  # closes, wrong answer
              ["no end \\boxed{", label, "}"]]  # the right answer inside an unclosed thought
    rows = probe.rollout_rows(cfg, policy, [sample], 3, 64, budgets=(4, 16, 64), engine=Scripted(tok, pieces))
    k0 = n("a b c d e") + n("</think>")
    assert [r["thought_tokens"] for r in rows] == [k0, n("x") + n("</think>"), None]
    assert [r["answer_tokens"] for r in rows] == [n(" \\boxed{") + n(label) + n("}"), n("\\boxed{ zzqq}"), None]
    assert [r["answered"] for r in rows] == [True, True, False]
    assert [r["reward"] for r in rows] == [1.0, -0.25, -0.5]  # the trainer's reward, gated on </think>
    total0 = k0 + rows[0]["answer_tokens"]
    # cut at budget + answer room (4): the first rollout scores once its whole answer fits
    assert rows[0]["reward_at"] == {b: 1.0 if b + 4 >= total0 else -0.5 for b in (4, 16, 64)}
    assert total0 > 8 and rows[0]["reward_at"][4] == -0.5
    assert rows[2]["reward_at"] == {4: -0.5, 16: -0.5, 64: -0.5}


def test_probe_command_on_the_tiny_model(tiny_llama, tiny_qwen2, train_shards, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"out: {tmp_path / 'exp'}\nbase: {{shards: {train_shards}, model: {tiny_llama}, bucket: all, "
                    "heldout-fraction: 0.2, temperature: 1.0, chat-template: 'off'}\narms:\n  think: {kind: rpt, "
                    "template: think, think-budget: 8, answer-room: 4, reward-no-answer: -1.0}\n")
    out = tmp_path / "probe.json"
    res = CliRunner().invoke(probe.main, ["--model", str(tiny_llama), "--shards", str(train_shards), "--spec",
                                          str(spec), "--arm", "think", "--contexts", "2", "--rollouts", "3",
                                          "--new-tokens", "6", "--set", "heldout-fraction=0",
                                          "--out", str(out)])
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())["models"][str(tiny_llama)]
    assert len(got["rows"]) == 6 and got["answer_room"] == 4
    assert all(1 <= r["length"] <= 6 for r in got["rows"])
    assert got["summary"] == probe.summarize([r | {"reward_at": {int(b): v for b, v in r["reward_at"].items()}}
                                              for r in got["rows"]]) | {"seconds": got["summary"]["seconds"]}
    # a random tiny model never closes a thought: every rollout gets the no-answer reward
    assert got["summary"]["closed_share"] == 0 and got["summary"]["mean_reward"] == -1.0
    # --keep adds a second model's probe beside the first
    res = CliRunner().invoke(probe.main, ["--model", str(tiny_qwen2), "--shards", str(train_shards), "--spec",
                                          str(spec), "--arm", "think", "--contexts", "1", "--rollouts", "2",
                                          "--new-tokens", "3", "--set", "heldout-fraction=0", "--out", str(out),
                                          "--keep"])
    assert res.exit_code == 0, res.output
    both = json.loads(out.read_text())
    assert both["models"][str(tiny_llama)] == json.loads(json.dumps(got))
    assert len(both["models"][str(tiny_qwen2)]["rows"]) == 2 and list(both["markdown"]) == [str(tiny_llama),
                                                                                           str(tiny_qwen2)]
    bad = CliRunner().invoke(probe.main, ["--shards", str(train_shards), "--spec", str(spec), "--arm", "nope"])
    assert bad.exit_code != 0 and "no arm 'nope'" in bad.output
