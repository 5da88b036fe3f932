"""The layout of a `rpt-train run` output directory, readable without torch: complete checkpoints
(`checkpoints/step-NNNNNN/` with trainer_state.pt) and `run.json`, the run's provenance: its held-out split
(`heldout_fraction`, `split_seed`) and its learning-rate schedule with the horizon (steps) it decays over.
`rpt-train eval` / `export` given a run or one of its checkpoints read the split from here."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from rpt_common.errors import UserError

STATE = "trainer_state.pt"
RECORD = "run.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoints_dir(out: str | os.PathLike) -> Path:
    return Path(out) / "checkpoints"


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints (renamed into place, with trainer state) as (step, path), oldest first."""
    root = checkpoints_dir(out)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / STATE).exists()]
    return sorted(found)


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def provenance(cfg, horizon: int) -> dict:
    """What a run directory records about how its run was set up: the split and the schedule's horizon."""
    return {"heldout_fraction": cfg.heldout_fraction, "split_seed": cfg.split_seed,
            "split_block_windows": cfg.split_block_windows, "shards": cfg.shards,
            "schedule": {"lr_schedule": cfg.lr_schedule, "warmup_steps": cfg.warmup_steps, "horizon": horizon}}


def write_record(out: str | os.PathLike, record: dict) -> None:
    path = Path(out) / RECORD
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def run_dir_of(spec: str) -> Path | None:
    """The run directory `spec` names: a run's --out, or one of its checkpoints (RUN/checkpoints/step-N)."""
    p = Path(spec)
    if spec == "demo" or not p.is_dir():
        return None
    if (p / RECORD).exists() or checkpoints_dir(p).is_dir():
        return p
    if _STEP_DIR.match(p.name) and p.parent.name == "checkpoints":
        return p.parent.parent
    return None


def read_provenance(spec: str) -> dict | None:
    """The provenance of the run behind --model `spec` (run dir or checkpoint): run.json, or, for a run written
    before run.json existed, the config saved with the checkpoint; None when `spec` is no run."""
    if spec == "demo":
        return None
    run = run_dir_of(spec)
    if run is not None and (run / RECORD).exists():
        try:
            return json.loads((run / RECORD).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"'{run / RECORD}' is unreadable ({e}); it records the run's held-out split: pass "
                            "--heldout-fraction and --split-seed yourself")
    p = Path(spec)
    ckpt = p if (p / "trainer_state.json").exists() else latest_checkpoint(p) if p.is_dir() else None
    if ckpt is None or not (ckpt / "trainer_state.json").exists():
        return None
    config = json.loads((ckpt / "trainer_state.json").read_text()).get("config") or {}
    if "heldout_fraction" not in config:
        return None
    return {"heldout_fraction": config["heldout_fraction"], "split_seed": config.get("split_seed", 0),
            "shards": config.get("shards")}


def read_run_config(spec: str) -> dict:
    """The options the run behind --model `spec` (run dir or checkpoint) was started with (its config.yaml); {}
    when `spec` is no run or the run has none."""
    import yaml

    run = run_dir_of(spec)
    path = run / "config.yaml" if run is not None else None
    if path is None or not path.exists():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"'{path}' is unreadable ({e}); pass the run's prompt options (--template ...) yourself")
