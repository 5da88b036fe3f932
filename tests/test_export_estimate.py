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


def test_verl_recipe_asks_for_dynamic_sampling_only_where_it_is_read(tmp_path):
    """verl.trainer.main_ppo does not read algorithm.filter_groups (only the DAPO recipe's trainer does): the
    default entry point gets no filter_groups flags and exports one batch of contexts per step; ENTRY=
    recipe.dapo.main_dapo gets them and exports GEN_BATCHES batches per step."""
    import os
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("rpt-train", "python3"):  # record the commands instead of running them
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{tmp_path}/calls"\n')
        (bin_dir / name).chmod(0o755)

    def calls(**extra):
        (tmp_path / "calls").unlink(missing_ok=True)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SHARDS": "s", "MODEL": "m", "STEPS": "2",
               "BATCH": "8", **extra}
        subprocess.run(["bash", str(ROOT / "pipelines/verl/rpt_paper.sh")], env=env, check=True)
        return (tmp_path / "calls").read_text().splitlines()

    export, train = calls()
    assert "-m verl.trainer.main_ppo" in train and "filter_groups" not in train and "--limit 16 " in export
    export, train = calls(ENTRY="recipe.dapo.main_dapo")
    assert "-m recipe.dapo.main_dapo" in train and "algorithm.filter_groups.enable=True" in train
    assert "--limit 64 " in export


def test_openrlhf_recipe_forwards_every_reward_env_var_to_the_ray_workers(tmp_path):
    """The reward file runs in Ray's workers: RPT_REWARD_* and RPT_ANSWER_FORMAT set for the recipe reach them
    through the runtime env, as the response prefix does."""
    import json
    import os
    import subprocess
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "rpt-train").write_text(f'#!/bin/sh\necho "$@" > "{tmp_path}/export"\n')
    (bin_dir / "ray").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/ray"\n')
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for name in ("rpt-train", "ray", "python3"):
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "SHARDS": "s",
           "MODEL": "m", "RESPONSE_PREFIX": "\\boxed{", "RPT_REWARD_NO_ANSWER": "-1", "RPT_ANSWER_FORMAT": "answer_tag"}
    env.pop("RPT_REWARD_CORRECT", None)
    subprocess.run(["bash", str(ROOT / "pipelines/openrlhf.sh")], env=env, check=True)
    args = (tmp_path / "ray").read_text().splitlines()
    runtime = json.loads(next(a for a in args if a.startswith("--runtime-env-json=")).split("=", 1)[1])
    assert runtime["env_vars"] == {"RPT_REWARD_NO_ANSWER": "-1", "RPT_ANSWER_FORMAT": "answer_tag",
                                   "RPT_RESPONSE_PREFIX": "\\boxed{"}
    # OpenRLHF keeps a prompt's last max_len - max_new_tokens ids: contexts exported inside that, with template room
    export = (tmp_path / "export").read_text().split()
    context = int(export[export.index("--max-context-tokens") + 1])
    budget = int(args[args.index("--data.max_len") + 1]) - int(args[args.index("--rollout.max_new_tokens") + 1])
    assert 0 < context <= budget - 256
