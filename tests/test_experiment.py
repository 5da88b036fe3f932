"""Issue 33: experiments as data. A smoke spec with every arm kind end to end on a tiny model; resume of a half-
finished arm equals an uninterrupted one; the report's statistics against hand-computed values; FLOP matching; the
trainer's token counters; multi-token prediction fields; the committed power experiment read by the new report."""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from shard_fixtures import train_shards, tiny_tok  # noqa: F401

from rpt_common.errors import UserError
from rpt_train import experiment, report, runner
from rpt_train.config import TrainConfig
from rpt_train.evaluate import EVAL_BUCKETS, Scored, matched_tokens, mtp_metrics
from rpt_train.stats import paired_difference

REPO = Path(__file__).resolve().parents[1]
TINY = {"heldout-fraction": 0.3, "split-seed": 4, "template": "answer-only", "chat-template": "off",
        "response-prefix": "\\boxed{", "device": "cpu", "labels-length": 2, "max-new-tokens": 6, "steps": 2,
        "batch-prompts": 2, "group-size": 4, "max-sampling-rounds": 1, "micro-batch-size": 4, "bucket": "all",
        "save-every": 1, "log-samples-every": 0, "lr": 1e-3, "loss": "dapo",
        "reward": ["shard_fixtures:length_reward"]}  # random tiny models never answer: a reward with variance


def write_spec(tmp_path: Path, shards, model, arms: dict, warm=None, comparisons=(), levers=None, **base) -> Path:
    spec = {"title": "tiny", "out": str(tmp_path / "work"), "results": str(tmp_path / "results"),
            "base": {"shards": str(shards), "model": str(model), **TINY, **base},
            "eval": {"limit": 3, "samples": 2}, "arms": arms, "comparisons": [list(c) for c in comparisons]}
    if warm:
        spec["warm"] = warm
    if levers:
        spec["levers"] = levers
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "tiny-exp.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# ---- the report's statistics against hand-computed values ---------------------------------------------------------

# a: 1 1 0 1 1 0, b: 0 0 0 1 0 0 -> d = 1 1 0 0 1 0 over problems p p q q r r
A, B, DOCS = [1, 1, 0, 1, 1, 0], [0, 0, 0, 1, 0, 0], ["p", "p", "q", "q", "r", "r"]
# by hand: mean d = 0.5; var(d) (n - 1) = 6 x 0.25 / 5 = 0.3. ANOVA by problem: group means 1, 0, 0.5; MSB =
# 2 (0.25 + 0.25 + 0) / 2 = 0.5, MSW = 0.5 / 3; m0 = (6 - 12 / 6) / 2 = 2; ICC = (0.5 - 1/6) / (0.5 + 1/6) = 0.5;
# m = 12 / 6 = 2, design effect = 1 + (2 - 1) 0.5 = 1.5; SE = sqrt(0.3 / 6 x 1.5) = sqrt(0.075)
SE = math.sqrt(0.075)
Z95 = 1.959963984540054


def test_paired_difference_matches_hand_computed_values():
    r = paired_difference(A, B, DOCS)
    assert r["diff"] == pytest.approx(0.5) and r["icc"] == pytest.approx(0.5)
    assert r["design_effect"] == pytest.approx(1.5) and r["se"] == pytest.approx(SE)
    assert r["ci"] == pytest.approx([0.5 - Z95 * SE, 0.5 + Z95 * SE])
    assert r["p_value"] == pytest.approx(math.erfc(0.5 / SE / math.sqrt(2)), rel=1e-9)  # = 0.0679
    assert r["p_value"] == pytest.approx(0.0679, abs=1e-4)
    assert r["detectable_effect"] == pytest.approx((Z95 + 0.8416212335729143) * SE)
    # independent problems (one position each): no design effect
    assert paired_difference(A, B, list("abcdef"))["design_effect"] == 1.0
    same = paired_difference([1, 0, 1], [1, 0, 1], list("abc"))
    assert same["diff"] == 0 and same["p_value"] == 1.0


def fake_record(kind: str, outcomes: list[int], keys: list[str], docs: list[str]) -> dict:
    """An arm record whose every bucket holds the same positions with these sampled-NTR outcomes (the keys in the
    position key's layout doc_id/window/t, in the document given: the report clusters by it)."""
    from rpt_train.stats import wilson

    keys = [f"{d}/0/{k}" for k, d in zip(keys, docs)]
    positions = [{"key": k, "doc_id": d, "correct": [bool(o), False], "greedy_correct": bool(o), "ntp_correct": False,
                  "right_tokens": [2 if o else 0, 0]} for k, d, o in zip(keys, docs, outcomes)]
    p = sum(outcomes) / len(outcomes)
    bucket = {"n": len(keys), "ntr_accuracy": p, "ntr_greedy_accuracy": p, "ntr_pass_at_k": p, "answer_rate": 1.0,
              "ntp_accuracy": 0.0, "right_tokens_mean": 2.0 if p else None, "right_bytes_mean": 3.0 if p else None,
              "multi_token_share": 1.0 if p else None, "right_answers": sum(outcomes)}
    bucket |= {f"{m}_ci": wilson(bucket[m], len(keys)) for m in report.TITLES}
    ev = {b: dict(bucket) for b in EVAL_BUCKETS} | {"positions": positions, "chosen": {b: keys for b in EVAL_BUCKETS}}
    return {"kind": kind, "eval": ev, "compute": {"rollout_tokens": 10, "forward_tokens": 100, "backward_tokens": 20,
                                                  "flops": 2e3 if kind != "eval" else 0, "seconds": 1.0,
                                                  "machine": "test"}}


def test_report_statistics_on_a_fixed_table(tmp_path):
    spec_path = write_spec(tmp_path, "unused-shards", "demo", {"a": {"kind": "rpt"}, "b": {"kind": "eval"}},
                           comparisons=[("a", "b")])
    spec = experiment.load_spec(str(spec_path))
    keys = [f"k{i}" for i in range(6)]
    spec.arms_dir.mkdir(parents=True)
    (spec.arms_dir / "a.json").write_text(json.dumps(fake_record("rpt", A, keys, DOCS)))
    (spec.arms_dir / "b.json").write_text(json.dumps(fake_record("eval", B, keys, DOCS)))
    res = json.loads(report.write_report(spec).read_text())
    assert set(res) >= {"arms", "compute", "comparisons", "verdict", "flops_formula"}
    c = res["comparisons"]["a - b"]["buckets"]["all"]
    assert (c["diff"], c["design_effect"], c["a"], c["b"]) == pytest.approx((0.5, 1.5, 4 / 6, 1 / 6))
    assert c["p_value"] == pytest.approx(math.erfc(0.5 / SE / math.sqrt(2)))
    assert c["ci"] == pytest.approx([0.5 - Z95 * SE, 0.5 + Z95 * SE])
    assert "no significant difference" in res["comparisons"]["a - b"]["verdict"]  # p = 0.068 > 0.05
    assert res["compute"]["b"]["flops"] == 0 and res["compute"]["a"]["flops"] == 2e3
    assert res["comparisons"]["a - b"]["right_tokens_mean_diff"]["all"] == 0.0
    assert res["arms"]["a"]["all"]["ntr_accuracy_ci"][0] < 4 / 6 < res["arms"]["a"]["all"]["ntr_accuracy_ci"][1]
    md = (tmp_path / "results" / "tiny-exp.md").read_text()
    assert "| a - b |" in md and "+0.500" in md and (tmp_path / "results" / "tiny-exp.png").stat().st_size > 0


def test_the_committed_power_experiment_reads_with_the_new_report(tmp_path):
    """The bespoke script's records (issue 23) through the spec port: same numbers, paired comparisons."""
    shutil.copytree(REPO / "results" / "smollm2-champ-power.arms", tmp_path / "smollm2-champ-power.arms")
    raw = yaml.safe_load((REPO / "pipelines" / "experiments" / "smollm2-champ-power.yaml").read_text())
    raw["results"] = str(tmp_path)
    path = tmp_path / "smollm2-champ-power.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    res = report.build_report(experiment.load_spec(str(path)))
    assert res["missing_arms"] == [] and list(res["arms"]) == ["before", "rpt", "rpt-seed1", "shuffled", "sft"]
    assert res["arms"]["before"]["all"]["ntr_accuracy"] == 0.15 and res["arms"]["rpt"]["all"]["ntr_accuracy"] == 0.31
    c = res["comparisons"]["rpt - before"]["buckets"]["all"]
    assert c["n"] == 200 and c["diff"] == pytest.approx(0.16) and c["p_value"] < 0.01
    assert res["compute"]["rpt"]["rollout_tokens"] == 28152 and res["compute"]["rpt"]["flops"] is None


