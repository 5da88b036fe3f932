"""Sample access: candidate-table bytes per position and the time to build one 256-context step, old vs new.

Writes synthetic shards (random ASCII text cut into 1-7 byte tokens, random float32 stats, so they compress like
real ones) with the real writer (`rpt_data.writer.build_table` + `write_shard`) twice: the old layout (one row group
per shard) and the new one (--row-group-rows windows per group). Then, for the old reader (rpt_train/samples.py at
--old-ref, the commit before this change) and the current one: seconds to build the candidate table, its bytes per scored position
(numpy nbytes), and seconds per `next_batch(256)` (median of --reps, first batch apart). Files are in the OS page
cache after writing: this measures decoding, not disk reads. Prints a table; writes bench/results/samples-cpu.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, write_json  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0, help="shard bytes on disk per layout (default 1 GB)")
    p.add_argument("--window", type=int, default=1024, help="tokens per window")
    p.add_argument("--context-prefix", type=int, default=128)
    p.add_argument("--shard-rows", type=int, default=1024, help="windows per shard (the tagger's default)")
    p.add_argument("--row-group-rows", type=int, default=32, help="windows per row group in the new layout")
    p.add_argument("--batch", type=int, default=256, help="contexts per step")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--old-ref", default="1731ec6", help="git revision whose rpt_train/samples.py is the old reader")
    p.add_argument("--workdir", default=None, help="where to write the shards (default: a temporary directory)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "samples-cpu.json"))
    return p


def synthetic_windows(rng, n: int, window: int, prefix: int, first: int):
    """n windows of `window` ASCII tokens; 4 windows per document, later ones with a context prefix."""
    from rpt_data.proxy import WindowStats
    from rpt_data.windows import Window

    windows, stats = [], []
    for k in range(n):
        w = (first + k) % 4
        lengths = rng.integers(1, 8, window)
        ends = np.cumsum(lengths)
        chars = rng.integers(97, 123, int(ends[-1]), dtype=np.uint8)
        chars[ends[:-1][rng.random(window - 1) < 0.7]] = 32  # most tokens start with a space
        windows.append(Window(doc_id=f"doc{(first + k) // 4}", window_index=w, token_start=w * (window - prefix),
                              text=chars.tobytes().decode("ascii"), token_ids=rng.integers(0, 49152, window, np.int32),
                              token_bytes=ends.astype(np.int32), score_start=0 if w == 0 else prefix))
        topk = rng.uniform(0, 3, window).astype(np.float32)
        topk[0] = np.nan if w == 0 else topk[0]  # a document's first token has no context
        stats.append(WindowStats(entropy=topk + 0.5, topk_entropy=topk, target_logprob=-topk,
                                 argmax=rng.integers(0, 49152, window).astype(np.int64)))
    return windows, stats


def write_layouts(args, root: Path, log) -> dict[str, Path]:
    """The same shards twice: one row group per shard (old) and --row-group-rows windows per group (new)."""
    import json

    from rpt_common.shards import MANIFEST, SCHEMA_VERSION, shard_name
    from rpt_data.writer import build_table, write_shard

    dirs = {"old": root / "old", "new": root / "new"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    entries = {k: [] for k in dirs}
    rng, seq, written = np.random.default_rng(0), 0, 0
    t0 = time.perf_counter()
    while written < args.gb * 1e9:
        windows, stats = synthetic_windows(rng, args.shard_rows, args.window, args.context_prefix, seq * args.shard_rows)
        above = [np.flatnonzero(np.nan_to_num(s.topk_entropy) > 0.5).astype(np.int32) for s in stats]
        selected = [a[a >= w.score_start] for a, w in zip(above, windows)]
        table = build_table(windows, stats, selected)
        for layout, d in dirs.items():
            rows = args.shard_rows if layout == "old" else args.row_group_rows
            digest = write_shard(d / shard_name(0, seq), table, rows)
            entries[layout].append({"file": shard_name(0, seq), "rows": table.num_rows, **digest})
        written += entries["new"][-1]["bytes"]
        seq += 1
    config = {"metric": "topk", "buckets": [0.5, 1.0, 1.5], "window": args.window}
    for layout, d in dirs.items():
        (d / MANIFEST).write_text(json.dumps({"schema_version": SCHEMA_VERSION, "complete": True, "config": config,
                                              "shards": entries[layout]}))
    log(f"wrote {seq} shards x 2 layouts, {written / 1e9:.2f} GB each, in {time.perf_counter() - t0:.0f} s")
    return dirs


def old_reader(ref: str):
    """rpt_train/samples.py as it was at `ref`, imported as its own module."""
    src = subprocess.run(["git", "show", f"{ref}:rpt_train/samples.py"], cwd=REPO, check=True, capture_output=True,
                         text=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_samples.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("old_samples", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_samples"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def table_bytes(cands) -> int:
    return sum(getattr(cands, k).nbytes for k in type(cands).__slots__)


def measure(module, directory: Path, tok, args, log) -> dict:
    from rpt_train.config import TrainConfig

    cfg = TrainConfig(shards=str(directory), bucket="all", entropy_metric="topk_entropy",
                      bucket_thresholds=[0.5, 1.0, 1.5], labels_length=8)
    t0 = time.perf_counter()
    data = module.TrainSamples(cfg, tok)
    build_s = time.perf_counter() - t0
    n = len(data.cands)
    t0 = time.perf_counter()
    data.next_batch(args.batch)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        data.next_batch(args.batch)
        times.append(time.perf_counter() - t0)
        if times[-1] > 20:  # the old layout: enough to see it
            break
    res = {"positions": n, "table_seconds": round(build_s, 2), "bytes_per_position": table_bytes(data.cands) / n,
           "sampler_bytes_per_position": data.sampler._perm.nbytes / n,
           "first_batch_seconds": round(first, 3), "batch_seconds": round(statistics.median(times), 3),
           "batch_reps": len(times)}
    log(f"  {module.__name__:>13s} on {directory.name} layout: {res}")
    return res


def run(args, log=lambda m: print(m, file=sys.stderr, flush=True)) -> dict:
    from tiny import make_tokenizer

    import rpt_train.samples as new

    root = Path(args.workdir or tempfile.mkdtemp(prefix="rpt-bench-samples-"))
    try:
        dirs = write_layouts(args, root, log)
        tok, old = make_tokenizer(), old_reader(args.old_ref)
        results = {f"{name}_reader/{layout}_layout": measure(mod, dirs[layout], tok, args, log)
                   for name, mod in (("old", old), ("new", new)) for layout in ("old", "new")}
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    before, after = results["old_reader/old_layout"], results["new_reader/new_layout"]
    out = {"gb_per_layout": args.gb, "window": args.window, "shard_rows": args.shard_rows,
           "row_group_rows": args.row_group_rows, "batch": args.batch, "cpus": os.cpu_count(),
           "loadavg": os.getloadavg(), "results": results,
           "speedup": round(before["batch_seconds"] / after["batch_seconds"], 1),
           "targets": {"batch<1s": after["batch_seconds"] < 1.0, "bytes_per_position<=6": after["bytes_per_position"] <= 6}}
    write_json(args.out, out)
    print(f"\n{'reader / layout':28s} {'positions':>11s} {'table s':>8s} {'B/pos':>6s} {'+sampler':>8s} "
          f"{'1st batch s':>11s} {'batch s':>8s}")
    for name, r in results.items():
        print(f"{name:28s} {r['positions']:11d} {r['table_seconds']:8.2f} {r['bytes_per_position']:6.2f} "
              f"{r['sampler_bytes_per_position']:8.2f} {r['first_batch_seconds']:11.3f} {r['batch_seconds']:8.3f}")
    print(f"results: {args.out}")
    return out


if __name__ == "__main__":
    run(parser().parse_args())
