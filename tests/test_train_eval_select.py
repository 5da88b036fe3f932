"""Eval's positions in bounded memory (issue 36): select_positions walks a memory-mapped seeded order a block at a
time over the memory-mapped table of the split's side, and picks exactly what the in-memory permutation picked.
(Every rank computes the same pick: tests/test_train_eval_compare.py checks 2 gloo ranks against one process.)"""
import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shard_fixtures import train_shards, tiny_tok  # noqa: F401

from rpt_common.shards import MANIFEST, SCHEMA_VERSION, SHARD_SCHEMA, shard_name
from rpt_train.candidates import TableSink, shuffled
from rpt_train.config import EvalConfig
from rpt_train.evaluate import BUCKET_NAMES, EVAL_BUCKETS, pick, select_positions
from rpt_train.samples import SampleBuilder, ShardSet, resolve_shard_defaults, split_candidates

WINDOW = 256


def old_pick(cands, seed: int, build, limit: int, thresholds) -> dict[str, list]:
    """select_positions' walk before issue 36's bound: an in-memory int64 permutation, gathered and masked whole."""
    order = np.random.default_rng([seed, 0xE5A1]).permutation(len(cands))
    built, chosen = {}, {}
    for b in EVAL_BUCKETS:
        th = -np.inf if b == "all" else thresholds[BUCKET_NAMES.index(b)]
        picked = []
        for i in order[cands.value[order] > th]:
            if len(picked) == limit:
                break
            if int(i) not in built:
                built[int(i)] = build(int(i))
            if built[int(i)] is not None:
                picked.append(built[int(i)])
        chosen[b] = picked
    return chosen


@pytest.mark.parametrize("split,seed,limit", [("heldout", 0, 3), ("train", 5, 8), ("all", 1, 40), ("all", 2, 0)])
def test_the_selection_is_the_in_memory_one(train_shards, tiny_tok, split, seed, limit):
    cfg = EvalConfig(shards=str(train_shards), model="demo", heldout_fraction=0.3, split=split, seed=seed,
                     limit=limit)
    shards = ShardSet(str(train_shards))
    got = select_positions(shards, tiny_tok, cfg)
    cands = split_candidates(shards, cfg, split)
    build = SampleBuilder(shards, cands, tiny_tok, labels_length=cfg.labels_length,
                          max_context_tokens=cfg.max_context_tokens, thresholds=cfg.bucket_thresholds,
                          answer_format=cfg.answer_format)
    want = old_pick(cands, seed, build, limit, cfg.bucket_thresholds)
    assert {b: [s.key for s in got[b]] for b in EVAL_BUCKETS} == {b: [s.key for s in want[b]] for b in EVAL_BUCKETS}
    assert got == want
    assert limit == 0 or sum(map(len, got.values())) > 0


def write_synthetic(out, windows: int, rows_per_group: int = 16):
    """Continuous-mode shards of `windows` windows of WINDOW scored positions (seeded entropies 0-3 nats), a
    stream of 64 windows per document; the text is a stand-in (the pick below never builds a sample)."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    name = shard_name(0, 0)
    with pq.ParquetWriter(out / name, SHARD_SCHEMA) as w:
        for g in range(0, windows, rows_per_group):
            n = min(rows_per_group, windows - g)
            offs = pa.array(np.arange(n + 1, dtype=np.int32) * WINDOW)
            ints = lambda v: pa.ListArray.from_arrays(offs, pa.array(v))  # noqa: E731
            ent = rng.uniform(0, 3, n * WINDOW).astype(np.float32)
            rows = np.arange(g, g + n)
            w.write_table(pa.Table.from_arrays([
                pa.array([f"stream-{r // 64}" for r in rows]), pa.array((rows % 64).astype(np.int32)),
                pa.array(rows.astype(np.int64) * WINDOW), pa.array(["x"] * n),
                ints(np.zeros(n * WINDOW, np.int32)), ints(np.tile(np.arange(1, WINDOW + 1, dtype=np.int32), n)),
                pa.array(np.zeros(n, np.int32)), ints(ent + 0.5), ints(ent), ints(-ent),
                ints(np.zeros(n * WINDOW, np.int32)), pa.ListArray.from_arrays(
                    pa.array(np.zeros(n + 1, dtype=np.int32)), pa.array(np.zeros(0, np.int32)))],
                schema=SHARD_SCHEMA))
    (out / MANIFEST).write_text(json.dumps({"schema_version": SCHEMA_VERSION, "complete": True,
                                            "shards": [{"file": name, "rows": windows}],
                                            "config": {"mode": "continuous", "window": WINDOW, "metric": "topk"}}))
    return out


def peak(fn) -> tuple[object, int]:
    """fn()'s result and the peak of Python/numpy heap memory (tracemalloc) it allocated on top of what was there."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_the_selection_memory_is_bounded_and_the_same(tmp_path, monkeypatch):
    """From 261K to 1.04M positions, the heap that building the table, the order and the walk of every bucket down
    to its `limit` usable positions (every third one unusable) needs grows by under 1 byte per position (the table's
    17 bytes a window and 1 bit a position); the in-memory walk holds ~20 bytes a position (the int64 order, its
    gathered entropies, the mask, the filtered order). Both pick the same positions."""
    monkeypatch.setenv("RPT_SCRATCH", str(tmp_path))
    build = lambda i: None if i % 3 == 0 else i  # noqa: E731
    runs = {}
    for windows in (1024, 4096):
        shards = ShardSet(str(write_synthetic(tmp_path / f"shards-{windows}", windows=windows)))
        cfg = EvalConfig(shards=shards.directory, model="demo", split="all", seed=4, limit=2000)
        resolve_shard_defaults(cfg, shards)

        def bounded():
            cands = split_candidates(shards, cfg, "all")
            order = shuffled(len(cands), [cfg.seed, 0xE5A1], TableSink.scratch_dir())
            return pick(cands, order, build, cfg.limit, cfg.bucket_thresholds), len(cands)

        (got, n), heap = peak(bounded)
        assert n == windows * (WINDOW - 1) and all(len(v) == cfg.limit for v in got.values())
        runs[windows] = n, heap
    (n1, heap1), (n2, heap2) = runs[1024], runs[4096]
    assert heap2 - heap1 < n2 - n1, f"{(heap2 - heap1) / (n2 - n1):.2f} bytes per position"

    def in_memory():
        cands = shards.candidates(cfg.entropy_metric, cuts=cfg.bucket_thresholds)
        return old_pick(cands, cfg.seed, build, cfg.limit, cfg.bucket_thresholds)

    want, old_heap = peak(in_memory)
    assert got == want
    assert old_heap > 10 * n2, f"{old_heap / n2:.2f} bytes per position"


def test_the_memory_mapped_order_is_the_permutation(tmp_path):
    for n in (0, 1, 1000, 70_001):
        want = np.random.default_rng([3, 0xE5A1]).permutation(n)
        got = shuffled(n, [3, 0xE5A1], str(tmp_path))
        assert got.dtype == np.uint32 and np.array_equal(got, want)
        assert np.array_equal(shuffled(n, [3, 0xE5A1]), want)