# ---- spec checks -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arms,extra,message", [
    ({"x": {"kind": "nope"}}, {}, "kind 'nope'"),
    ({"x": {"kind": "rpt", "no_such_option": 1}}, {}, "unknown option 'no_such_option'"),
    ({"x": {"kind": "sft", "match_flops": "y"}}, {}, "refers to arm 'y'"),
    ({"x": {"kind": "eval"}, "y": {"kind": "sft", "match_flops": "x"}}, {}, "trains nothing"),
    ({"x": {"kind": "rpt"}}, {"comparisons": [["x", "z"]]}, "must name two arms"),
    ({"x": {"kind": "rpt"}}, {"bogus": 1}, "unknown key"),
    ({"x": {"kind": "rpt"}, "y": {"kind": "sft", "contexts_of": "x", "bucket": "hard"}}, {}, "drop its own bucket"),
    # an arm's eval: may change how its model is run, not the task the report pairs arms on by position
    *[({"x": {"kind": "rpt", "eval": {"template": "think", **bad}}}, {}, f"eval: section sets {name}, which change")
      for name, bad in [("labels-length", {"labels-length": 4}), ("max-context-tokens", {"max-context-tokens": 32}),
                        ("answer-format", {"answer-format": "answer_tag"}), ("limit, samples", {"limit": 9,
                                                                                               "samples": 2}),
                        ("seed", {"seed": 3}), ("bucket-thresholds", {"bucket-thresholds": [1.0, 2.0, 3.0]}),
                        ("split", {"split": "all"}), ("baseline", {"baseline": "demo"})]],
])
def test_bad_specs_are_refused_with_the_file_named(tmp_path, arms, extra, message):
    path = write_spec(tmp_path, "s", "demo", arms)
    raw = yaml.safe_load(path.read_text()) | extra
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(UserError, match=message) as e:
        experiment.load_spec(str(path))
    assert str(path) in str(e.value)


def block_split_evals() -> tuple[dict, dict]:
    """Two arms' eval records on ONE continuous stream split by blocks of 16 windows: 20 held-out blocks of 10
    positions, a whole block moving together under arm a (a block-level effect)."""
    import random

    rng, keys, a, b = random.Random(0), [], [], []
    for block in range(20):
        shift = rng.random() < 0.5
        for j in range(10):
            keys.append(f"stream0/{block * 16 + j}/{j}")
            a.append(shift or rng.random() < 0.2)
            b.append(rng.random() < 0.2)
    rec = lambda k, c: {"key": k, "doc_id": "stream0", "correct": [c, False], "greedy_correct": c,  # noqa: E731
                        "ntp_correct": c}
    return tuple({"chosen": {bb: keys for bb in EVAL_BUCKETS}, "positions": [rec(k, c) for k, c in zip(keys, x)],
                  "meta": {"split_block_windows": 16}} for x in (a, b))


def test_report_and_eval_baseline_cluster_paired_positions_alike():
    """The experiment report and `rpt-train eval --baseline` give one interval on the same positions: both cluster
    by the held-out split unit (compare.paired_by_position), on a stream split by blocks its block, not the one
    document (one cluster: design effect 1, an interval far too narrow)."""
    from rpt_train.compare import cluster_of, compare

    ea, eb = block_split_evals()
    by_eval = compare(ea, eb, block_windows=16)["all"]["ntr_accuracy"]
    by_report = report.compare({"eval": ea}, {"eval": eb}, "ntr_accuracy", 0.05, 0.8)["all"]
    for k in ("diff", "ci", "p_value", "design_effect", "se"):
        assert by_report[k] == pytest.approx(by_eval[k])
    keys = ea["chosen"]["all"]
    a, b = ([float(p["correct"][0]) for p in e["positions"]] for e in (ea, eb))
    blocks = paired_difference(a, b, [cluster_of(k, 16) for k in keys])
    assert by_report["ci"] == pytest.approx(blocks["ci"]) and by_report["design_effect"] > 2
    assert by_report["ci"][0] < paired_difference(a, b, ["stream0"] * len(a))["ci"][0]  # wider than by document
    # split by document (structured shards, older records without the field): the document, as before
    ea["meta"], eb["meta"] = {"split_block_windows": 0}, {}
    assert report.compare({"eval": ea}, {"eval": eb}, "ntr_accuracy", 0.05, 0.8)["all"]["design_effect"] == 1.0


def test_sft_on_another_arms_contexts_takes_its_positions(tmp_path, monkeypatch):
    """contexts.jsonl indexes the candidate positions of the arm that rolled them out: the sft arm inherits them."""
    path = write_spec(tmp_path, "s", "demo", {"x": {"kind": "rpt", "bucket": "hard"},
                                              "y": {"kind": "sft", "contexts_of": "x", "seed": 3}})
    spec = experiment.load_spec(str(path))
    assert experiment.position_options(spec.arms["x"]) == {"bucket": "hard"}
    assert experiment.position_options(spec.arms["y"]) == {}  # seed orders draws; it picks no position
    exp = experiment.Experiment(spec)
    spec.arms_dir.mkdir(parents=True)
    (spec.arms_dir / "x.json").write_text("{}")
    (spec.arms_dir / "x.contexts.jsonl").write_text('{"step": 1, "contexts": [0]}\n{"step": 2, "contexts": [1]}\n')
    import rpt_train.sft

    seen = {}
    monkeypatch.setattr(rpt_train.sft, "sft_train", lambda cfg, batches, *a, **k: seen.setdefault("cfg", cfg) and {})
    experiment.ARM_KINDS["sft"].run(exp, spec.arms["y"])
    assert (seen["cfg"].bucket, seen["cfg"].steps, seen["cfg"].seed) == ("hard", 2, 3)


def test_sft_on_a_curriculum_arms_contexts_trains_on_the_positions_it_rolled_out(tmp_path, tiny_llama, train_shards,
                                                                                  tiny_tok, monkeypatch):
    """An arm with --curriculum logs each step's indices into its stage's own table (objectives.CurriculumSamples):
    the sft arm with contexts_of it trains, step by step, on exactly the positions that arm rolled out (not on what
    those indices point to in the table of --bucket); a contexts.jsonl whose keys another table rebuilds is refused."""
    import rpt_train.sft as sft
    from rpt_train.objectives import CurriculumSamples
    from rpt_train.samples import TrainSamples

    cur = {"curriculum": ["hard", "easy"], "curriculum_steps": [1]}
    path = write_spec(tmp_path, train_shards, tiny_llama, {"x": {"kind": "rpt", **cur},
                                                           "y": {"kind": "sft", "contexts_of": "x"}})
    spec = experiment.load_spec(str(path))
    exp = experiment.Experiment(spec)
    data = CurriculumSamples(exp.train_config(spec.arms["x"]), tiny_tok, None)  # what x's trainer draws from
    rolled, lines = {}, []
    for step in (1, 2):
        data.set_step(step)
        drawn = data.next_batch(3)
        rolled[step] = [s.key for s in drawn]
        lines.append(json.dumps({"step": step, "contexts": [s.index for s in drawn], "keys": rolled[step]}))
    spec.arms_dir.mkdir(parents=True)
    (spec.arms_dir / "x.json").write_text("{}")
    (spec.arms_dir / "x.contexts.jsonl").write_text("\n".join(lines) + "\n")
    real, trained = sft.sft_train, {}

    def spy(cfg, batches, *a, **k):
        def given(d, step):
            got = batches(d, step)
            trained[step] = [s.key for s in got if s is not None]
            return got
        return real(cfg, given, *a, **k)
    monkeypatch.setattr(sft, "sft_train", spy)
    experiment.ARM_KINDS["sft"].run(exp, spec.arms["y"])
    assert trained == rolled
    # the same indices under another table (x's file read by an arm of bucket all): refused, naming the file
    with pytest.raises(UserError, match="x.contexts.jsonl', step 1: its context indices rebuild other positions"):
        sft.same_contexts(spec.arms_dir / "x.contexts.jsonl")(
            TrainSamples(exp.train_config(spec.arms["y"]), tiny_tok, answers=True), 1)


# ---- multi-token prediction and token counters ---------------------------------------------------------------------

def test_matched_tokens_and_mtp_metrics():
    labels = [" the", " cat", "s"]
    assert [matched_tokens(a, labels) for a in (" the", " the cat", " the cats", " th", "", None, " dog")] == \
        [1, 2, 3, 0, 0, 0, 0]
    sample = type("S", (), {"label_tokens": labels})()
    scored = [Scored(sample=sample, correct=[True, True], answered=[True, True], lengths=[1, 1], ntp_correct=False,
                     completions=["", ""], greedy_correct=False, greedy_completion="", right_tokens=[1, 3]),
              Scored(sample=sample, correct=[False, False], answered=[True, True], lengths=[1, 1], ntp_correct=False,
                     completions=["", ""], greedy_correct=False, greedy_completion="", right_tokens=[0, 0])]
    m = mtp_metrics(scored)
    assert m == {"right_answers": 2, "right_tokens_mean": 2.0, "right_bytes_mean": (4 + 9) / 2,
                 "multi_token_share": 0.5}
    assert mtp_metrics(scored[1:])["right_tokens_mean"] is None


def test_pass_tokens_counts_a_shared_prefix_once_per_group():
    from rpt_train.rollout import RolloutBatch
    from rpt_train.update import pass_tokens

    pm = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])  # 2 groups of G = 2, prompts of 2 and 3 tokens
    cm = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]])
    batch = RolloutBatch(prompt_ids=pm, prompt_mask=pm, completion_ids=cm, completion_mask=cm, logprobs=None,
                         texts=[""] * 4)
    assert pass_tokens(batch, [0, 1, 2, 3], shared=False, G=2) == 10 + 7
    assert pass_tokens(batch, [0, 1, 2, 3], shared=True, G=2) == 2 + 3 + 7
    assert pass_tokens(batch, [1, 2], shared=True, G=2) == 2 + 3 + 1 + 3


# ---- FLOP matching ---------------------------------------------------------------------------------------------------

