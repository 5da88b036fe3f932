"""Evaluation at scale (issue 36): `rpt-train eval` under torchrun equals one process (positions striped over ranks
in seeded chunks), `--baseline` scores a second model on the same positions and reports paired differences, and an
eval of a run prompts as the run did."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from shard_fixtures import train_shards  # noqa: F401

from rpt_train.cli import main
from rpt_train.compare import cluster_of, compare
from rpt_train.config import EvalConfig, load_config
from rpt_train.evaluate import EVAL_BUCKETS

TESTS = Path(__file__).parent
REPO = TESTS.parent


def torchrun(*args, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def test_eval_on_two_ranks_equals_one_process(train_shards, tiny_llama, tmp_path):
    """Every sampled and greedy completion, outcome and metric of 2 gloo ranks equals one process's."""
    import torch
    from eval_driver import score

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs: the same float reductions, the same sampled tokens
    try:
        one = score(str(train_shards), str(tiny_llama))
    finally:
        torch.set_num_threads(threads)
    r = torchrun(TESTS / "eval_driver.py", train_shards, tiny_llama, tmp_path / "two.json")
    assert r.returncode == 0, r.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two.pop("world") == 2
    assert len(one["positions"]) > 3  # more chunks (2 positions each) than ranks, one rank with an extra chunk
    assert two == json.loads(json.dumps(one))


def test_compare_pairs_the_same_positions():
    keys = [f"data/part-{i % 2}.txt/{i}/5" for i in range(6)]
    chosen = {b: keys for b in EVAL_BUCKETS}
    rec = lambda k, c: {"key": k, "correct": [c, False], "greedy_correct": c, "ntp_correct": False}  # noqa: E731
    a = {"chosen": chosen, "positions": [rec(k, i < 4) for i, k in enumerate(keys)]}
    b = {"chosen": chosen, "positions": [rec(k, i < 1) for i, k in enumerate(keys)]}
    out = compare(a, b, block_windows=0)
    d = out["all"]["ntr_accuracy"]
    assert d["n"] == 6 and d["diff"] == pytest.approx(0.5) and d["ci"][0] < 0.5 < d["ci"][1] and d["p_value"] < 0.05
    assert out["all"]["ntp_accuracy"]["diff"] == 0 and out["all"]["ntp_accuracy"]["p_value"] == 1.0
    assert cluster_of("data/part-0.txt/33/5", 16) == "data/part-0.txt#2" and cluster_of("a/b/1/2", 0) == "a/b"
    with pytest.raises(ValueError):
        compare(a, {**b, "chosen": {bb: keys[:3] for bb in EVAL_BUCKETS}})


def test_eval_with_a_baseline_reports_paired_differences(train_shards, tiny_llama, tmp_path):
    out = tmp_path / "eval.json"
    r = CliRunner().invoke(main, ["eval", "--shards", str(train_shards), "--model", str(tiny_llama), "--baseline",
                                  str(tiny_llama), "--device", "cpu", "--limit", "4", "--samples", "2",
                                  "--max-new-tokens", "3", "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert [p["key"] for p in res["positions"]] == [p["key"] for p in res["baseline"]["positions"]]
    assert "completions" not in res["positions"][0]
    for b in EVAL_BUCKETS:
        for name, d in res["comparison"][b].items():
            assert d["n"] == res[b]["n"] == res["baseline"][b]["n"]
            # the same model: the deterministic outcomes agree position by position
            if name in ("ntr_greedy_accuracy", "ntp_accuracy") and d["n"] >= 2:
                assert d["diff"] == 0 and d["p_value"] == 1.0
    assert "baseline" in r.output and "paired" in r.output


def test_eval_of_a_run_prompts_as_the_run_did(train_shards, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"heldout_fraction": 0.3, "split_seed": 2}))
    (run / "config.yaml").write_text(yaml.safe_dump({"template": "answer-only", "response_prefix": "\\boxed{",
                                                     "max_context_tokens": 64, "chat_template": "off"}))
    cfg = load_config(EvalConfig, None, {"shards": str(train_shards), "model": str(run)})
    assert (cfg.template, cfg.response_prefix, cfg.max_context_tokens, cfg.chat_template) == \
        ("answer-only", "\\boxed{", 64, "off")
    assert (cfg.heldout_fraction, cfg.split_seed) == (0.3, 2)
    given = load_config(EvalConfig, None, {"shards": str(train_shards), "model": str(run), "template": "v0"})
    assert (given.template, given.response_prefix) == ("v0", "\\boxed{")  # what is typed wins
    plain = load_config(EvalConfig, None, {"shards": str(train_shards), "model": "demo"})
    assert (plain.template, plain.response_prefix) == ("v0", "")


