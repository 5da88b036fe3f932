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
