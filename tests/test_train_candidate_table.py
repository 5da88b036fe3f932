"""The candidate table bounded per rank (issue 36): TrainSamples builds it a row group at a time into memory-mapped
scratch files (positions and their order in the page cache, not in each rank's heap), equal to the in-memory table."""
import numpy as np
import pytest
from shard_fixtures import train_shards, tiny_tok  # noqa: F401

from rpt_train.candidates import Candidates, TableSink
from rpt_train.config import TrainConfig
from rpt_train.samples import PositionSampler, ShardSet, TrainSamples, select_mask

FIELDS = ("row_shard", "row_index", "row_heldout", "offsets", "t", "value", "selected_bits")


def same(a: Candidates, b: Candidates) -> bool:
    return all(np.array_equal(np.asarray(getattr(a, k)), np.asarray(getattr(b, k))) for k in FIELDS) and \
        all(np.asarray(getattr(a, k)).dtype == np.asarray(getattr(b, k)).dtype for k in FIELDS)


@pytest.mark.parametrize("bucket", ["all", "selected", "medium"])
def test_the_memory_mapped_table_equals_the_in_memory_one(train_shards, tiny_tok, bucket):
    cfg = TrainConfig(shards=str(train_shards), bucket=bucket, heldout_fraction=0.3)
    data = TrainSamples(cfg, tiny_tok, keep_heldout=True)
    assert isinstance(data.cands.t, np.memmap) and isinstance(data.cands.value, np.memmap)
    assert isinstance(data.sampler._perm, np.memmap)
    cands = ShardSet(str(train_shards)).candidates(cfg.entropy_metric, 0.3, 0, cuts=cfg.bucket_thresholds)
    mask = select_mask(cands, bucket=bucket, min_entropy=None, thresholds=cfg.bucket_thresholds)
    assert same(data.cands, cands.take(mask & ~cands.heldout))
    assert same(data.heldout_cands, cands.take(mask & cands.heldout))
    assert [data.sampler.next() for _ in range(len(data))] == \
        np.random.default_rng([cfg.seed, 0]).permutation(len(data)).tolist()


def test_the_sink_widens_like_concatenate(tmp_path):
    def part(t_dtype, v_dtype, n, shard):
        return Candidates(row_shard=np.full(1, shard, np.int32), row_index=np.zeros(1, np.int32),
                          row_heldout=np.zeros(1, bool), offsets=np.array([0, n]), t=np.arange(1, n + 1, dtype=t_dtype),
                          value=np.linspace(0, 2, n).astype(v_dtype),
                          selected_bits=np.packbits(np.arange(n) % 3 == 0, bitorder="little"))

    parts = [part(np.uint16, np.float16, 5, 0), part(np.uint32, np.float32, 11, 1), part(np.uint16, np.float16, 0, 2),
             part(np.uint16, np.float16, 3, 3)]
    sink = TableSink(str(tmp_path))
    for p in parts:
        sink.add(p)
    assert same(sink.finish(), Candidates.concat(parts))
    assert TableSink(str(tmp_path)).finish().t.shape == (0,)


def test_a_memory_mapped_order_is_the_same_order(tmp_path):
    a, b = PositionSampler(1000, 7), PositionSampler(1000, 7, directory=str(tmp_path))
    assert [a.next() for _ in range(2500)] == [b.next() for _ in range(2500)]  # across epochs too
    assert PositionSampler(0, 1, directory=str(tmp_path)).n == 0


@pytest.mark.parametrize("split", ["heldout", "train", "all"])
def test_eval_candidates_are_memory_mapped_and_equal(train_shards, split):
    from rpt_train.samples import resolve_shard_defaults, split_candidates

    cfg = TrainConfig(shards=str(train_shards), heldout_fraction=0.3)
    shards = ShardSet(str(train_shards))
    resolve_shard_defaults(cfg, shards)
    got = split_candidates(shards, cfg, split)
    assert isinstance(got.t, np.memmap)
    cands = shards.candidates(cfg.entropy_metric, 0.3, 0, cuts=cfg.bucket_thresholds)
    want = cands if split == "all" else cands.take(cands.heldout if split == "heldout" else ~cands.heldout)
    assert same(got, want)


def test_the_sink_widens_a_block_at_a_time(tmp_path, monkeypatch):
    """Widening rewrites the scratch file in blocks: the heap never holds the whole file (10 GB at 1B positions)."""
    monkeypatch.setattr(TableSink, "WIDEN_BLOCK", 4, raising=False)
    reads = []

    def part(v_dtype, n):
        return Candidates(row_shard=np.zeros(1, np.int32), row_index=np.zeros(1, np.int32),
                          row_heldout=np.zeros(1, bool), offsets=np.array([0, n]), t=np.arange(n, dtype=np.uint16),
                          value=np.linspace(0, 2, n).astype(v_dtype),
                          selected_bits=np.packbits(np.ones(n, bool), bitorder="little"))

    sink = TableSink(str(tmp_path))
    parts = [part(np.float16, 19), part(np.float16, 6)]
    for p in parts:
        sink.add(p)
    f = sink.files["value"]
    read = f.read
    monkeypatch.setattr(f, "read", lambda n=-1: reads.append(n) or read(n), raising=False)
    parts.append(part(np.float32, 7))
    sink.add(parts[-1])
    assert reads and all(0 < n <= 4 * 2 for n in reads)
    assert same(sink.finish(), Candidates.concat(parts))
