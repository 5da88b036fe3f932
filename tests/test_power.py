"""Issue 16: Wilson intervals, greedy NTR accuracy, the power sizing, the SFT control and the power script end to end
(tiny random model, a few seconds)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from shard_fixtures import train_shards, tiny_tok  # noqa: F401

from rpt_train.config import EvalConfig, TrainConfig
from rpt_train.evaluate import EVAL_BUCKETS, evaluate, select_positions
from rpt_train.policy import load_policy
from rpt_train.rollout import RolloutBatch
from rpt_train.samples import ShardSet, TrainSamples
from rpt_train.stats import wilson
from rpt_train.templates import PromptBuilder

SCRIPT = Path(__file__).resolve().parents[1] / "pipelines" / "smollm2_champ_power.py"


@pytest.fixture(scope="module")
def power():
    spec = importlib.util.spec_from_file_location("smollm2_champ_power", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("k,n,lo,hi", [  # Newcombe (1998), Stat. Med. 17:857, Table II, method 3 (Wilson score)
    (81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_matches_published_values(k, n, lo, hi):
    got = wilson(k / n, n)
    assert got == pytest.approx([lo, hi], abs=1e-4)


def test_wilson_bounds_are_exact_at_zero_and_one():
    assert wilson(0.0, 100)[0] == 0.0 and wilson(1.0, 100)[1] == 1.0


def test_wilson_of_nothing_is_none():
    assert wilson(None, 10) is None and wilson(0.5, 0) is None


def test_detectable_effect_matches_the_textbook_sample_size(power):
    # Fleiss without continuity correction: 0.5 vs 0.6 at 5% / 80% needs 387.3 per arm
    assert power.detectable_effect(388, 0.5) == pytest.approx(0.1, abs=5e-4)
    assert power.detectable_effect(388, 0.5) < 0.1 < power.detectable_effect(387, 0.5)
    # a design effect of 2 halves the sample: n = 200 at deff 2 is n = 100 independent positions
    assert power.detectable_effect(200, 0.0, deff=2.0) == pytest.approx(power.detectable_effect(100, 0.0))
    assert power.detectable_effect(100, 0.0) > power.detectable_effect(400, 0.0) > 0


def test_icc_and_design_effect(power):
    assert power.icc_anova([[1, 1, 1], [0, 0, 0], [1, 1, 1]]) == pytest.approx(1.0)
    assert power.icc_anova([[1, 0], [1, 0], [0, 1]]) == 0.0  # within-problem spread only: clipped at 0
    assert power.design_effect([3, 3, 3], 0.5) == pytest.approx(2.0)
    assert power.design_effect([1] * 10, 0.9) == pytest.approx(1.0)


def test_answer_target_leaves_out_the_response_prefix(power):
    assert power.answer_target(" the", "\\boxed{") == " the}"
    assert power.answer_target(" the", "") == "\\boxed{ the}"


class GreedyOracle:
    """Right answer when decoding greedily, a wrong one when sampling."""

    def __init__(self, tokenizer, samples):
        prompts = PromptBuilder(tokenizer)
        self.by_prompt = {tuple(prompts.ids(s.context)): s for s in samples}

    def generate(self, prompts, params):
        texts = []
        for p in prompts:
            label = "".join(self.by_prompt[tuple(p)].label_tokens)
            texts += [f"\\boxed{{{label}}}" if params.greedy else "\\boxed{\x00}"] * params.n
        ones = torch.ones(len(texts), 1, dtype=torch.long)
        return RolloutBatch(prompt_ids=ones, prompt_mask=ones, completion_ids=ones, completion_mask=ones, logprobs=None,
                            texts=texts)


def test_greedy_accuracy_and_intervals_in_the_eval(tiny_llama, train_shards, tiny_tok):
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
    assert {p["key"] for p in result["positions"]} == set(unique)
    assert all(p["greedy_correct"] and not any(p["correct"]) for p in result["positions"])


def test_sft_loss_is_cross_entropy_on_the_answer_tokens_only(power, tiny_llama, train_shards, tiny_tok, tmp_path):
    cfg = TrainConfig(shards=str(train_shards), model=str(tiny_llama), out=str(tmp_path / "sft"), bucket="all",
                      steps=1, batch_prompts=3, micro_batch_size=2, template="answer-only", chat_template="off",
                      response_prefix="\\boxed{", lr=1e-3, device="cpu")
    power.sft_train(cfg, lambda data, step: data.next_batch(3))
    logged = json.loads((tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()[0])
    # expected: the untrained model's mean NLL of "label}<eos>" after each prompt, one row at a time
    policy = load_policy(str(tiny_llama), device="cpu")
    prompts = PromptBuilder(tiny_tok, "answer-only", "off", "\\boxed{")
    nll, count = 0.0, 0
    for s in TrainSamples(cfg, tiny_tok).next_batch(3):
        p = prompts.ids(s.context)
        t = tiny_tok(s.label_tokens[0] + "}", add_special_tokens=False)["input_ids"] + [tiny_tok.eos_token_id]
        with torch.no_grad():
            logp = torch.log_softmax(policy.model(input_ids=torch.tensor([p + t])).logits[0, :-1].float(), -1)
        nll -= sum(float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(t))
        count += len(t)
    assert logged["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert logged["target_tokens"] == count
    assert (tmp_path / "sft" / "model" / "config.json").exists()


def test_power_script_smoke_runs_every_arm_and_reports(power, tiny_llama, train_shards, tmp_path):
    recipe = tmp_path / "tiny-power.yaml"
    recipe.write_text(yaml.safe_dump({
        "shards": str(train_shards), "model": str(tiny_llama), "heldout-fraction": 0.3, "split-seed": 4,
        "template": "answer-only", "chat-template": "off", "response-prefix": "\\boxed{", "device": "cpu",
        "labels-length": 2, "warm": {"fraction": 0.3},
        "run": {"out": str(tmp_path / "run"), "bucket": "all", "micro-batch-size": 4, "sampler": "learnability"},
        "eval": {"limit": 3}}))
    power.main(["all", "--recipe", str(recipe), "--smoke"])
    root = tmp_path / "run-smoke"
    res = json.loads((root / "tiny-power.json").read_text())
    assert list(res["arms"]) == ["before", "rpt", "rpt-seed1", "shuffled", "sft"]
    for arm in res["arms"].values():
        for b in EVAL_BUCKETS:
            assert {"n", "ntr_accuracy", "ntr_greedy_accuracy", "ntr_pass_at_k", "answer_rate",
                    "ntp_accuracy"} <= set(arm[b])
    assert res["steps"] == power.SMOKE["steps"] and res["verdict"] and res["device"]
    assert set(res["detectable_effect"]) == set(EVAL_BUCKETS) and res["seconds"].keys() == res["arms"].keys()
    md = (root / "tiny-power.md").read_text()
    assert md.count("| NTR accuracy (sampled), ") == 5 and "## Warm start" in md and "P(a right first answer" in md
    assert (root / "tiny-power.png").stat().st_size > 0
    assert len((root / "sft" / "train" / "metrics.jsonl").read_text().splitlines()) == power.SMOKE["steps"]
    # the warm start: documents neither held out nor trained on by any arm; every arm starts from its model
    warm_docs = set((root / "warm" / "docs.txt").read_text().split())
    assert warm_docs and res["warm_start"]["documents"] == len(warm_docs)
    assert res["config"]["train"]["model"] == str(root / "warm" / "train" / "model")
    from rpt_train.samples import is_heldout
    assert not any(is_heldout(d, 0.3, 4) for d in warm_docs)
    tok = load_policy(str(tiny_llama), device="cpu").tokenizer
    data = TrainSamples(TrainConfig(**{**res["config"]["train"], "model": str(tiny_llama)}), tok)
    for arm in ("rpt", "rpt-seed1", "shuffled"):
        rolled = [i for x in (root / arm / "train" / "contexts.jsonl").read_text().splitlines()
                  for i in json.loads(x)["contexts"]]
        assert rolled and not {s.doc_id for s in data.build.many(rolled)} & warm_docs
    # the SFT arm trained on exactly the contexts the RPT arm rolled out (refill rounds included)
    rpt_draws = [json.loads(x)["contexts_drawn"] for x in (root / "rpt" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert res["compute"]["sft"]["contexts"] == sum(rpt_draws) == res["compute"]["rpt"]["contexts"] > 0
    assert res["compute"]["rpt"]["contexts_scored"] == 2 * res["compute"]["rpt"]["contexts"]  # --sampler-pool 2
    assert set(res["comparisons_by_metric"]) == {"ntr_greedy_accuracy", "ntp_accuracy"} and res["levers"] == {}
    assert set(res["prompt_levers"]["models"]) == {"base", "warm-started"}
    # the RPT seeds differ; a finished arm is not rerun
    seeds = [yaml.safe_load((root / a / "train" / "config.yaml").read_text())["seed"] for a in ("rpt", "rpt-seed1")]
    assert seeds[1] == seeds[0] + 1
    before = (root / "rpt" / "eval.json").stat().st_mtime_ns
    power.main(["rpt", "--recipe", str(recipe), "--smoke"])
    assert (root / "rpt" / "eval.json").stat().st_mtime_ns == before
    # an arm not run yet: the report says it is interim and leaves the arm out
    (root / "shuffled" / "eval.json").unlink()
    power.main(["report", "--recipe", str(recipe), "--smoke"])
    res = json.loads((root / "tiny-power.json").read_text())
    assert "shuffled" not in res["arms"] and res["missing_arms"] == ["shuffled"] and "Interim" in res["verdict"]
    assert "rpt - shuffled" not in res["comparisons"] and "shuffled-reward control is not run yet" in res["verdict"] \
        or "No significant" in res["verdict"]
    power.main(["shuffled", "--recipe", str(recipe), "--smoke"])

    # a lever: one arm rerun as a named variant with a training override, listed apart by the report
    power.main(["rpt", "--recipe", str(recipe), "--smoke", "--name", "rpt-hi-lr", "--set", "lr=1e-3"])
    power.main(["report", "--recipe", str(recipe), "--smoke"])
    res = json.loads((root / "tiny-power.json").read_text())
    assert list(res["arms"]) == ["before", "rpt", "rpt-seed1", "shuffled", "sft"] and list(res["levers"]) == ["rpt-hi-lr"]
    lever = res["levers"]["rpt-hi-lr"]
    assert lever["arm"] == "rpt" and lever["overrides"] == {"lr": 1e-3} and "all" in lever["vs_before"]
    assert yaml.safe_load((root / "rpt-hi-lr" / "train" / "config.yaml").read_text())["lr"] == 1e-3
    assert "| rpt-hi-lr | rpt |" in (root / "tiny-power.md").read_text()
    # a new machine: no arm's training metrics left; the report keeps the plot drawn from them and says so
    png = (root / "tiny-power.png").read_bytes()
    for p in root.glob("*/train/metrics.jsonl"):
        p.unlink()
    power.main(["report", "--recipe", str(recipe), "--smoke"])
    assert (root / "tiny-power.png").read_bytes() == png
    assert "the plot is the one an earlier report drew" in (root / "tiny-power.md").read_text()


def test_arm_metrics_fall_back_to_the_copy_kept_in_git(power, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "out" / "smollm2-champ-power"
    kept = power.committed_metrics(root, "rpt-seed1", smoke=False)
    assert kept == Path("results/smollm2-champ-power.arms/rpt-seed1.metrics.jsonl")
    assert power.arm_metrics(root, "rpt-seed1", smoke=False) == []
    kept.parent.mkdir(parents=True)
    kept.write_text('{"step": 1, "reward": 0.5}\n')
    assert power.arm_metrics(root, "rpt-seed1", smoke=False) == [{"step": 1, "reward": 0.5}]
    (root / "rpt-seed1" / "train").mkdir(parents=True)
    (root / "rpt-seed1" / "train" / "metrics.jsonl").write_text('{"step": 1, "reward": 0.25}\n')
    assert power.arm_metrics(root, "rpt-seed1", smoke=False)[0]["reward"] == 0.25  # this machine's run first
    assert power.committed_metrics(root, "rpt", smoke=True) is None


def test_power_variant_options_are_checked(power):
    with pytest.raises(SystemExit):
        power.main(["rpt", "--set", "lr=1e-3"])  # --set without --name
    with pytest.raises(SystemExit):
        power.main(["rpt", "--name", "sft", "--set", "lr=1e-3"])  # a variant may not take an arm's name
    from rpt_common.errors import UserError
    with pytest.raises(UserError, match="no-such-key"):
        power.parse_sets(["no-such-key=1"])


def test_sft_keeps_float32_masters_under_a_bf16_compute_dtype(power, tiny_llama, train_shards, tmp_path):
    """--dtype bfloat16 is a compute dtype: the SFT arm's weights and their update stay float32 (an AdamW step on
    bf16 weights at a small lr rounds away), as in rpt-train."""
    cfg = TrainConfig(shards=str(train_shards), model=str(tiny_llama), out=str(tmp_path / "sft"), bucket="all",
                      steps=1, batch_prompts=3, micro_batch_size=3, template="answer-only", chat_template="off",
                      response_prefix="\\boxed{", lr=1e-6, device="cpu", dtype="bfloat16")
    power.sft_train(cfg, lambda data, step: data.next_batch(3))
    before = load_policy(str(tiny_llama), device="cpu").model.state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "sft" / "model").state_dict()
    assert all(t.dtype == torch.float32 for t in after.values())
    moved = sum(int((after[k] != before[k]).sum()) for k in before) / sum(t.numel() for t in before.values())
    assert moved > 0.5
