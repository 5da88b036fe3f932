"""Run logs: `metrics.jsonl` (one object per step), `samples.jsonl` (rollouts every N steps), a compact
console line, and TensorBoard when asked and installed. A resumed run first drops lines past its checkpoint."""
from __future__ import annotations

import json
import math
import os
import platform
import sys
from pathlib import Path

CONSOLE = [("loss", "loss", "{:.4g}"), ("reward", "reward", "{:.3f}"), ("frac_reward_zero_std", "zero_std", "{:.2f}"),
           ("answer_rate", "answered", "{:.2f}"), ("forced_share", "forced", "{:.2f}"),
           ("completion_length", "len", "{:.0f}"), ("clip_ratio", "clip", "{:.3f}"),
           ("entropy", "ent", "{:.2f}"), ("kl", "kl", "{:.4f}"), ("lr", "lr", "{:.2e}"), ("seconds", "s", "{:.1f}")]


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the lines with step <= last_step (a resumed run rewrites what came after its checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= last_step:
                keep.append(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in keep))
    tmp.replace(path)


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """`write=False` (ranks other than 0 under torchrun): every method does nothing."""

    def __init__(self, out: str, *, start_step: int, total_steps: int, tensorboard: bool = False, quiet: bool = False,
                 write: bool = True):
        self.out = Path(out)
        self.metrics_path, self.samples_path = self.out / "metrics.jsonl", self.out / "samples.jsonl"
        self.contexts_path = self.out / "contexts.jsonl"
        self.total, self.quiet, self.tb, self.write = total_steps, quiet, None, write
        if not write:
            return
        for p in (self.metrics_path, self.samples_path, self.contexts_path):
            _truncate_jsonl(p, start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=start_step + 1)
            except ImportError:
                print("warning: --tensorboard needs the tensorboard package; logging to metrics.jsonl only",
                      file=sys.stderr)

    def log(self, metrics: dict) -> None:
        if not self.write:
            return
        metrics = {k: _clean(v) for k, v in metrics.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, metrics["step"])
            self.tb.flush()  # on disk each step: a rank that stops (os._exit under torchrun, kill -9) loses none
        if not self.quiet:
            parts = [f"step {metrics['step']}/{self.total}"]
            parts += [f"{short} {fmt.format(metrics[k])}" for k, short, fmt in CONSOLE if metrics.get(k) is not None]
            print(" | ".join(parts), flush=True)

    def samples(self, records: list[dict]) -> None:
        if not self.write:
            return
        with open(self.samples_path, "a") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")

    def contexts(self, step: int, indices: list[int], keys: list[str] | None = None) -> None:
        """The candidate indices (`Sample.index`: into the table the step drew from, under --curriculum its stage's)
        rolled out at `step`, in draw order, and their positions' keys (`Sample.key`, doc_id/window/t): what a
        control arm (SFT on the same contexts) or an audit rebuilds the step's samples from; the keys let it check
        that it rebuilt the same positions."""
        if not self.write:
            return
        record = {"step": step, "contexts": indices} | ({"keys": keys} if keys is not None else {})
        with open(self.contexts_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def machine() -> str:
    """The machine a result was measured on, in words (reports carry it beside every timing)."""
    import torch

    if torch.cuda.is_available():
        return f"GPU ({torch.cuda.get_device_name(0)})"
    return (f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
            f"{torch.get_num_threads()} threads)")
