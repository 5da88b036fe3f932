"""Checkpoints: `OUT/checkpoints/step-NNNNNN/` = HF `save_pretrained` weights + tokenizer + trainer_state.pt
(optimizer, scheduler, RNG, sample cursor). Written to a temp dir and renamed, so a half-written one is never read."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from rpt_common.errors import UserError

STATE = "trainer_state.pt"
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


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: str | os.PathLike, step: int, model, tokenizer, state: dict, keep: int) -> Path:
    """Write step-NNNNNN atomically (temp dir + rename), then delete all but the last `keep` checkpoints."""
    root = checkpoints_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    torch.save({**state, "step": step, "rng": rng_state()}, tmp / STATE)
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": state.get("config")}, indent=1))
    if final.exists():  # re-saving a step after a resume: move the old copy out of the way in one rename
        _discard(final)
    os.replace(tmp, final)
    tidy_checkpoints(out, keep)
    return final


def tidy_checkpoints(out: str | os.PathLike, keep: int) -> None:
    """Delete all but the last `keep` checkpoints, and what a run killed while saving or deleting left."""
    for _, old in list_checkpoints(out)[:-keep]:
        _discard(old)
    root = checkpoints_dir(out)
    for p in [*root.glob(".del-*"), *root.glob(".tmp-step-*")]:
        shutil.rmtree(p, ignore_errors=True)


def _discard(path: Path) -> None:
    """Delete a checkpoint so that a kill at any moment never leaves a half-deleted step-NNNNNN behind:
    rename it to a hidden name first (atomic), then remove it."""
    doomed = path.with_name(f".del-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def load_trainer_state(path: Path) -> dict:
    try:
        # Our own file: numpy and python RNG states need full unpickling.
        return torch.load(path / STATE, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"checkpoint '{path}' has an unreadable {STATE} ({e}); delete that checkpoint to resume "
                        "from the one before")
