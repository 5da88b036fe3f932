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


SPLIT_HINT = ("it records the run's held-out split: fix it, or pass --heldout-fraction, --split-seed and "
              "--split-block-windows yourself")
PROMPT_HINT = "fix it, or delete it and pass the run's prompt options (--template ...) yourself"


def read_saved(path: Path, hint: str, yaml_text: bool = False) -> dict:
    """A run's saved file (config.yaml, run.json, a checkpoint's trainer_state.json) as a mapping; a file that cannot
    be read or parsed (truncated, binary bytes) or is empty or no mapping (a YAML list, plain text) is one UserError
    naming it, with `hint` (what to pass instead)."""
    try:
        text = path.read_text()
        if yaml_text:
            import yaml

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as e:
                raise ValueError(str(e).replace("\n", " ")) from None
        else:
            data = json.loads(text)
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise UserError(f"'{path}' is unreadable ({e}); {hint}") from None
    if not isinstance(data, dict):
        kinds = {"list": "a list", "str": "plain text", "bool": "a boolean"}
        what = "empty" if data is None else (f"not a mapping of option names (it holds "
                                             f"{kinds.get(type(data).__name__, type(data).__name__ + ' data')})")
        raise UserError(f"'{path}' is damaged: {what}; {hint}")
    return data


def _provenance_values(path: Path, record: dict) -> dict:
    """run.json's split keys checked (type and range), each failure one UserError naming the file and the key;
    other keys (schedule, heldout, ones of other versions) are not read here and so not checked."""
    kinds = {"heldout_fraction": ((int, float), "a number"), "split_seed": ((int,), "an integer"),
             "split_block_windows": ((int,), "an integer"), "shards": ((str, type(None)), "a path or null")}
    out = dict(record)
    for key, (ok_types, what) in kinds.items():
        if key in record:
            v = record[key]
            if isinstance(v, bool) or not isinstance(v, ok_types):
                shown = repr(v) if len(repr(v)) <= 60 else repr(v)[:57] + "..."
                raise UserError(f"'{path}' is damaged: '{key}' should be {what}, got {shown}; {SPLIT_HINT}")
            out[key] = float(v) if key == "heldout_fraction" else v
    ok = {"heldout_fraction": lambda v: 0.0 <= v < 1.0, "split_block_windows": lambda v: v >= 0}
    for key, check in ok.items():
        if key in out and not check(out[key]):
            raise UserError(f"'{path}' is damaged: '{key}' is {out[key]!r}, out of range; {SPLIT_HINT}")
    return out


def read_provenance(spec: str) -> dict | None:
    """The provenance of the run behind --model `spec` (run dir or checkpoint): run.json, or, for a run written
    before run.json existed, the config saved with the checkpoint; None when `spec` is no run. A damaged file is one
    UserError naming it (and the key); keys of other versions are ignored."""
    if spec == "demo":
        return None
    run = run_dir_of(spec)
    if run is not None and (run / RECORD).exists():
        return _provenance_values(run / RECORD, read_saved(run / RECORD, SPLIT_HINT))
    p = Path(spec)
    ckpt = p if (p / "trainer_state.json").exists() else latest_checkpoint(p) if p.is_dir() else None
    if ckpt is None or not (ckpt / "trainer_state.json").exists():
        return None
    path = ckpt / "trainer_state.json"
    config = read_saved(path, SPLIT_HINT).get("config")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise UserError(f"'{path}' is damaged: its 'config' is not a mapping of option names; {SPLIT_HINT}")
    config = {str(k).replace("-", "_"): v for k, v in config.items()}  # the split keys are checked below
    if config.get("heldout_fraction") is None:
        return None
    return _provenance_values(path, {"heldout_fraction": config["heldout_fraction"],
                                     "split_seed": config.get("split_seed", 0), "shards": config.get("shards")})


def read_run_config(spec: str, convert=None) -> dict:
    """The options the run behind --model `spec` (run dir or checkpoint) was started with (its config.yaml), each
    converted to its option's type; {} when `spec` is no run or the run has none. A damaged config.yaml (truncated,
    binary, empty, no mapping, a value of another type) is one UserError naming it (and the key); keys that are no
    option of this version (written by a newer or older one) are ignored. `convert(path, data, hint)` types the
    options (rpt_train.config.saved_options; passed in, so this module imports no config: no import cycle)."""
    run = run_dir_of(spec)
    path = run / "config.yaml" if run is not None else None
    if path is None or not path.exists():
        return {}
    data = read_saved(path, PROMPT_HINT, yaml_text=True)
    return convert(path, data, PROMPT_HINT) if convert is not None else data
