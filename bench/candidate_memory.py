"""Peak memory of the training candidate table at a large synthetic position count (issue 36).

    python bench/candidate_memory.py --positions 20000000 [--out bench/results/candidate-memory.json]

Writes continuous-mode shards of N scored positions (windows of 1024 tokens, seeded entropies) to a scratch
directory, then builds the training table in a fresh process twice: `inmemory` (the whole table, then the
filter, then the order, all in the heap: the code before issue 36) and `mapped` (TrainSamples' build: a row group at
a time into memory-mapped scratch files). Each reports the peak anonymous memory (RssAnon, sampled every 5 ms: the
process's own heap, what 8 ranks multiply), the peak file-backed resident memory (RssFile: page cache the kernel may
reclaim) and VmHWM (their sum at the peak)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
WINDOW = 1024


def write_shards(out: Path, positions: int, rows_per_group: int = 64, files: int = 16) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rpt_common.shards import MANIFEST, SCHEMA_VERSION, SHARD_SCHEMA, shard_name

    out.mkdir(parents=True, exist_ok=True)
    rows = -(-positions // WINDOW)
    rng = np.random.default_rng(0)
    entries, per_shard = [], -(-rows // 4)
    for k in range(4):
        lo, hi = k * per_shard, min(rows, (k + 1) * per_shard)
        name = shard_name(0, k)
        with pq.ParquetWriter(out / name, SHARD_SCHEMA) as w:
            for g in range(lo, hi, rows_per_group):
                n = min(rows_per_group, hi - g)
                offs = pa.array(np.arange(n + 1, dtype=np.int32) * WINDOW)
                ints = lambda v: pa.ListArray.from_arrays(offs, pa.array(v))  # noqa: E731
                ent = rng.uniform(0, 3, n * WINDOW).astype(np.float32)
                table = pa.Table.from_arrays([
                    pa.array([f"data/part-{(g + i) % files:05d}.jsonl.gz" for i in range(n)]),
                    pa.array(np.arange(g, g + n, dtype=np.int32)), pa.array(np.arange(g, g + n, dtype=np.int64) * WINDOW),
                    pa.array(["synthetic"] * n),
                    ints(np.zeros(n * WINDOW, np.int32)), ints(np.tile(np.arange(1, WINDOW + 1, dtype=np.int32), n)),
                    pa.array(np.zeros(n, np.int32)),
                    ints(ent + 0.5), ints(ent), ints(-ent), ints(np.zeros(n * WINDOW, np.int32)),
                    pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * 8),
                                             pa.array(np.tile(np.arange(1, 9, dtype=np.int32) * 100, n))),
                ], schema=SHARD_SCHEMA)
                w.write_table(table)
        entries.append({"file": name, "rows": hi - lo})
    (out / MANIFEST).write_text(json.dumps({"schema_version": SCHEMA_VERSION, "complete": True, "shards": entries,
                                            "config": {"mode": "continuous", "window": WINDOW, "metric": "topk"}}))


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def measure(shards: str, how: str) -> dict:
    """Build the training table of `shards` (bucket all, 1% held out in blocks of 16 windows) one way; peaks."""
    from rpt_train.config import TrainConfig
    from rpt_train.samples import PositionSampler, ShardSet, TrainSamples, cuts_of, resolve_shard_defaults, select_mask

    peak = {"RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k in peak:
                peak[k] = max(peak[k], status(k))
            time.sleep(0.005)

    base = {k: status(k) for k in peak}
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    cfg = TrainConfig(shards=shards, bucket="all", heldout_fraction=0.01)
    if how == "mapped":
        data = TrainSamples(cfg, None)
        n = len(data)
    else:
        shard_set = ShardSet(shards)
        resolve_shard_defaults(cfg, shard_set)
        cands = shard_set.candidates(cfg.entropy_metric, 0.01, 0, cuts=cuts_of(cfg), block_windows=16)
        mask = select_mask(cands, bucket="all", min_entropy=None, thresholds=cfg.bucket_thresholds)
        table = cands.take(mask & ~cands.heldout)
        del cands, mask
        n = len(table)
        order = PositionSampler(n, 0)
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    return {"how": how, "positions": n, "peak_anon_bytes": peak["RssAnon"], "base_anon_bytes": base["RssAnon"],
            "peak_file_bytes": peak["RssFile"], "vm_hwm_bytes": status("VmHWM"), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=20_000_000)
    ap.add_argument("--out", default="")
    ap.add_argument("--measure", nargs=2, metavar=("SHARDS", "HOW"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    with tempfile.TemporaryDirectory(prefix="rpt-bench-") as tmp:
        shards = Path(tmp) / "shards"
        write_shards(shards, args.positions)
        runs = []
        for how in ("inmemory", "mapped"):
            r = subprocess.run([sys.executable, __file__, "--measure", str(shards), how], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=str(REPO)), check=True)
            runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    result = {"positions_scored": args.positions, "window": WINDOW, "runs": runs}
    for r in runs:
        print(f"{r['how']:>8}: {r['positions']:,} training positions: peak anonymous "
              f"{(r['peak_anon_bytes'] - r['base_anon_bytes']) / 2**20:,.0f} MiB above start "
              f"({(r['peak_anon_bytes'] - r['base_anon_bytes']) / r['positions']:.2f} B/position), page cache "
              f"{r['peak_file_bytes'] / 2**20:,.0f} MiB, VmHWM {r['vm_hwm_bytes'] / 2**20:,.0f} MiB")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
