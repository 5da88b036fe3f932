"""Kill -9 harness for `rpt-train run` (the training side of tests/data_helpers.py's harness).

One process imports the trainer once, then forks a child per training run. Kill points, counted per run:
  weights: right after the k-th save_pretrained of the policy, with model.safetensors cut to half its size
      (a torn weights file in the temp checkpoint dir);
  state: during the k-th torch.save of trainer_state.pt, after half of its bytes reached the file;
  rename: right before the k-th os.replace of the checkpoint code (temp dir -> step dir, or step dir -> .del-*);
  discard: at the k-th shutil.rmtree of the checkpoint code (old checkpoints being deleted);
  metrics: during the k-th metrics.jsonl line, after half of it reached the file;
  timer: the parent SIGKILLs the child after a random delay.
Every run after a kill first checks what the kill left: the checkpoint that --resume would pick must be whole
(weights load, trainer state loads), then resumes.
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

from data_helpers import forked

KILL_KINDS = ("weights", "state", "rename", "discard", "metrics", "timer")


def install_fault(kind: str | None, point: int, counts: dict) -> None:
    import shutil

    import torch
    import transformers

    import rpt_train.checkpoint as checkpoint
    from rpt_train.metrics import MetricsLogger

    def hit(k: str) -> bool:
        counts[k] += 1
        return k == kind and counts[k] == point

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    save_pretrained = transformers.PreTrainedModel.save_pretrained

    def watched_save_pretrained(self, path, *a, **kw):
        save_pretrained(self, path, *a, **kw)
        if hit("weights"):
            f = Path(path) / "model.safetensors"
            os.truncate(f, f.stat().st_size // 2)
            die()

    def watched_torch_save(obj, path, *a, **kw):
        if hit("state"):
            torch.save(obj, str(path) + ".full")
            data = Path(str(path) + ".full").read_bytes()
            os.remove(str(path) + ".full")
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            die()
        return torch.save(obj, path, *a, **kw)

    class WatchedOs:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            if hit("rename"):
                die()
            return os.replace(src, dst)

    class WatchedShutil:
        def __getattr__(self, name):
            return getattr(shutil, name)

        @staticmethod
        def rmtree(path, *a, **kw):
            if hit("discard"):
                die()
            return shutil.rmtree(path, *a, **kw)

    log = MetricsLogger.log

    def watched_log(self, metrics):
        if hit("metrics"):
            line = json.dumps(metrics)
            with open(self.metrics_path, "a") as f:
                f.write(line[: len(line) // 2])
            die()
        return log(self, metrics)

    transformers.PreTrainedModel.save_pretrained = watched_save_pretrained
    checkpoint.torch = type("WatchedTorch", (), {"save": staticmethod(watched_torch_save),
                                                 "__getattr__": lambda self, n: getattr(torch, n)})()
    checkpoint.os, checkpoint.shutil = WatchedOs(), WatchedShutil()
    MetricsLogger.log = watched_log


def state_problems(out: Path) -> list[str]:
    """What --resume would trip over: the checkpoint it picks must be whole."""
    from safetensors.torch import load_file

    from rpt_train.checkpoint import latest_checkpoint, load_trainer_state

    ckpt = latest_checkpoint(out)
    if ckpt is None:
        return []
    try:
        load_file(ckpt / "model.safetensors")
        load_trainer_state(ckpt)
    except Exception as e:  # any failure means a torn checkpoint under its final name
        return [f"{ckpt.name}: {type(e).__name__}: {e}"]
    return []


def _fork_run(cfg, kind=None, point=0, delay=None, log=None, counts_file=None) -> int:
    """Run one training job in a forked child; returns its exit code, or -9 when it was killed."""
    def body():
        from shard_fixtures import length_reward

        from rpt_train.config import TrainConfig
        from rpt_train.trainer import train

        problems = state_problems(Path(cfg["out"]))
        if problems:
            print("STATE PROBLEMS: " + json.dumps(problems), flush=True)
            os._exit(3)
        counts = dict.fromkeys(KILL_KINDS, 0)
        install_fault(kind, point, counts)
        train(TrainConfig(**cfg), reward_fns=[length_reward], quiet=True)
        if counts_file is not None:
            counts_file.write_text(json.dumps(counts))

    return forked(body, log, delay)


def _resumed_step(out: Path) -> int:
    from rpt_train.checkpoint import list_checkpoints

    found = list_checkpoints(out)
    return found[-1][0] if found else 0


def kill_harness(plan: dict) -> dict:
    """plan: cfg (TrainConfig kwargs without out/resume), root, seed, chains, and kills (per chain, kinds drawn
    at random) or sequence (these kinds in order). Writes root/ref (uninterrupted) and root/chain<i>."""
    root, rng, cfg = Path(plan["root"]), random.Random(plan["seed"]), plan["cfg"]
    t0 = time.perf_counter()
    code = _fork_run(dict(cfg, out=str(root / "ref")), log=root / "ref.log", counts_file=root / "ref-counts.json")
    assert code == 0, (root / "ref.log").read_text()
    ref_seconds = time.perf_counter() - t0
    counts = json.loads((root / "ref-counts.json").read_text())
    steps = []
    for c in range(plan["chains"]):
        out, log = root / f"chain{c}", root / f"chain{c}.log"
        run_cfg = dict(cfg, out=str(out), resume=True)
        kinds = plan.get("sequence") or [rng.choice([k for k in KILL_KINDS if k == "timer" or counts[k]])
                                         for _ in range(plan["kills"])]
        for kind in kinds:
            left = (cfg["steps"] - _resumed_step(out)) / cfg["steps"]
            if kind == "timer":
                point, delay = 0, rng.uniform(0, ref_seconds * left)
            else:
                point, delay = rng.randint(1, max(1, round(counts[kind] * left))), None
            code = _fork_run(run_cfg, None if kind == "timer" else kind, point, delay, log)
            steps.append({"chain": c, "kind": kind, "point": point if delay is None else round(delay, 3),
                          "killed": code == -9, "exit": code})
            if code != -9:
                break
        code = _fork_run(run_cfg, log=log)
        steps.append({"chain": c, "kind": "final", "killed": False, "exit": code})
    return {"steps": steps, "counts": counts, "ref_seconds": ref_seconds}


def kill_harness_main() -> None:
    """`python -c 'import train_helpers as h; h.kill_harness_main()' PLAN.json RESULT.json`"""
    import torch

    torch.set_num_threads(1)  # before any fork

    import importlib

    import rpt_train.trainer  # noqa: F401  (the expensive imports, once, before any fork)
    import transformers.tokenization_utils_fast  # noqa: F401

    plan = json.loads(Path(sys.argv[1]).read_text())
    model_type = json.loads((Path(plan["cfg"]["model"]) / "config.json").read_text())["model_type"]
    importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    Path(sys.argv[2]).write_text(json.dumps(kill_harness(plan)))