def test_sft_stops_at_its_token_budget(tiny_llama, train_shards, tmp_path):
    from rpt_train.sft import next_contexts, read_jsonl, sft_train

    cfg = dict(shards=str(train_shards), model=str(tiny_llama), bucket="all", batch_prompts=2, micro_batch_size=2,
               template="answer-only", chat_template="off", response_prefix="\\boxed{", lr=1e-3, device="cpu",
               save_every=100)
    free = sft_train(TrainConfig(**cfg, out=str(tmp_path / "free"), steps=5), next_contexts(2))
    per_step = [m["forward_tokens"] for m in read_jsonl(tmp_path / "free" / "metrics.jsonl")]
    assert free["trained_tokens"] == sum(per_step) and len(per_step) == 5
    budget = sum(per_step[:3]) + per_step[3] - 1  # three steps fit, the fourth would pass it
    got = sft_train(TrainConfig(**cfg, out=str(tmp_path / "capped"), steps=100), next_contexts(2), max_tokens=budget)
    assert got["steps"] == 3 and got["trained_tokens"] == sum(per_step[:3]) <= budget
    assert experiment.matched_tokens(6 * 1000 * budget + 5, 1000) == budget


# ---- end to end --------------------------------------------------------------------------------------------------------

SMOKE_ARMS = {"before": {"kind": "eval"}, "rpt": {"kind": "rpt"}, "shuffled": {"kind": "shuffled"},
              "sft": {"kind": "sft", "contexts_of": "rpt"},
              "sft-flops": {"kind": "sft", "match_flops": "rpt", "sampler": "uniform"}}


