"""`rpt-train run` / `rpt-train eval` end to end through click, recipes, and bad input (exit 2, one sentence)."""
import json
import shutil

import pytest
from click.testing import CliRunner
from shard_fixtures import train_shards, write_shards_standin  # noqa: F401

from rpt_train.cli import main
from rpt_train.config import TrainConfig, load_config

CONTRACT = {"step", "loss", "lr", "reward", "reward_std", "frac_reward_zero_std", "answer_rate", "completion_length",
            "clip_ratio", "entropy", "seconds"}
SMALL = ["--batch-prompts", "2", "--group-size", "2", "--max-new-tokens", "4", "--bucket", "all"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_run_then_eval_end_to_end(tiny_llama, train_shards, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"shards: {train_shards}\nmodel: {tiny_llama}\nout: {tmp_path / 'run'}\nsteps: 5\n"
                      "batch-prompts: 2\ngroup_size: 2\nmax-new-tokens: 4\nbucket: all\nsave-every: 1\n"
                      "reward: [shard_fixtures:length_reward]\neval:\n  limit: 3\n  samples: 2\n")
    r = invoke("run", recipe, "--steps", 2, "--loss", "dapo")
    assert r.exit_code == 0, r.output
    assert "step 2/2" in r.output
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2] and CONTRACT <= set(lines[0])
    assert "kl" not in lines[0]  # beta = 0: no reference model, no kl
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    assert (ckpt / "config.json").exists() and (ckpt / "trainer_state.pt").exists()
    r = invoke("eval", recipe, "--model", tmp_path / "run", "--max-new-tokens", 3, "--out", tmp_path / "eval.json")
    assert r.exit_code == 0, r.output
    assert "ntr_acc" in r.output and "hard" in r.output
    result = json.loads((tmp_path / "eval.json").read_text())
    for b in ("easy", "medium", "hard", "all"):
        assert {"n", "ntr_accuracy", "ntr_pass_at_k", "answer_rate", "ntp_accuracy"} <= set(result[b])
        assert result[b]["n"] == 3
    assert result["meta"]["k"] == 2 and result["meta"]["model"].endswith("step-000002")


def test_recipe_keys_and_cli_precedence(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("shards: a\nclip-high: 0.3\ngroup_size: 4\nrun:\n  steps: 7\neval:\n  limit: 3\n"
                      "bucket-thresholds: 0.1,0.2,0.3\n")
    cfg = load_config(TrainConfig, str(recipe), {"steps": 9, "lr": None, "reward": ()})
    assert (cfg.clip_high, cfg.group_size, cfg.steps, cfg.bucket_thresholds) == (0.3, 4, 9, [0.1, 0.2, 0.3])
    assert load_config(TrainConfig, str(recipe), {}).steps == 7


def _not_causal_lm(tmp_path, tiny_llama):
    from transformers import T5Config

    d = tmp_path / "t5"
    T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, d_kv=8, vocab_size=320).save_pretrained(d)
    for f in tiny_llama.glob("tokenizer*"):
        shutil.copy(f, d)
    return d


def _mismatched_tokenizer(tmp_path, tiny_llama):
    from transformers import AutoTokenizer

    d = tmp_path / "mismatch"
    shutil.copytree(tiny_llama, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens([f"<x{i}>" for i in range(50)])
    tok.save_pretrained(d)
    return d


def _corrupt(tmp_path, shards):
    d = tmp_path / "corrupt"
    shutil.copytree(shards, d)
    f = next(d.glob("**/shard-*.parquet"))
    f.write_bytes(f.read_bytes()[:200])
    return d


@pytest.mark.parametrize("case,message", [
    ("schema", "schema version 0"),
    ("corrupt", "truncated or corrupt"),
    ("empty-bucket", "no training position"),
    ("not-causal", "cannot load a causal language model"),
    ("corrupt-weights", "cannot load a causal language model"),
    ("tokenizer", "does not belong to this model"),
    ("no-shards", "not an `rpt-data tag` output directory"),
    ("bad-option", "--group-size must be at least 2"),
])
def test_bad_input_is_one_sentence_and_exit_2(case, message, tiny_llama, train_shards, tmp_path):
    shards, model, extra = train_shards, tiny_llama, []
    if case == "schema":
        shards = write_shards_standin(tmp_path / "old", tiny_llama, schema_version=0)
    elif case == "corrupt":
        shards = _corrupt(tmp_path, train_shards)
    elif case == "empty-bucket":
        extra = ["--min-entropy", 1e9]
    elif case == "not-causal":
        model = _not_causal_lm(tmp_path, tiny_llama)
    elif case == "corrupt-weights":  # a truncated download of the weights file
        model = tmp_path / "corrupt-model"
        shutil.copytree(tiny_llama, model)
        (model / "model.safetensors").write_bytes(b"not a safetensors file")
    elif case == "tokenizer":
        model = _mismatched_tokenizer(tmp_path, tiny_llama)
    elif case == "no-shards":
        shards = tmp_path / "nothing"
    elif case == "bad-option":
        extra = ["--group-size", 1]
    r = CliRunner().invoke(main, ["run", "--shards", str(shards), "--model", str(model), "--out", str(tmp_path / "o"),
                                  "--steps", "1", *SMALL, *map(str, extra)])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len([line for line in r.output.splitlines() if line.startswith("error:")]) == 1
    if case in ("schema", "corrupt", "not-causal"):
        e = CliRunner().invoke(main, ["eval", "--shards", str(shards), "--model", str(model), "--limit", "2"])
        assert e.exit_code == 2 and message in e.output and "Traceback" not in e.output
