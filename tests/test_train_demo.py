"""Slow: `rpt-train run` and `rpt-train eval` with the real demo policy (SmolLM2-135M-Instruct, chat template)."""
import json

import pytest
from click.testing import CliRunner
from shard_fixtures import write_shards

from rpt_train.cli import main

pytestmark = pytest.mark.slow


def test_demo_model_run_and_eval(tmp_path):
    shards = write_shards(tmp_path / "shards", "demo", window=64, context_prefix=16)
    common = ["--shards", shards, "--model", "demo", "--max-new-tokens", "16", "--max-context-tokens", "48",
              "--heldout-fraction", "0.3"]
    r = CliRunner().invoke(main, ["run", *map(str, common), "--out", str(tmp_path / "run"), "--steps", "1",
                                  "--batch-prompts", "1", "--group-size", "2", "--bucket", "all"])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert m["rollout_tokens"] > 0 and 0 <= m["answer_rate"] <= 1
    r = CliRunner().invoke(main, ["eval", *map(str, common), "--model", str(tmp_path / "run"), "--limit", "2",
                                  "--samples", "2", "--out", str(tmp_path / "eval.json")])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["all"]["n"] == 2 and 0 <= result["all"]["ntp_accuracy"] <= 1