def test_smoke_spec_runs_every_arm_kind_and_reports(tiny_llama, train_shards, tmp_path):
    path = write_spec(tmp_path, train_shards, tiny_llama, SMOKE_ARMS, warm={"fraction": 0.3, "steps": 2, "batch": 2},
                      comparisons=[("rpt", "before"), ("rpt", "shuffled"), ("rpt", "sft-flops")],
                      levers={"positions": 3})
    out = runner.run_experiment(str(path))
    res = json.loads(out.read_text())
    assert list(res["arms"]) == list(SMOKE_ARMS) and res["missing_arms"] == []
    for arm in res["arms"].values():
        for b in EVAL_BUCKETS:
            assert {"n", "ntr_accuracy", "ntr_greedy_accuracy", "ntr_pass_at_k", "ntp_accuracy", "ntr_accuracy_ci",
                    "right_tokens_mean", "right_bytes_mean", "multi_token_share"} <= set(arm[b])
    n = experiment.non_embedding_params(str(tiny_llama))
    for name, c in res["compute"].items():
        assert set(report.COMPUTE) <= set(c) and c["machine"]
        assert c["flops"] == 2 * n * c["forward_tokens"] + 4 * n * c["backward_tokens"]
    rpt, sft_flops = res["compute"]["rpt"], res["compute"]["sft-flops"]
    assert res["compute"]["before"]["flops"] == 0 and rpt["rollout_tokens"] > 0 and rpt["backward_tokens"] > 0
    assert rpt["forward_tokens"] > rpt["rollout_tokens"] + rpt["backward_tokens"]
    # FLOP matching: the SFT arm's budget is the rpt arm's FLOPs in tokens at 6 N each, and it stays within it
    assert sft_flops["budget_tokens"] == int(rpt["flops"] // (6 * n)) >= sft_flops["trained_tokens"] > 0
    assert 0 < sft_flops["flops"] <= rpt["flops"]
    assert set(res["comparisons"]) == {"rpt - before", "rpt - shuffled", "rpt - sft-flops"}
    for c in res["comparisons"].values():
        assert {"diff", "ci", "p_value", "design_effect", "detectable_effect"} <= set(c["buckets"]["all"])
        assert c["verdict"]
    # the warm start: documents neither held out nor trained on; every arm starts from its model
    kept = tmp_path / "results" / "tiny-exp.arms"
    warm_docs = set((tmp_path / "work" / "warm" / "docs.txt").read_text().split())
    assert warm_docs and json.loads((kept / "warm.json").read_text())["documents"] == len(warm_docs)
    rec = json.loads((kept / "rpt.json").read_text())
    assert rec["train_config"]["model"] == str(tmp_path / "work" / "warm" / "train" / "model")
    assert rec["train_config"]["exclude_docs"] == str(tmp_path / "work" / "warm" / "docs.txt")
    # the sft arm trained on exactly the contexts the rpt arm rolled out
    drawn = [json.loads(x)["contexts_drawn"] for x in (kept / "rpt.metrics.jsonl").read_text().splitlines()]
    assert json.loads((kept / "sft.json").read_text())["sft"]["contexts"] == sum(drawn) > 0
    # a finished arm is not rerun; --rerun runs it over
    stamp = (kept / "rpt.json").stat().st_mtime_ns
    runner.run_experiment(str(path), ["rpt"])
    assert (kept / "rpt.json").stat().st_mtime_ns == stamp
    # the levers stage: both models, the prompts the tokenizer allows (no chat template here)
    assert set(res["prompt_levers"]["models"]) == {"base", "warm-started"}
    assert set(res["prompt_levers"]["models"]["base"]) == {"raw context", "answer-only, no chat template"}
    md = (tmp_path / "results" / "tiny-exp.md").read_text()
    assert "P(a right first answer token)" in md
    assert "## Compute per arm" in md and "2 N forward_tokens + 4 N backward_tokens" in md and "## Verdict" in md


def test_an_arm_needs_its_dependency(tiny_llama, train_shards, tmp_path):
    path = write_spec(tmp_path, train_shards, tiny_llama, SMOKE_ARMS)
    with pytest.raises(UserError, match="needs arm 'rpt' finished first"):
        runner.run_experiment(str(path), ["sft"])


class Stop(Exception):
    pass


@pytest.mark.parametrize("kind", ["rpt", "sft"])
def test_a_half_finished_arm_resumes_to_the_uninterrupted_result(kind, tiny_llama, train_shards, tmp_path,
                                                                  monkeypatch):
    import rpt_train.checkpoint as checkpoint
    import rpt_train.trainer as trainer

    arms = {"arm": {"kind": kind, "steps": 3}}
    ref = write_spec(tmp_path / "ref", train_shards, tiny_llama, arms)
    runner.run_experiment(str(ref))
    path = write_spec(tmp_path / "cut", train_shards, tiny_llama, arms)
    real = checkpoint.save_checkpoint

    def save_then_die(out, step, *a, **kw):  # killed right after the checkpoint of step 2
        saved = real(out, step, *a, **kw)
        if step == 2:
            raise Stop
        return saved
    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(Stop):
        runner.run_experiment(str(path))
    kept = tmp_path / "cut" / "results" / "tiny-exp.arms"
    assert not (kept / "arm.json").exists()  # not finished: no record
    monkeypatch.undo()
    runner.run_experiment(str(path))
    a = json.loads((tmp_path / "ref" / "results" / "tiny-exp.arms" / "arm.json").read_text())
    b = json.loads((kept / "arm.json").read_text())
    assert b["eval"]["positions"] == a["eval"]["positions"] and b["eval"]["all"] == a["eval"]["all"]
    strip = lambda path: [{k: v for k, v in json.loads(x).items() if "seconds" not in k and "per_s" not in k}  # noqa: E731
                          for x in path.read_text().splitlines()]
    assert strip(kept / "arm.metrics.jsonl") == strip(tmp_path / "ref" / "results" / "tiny-exp.arms" / "arm.metrics.jsonl")
    for key in ("rollout_tokens", "forward_tokens", "backward_tokens", "flops"):
        assert b["compute"][key] == a["compute"][key]
    from safetensors.torch import load_file

    def weights(root):
        work = root / "work" / "arm" / "train"
        model_dir = work / "model" if kind == "sft" else sorted((work / "checkpoints").glob("step-*"))[-1]
        return load_file(model_dir / "model.safetensors")
    wa, wb = weights(tmp_path / "ref"), weights(tmp_path / "cut")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_power_spec_configures_the_arms_as_the_committed_run_did():
    """The port of the bespoke script: every arm's training options and the eval design equal those recorded in
    its committed records (the same held-out split, seed and positions), option by option."""
    from rpt_train.config import to_dict

    spec = experiment.load_spec(str(REPO / "pipelines" / "experiments" / "smollm2-champ-power.yaml"))
    exp = experiment.Experiment(spec)
    kept = REPO / "results" / "smollm2-champ-power.arms"
    for arm in spec.arms:
        rec = json.loads((kept / f"{arm}.json").read_text())
        new_eval = to_dict(exp.eval_config(exp.start_model()))
        assert {k: new_eval[k] for k in rec["eval_config"]} == rec["eval_config"], arm
        if spec.arms[arm].kind != "eval":  # (the before record also kept a training config: unused)
            new = to_dict(exp.train_config(spec.arms[arm]))
            # out: the old record kept the root; rollout_gather: a torchrun-only option whose default became "auto"
            skip = ("out", "resume", "rollout_gather")
            assert {k: new[k] for k in rec["train_config"] if k not in skip} == \
                {k: v for k, v in rec["train_config"].items() if k not in skip}, arm
    warm = json.loads((kept / "warm.json").read_text())
    assert {k: warm[k] for k in experiment.WARM} == spec.warm


# ---- carried over from the bespoke power script's tests (issue 16) -------------------------------------------------

@pytest.mark.parametrize("k,n,lo,hi", [  # Newcombe (1998), Stat. Med. 17:857, Table II, method 3 (Wilson score)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_matches_published_values(k, n, lo, hi):
    from rpt_train.stats import wilson

    assert wilson(k / n, n) == pytest.approx([lo, hi], abs=1e-4)


def test_wilson_bounds_are_exact_at_zero_and_one():
    from rpt_train.stats import wilson

    assert wilson(0.0, 100)[0] == 0.0 and wilson(1.0, 100)[1] == 1.0
    assert wilson(None, 10) is None and wilson(0.5, 0) is None


def test_detectable_effect_matches_the_textbook_sample_size():
    from rpt_train.stats import detectable_effect

    # Fleiss without continuity correction: 0.5 vs 0.6 at 5% / 80% needs 387.3 per arm
    assert detectable_effect(388, 0.5) == pytest.approx(0.1, abs=5e-4)
    assert detectable_effect(388, 0.5) < 0.1 < detectable_effect(387, 0.5)
    # a design effect of 2 halves the sample: n = 200 at deff 2 is n = 100 independent positions
    assert detectable_effect(200, 0.0, deff=2.0) == pytest.approx(detectable_effect(100, 0.0))
    assert detectable_effect(100, 0.0) > detectable_effect(400, 0.0) > 0


def test_icc_and_design_effect():
    from rpt_train.stats import design_effect, icc_anova

    assert icc_anova([[1, 1, 1], [0, 0, 0], [1, 1, 1]]) == pytest.approx(1.0)
    assert icc_anova([[1, 0], [1, 0], [0, 1]]) == 0.0  # within-problem spread only: clipped at 0
    assert design_effect([3, 3, 3], 0.5) == pytest.approx(2.0)
    assert design_effect([1] * 10, 0.9) == pytest.approx(1.0)


def test_answer_target_leaves_out_the_response_prefix():
    from rpt_train.sft import answer_target

    assert answer_target(" the", "\\boxed{") == " the}"
    assert answer_target(" the", "") == "\\boxed{ the}"


class GreedyOracle:
    """Right answer when decoding greedily, a wrong one when sampling."""

    def __init__(self, tokenizer, samples):
        from rpt_train.templates import PromptBuilder

        prompts = PromptBuilder(tokenizer)
        self.by_prompt = {tuple(prompts.ids(s.context)): s for s in samples}

    def generate(self, prompts, params):
        from rpt_train.rollout import RolloutBatch

        texts = []
        for p in prompts:
            label = "".join(self.by_prompt[tuple(p)].label_tokens)
            texts += [f"\\boxed{{{label}}}" if params.greedy else "\\boxed{\x00}"] * params.n
        ones = torch.ones(len(texts), 1, dtype=torch.long)
        return RolloutBatch(prompt_ids=ones, prompt_mask=ones, completion_ids=ones, completion_mask=ones, logprobs=None,
                            texts=texts)


def test_greedy_accuracy_and_intervals_in_the_eval(tiny_llama, train_shards, tiny_tok):
    from rpt_train.config import EvalConfig
    from rpt_train.evaluate import evaluate, select_positions
    from rpt_train.policy import load_policy
    from rpt_train.samples import ShardSet
    from rpt_train.stats import wilson

    cfg = EvalConfig(shards=str(train_shards), limit=5, samples=2, max_new_tokens=4)
    shards = ShardSet(str(train_shards))
    chosen = select_positions(shards, tiny_tok, cfg)
    unique = {s.key: s for b in EVAL_BUCKETS for s in chosen[b]}
    model = load_policy(str(tiny_llama), device="cpu").model
    result = evaluate(model, tiny_tok, GreedyOracle(tiny_tok, unique.values()), cfg, shards, chosen, details=True)
    for b in EVAL_BUCKETS:
        r = result[b]
        assert (r["ntr_greedy_accuracy"], r["ntr_accuracy"], r["ntr_pass_at_k"]) == (1.0, 0.0, 0.0)
        assert r["ntr_greedy_accuracy_ci"] == wilson(1.0, 5) and r["ntr_accuracy_ci"] == wilson(0.0, 5)
        assert result["chosen"][b] == [s.key for s in chosen[b]]
        assert r["right_answers"] == 0 and r["right_tokens_mean"] is None  # only sampled answers count
    assert {p["key"] for p in result["positions"]} == set(unique)
    assert all(p["greedy_correct"] and not any(p["correct"]) for p in result["positions"])


def test_sft_loss_is_cross_entropy_on_the_answer_tokens_only(tiny_llama, train_shards, tiny_tok, tmp_path):
    from rpt_train.policy import load_policy
    from rpt_train.samples import TrainSamples
    from rpt_train.sft import next_contexts, sft_train
    from rpt_train.templates import PromptBuilder

    cfg = TrainConfig(shards=str(train_shards), model=str(tiny_llama), out=str(tmp_path / "sft"), bucket="all",
                      steps=1, batch_prompts=3, micro_batch_size=2, template="answer-only", chat_template="off",
                      response_prefix="\\boxed{", lr=1e-3, device="cpu")
    sft_train(cfg, next_contexts(3))
    logged = json.loads((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()[0])
    # expected: the untrained model's mean NLL of "label}<eos>" after each prompt, one row at a time
    policy = load_policy(str(tiny_llama), device="cpu")
    prompts = PromptBuilder(tiny_tok, "answer-only", "off", "\\boxed{")
    nll, count, tokens = 0.0, 0, 0
    for s in TrainSamples(cfg, tiny_tok).next_batch(3):
        p = prompts.ids(s.context)
        t = tiny_tok(s.label_tokens[0] + "}", add_special_tokens=False)["input_ids"] + [tiny_tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(policy.model(input_ids=torch.tensor([p + t])).logits[0, :-1].float(), -1)
        nll -= sum(float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(t))
        count += len(t)
        tokens += len(p) + len(t)
    assert logged["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert logged["target_tokens"] == count and logged["forward_tokens"] == logged["backward_tokens"] == tokens
    assert (tmp_path / "sft" / "model" / "config.json").exists()


def test_sft_keeps_float32_masters_under_a_bf16_compute_dtype(tiny_llama, train_shards, tmp_path):
    """--dtype bfloat16 is a compute dtype: the SFT arm's weights and their update stay float32 (an AdamW step on
    bf16 weights at a small lr rounds away), as in rpt-train."""
    from transformers import AutoModelForCausalLM

    from rpt_train.policy import load_policy
    from rpt_train.sft import next_contexts, sft_train

    cfg = TrainConfig(shards=str(train_shards), model=str(tiny_llama), out=str(tmp_path / "sft"), bucket="all",
                      steps=1, batch_prompts=3, micro_batch_size=3, template="answer-only", chat_template="off",
                      response_prefix="\\boxed{", lr=1e-6, device="cpu", dtype="bfloat16")
    sft_train(cfg, next_contexts(3))
    before = load_policy(str(tiny_llama), device="cpu").model.state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model").state_dict()
    assert all(t.dtype == torch.float32 for t in after.values())
    moved = sum(int((after[k] != before[k]).sum()) for k in before) / sum(t.numel() for t in before.values())
    assert moved > 0.5


def test_arm_metrics_fall_back_to_the_copy_kept_in_git(tmp_path):
    path = write_spec(tmp_path, "s", "demo", {"rpt": {"kind": "rpt"}})
    spec = experiment.load_spec(str(path))
    assert report.arm_metrics(spec, "rpt") == []
    spec.arms_dir.mkdir(parents=True)
    (spec.arms_dir / "rpt.metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    assert report.arm_metrics(spec, "rpt") == [{"step": 1, "reward": 0.5}]
    (Path(spec.out) / "rpt" / "train").mkdir(parents=True)
    (Path(spec.out) / "rpt" / "train" / "metrics.jsonl").write_text('{"step": 1, "reward": 0.25}\n')
    assert report.arm_metrics(spec, "rpt")[0]["reward"] == 0.25  # this machine's run first


def test_the_report_says_which_arms_are_evaluated_with_their_own_settings(tmp_path):
    """An arm with eval: overrides (a thinking arm's template) is named in the report with its settings, since its
    comparisons with the common design's arms mix two eval prompts; an arm without them is not."""
    arms = {"a": {"kind": "rpt", "eval": {"template": "think", "think-budget": 16}}, "b": {"kind": "eval"}}
    spec = experiment.load_spec(str(write_spec(tmp_path, "unused-shards", "demo", arms, comparisons=[("a", "b")])))
    keys = [f"k{i}" for i in range(6)]
    spec.arms_dir.mkdir(parents=True)
    for name, outcomes in (("a", A), ("b", B)):
        (spec.arms_dir / f"{name}.json").write_text(json.dumps(fake_record("rpt", outcomes, keys, DOCS)))
    res = json.loads(report.write_report(spec).read_text())
    assert res["arm_eval_overrides"] == {"a": {"template": "think", "think_budget": 16}}
    md = (spec.arms_dir.parent / f"{spec.name}.md").read_text()
    assert "**`a` is evaluated with its own settings** (template 'think', think-budget 16)" in md
    assert "**`b` is evaluated" not in md


def test_the_verdict_says_which_results_survive_bonferroni_over_all_its_tests(tmp_path):
    """Three tests (a - b, c - d, factor f): p = 0.068, 1 and 0.068 (the factor halves diff and SE alike). At alpha
    0.25 Bonferroni asks p < 0.25 / 3 = 0.0833: a - b and the factor pass, c - d does not; at 0.05 none does."""
    arms = {x: {"kind": "rpt"} for x in "abcd"}
    path = write_spec(tmp_path, "unused-shards", "demo", arms, comparisons=[("a", "b"), ("c", "d")])
    raw = yaml.safe_load(path.read_text()) | {"factors": {"f": [["a", "b"], ["c", "d"]]}, "alpha": 0.25}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    keys = [f"k{i}" for i in range(6)]
    spec = experiment.load_spec(str(path))
    spec.arms_dir.mkdir(parents=True)
    for name, outcomes in zip("abcd", (A, B, B, B)):
        (spec.arms_dir / f"{name}.json").write_text(json.dumps(fake_record("rpt", outcomes, keys, DOCS)))
    verdict = report.build_report(spec)["verdict"]
    assert "over these 3 tests Bonferroni asks p < 0.0833, which only a - b, factor f pass." in verdict
    raw["alpha"] = 0.05
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert "Bonferroni asks p < 0.0167, which none passes." in report.build_report(experiment.load_spec(str(path)))["verdict"]


def test_a_factor_is_the_mean_of_its_simple_effects_on_a_fixed_table(tmp_path):
    """Factor f = mean of (a - b) and (c - d): with c = d the per-position differences halve, so the effect is 0.25
    and its SE half the comparison's (the ICC, hence the design effect and the p-value, unchanged)."""
    arms = {x: {"kind": "rpt"} for x in "abcd"}
    path = write_spec(tmp_path, "unused-shards", "demo", arms)
    raw = yaml.safe_load(path.read_text()) | {"factors": {"f": [["a", "b"], ["c", "d"]]}}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    spec = experiment.load_spec(str(path))
    keys = [f"k{i}" for i in range(6)]
    spec.arms_dir.mkdir(parents=True)
    for name, outcomes in zip("abcd", (A, B, B, B)):
        (spec.arms_dir / f"{name}.json").write_text(json.dumps(fake_record("rpt", outcomes, keys, DOCS)))
    res = report.build_report(spec)
    f = res["factors"]["f"]["by_metric"]["ntr_accuracy"]["all"]
    assert (f["diff"], f["se"], f["design_effect"]) == pytest.approx((0.25, SE / 2, 1.5))
    assert f["p_value"] == pytest.approx(math.erfc(0.5 / SE / math.sqrt(2)))
    assert res["factors"]["f"]["right_tokens_mean_diff"]["all"] == 0.0
    assert "Factor f (a - b; c - d)" in res["verdict"] and "+0.250" in res["verdict"]
    with pytest.raises(UserError, match="factor 'g'"):
        raw["factors"] = {"g": [["a", "zz"]]}
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        experiment.load_spec(str(path))


# ---- every arm's eval is the common design (+ its own eval: section) -------------------------------------------------

def fake_run(exp, arm) -> str:
    """The arm's run directory as train() leaves it for the eval: config.yaml (the arm's train config), run.json."""
    from rpt_train.config import to_dict

    cfg = exp.train_config(arm, check_only=True)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg)))
    (run / "run.json").write_text("{}")
    return cfg.out


def eval_of(exp, model, arm=None) -> dict:
    from rpt_train.config import to_dict

    return {k: v for k, v in to_dict(exp.eval_config(model, arm)).items() if k != "model"}


THINKER = {"kind": "rpt", "template": "think", "response-prefix": "", "think-budget": 8, "think-overflow": "close",
           "sampler": "uniform"}


def test_an_arm_is_evaluated_with_the_common_design_not_its_training_prompt(tmp_path):
    """An arm that trains with its own temperature or think template/budget/close and has no eval: section is
    evaluated exactly as `before` (its run's config.yaml is not inherited: RUN_OPTIONS are pinned to the design's),
    with or without a base template; its eval: section is the only difference, key for key; `rpt-train eval` of
    the same run directory still evaluates as the run did (that rule stays)."""
    from rpt_train.config import EvalConfig, load_config

    own = {"template": "think", "response_prefix": "", "think_overflow": "close", "think_budget": 16,
           "answer_room": 16}
    arms = {"before": {"kind": "eval"}, "hot": {"kind": "rpt", "temperature": 1.0}, "close": THINKER,
            "own": {**THINKER, "eval": {k.replace("_", "-"): v for k, v in own.items()}}}
    for drop_template in (False, True):
        tmp = tmp_path / str(drop_template)
        path = write_spec(tmp, "unused-shards", "demo", arms)
        if drop_template:  # the template and response prefix are then EvalConfig's defaults for `before`
            raw = yaml.safe_load(path.read_text())
            del raw["base"]["template"], raw["base"]["response-prefix"]
            path.write_text(yaml.safe_dump(raw))
        spec = experiment.load_spec(str(path))
        exp = experiment.Experiment(spec)
        common = eval_of(exp, exp.start_model(), spec.arms["before"])
        for name in ("hot", "close"):
            assert eval_of(exp, fake_run(exp, spec.arms[name]), spec.arms[name]) == common, name
        mine = eval_of(exp, fake_run(exp, spec.arms["own"]), spec.arms["own"])
        assert {k for k in common if mine[k] != common[k]} == {k for k in own if own[k] != common[k]}
        assert {k: mine[k] for k in own} == own
        # plain `rpt-train eval --model RUN` keeps taking the run's prompt and sampling
        plain = load_config(EvalConfig, None, {"shards": "unused-shards", "model": str(exp.root / "hot" / "train")})
        assert plain.temperature == 1.0
        plain = load_config(EvalConfig, None, {"shards": "unused-shards", "model": str(exp.root / "close" / "train")})
        assert (plain.template, plain.think_overflow, plain.think_budget) == ("think", "close", 8)


def test_an_arm_that_trains_its_own_prompt_without_an_eval_section_is_noted_at_load(tmp_path, capsys):
    """A close-trained thinking arm without an eval: section loads, is named once on stderr with its keys (the eval
    is the common answer-only design) and its eval after training is accepted (it was refused after training); an
    arm with an eval: section, one whose options leave the prompt alone, and a non-training arm are not named."""
    arms = {"before": {"kind": "eval", "temperature": 2.0}, "think": THINKER, "lr": {"kind": "rpt", "lr": 1e-2},
            "hot": {"kind": "rpt", "temperature": 1.0, "eval": {"temperature": 1.0}}}
    spec = experiment.load_spec(str(write_spec(tmp_path, "unused-shards", "demo", arms)))
    err = capsys.readouterr().err
    notes = [x for x in err.splitlines() if "arm '" in x]
    assert len(notes) == 1 and notes[0].startswith(f"note: spec '{spec.path}': arm 'think' trains with ")
    for said in ("--template 'think' (eval: 'answer-only')", "--response-prefix ''", "--think-budget 8 (eval: 0)",
                 "--think-overflow 'close' (eval: 'fail')", "evaluated with the spec's common design",
                 "give it an eval: section"):
        assert said in notes[0], said
    assert "'hot'" not in notes[0] and "'lr'" not in notes[0] and "'before'" not in notes[0]
    exp = experiment.Experiment(spec)
    cfg = exp.eval_config(fake_run(exp, spec.arms["think"]), spec.arms["think"])
    assert (cfg.template, cfg.think_overflow, cfg.think_budget) == ("answer-only", "fail", 0)
    experiment.load_spec(spec.path)  # the CLI loads a spec twice: the note is said once
    assert "arm 'think'" not in capsys.readouterr().err


def test_the_committed_specs_evaluate_every_arm_with_the_common_design():
    """Every arm of pipelines/experiments/*.yaml, its run directory as training leaves it: the eval equals the one of
    a model that is no run (the design plus the arm's own eval: section); only rlp is noted (trains thoughts,
    evaluated answer-only on purpose)."""
    import tempfile

    for path in sorted((REPO / "pipelines" / "experiments").glob("*.yaml")):
        spec = experiment.load_spec(str(path))
        spec.out = tempfile.mkdtemp(prefix="rpt-spec-")
        exp = experiment.Experiment(spec)
        for name, arm in spec.arms.items():
            if arm.kind in ("rpt", "shuffled"):
                assert eval_of(exp, fake_run(exp, arm), arm) == eval_of(exp, "demo", arm), (path.name, name)
        shutil.rmtree(spec.out, ignore_errors=True)


def test_every_committed_spec_loads_with_its_arms_eval_sections():
    """The arms' eval: sections of pipelines/experiments/*.yaml set only how the model is run (ARM_EVAL): each spec
    loads, rpt-think's thinking eval included."""
    for path in sorted((REPO / "pipelines" / "experiments").glob("*.yaml")):
        spec = experiment.load_spec(str(path))
        assert all(set(arm.eval) <= set(experiment.ARM_EVAL) for arm in spec.arms.values()), path.name
    spec = experiment.load_spec(str(REPO / "pipelines" / "experiments" / "smollm2-champ-objectives.yaml"))
    assert spec.arms["rpt-think"].eval == {"template": "think", "response_prefix": "", "think_overflow": "close",
                                           "think_budget": 16, "answer_room": 16}


def test_the_objectives_spec_notes_only_rlp(capsys):
    experiment._NOTED.clear()
    experiment.load_spec(str(REPO / "pipelines" / "experiments" / "smollm2-champ-objectives.yaml"))
    notes = [x for x in capsys.readouterr().err.splitlines() if x.startswith("note: spec")]
    assert len(notes) == 1 and "arm 'rlp' trains with --think-budget 32 (eval: 0);" in notes[0]
    assert "rpt-think" not in notes[0]


def test_an_experiment_under_torchrun_is_refused_at_once(tmp_path, monkeypatch):
    """Arms run in one process: under torchrun every rank would run the warm start and the arms and write the same
    files. Refused before the spec loads (a spec that does not exist), saying how to use several GPUs instead."""
    from click.testing import CliRunner

    from rpt_train.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="torchrun.*CUDA_VISIBLE_DEVICES=1 rpt-train experiment SPEC ARM"):
        runner.run_experiment(str(tmp_path / "missing.yaml"))
    out = CliRunner().invoke(main, ["experiment", str(tmp_path / "missing.yaml")])
    assert out.exit_code != 0 and "WORLD_SIZE=2" in out.output and "--report-only" in out.output
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError, match="missing.yaml"):  # one process: the spec is read
        runner.run_experiment(str(tmp_path / "missing.yaml"))


def test_warm_start_made_with_other_warm_or_base_options_is_refused(tmp_path, monkeypatch):
    """A warm start is reused only when its warm.json was made with the spec's warm: options (fraction, steps,
    batch, lr), base shards and model (paths as given) and held-out split (heldout-fraction, split-seed: they decide
    the warm documents too): a change is one UserError naming the keys and saying to delete OUT/warm; an older
    warm.json without some of these keys is accepted (those not checked). The committed specs accept
    their kept warm.json."""
    shards, model = tmp_path / "shards", tmp_path / "model"
    warm = {"fraction": 0.3, "steps": 2, "batch": 2, "lr": 1e-3}

    def exp_of(**changed):
        split = {k: changed.pop(k) for k in ("heldout-fraction", "split-seed") if k in changed}
        spec = experiment.load_spec(str(write_spec(tmp_path, changed.pop("shards", shards),
                                                   changed.pop("model", model), {"before": {"kind": "eval"}},
                                                   warm={**warm, **changed}, **split)))
        return experiment.Experiment(spec)
    root = tmp_path / "work" / "warm"
    (root / "train" / "model").mkdir(parents=True)
    (root / "train" / "model" / "config.json").write_text("{}")
    record = {"documents": 3, **warm, "base_model": str(model), "base_shards": str(shards),
              "heldout_fraction": TINY["heldout-fraction"], "split_seed": TINY["split-seed"]}
    (root / "warm.json").write_text(json.dumps(record))
    assert exp_of().warm_start() == record
    for changed, says in [({"lr": 1e-5}, "lr: 0.001 there, 1e-05 now"),
                          ({"fraction": 0.5, "batch": 4}, "fraction: 0.3 there, 0.5 now; batch: 2 there, 4 now"),
                          ({"steps": 3}, "steps: 2 there, 3 now"),
                          ({"model": tmp_path / "other"}, f"base_model: '{model}' there, '{tmp_path / 'other'}' now"),
                          ({"shards": tmp_path / "s2"}, f"base_shards: '{shards}' there, '{tmp_path / 's2'}' now"),
                          ({"heldout-fraction": 0.5}, "heldout_fraction: 0.3 there, 0.5 now"),
                          ({"split-seed": 5}, "split_seed: 4 there, 5 now")]:
        with pytest.raises(UserError, match=f"warm start in '{root}' was made with other options \\({says}\\); "
                                            f"delete '{root}' \\(or use another out:\\) to rebuild it"):
            exp_of(**changed).warm_start()
    older = {k: v for k, v in record.items() if k not in ("base_model", "base_shards", "heldout_fraction", "split_seed")}
    (root / "warm.json").write_text(json.dumps(older))
    assert exp_of(model=tmp_path / "other", **{"split-seed": 5}).warm_start() == older
    for bad in (json.dumps(record)[:20], "[]", ""):
        (root / "warm.json").write_text(bad)
        with pytest.raises(UserError, match=f"warm.json' is (damaged|unreadable).*delete '{root}'"):
            exp_of().warm_start()
    for path in sorted((REPO / "pipelines" / "experiments").glob("*.yaml")):
        spec = experiment.load_spec(str(path))
        if spec.warm and (spec.arms_dir / "warm.json").exists():
            base = experiment.load_config(TrainConfig, None, {k: v for k, v in spec.train.items()
                                                              if k in experiment.field_types(TrainConfig)})
            record = json.loads((spec.arms_dir / "warm.json").read_text())
            if not (Path(base.shards) / "manifest.json").exists() and "split_block_windows" in record:
                # the spec's shards are not built here (a clean checkout: `make demo` makes them); the held-out
                # unit they resolve to cannot be read, every other key is still checked
                monkeypatch.setattr(experiment, "split_blocks", lambda base, shards=None: record["split_block_windows"])
            assert experiment.Experiment(spec).check_warm(spec.arms_dir / "warm.json", base), path
            monkeypatch.undo()


# ---- the arms' eval settings: one task for every record ------------------------------------------------------------

def records_with_eval(spec, outcomes: dict, **changed) -> dict:
    """fake_record of each arm with the eval_config the spec gives it (the model its record would name), keys of
    `changed` (arm -> {key: value}) set over it; written to RESULTS/NAME.arms/."""
    from rpt_train.config import to_dict

    exp, keys, out = experiment.Experiment(spec), [f"k{i}" for i in range(6)], {}
    spec.arms_dir.mkdir(parents=True, exist_ok=True)
    for name, x in outcomes.items():
        r = fake_record(spec.arms[name].kind, x, keys, DOCS)
        r["eval_config"] = to_dict(exp.eval_config(str(exp.root / name / "train"), spec.arms[name]))
        r["eval_config"] |= changed.get(name, {})
        (spec.arms_dir / f"{name}.json").write_text(json.dumps(r))
        out[name] = r
    return out


def test_the_report_refuses_arms_evaluated_on_another_task(tmp_path):
    """Arms whose records were evaluated with other samples, seed, limit, labels, split, ... than the spec's design
    (or than each other) are refused by the report, naming the arms, the keys and `--rerun` (they were paired on
    the positions they share: s3 of the review, samples 8 vs 1, seed 0 vs 7 -> a difference, no refusal). What an
    arm's eval: section may set (ARM_EVAL; dtype included: it changes the numbers) may differ and is said in the
    report; where and how fast (device, batch, cache) and the model are never compared; a record of an older
    version without eval_config is accepted with a note."""
    arms = {"a": {"kind": "rpt"}, "b": {"kind": "eval"}}
    path = write_spec(tmp_path, "unused-shards", "demo", arms, comparisons=[("a", "b")])
    spec = experiment.load_spec(str(path))
    records_with_eval(spec, {"a": A, "b": B})
    assert report.build_report(spec)["eval_notes"] == []
    for changed, says in [({"samples": 1, "seed": 7}, "'b': seed 7 there, 0 in the spec; 'b': samples 1 there, 2"),
                          ({"limit": 400}, "'b': limit 400 there, 3 in the spec"),
                          ({"labels_length": 4}, "'b': labels-length 4 there, 2 in the spec"),
                          ({"split": "all"}, "'b': split 'all' there, 'heldout' in the spec"),
                          ({"heldout_fraction": 0.5}, "'b': heldout-fraction 0.5 there, 0.3 in the spec")]:
        records_with_eval(spec, {"a": A, "b": B}, b=changed)
        with pytest.raises(UserError, match=f"arm\\(s\\) b were evaluated on another task .*{says}.*"
                                            f"`rpt-train experiment {path} b --rerun`"):
            report.build_report(spec)
        with pytest.raises(UserError, match="were evaluated on another task"):
            report.write_report(spec)
    # the spec edited since both ran: both named
    records_with_eval(spec, {"a": A, "b": B}, a={"samples": 4}, b={"samples": 4})
    with pytest.raises(UserError, match=f"arm\\(s\\) a, b were .*experiment {path} a b --rerun"):
        report.build_report(spec)
    # a split key the spec leaves to the run or the shards (None) is still compared between the records
    assert spec.eval.get("split_block_windows") is None
    records_with_eval(spec, {"a": A, "b": B}, a={"split_block_windows": 0}, b={"split_block_windows": 16})
    with pytest.raises(UserError, match="other tasks \\(split-block-windows 0 in 'a', 16 in 'b'\\)"):
        report.build_report(spec)
    # runtime settings and the model: no refusal, no note
    records_with_eval(spec, {"a": A, "b": B}, b={"device": "cuda", "rollout_batch_size": 8, "static_cache": True,
                                                 "model": "elsewhere"})
    assert report.build_report(spec)["eval_notes"] == []
    # an arm's own eval settings may differ; the report says so, and that the spec now says otherwise
    records_with_eval(spec, {"a": A, "b": B}, b={"dtype": "bfloat16", "template": "think"})
    res = json.loads(report.write_report(spec).read_text())
    assert res["comparisons"]["a - b"]["buckets"]["all"]["n"] == 6
    notes = res["eval_notes"]
    assert any(n.startswith("Arms evaluated with different dtype (`a` 'float32', `b` 'bfloat16')") for n in notes)
    assert any(n.startswith("Arms evaluated with different template (`a` 'answer-only', `b` 'think')") for n in notes)
    assert any(n.startswith("`b` was evaluated with template 'think', dtype 'bfloat16'; the spec now gives "
                            "'answer-only', 'float32'") for n in notes)
    assert notes[0] in (spec.arms_dir.parent / f"{spec.name}.md").read_text()
    # an older record without eval_config: accepted, said
    rec = json.loads((spec.arms_dir / "b.json").read_text())
    del rec["eval_config"]
    (spec.arms_dir / "b.json").write_text(json.dumps(rec))
    records_with_eval(spec, {"a": A})
    assert report.build_report(spec)["eval_notes"] == [
        "The record(s) of `b` were written without their eval settings (an older version): that they share the "
        "design with the other arms is not checked."]


def test_compare_refuses_records_of_other_tasks():
    """The review's s3: two records evaluated with other samples, seed and positions, paired on the 200 positions
    they share (a difference of 0.02, n = 200): refused; the same records with one eval config are compared."""
    import random

    def rec(seed, cfg, n):
        rng = random.Random(seed)
        pos = [{"key": f"d{i % 20}/0/{i}", "doc_id": f"d{i % 20}", "correct": [rng.random() < .4] * cfg["samples"],
                "greedy_correct": rng.random() < .4, "ntp_correct": rng.random() < .4} for i in range(n)]
        keys = [p["key"] for p in pos]
        return {"eval": {"positions": pos, "chosen": {b: keys for b in EVAL_BUCKETS}, "meta": {}}, "eval_config": cfg}
    a = rec(0, {"samples": 8, "temperature": 1.0, "seed": 0, "limit": 400, "max_new_tokens": 64}, 400)
    b = rec(1, {"samples": 1, "temperature": 0.0, "seed": 7, "limit": 200, "max_new_tokens": 8}, 200)
    with pytest.raises(UserError, match="other tasks \\(samples 8 in 'arm 1', 1 in 'arm 2'; seed 0 in 'arm 1', 7 "
                                        "in 'arm 2'; limit 400 in 'arm 1', 200 in 'arm 2'\\)"):
        report.compare(a, b, "ntr_accuracy", 0.05, 0.8)
    b["eval_config"] = {**a["eval_config"], "temperature": 0.0, "max_new_tokens": 8}  # an arm's own: compared
    assert report.compare(a, b, "ntr_accuracy", 0.05, 0.8)["all"]["n"] == 200


def test_the_committed_records_share_their_specs_eval(tmp_path):
    """Every committed spec with its committed records (copies): each record is made with the eval its spec gives
    the arm (run_arm would take it as done), and the report accepts them with no note but those naming an arm's own
    eval: settings (rpt-think is evaluated with its think template and budget: said, not refused)."""
    for path in sorted((REPO / "pipelines" / "experiments").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        name = raw.get("name") or path.stem
        if not (REPO / "results" / f"{name}.arms").exists():
            continue
        shutil.copytree(REPO / "results" / f"{name}.arms", tmp_path / f"{name}.arms")
        raw |= {"results": str(tmp_path), "out": str(tmp_path / "out" / name)}
        (tmp_path / path.name).write_text(yaml.safe_dump(raw, sort_keys=False))
        spec = experiment.load_spec(str(tmp_path / path.name))
        exp = experiment.Experiment(spec)
        kept = [a for a in spec.arms if exp.record_path(a).exists()]
        assert kept, path.name
        for a in kept:
            exp.check_record(a)
        notes = report.build_report(spec)["eval_notes"]
        assert all(n.startswith("Arms evaluated with different ") for n in notes), (path.name, notes)
        own = {a for a, arm in spec.arms.items() if getattr(arm, "eval", None)}
        assert not notes or own, (path.name, notes)


def fake_eval(monkeypatch, calls: list | None = None):
    """Arms run without a model: run_eval returns fake_record's eval, an eval arm's model needs no parameters."""
    keys = [f"k{i}" for i in range(6)]

    def run_eval(cfg):
        if calls is not None:
            calls.append(cfg.model)
        return fake_record("eval", A, keys, DOCS)["eval"]
    monkeypatch.setattr(experiment, "run_eval", run_eval)
    monkeypatch.setattr(experiment.Experiment, "params", lambda self, model: 1)


def test_a_kept_record_evaluated_otherwise_than_the_spec_now_says_is_not_done(tmp_path, monkeypatch, capsys):
    """An arm's kept record counts as done only when its eval_config is what the spec now gives the arm (design and
    the arm's own eval: section; device, batch sizes, cache aside): after an edit of the spec's eval: (samples) or of
    the arm's eval: (template), running it is refused naming the keys and `--rerun`, before any other arm runs;
    --rerun runs it over. A record of an older version without eval_config stays done."""
    calls = []
    fake_eval(monkeypatch, calls)
    arms = {"before": {"kind": "eval"}, "other": {"kind": "eval", "model": "demo"}}
    path = write_spec(tmp_path, "unused-shards", "demo", arms)
    kept = runner.run_experiment(str(path), ["before"]).parent / "tiny-exp.arms"
    assert calls == ["demo"] and "before: done" not in capsys.readouterr().out
    runner.run_experiment(str(path), ["before"])
    assert calls == ["demo"] and "before: done" in capsys.readouterr().out
    raw = yaml.safe_load(path.read_text())
    for edit, says in [(lambda r: r["eval"].update(samples=3), "samples: 2 there, 3 now"),
                       (lambda r: r["arms"]["before"].update(eval={"template": "think"}),
                        "template: 'answer-only' there, 'think' now")]:
        changed = json.loads(json.dumps(raw))
        edit(changed)
        path.write_text(yaml.safe_dump(changed))
        spec = experiment.load_spec(str(path))
        with pytest.raises(UserError, match=f"arm 'before': its record '{kept / 'before.json'}' was evaluated with "
                                            f"other eval settings than the spec now gives it \\({says}\\).*"
                                            f"`rpt-train experiment {path} before --rerun`"):
            experiment.Experiment(spec).run_arm("before")
        with pytest.raises(UserError, match="was evaluated with other eval settings"):
            runner.run_experiment(str(path))  # refused before `other` runs
        assert calls == ["demo"] and not (kept / "other.json").exists()
    raw["base"]["device"], raw["eval"]["rollout-batch-size"] = "cuda", 4  # where and how fast: still done
    path.write_text(yaml.safe_dump(raw))
    spec = experiment.load_spec(str(path))
    assert experiment.Experiment(spec).run_arm("before") == kept / "before.json" and calls == ["demo"]
    raw["eval"]["samples"] = 3
    path.write_text(yaml.safe_dump(raw))
    runner.run_experiment(str(path), ["before"], rerun=True)
    assert calls == ["demo", "demo"] and json.loads((kept / "before.json").read_text())["eval_config"]["samples"] == 3
    rec = json.loads((kept / "before.json").read_text())
    del rec["eval_config"]
    (kept / "before.json").write_text(json.dumps(rec))
    raw["eval"]["samples"] = 2
    path.write_text(yaml.safe_dump(raw))
    runner.run_experiment(str(path), ["before"])  # an older record: not checked, done
    assert calls == ["demo", "demo"]


def test_an_arm_another_process_runs_is_skipped_and_reported_as_running(tmp_path, monkeypatch, capsys):
    """The same spec started once per GPU is a queue: an arm whose flock OUT/ARM.lock another process holds is
    skipped, naming that process, and the next arm runs (before, two processes resumed one checkpoint and appended
    to one metrics.jsonl: FLOPs counted twice); the interim report names it as running; --rerun does not delete
    its record or work folder; an arm that needs it is skipped too; so is the levers stage. Released, it runs."""
    monkeypatch.setattr(experiment, "LOCK_RETRIES", (0.0,))
    calls = []
    fake_eval(monkeypatch, calls)
    arms = {"a": {"kind": "eval"}, "b": {"kind": "eval", "model": "other"}}
    path = write_spec(tmp_path, "unused-shards", "demo", arms, comparisons=[("a", "b")])
    spec = experiment.load_spec(str(path))
    me = f"pid {experiment.os.getpid()} on {experiment.platform.node()}"
    lock = tmp_path / "work" / "a.lock"
    with experiment.exclusive(lock) as (holder, _):  # another process running `a` (another open file: held)
        assert holder is None and lock.read_text() == me + "\n"
        res = json.loads(runner.run_experiment(str(path)).read_text())
        out = capsys.readouterr().out
        assert f"a: skipped: another process ({me}) is running it (lock '{lock}')" in out and calls == ["other"]
        assert res["missing_arms"] == ["a"] and res["running_arms"] == {"a": me}
        assert f"Interim: arm(s) a ({me}) running." in res["verdict"]
        (tmp_path / "work" / "a").mkdir()
        (spec.arms_dir / "a.json").write_text("{}")
        assert experiment.Experiment(spec).run_arm("a", rerun=True) is None
        assert (tmp_path / "work" / "a").exists() and (spec.arms_dir / "a.json").exists()
        assert "the record it writes counts as rerun" in capsys.readouterr().out
        (spec.arms_dir / "a.json").unlink()
    res = json.loads(runner.run_experiment(str(path)).read_text())
    assert calls == ["other", "demo"] and res["missing_arms"] == [] and res["running_arms"] == {}
    # an arm whose dependency another process runs; the levers stage
    arms = {"r": {"kind": "rpt"}, "s": {"kind": "sft", "match_flops": "r", "lr-schedule": "constant"}}
    spec = experiment.load_spec(str(write_spec(tmp_path / "dep", "unused-shards", "demo", arms,
                                               levers={"positions": 3})))
    with experiment.exclusive(experiment.arm_lock(spec, "r")):
        assert experiment.Experiment(spec).run_arm("s") is None
        assert f"s: skipped: it needs arm 'r', which another process ({me}) is running" in capsys.readouterr().out
        assert experiment.lock_holder(experiment.arm_lock(spec, "r")) == me
    assert experiment.lock_holder(experiment.arm_lock(spec, "r")) is None
    with experiment.exclusive(experiment.arm_lock(spec, "levers")):
        assert experiment.Experiment(spec).measure_levers() is None
        assert "levers: skipped: another process" in capsys.readouterr().out


def test_the_report_files_are_replaced_atomically(tmp_path, monkeypatch):
    """A write of the Markdown or the PNG that fails half-way (disk full, a process killed) leaves the earlier
    report whole and no temp file (they were written in place: a reader saw half a file)."""
    import matplotlib.figure

    spec = experiment.load_spec(str(write_spec(tmp_path, "unused-shards", "demo", {"a": {"kind": "rpt"},
                                                                                   "b": {"kind": "eval"}})))
    records_with_eval(spec, {"a": A, "b": B})
    report.write_report(spec)
    res = tmp_path / "results"
    md, png = (res / "tiny-exp.md").read_bytes(), (res / "tiny-exp.png").read_bytes()
    real_write = Path.write_text

    def half_text(self, text, *args, **kw):
        if ".md" in self.name:
            real_write(self, text[:10])
            raise OSError(28, "No space left on device")
        return real_write(self, text, *args, **kw)

    def half_png(self, fname, *args, **kw):
        Path(fname).write_bytes(b"\x89PNG")
        raise OSError(28, "No space left on device")
    for target, fake in ((Path, half_text), (matplotlib.figure.Figure, half_png)):
        with monkeypatch.context() as m:
            m.setattr(target, "write_text" if target is Path else "savefig", fake)
            with pytest.raises(OSError):
                report.write_report(spec)
        assert (res / "tiny-exp.md").read_bytes() == md and (res / "tiny-exp.png").read_bytes() == png
        assert not [p for p in res.iterdir() if p.name.endswith(".tmp")]


def test_rerun_in_processes_one_per_gpu_runs_each_arm_once(tmp_path, monkeypatch, capsys):
    """`--rerun` started once per GPU: the first process to reach an arm deletes its old record and work folder and
    runs it; another reaching it after finds a record written since it started (by that one, in this round) and
    keeps it (before, each process reran the arm in turn, deleting the record and work folder under the others,
    a dependent arm's contexts among them)."""
    import os
    import time

    calls = []
    fake_eval(monkeypatch, calls)
    spec = experiment.load_spec(str(write_spec(tmp_path, "unused-shards", "demo", {"a": {"kind": "eval"}})))
    record, work = spec.arms_dir / "a.json", tmp_path / "work" / "a"
    spec.arms_dir.mkdir(parents=True, exist_ok=True)
    record.write_text("{}")
    (work / "train").mkdir(parents=True)
    past = time.time() - 100
    for p in (record, work):
        os.utime(p, (past, past))
    first, second = experiment.Experiment(spec), experiment.Experiment(spec)  # both started before the round
    first.started = second.started = time.time() - 50
    assert first.run_arm("a", rerun=True) == record and calls == ["demo"] and not work.exists()
    assert json.loads(record.read_text())["arm"] == "a"
    work.mkdir()  # the first process's work folder
    assert second.run_arm("a", rerun=True) == record and calls == ["demo"] and work.exists()
    assert "a: done since this process started, by another one" in capsys.readouterr().out
    assert experiment.Experiment(spec).run_arm("a", rerun=True) == record and calls == ["demo", "demo"]


def test_locks_fall_back_to_exclusive_creation_without_flock(tmp_path, monkeypatch, capsys):
    """Where flock fails (ENOLCK: NFSv3 without lockd, Lustre without -o flock) the lock is ARM.lock.held, made by
    exclusive creation with `pid N on HOST` (before, every process ran the arm unlocked: FLOPs counted twice): held,
    another process skips the arm; released, it is deleted; one left by a dead process on this host is taken over;
    one held from another host is respected, naming the file to delete if no process runs there."""
    import errno
    import fcntl
    import subprocess
    import sys

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(experiment, "LOCK_RETRIES", (0.0,))
    calls = []
    fake_eval(monkeypatch, calls)
    spec = experiment.load_spec(str(write_spec(tmp_path, "unused-shards", "demo", {"a": {"kind": "eval"}})))
    me = experiment._me()
    assert me.startswith(f"pid {experiment.os.getpid()} on {experiment.platform.node()}")
    lock = experiment.arm_lock(spec, "a")
    held = lock.with_name("a.lock.held")
    with experiment.exclusive(lock) as (holder, unlocked):
        assert experiment.Experiment(spec).run_arm("a") is None and calls == []
        assert f"a: skipped: another process ({me}) is running it" in capsys.readouterr().out
        assert holder is None and unlocked is None and held.read_text() == me + "\n"
        assert experiment.lock_holder(lock) == me
    assert not held.exists() and experiment.lock_holder(lock) is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held.write_text(f"pid {dead.stdout.strip()} on {experiment.platform.node()}\n")
    with experiment.exclusive(lock, waiting="waiting for {holder}") as (holder, _):
        assert holder is None and held.read_text() == me + "\n"
    held.write_text("pid 1 on another-host\n")
    with experiment.exclusive(lock) as (holder, _):
        assert holder == f"pid 1 on another-host; if no such process runs on another-host, delete '{held}'"
    assert held.exists() and experiment.Experiment(spec).run_arm("a") is None and calls == []
    held.unlink()
    assert experiment.Experiment(spec).run_arm("a") == spec.arms_dir / "a.json" and calls == ["demo"]


def test_fallback_lock_naming_this_pid_but_not_made_by_it_is_stale(tmp_path, monkeypatch):
    """A PATH.held naming this process's pid on this host (and pid namespace) that this process did not make was
    left by an earlier process with the same pid (before, it counted as a live holder: every arm skipped, the warm
    start waited on itself forever): taken over. One this process made is still its own. One naming the same pid
    and host in another pid namespace (a container beside this one with host networking, each pid 1) cannot be
    checked: respected, with the namespace named."""
    import errno
    import fcntl

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_flock)
    monkeypatch.setattr(experiment, "LOCK_RETRIES", (0.0,))
    me = experiment._me()
    lock = tmp_path / "a.lock"
    held = experiment.held_path(lock)
    beside = f"pid {experiment.os.getpid()} on {experiment.platform.node()} in pid:[1]"
    held.write_text(beside + "\n")
    lock.touch()
    with experiment.exclusive(lock) as (holder, _):
        assert holder == f"{beside}; if no such process runs on {experiment.platform.node()} in pid:[1] (another " \
                         f"pid namespace), delete '{held}'"
    assert held.read_text() == beside + "\n"
    held.write_text(me + "\n")
    assert experiment.lock_holder(lock.parent / "missing.lock") is None
    lock.touch()
    assert experiment.lock_holder(lock) is None
    with experiment.exclusive(lock, waiting="waiting for {holder}") as (holder, unlocked):
        assert holder is None and unlocked is None and held.read_text() == me + "\n"
        assert experiment.lock_holder(lock) == me
    assert not held.exists()


def test_sigterm_releases_the_fallback_lock(tmp_path):
    """SIGTERM (scancel, a time limit) on an experiment process holding a fallback lock exits 143 through its
    `finally`: the PATH.held file is deleted (before, the process died with it left behind)."""
    import signal
    import subprocess
    import sys

    lock = tmp_path / "a.lock"
    code = f"""
import errno, fcntl, time
from pathlib import Path
from rpt_train import experiment
def no_flock(*args):
    raise OSError(errno.ENOLCK, "No locks available")
fcntl.flock = no_flock
experiment.exit_on_sigterm()
with experiment.exclusive(Path({str(lock)!r})) as (holder, _):
    assert holder is None
    print("held", flush=True)
    time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    assert experiment.held_path(lock).exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143, proc.stderr.read()
    assert not experiment.held_path(lock).exists()


def test_records_follow_shards_copied_or_moved(tmp_path, monkeypatch, capsys):
    """A record evaluated on shards that were then copied or moved (node-local copies, a new disk) stays done and
    reported once the spec names the new place: the shards' identity (their names and digests, kept in the eval's
    meta) is compared, not their path (before, every record was refused: hours of --rerun). Shards with other
    content, or a record without the identity (an older version), are still compared by path: refused."""
    from rpt_common.shards import shards_identity

    def tagged(where: Path, digest: str) -> Path:
        where.mkdir(parents=True)
        (where / "manifest.json").write_text(json.dumps({"complete": True, "shards": [
            {"file": "data/shard-00000-00000.parquet", "sha256": digest}]}))
        return where

    first, copy, other = tagged(tmp_path / "a", "1" * 64), tagged(tmp_path / "b", "1" * 64), tagged(tmp_path / "c", "2" * 64)
    assert shards_identity(first) == shards_identity(copy) != shards_identity(other)
    retagged = json.loads((copy / "manifest.json").read_text())  # the same shard files, other bucket thresholds
    tagged(tmp_path / "d", "1" * 64).joinpath("manifest.json").write_text(json.dumps({**retagged, "config": {
        "buckets": [1.0, 2.0]}}))
    assert shards_identity(tmp_path / "d") != shards_identity(first)
    assert shards_identity(tmp_path / "nowhere") is None
    keys = [f"k{i}" for i in range(6)]

    def run_eval(cfg):
        ev = fake_record("eval", A, keys, DOCS)["eval"]
        return {**ev, "meta": {**ev.get("meta", {}), "shards_identity": shards_identity(cfg.shards)}}
    monkeypatch.setattr(experiment, "run_eval", run_eval)
    monkeypatch.setattr(experiment.Experiment, "params", lambda self, model: 1)
    arms = {"before": {"kind": "eval"}, "other": {"kind": "eval", "model": "demo"}}
    path = write_spec(tmp_path, first, "demo", arms)
    runner.run_experiment(str(path), ["before"])
    raw = yaml.safe_load(path.read_text())
    raw["base"]["shards"] = str(copy)
    path.write_text(yaml.safe_dump(raw))
    spec = experiment.load_spec(str(path))
    assert experiment.Experiment(spec).run_arm("before") == spec.arms_dir / "before.json"
    assert "before: done" in capsys.readouterr().out
    runner.run_experiment(str(path), ["other"])  # evaluated on the copy, paired with the record made on the first
    assert set(json.loads((spec.arms_dir.parent / "tiny-exp.json").read_text())["arms"]) == {"before", "other"}
    raw["base"]["shards"] = str(other)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="shards: '.*a' there, '.*c' now"):
        experiment.Experiment(experiment.load_spec(str(path))).run_arm("before")
    rec = json.loads((spec.arms_dir / "before.json").read_text())
    del rec["eval"]["meta"]["shards_identity"]
    (spec.arms_dir / "before.json").write_text(json.dumps(rec))
    raw["base"]["shards"] = str(copy)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="shards: '.*a' there, '.*b' now"):
        experiment.Experiment(experiment.load_spec(str(path))).run_arm("before")
