"""Exports sized to the run (issue 36): `export` prints its rows and bytes before writing, and the engine recipes
export what they train on (--limit from steps x batch), not one row per training position."""
import json
import re
from pathlib import Path

from click.testing import CliRunner
from shard_fixtures import train_shards  # noqa: F401

from rpt_train.cli import main

ROOT = Path(__file__).parent.parent


def test_export_prints_a_size_estimate_before_writing(train_shards, tiny_llama, tmp_path):
    out = tmp_path / "ex"
    r = CliRunner().invoke(main, ["export", "--shards", str(train_shards), "--model", str(tiny_llama),
                                                  "--out", str(out), "--format", "openrlhf", "--bucket", "all",
                                                  "--limit", "20", "--no-progress"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    line = next(x for x in r.stderr.splitlines() if x.startswith("export will write"))
    assert "train <= 20 rows" in line
    meta = json.loads((out / "export.json").read_text())
    rows, size = meta["estimate"]["train"]["rows"], meta["estimate"]["train"]["bytes"]
    written = (out / "train.jsonl").stat().st_size
    assert rows == 20 >= meta["files"]["train"]["rows"]
    assert 0.5 < size / written < 2  # the probe's mean row size is near the rows written (jsonl: uncompressed)


def test_engine_recipes_export_with_a_limit():
    """Every `rpt-train export` in pipelines/ (shell recipes, the TRL script's usage) caps the training rows."""
    found = 0
    for path in [*ROOT.glob("pipelines/**/*.sh"), ROOT / "pipelines" / "trl_grpo.py"]:
        text = path.read_text().replace("\\\n", " ")
        for cmd in re.findall(r"rpt-train export --shards[^\n]*", text):
            found += 1
            assert "--limit" in cmd, f"{path.name}: {cmd}"
    assert found >= 3