def test_eval_of_a_run_applies_its_budget_rule(train_shards, tmp_path, capsys):
    """A run trained with --think-overflow close is evaluated with it (not the default fail), at its last budget:
    --think-budget-final once the decay is over, the decayed budget at the run's last step when it stops before."""
    run = tmp_path / "run"
    run.mkdir()
    saved = {"template": "think", "think_overflow": "close", "think_close": "</think>\n\\boxed{", "answer_room": 8,
             "think_budget": 64, "think_budget_final": 16, "think_decay_steps": 10, "steps": 20}
    (run / "run.json").write_text(json.dumps({"heldout_fraction": 0.0, "split_seed": 0}))
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    args = {"shards": str(train_shards), "model": str(run)}
    cfg = load_config(EvalConfig, None, args)
    assert (cfg.think_overflow, cfg.think_close, cfg.answer_room, cfg.think_budget) == \
        ("close", "</think>\n\\boxed{", 8, 16)
    assert "--think-overflow 'close'" in capsys.readouterr().err
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "steps": 6}))  # 64 -> 16 over steps 1..11
    assert load_config(EvalConfig, None, args).think_budget == round(64 + (16 - 64) * 5 / 10)
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "think_budget_final": None, "think_decay_steps": 0}))
    assert load_config(EvalConfig, None, args).think_budget == 64
    given = load_config(EvalConfig, None, {**args, "think_overflow": "fail", "think_budget": 32, "answer_room": 4})
    assert (given.think_overflow, given.think_budget, given.answer_room, given.think_close) == \
        ("fail", 32, 4, "</think>\n\\boxed{")  # what is typed wins
    plain = load_config(EvalConfig, None, {"shards": str(train_shards), "model": "demo"})
    assert (plain.think_overflow, plain.think_budget, plain.answer_room, plain.think_close) == ("fail", 0, 16, "auto")


RUN_GRID = [  # run options: no budget; fail / close; no decay, decay over, stopped mid-decay; rlp; think / answer-only
    {"template": "answer-only", "max_new_tokens": 12, "temperature": 1.0, "top_p": 0.95, "top_k": 50},
    {"template": "answer-only", "objective": "rlp", "think_budget": 24, "think_budget_final": 8,
     "think_decay_steps": 4},
    *[{"template": template, "think_overflow": overflow, "think_budget": 64, "answer_room": 8, **decay}
      for template in ("think", "think-brief") for overflow in ("fail", "close")
      for decay in ({}, {"think_budget_final": 16, "think_decay_steps": 10, "steps": 20},
                    {"think_budget_final": 16, "think_decay_steps": 10, "steps": 6})],
]


@pytest.mark.parametrize("options", RUN_GRID, ids=lambda o: "-".join(f"{v}" for v in o.values()))
def test_eval_of_a_run_generates_as_its_in_run_evals(train_shards, tmp_path, options, capsys):
    """`rpt-train eval --model RUN` (no options), and the same with the run's own options as a recipe, equals the
    run's in-run --eval-every eval config on every prompt and generation setting (the budget at its last step,
    fail: --max-new-tokens = that + --answer-room)."""
    from rpt_train.budget import EVAL_GENERATION
    from rpt_train.config import PROMPT_OPTIONS, SAMPLING_OPTIONS, TrainConfig, to_dict
    from rpt_train.trainer import eval_config

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(TrainConfig, None, {"shards": str(train_shards), "out": str(run), "steps": 20, **options})
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (run / "run.json").write_text(json.dumps({"heldout_fraction": 0.0, "split_seed": 0}))
    settings = PROMPT_OPTIONS + SAMPLING_OPTIONS + EVAL_GENERATION
    in_run = {k: getattr(eval_config(cfg), k) for k in settings}
    of_dir = load_config(EvalConfig, None, {"shards": str(train_shards), "model": str(run)})
    assert {k: getattr(of_dir, k) for k in settings} == in_run
    recipe = tmp_path / "recipe.yaml"  # the run's recipe, its budget schedule at the top level
    recipe.write_text(yaml.safe_dump({"steps": 20, **options}))
    for model in (str(run), "demo"):
        shared = load_config(EvalConfig, str(recipe), {"shards": str(train_shards), "model": model})
        assert {k: getattr(shared, k) for k in settings} == in_run, model
    before = tmp_path / "before.yaml"  # the recipe the run was started from, before its command-line overrides
    before.write_text(yaml.safe_dump({"steps": 3, "template": "v0", "temperature": 0.5, "top_p": 0.5, "top_k": 5,
                                      "max_new_tokens": 8192, "answer_room": 3, "think_overflow": "fail",
                                      "think_budget": 4096, "think_budget_final": 256, "think_decay_steps": 2}))
    capsys.readouterr()
    of_run = load_config(EvalConfig, str(before), {"shards": str(train_shards), "model": str(run)})
    assert {k: getattr(of_run, k) for k in settings} == in_run  # the run's config.yaml wins over its recipe
    err = capsys.readouterr().err
    assert "over the recipe's top-level " in err and "--temperature 0.5" in err and "--steps 3" in err
    plain = load_config(EvalConfig, str(before), {"shards": str(train_shards), "model": "demo"})
    assert (plain.template, plain.temperature, plain.top_k, plain.think_budget, plain.max_new_tokens) == \
        ("v0", 0.5, 5, 0, 256 + 3)  # no run: the recipe's top-level keys, as `rpt-train run` would read them
    if cfg.think_budget:
        assert in_run["max_new_tokens"] == cfg.answer_room * (cfg.objective == "rpt") + \
            (cfg.think_budget_final if cfg.think_decay_steps and cfg.steps > cfg.think_decay_steps else
             round(64 + (16 - 64) * 5 / 10) if cfg.steps == 6 else cfg.think_budget)
        assert in_run["think_budget"] == (in_run["max_new_tokens"] - 8 if cfg.think_overflow == "close" else 0)


