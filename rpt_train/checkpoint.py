"""Checkpoints: `OUT/checkpoints/step-NNNNNN/` = HF `save_pretrained` weights + tokenizer + trainer_state.pt
(optimizer, scheduler, RNG, sample cursor). Written to a temp dir and renamed, so a half-written one is never read.
Under FSDP2 the same layout: full (unsharded) weights and optimizer state, loadable on any number of ranks, plus
every rank's RNG state; rank 0 writes."""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from rpt_common.errors import UserError, is_disk_full
from rpt_train import distributed
from rpt_train.rundir import STATE, checkpoints_dir, latest_checkpoint, list_checkpoints  # noqa: F401 (re-exported)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(saved: dict) -> bool:
    """Set this rank's RNG state from a checkpoint's `rng` entry; False (nothing set) when the checkpoint was
    written by another number of ranks."""
    per_rank = saved.get("per_rank", [saved])
    if len(per_rank) != distributed.world_size():
        return False
    set_rng_state(per_rank[distributed.rank()])
    return True


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: str | os.PathLike, step: int, model, tokenizer, state: dict, keep: int) -> Path:
    """Write step-NNNNNN atomically (temp dir + rename), then delete all but the last `keep` checkpoints.
    FSDP2: every rank calls it (the full weights and the RNG states are gathered), rank 0 writes and renames, and
    the ranks leave together, so none reads or deletes a checkpoint before it is complete."""
    weights = distributed.full_state_dict(model)  # None when unsharded: save_pretrained reads the model itself
    rng = rng_state() if distributed.world_size() == 1 else {"per_rank": distributed.all_gather_objects(rng_state())}
    root = checkpoints_dir(out)
    final = root / f"step-{step:06d}"

    def write() -> None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        with disk_full_is_a_user_error(tmp):
            if weights is None:
                model.save_pretrained(tmp, safe_serialization=True)
            else:
                model.save_pretrained(tmp, safe_serialization=True, state_dict=weights)
            tokenizer.save_pretrained(tmp)
            torch.save({**state, "step": step, "rng": rng}, tmp / STATE)
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config": state.get("config")}, indent=1))
        if final.exists():  # re-saving a step after a resume: move the old copy out of the way in one rename
            _discard(final)
        os.replace(tmp, final)
        tidy_checkpoints(out, keep)

    distributed.broadcast_from_main(write)  # a full disk on rank 0 is raised on every rank, none waits forever
    # The broadcast alone does not make the ranks leave together: gloo may return on rank 0 before the others have
    # received, and a rank that then tears the group down aborts them (seen in a 2-rank CLI run). Keep the barrier.
    distributed.barrier()
    return final


@contextlib.contextmanager
def disk_full_is_a_user_error(tmp: Path):
    """A full disk (or quota) while saving: the temp dir goes, earlier checkpoints stay, one sentence says what to do."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(tmp.parent.parent)
        where = f"the last complete checkpoint is '{last}'" if last else "no checkpoint was saved yet"
        raise UserError(f"no space left on the device while saving checkpoint '{tmp.name[5:]}' ({e.strerror}); "
                        f"{where}: free some space and rerun with --resume") from None


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
    """trainer_state.pt, read once (by rank 0 under torchrun): every rank gets the small entries (scheduler, sampler,
    RNG, step, config), the optimizer state stays on rank 0, which broadcasts it shard by shard (distributed.py)."""
    def read() -> dict:
        hint = "delete that checkpoint to resume from the one before"
        try:
            # Our own file: numpy and python RNG states need full unpickling.
            state = torch.load(path / STATE, map_location="cpu", weights_only=False)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            raise UserError(f"'{path / STATE}' is unreadable ({e}); {hint}") from None
        missing = [k for k in ("step", "scheduler", "sampler", "rng") if not isinstance(state, dict) or k not in state]
        if missing or not isinstance(state["step"], int) or not isinstance(state.get("config", {}), dict):
            what = f"lacks {', '.join(missing)}" if missing else "has a 'step' or 'config' of another type"
            raise UserError(f"'{path / STATE}' is damaged: it {what}; {hint}")
        from rpt_train.config import saved_options

        saved_options(path / STATE, state.get("config", {}), hint)  # each saved option of its type, or the key named
        return state

    if distributed.world_size() == 1:
        return read()
    state = read() if distributed.is_main() else None
    # the optimizer state and rlp's EMA weights stay on rank 0, which broadcasts each rank's shards
    small = distributed.broadcast_from_main(lambda: {k: v for k, v in state.items() if k not in ("optimizer", "ema")})
    return state if distributed.is_main() else small


def base_model_identity(spec: str) -> str:
    """What a run's base model is, comparable across resumes: `demo`, or the absolute path --model resolves to."""
    from rpt_train.policy import resolve_policy

    return spec if spec == "demo" else str(Path(resolve_policy(spec)).expanduser().resolve())
