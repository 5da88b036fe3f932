"""The memory plan bounds the prompt by the shards (issue 36): with --max-context-tokens 0 a context is at most one
row, so `plan` and `run` count the shards' window + the template, not a fixed 1024 tokens."""
import json

from click.testing import CliRunner

from rpt_common.shards import MANIFEST, SCHEMA_VERSION
from rpt_train.cli import main
from rpt_train.config import TrainConfig
from rpt_train.plan import DEFAULT_PROMPT_TOKENS, TEMPLATE_TOKENS, planned_prompt

PLAN = ["plan", "--model", "bench/configs/qwen2-1.5b", "--max-new-tokens", "8192", "--batch-prompts", "256",
        "--group-size", "8", "--micro-batch-size", "1", "--rollout-batch-size", "64", "--device-memory", "80",
        "--json"]


def shards_with_window(path, window: int):
    path.mkdir()
    (path / MANIFEST).write_text(json.dumps({"schema_version": SCHEMA_VERSION, "config": {"window": window},
                                             "shards": [], "complete": True}))
    return path


def plan_json(*extra) -> dict:
    r = CliRunner().invoke(main, PLAN + list(map(str, extra)))
    return json.loads(r.output.strip().splitlines()[-1])


def test_the_prompt_bound_comes_from_the_shards_window(tmp_path):
    shards = shards_with_window(tmp_path / "w4096", 4096)
    cfg = TrainConfig(shards=str(shards))
    assert planned_prompt(cfg)[0] == 4096 + TEMPLATE_TOKENS
    assert planned_prompt(TrainConfig(shards=str(shards), max_context_tokens=512))[0] == 512 + TEMPLATE_TOKENS
    assert planned_prompt(TrainConfig(shards=str(tmp_path / "none")))[0] == DEFAULT_PROMPT_TOKENS
    default = plan_json()
    long = plan_json("--shards", shards)
    short = plan_json("--shards", shards_with_window(tmp_path / "w256", 256))
    assert long["total_bytes"] > default["total_bytes"] > short["total_bytes"]
    assert plan_json("--shards", shards, "--max-context-tokens", 896)["total_bytes"] == default["total_bytes"]


# --- the policy's tokenizer is not the shards' proxy tokenizer: the window bound is scaled ---------------------------
import math  # noqa: E402
import shutil  # noqa: E402

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
from data_helpers import make_tokenizer_of  # noqa: E402
from shard_fixtures import train_shards  # noqa: E402,F401
from tiny import make_tokenizer  # noqa: E402

from rpt_common.shards import shard_paths  # noqa: E402
from rpt_train.plan import prompt_bound  # noqa: E402

TINY_PLAN = ["plan", "--max-new-tokens", "64", "--batch-prompts", "4", "--group-size", "2", "--micro-batch-size", "1",
             "--device-memory", "80", "--json"]


def tiny_plan(model, *extra) -> tuple[dict, str]:
    r = CliRunner().invoke(main, TINY_PLAN + ["--model", str(model)] + list(map(str, extra)))
    assert r.exit_code == 0, r.output
    return json.loads(r.output.strip().splitlines()[-1]), r.output


def policy_with(tmp_path, config_dir, tok, name):
    """The tiny model's config (shapes unchanged) with another tokenizer: only the tokenizer differs."""
    d = tmp_path / name
    d.mkdir()
    shutil.copy(config_dir / "config.json", d / "config.json")
    tok.save_pretrained(d)
    return d


def worst_ratio(shards, tok) -> float:
    rows = [r for p in shard_paths(shards) for r in pq.read_table(p, columns=["text", "token_ids"]).to_pylist()]
    assert 0 < len(rows) <= 256  # the whole fixture is the sample
    return max(len(tok(r["text"], add_special_tokens=False)["input_ids"]) / len(r["token_ids"]) for r in rows)


@pytest.mark.parametrize("kind", ["bytes", "bytelevel", "metaspace", "wordpiece"])
def test_the_window_is_scaled_by_the_policy_tokens_per_proxy_token(tmp_path, tiny_llama, train_shards, kind):
    tok = make_tokenizer(258) if kind == "bytes" else make_tokenizer_of(kind)  # "bytes": ~one token per byte
    policy = policy_with(tmp_path, tiny_llama, tok, kind)
    window = json.loads((train_shards / MANIFEST).read_text())["config"]["window"]
    ratio = worst_ratio(train_shards, tok)
    scaled = math.ceil(window * max(1.0, ratio))
    bound = prompt_bound(TrainConfig(model=str(policy), shards=str(train_shards)))
    assert bound[0] == scaled + TEMPLATE_TOKENS
    assert bound[2].startswith(f"prompt bound: {window} proxy tokens x {max(1.0, ratio):.2f} (policy/proxy tokens, "
                               f"worst of ") and bound[2].endswith(f" + {TEMPLATE_TOKENS} template tokens = {bound[0]}")
    got, out = tiny_plan(policy, "--shards", train_shards)
    assert bound[2] in out
    # the plan is that of a context cut at the scaled window: every term (kv cache, activations) follows the bound
    assert got == tiny_plan(policy, "--max-context-tokens", scaled)[0]
    if kind == "bytes":  # a policy splitting the same text into ~2x tokens: a larger plan than the window's
        assert ratio > 1.5
        unscaled = tiny_plan(policy, "--max-context-tokens", window)[0]
        assert got["kv_cache"] > unscaled["kv_cache"] and got["activations"] > unscaled["activations"]


def test_the_same_tokenizer_keeps_the_window_bound(tiny_llama, train_shards):
    window = json.loads((train_shards / MANIFEST).read_text())["config"]["window"]
    assert prompt_bound(TrainConfig(model=str(tiny_llama), shards=str(train_shards))) == \
        (window + TEMPLATE_TOKENS, f"shard window {window} + {TEMPLATE_TOKENS} template", "")
    got, out = tiny_plan(tiny_llama, "--shards", train_shards)
    assert "prompt bound:" not in out and "warning" not in out
    assert got == tiny_plan(tiny_llama, "--max-context-tokens", window)[0]


def test_an_unloadable_policy_tokenizer_warns_and_keeps_the_window(tmp_path, tiny_llama, train_shards):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_llama / "config.json", config_only / "config.json")
    window = json.loads((train_shards / MANIFEST).read_text())["config"]["window"]
    got, out = tiny_plan(config_only, "--shards", train_shards)
    assert "warning: cannot load the policy's tokenizer" in out
    assert got == tiny_plan(config_only, "--max-context-tokens", window)[0]