def test_eval_of_a_checkpoint_says_it_takes_the_runs_last_budget(train_shards, tmp_path, capsys):
    """A checkpoint mid-decay is evaluated at the run's last-step budget (as its in-run evals are); the note says
    so and names the budget it trained at, and --think-budget (close) or --max-new-tokens (fail) changes it."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-3").mkdir(parents=True)
    saved = {"template": "think", "think_overflow": "close", "answer_room": 8, "think_budget": 64,
             "think_budget_final": 16, "think_decay_steps": 10, "steps": 20}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    args = {"shards": str(train_shards), "model": str(run / "checkpoints" / "step-3")}
    assert load_config(EvalConfig, None, args).think_budget == 16
    err = capsys.readouterr().err
    assert f"the run '{run}' did at its last step" in err
    assert "a checkpoint is evaluated at the run's last-step budget" in err and "--think-budget 54 to" in err
    assert load_config(EvalConfig, None, {**args, "think_budget": 54}).think_budget == 54
    assert "a checkpoint" not in capsys.readouterr().err
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "think_overflow": "fail"}))
    assert load_config(EvalConfig, None, args).max_new_tokens == 16 + 8
    assert "--max-new-tokens 62 to evaluate at that" in capsys.readouterr().err
    load_config(EvalConfig, None, {**args, "model": str(run)})
    assert "a checkpoint" not in capsys.readouterr().err


def test_eval_of_an_unfinished_run_names_the_budget_its_latest_checkpoint_trained_at(train_shards, tmp_path, capsys):
    """`eval --model RUN` of a run stopped mid-decay (latest checkpoint step-3 of 20) evaluates those weights at the
    run's last-step budget, as a checkpoint path does, and says so with the budget step 3 trained at; a finished run
    (or one stopped after the decay ended: the same budget) gets no such note."""
    run = tmp_path / "run"
    saved = {"template": "think", "think_overflow": "close", "answer_room": 8, "think_budget": 64,
             "think_budget_final": 16, "think_decay_steps": 10, "steps": 20}
    (run / "config.yaml").parent.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    args = {"shards": str(train_shards), "model": str(run)}
    for step in (3, 15, 20):
        (run / "checkpoints" / f"step-{step:06d}").mkdir(parents=True)
        (run / "checkpoints" / f"step-{step:06d}" / "trainer_state.pt").write_bytes(b"")  # complete (the latest)
        assert load_config(EvalConfig, None, args).think_budget == 16  # the budget used does not change
        err = capsys.readouterr().err
        assert f"the run '{run}' did at its last step" in err
        assert ("the run stopped at step-000003 of its 20 steps" in err and "(step-000003 trained at --think-budget "
                "54: pass --think-budget 54 to evaluate at that)" in err) == (step == 3), (step, err)
        if step == 3:
            (run / "config.yaml").write_text(yaml.safe_dump({**saved, "think_overflow": "fail"}))
            assert load_config(EvalConfig, None, args).max_new_tokens == 16 + 8
            assert "step-000003 trained at --max-new-tokens 62: pass --max-new-tokens 62" in capsys.readouterr().err
            load_config(EvalConfig, None, {**args, "max_new_tokens": 62})
            assert "stopped at" not in capsys.readouterr().err  # given: nothing to point at
            (run / "config.yaml").write_text(yaml.safe_dump(saved))
        assert "a checkpoint is evaluated" not in err


def test_the_budget_schedule_reaches_its_final_budget_once_the_decay_is_over():
    """--think-decay-steps S: step 1 is --think-budget, step S + 1 (the first after S decaying steps) exactly
    --think-budget-final, linear (rounded) between: a 1000-step run decaying 4096 -> 256 over 1000 steps ends at
    260 (its last step is still decaying), one decaying over 999 steps ends at 256."""
    from types import SimpleNamespace

    from rpt_train.budget import think_budget

    for start, final, decay in ((4096, 256, 1000), (64, 16, 10), (16, 64, 4), (100, 20, 8), (7, 3, 1), (8, 8, 5)):
        cfg = SimpleNamespace(think_budget=start, think_budget_final=final, think_decay_steps=decay)
        steps = [think_budget(cfg, s) for s in range(1, decay + 3)]
        assert steps[0] == start and steps[decay:] == [final, final]
        assert steps == sorted(steps, reverse=final < start)
    cfg = SimpleNamespace(think_budget=4096, think_budget_final=256, think_decay_steps=1000)
    assert (think_budget(cfg, 1000), think_budget(cfg, 1001)) == (260, 256)
    assert think_budget(SimpleNamespace(think_budget=4096, think_budget_final=256, think_decay_steps=999), 1000) == 256


def test_eval_of_a_close_run_refuses_a_template_without_think_end(train_shards, tmp_path, capsys):
    """A close run evaluated with a template that never asks for </think> would cut and force every completion:
    refused in one sentence; --think-overflow fail with it is the run's budget as a length cap. What the eval:
    section or the command line gives is kept as given."""
    from rpt_common.errors import UserError

    run = tmp_path / "run"
    run.mkdir()
    saved = {"template": "think", "think_overflow": "close", "think_budget": 64, "think_budget_final": 16,
             "think_decay_steps": 10, "steps": 20, "answer_room": 8}
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    (run / "run.json").write_text(json.dumps({"heldout_fraction": 0.0, "split_seed": 0}))
    args = {"shards": str(train_shards), "model": str(run)}
    with pytest.raises(UserError, match="--template 'answer-only' does not ask for </think>"):
        load_config(EvalConfig, None, {**args, "template": "answer-only"})
    with pytest.raises(UserError, match="does not ask for </think>"):
        load_config(EvalConfig, None, {"shards": str(train_shards), "think_overflow": "close", "think_budget": 8})
    fail = load_config(EvalConfig, None, {**args, "template": "answer-only", "think_overflow": "fail"})
    assert (fail.think_budget, fail.max_new_tokens) == (0, 16 + 8)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**saved, "eval": {"think_budget": 32, "max_new_tokens": 100}}))
    given = load_config(EvalConfig, str(recipe), args)
    assert (given.think_overflow, given.think_budget, given.max_new_tokens) == ("close", 32, 100)


def test_the_eval_label_states_the_budget_rule():
    from rpt_train.budget import eval_rule

    close = EvalConfig(shards="x", think_overflow="close", think_budget=16, answer_room=8, max_new_tokens=8192)
    assert eval_rule(close).startswith("of <= 16+8 tokens each") and "8,192" not in eval_rule(close)
    assert eval_rule(EvalConfig(shards="x", max_new_tokens=24)) == "of <= 24 tokens each"


def test_a_baseline_with_another_tokenizer_is_refused(train_shards, tiny_llama, tmp_path):
    """Positions, context cuts and label boundaries come from the model's tokenizer: a baseline must share it (the
    vocabulary and the merges); the same tokenizer saved again with other padding is the same."""
    import shutil

    from tiny import make_model_dir

    from rpt_train.compare import check_tokenizers
    from rpt_train.policy import load_policy

    other = make_model_dir(tmp_path / "other", vocab_size=300)
    merges = tmp_path / "merges"
    shutil.copytree(tiny_llama, merges)
    spec = json.loads((merges / "tokenizer.json").read_text())
    spec["model"]["merges"] = spec["model"]["merges"][:-5]  # the same vocabulary, other boundaries
    (merges / "tokenizer.json").write_text(json.dumps(spec))
    saved = tmp_path / "saved"
    load_policy(str(tiny_llama), "cpu").tokenizer.save_pretrained(saved)  # padding left, as a run's checkpoint
    shutil.copy(tiny_llama / "config.json", saved / "config.json")
    check_tokenizers(str(tiny_llama), str(saved))
    for baseline, what in ((other, "vocabulary"), (merges, "segmentation rules")):
        r = CliRunner().invoke(main, ["eval", "--shards", str(train_shards), "--model", str(tiny_llama), "--baseline",
                                      str(baseline), "--device", "cpu", "--limit", "2", "--samples", "1",
                                      "--max-new-tokens", "2"])
        assert r.exit_code == 2 and "another tokenizer" in r.output and what in r.output, r.output
