"""The held-out split in continuous mode (issue 36): a stream (one document per file) is split by blocks of
consecutive windows rather than whole, a split that holds out nothing is refused in one sentence, and `run`
reports and records what it held out."""
import json
import os
from pathlib import Path

import pytest
from shard_fixtures import TEXTS, length_reward, train_shards  # noqa: F401

from rpt_common.errors import UserError
from rpt_train.config import EvalConfig, TrainConfig, load_config
from rpt_train.samples import ShardSet, TrainSamples, is_heldout, split_unit


def write_corpus(root: Path, files: int = 4) -> list[str]:
    """`files` text files of a few windows each, named as a web corpus is (data/part-0000N.txt)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(files):
        p = root / f"part-{i:05d}.txt"
        p.write_text("\n\n".join(TEXTS[(i + j) % len(TEXTS)] for j in range(4)) + "\n")
        paths.append(str(p))
    return paths


def tag_continuous(root: Path, model: Path, files: int = 4) -> Path:
    from rpt_data.config import TagConfig
    from rpt_data.pipeline import run_tag

    out = root / "shards"
    paths = write_corpus(root / "data", files)
    # doc ids are the input paths as given: relative ones (data/part-0000N.txt) make every hash-based split of these
    # shards the same on every machine (absolute tmp paths drew another split per run: a test could fail by chance)
    here = os.getcwd()
    os.chdir(root)
    try:
        run_tag(TagConfig(inputs=[os.path.relpath(p, root) for p in paths], model=str(model), out=str(out),
                          window=32, context_prefix=8, mode="continuous", progress=False))
    finally:
        os.chdir(here)
    return out


@pytest.fixture(scope="module")
def continuous_shards(tiny_llama, tmp_path_factory) -> Path:
    return tag_continuous(tmp_path_factory.mktemp("split"), tiny_llama)


def _cfg(shards, **kw):
    return TrainConfig(**{"shards": str(shards), "model": "demo", "bucket": "all", "heldout_fraction": 0.3,
                          "split_seed": 0} | kw)


def test_continuous_shards_split_inside_streams_by_blocks(continuous_shards, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = _cfg(continuous_shards, split_block_windows=2)
    data = TrainSamples(cfg, tok)
    assert cfg.split_block_windows == 2
    shards = ShardSet(str(continuous_shards))
    cands = shards.candidates("topk_entropy", 0.3, 0, block_windows=2)
    rows = shards.rows(cands.row_shard, cands.row_index, columns=["doc_id", "window_index"])
    held = {(r["doc_id"], r["window_index"]): bool(h) for r, h in zip(rows, cands.row_heldout)}
    assert all(h == is_heldout(split_unit(d, w, 2), 0.3, 0) for (d, w), h in held.items())
    # the unit is a block of 2 consecutive windows: both windows of a block are on the same side
    blocks = {}
    for (d, w), h in held.items():
        blocks.setdefault((d, w // 2), set()).add(h)
    assert all(len(sides) == 1 for sides in blocks.values())
    # some stream has windows on both sides: the split is inside the files, not of whole files
    per_doc = {}
    for (d, _), h in held.items():
        per_doc.setdefault(d, set()).add(h)
    assert any(len(sides) == 2 for sides in per_doc.values())
    assert data.split["positions"] == int(cands.heldout.sum()) > 0
    assert data.split["documents"] == len({d for (d, _), h in held.items() if h})
    assert 0 < data.split["share"] < 1
    # training positions never come from a held-out block
    train_rows = shards.rows(data.cands.row_shard, data.cands.row_index, columns=["doc_id", "window_index"])
    assert not any(held[(r["doc_id"], r["window_index"])] for r in train_rows)


def test_continuous_default_is_blocks_and_structured_default_is_documents(continuous_shards, train_shards):
    for shards, expected in ((continuous_shards, 16), (train_shards, 0)):
        cfg = _cfg(shards, heldout_fraction=0.0)
        from rpt_train.samples import resolve_shard_defaults
        resolve_shard_defaults(cfg, ShardSet(str(shards)))
        assert cfg.split_block_windows == expected


def test_a_split_that_holds_out_nothing_is_refused(continuous_shards, tiny_llama):
    """Whole files as the unit (the old behaviour): a seed where no file is held out refuses in one sentence."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    import pyarrow.parquet as pq

    all_docs = {d for p in ShardSet(str(continuous_shards)).paths for d in pq.read_table(p, columns=["doc_id"])
                .column("doc_id").to_pylist()}
    assert len(all_docs) == 4
    seed = next(s for s in range(1000) if not any(is_heldout(d, 0.05, s) for d in all_docs))
    with pytest.raises(UserError, match="holds out 0 of") as e:
        TrainSamples(_cfg(continuous_shards, heldout_fraction=0.05, split_seed=seed, split_block_windows=0), tok)
    assert "\n" not in str(e.value)


def test_run_reports_and_records_the_split_and_eval_inherits_it(continuous_shards, tiny_llama, tmp_path, capsys):
    from rpt_train.trainer import train

    out = train(_cfg(continuous_shards, model=str(tiny_llama), out=str(tmp_path / "run"), steps=1, batch_prompts=2,
                     group_size=2, max_new_tokens=4, split_block_windows=2, save_every=1, log_samples_every=0,
                     device="cpu", dynamic_sampling=False), reward_fns=[length_reward])
    printed = capsys.readouterr().out
    record = json.loads((out / "run.json").read_text())
    assert record["split_block_windows"] == 2
    assert record["heldout"]["positions"] > 0 and record["heldout"]["documents"] >= 1
    assert f"held out: {record['heldout']['positions']} positions" in printed
    ecfg = load_config(EvalConfig, None, {"shards": str(continuous_shards), "model": str(out)})
    assert (ecfg.heldout_fraction, ecfg.split_block_windows) == (0.3, 2)


def test_training_labels_never_reach_into_a_held_out_window(continuous_shards, tiny_llama):
    """Windows overlap: the labels of a position near a window's end read on into the next window. When that
    window is held out, the position is dropped from training (and only then): no reward is for held-out text."""
    from transformers import AutoTokenizer

    from rpt_train.samples import SampleBuilder

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    cfg = _cfg(continuous_shards, split_block_windows=1)
    data = TrainSamples(cfg, tok)
    n = len(data)
    got = data.build.many(range(n))
    before = SampleBuilder(data.shards, data.cands, tok, labels_length=cfg.labels_length,
                           max_context_tokens=cfg.max_context_tokens, thresholds=cfg.bucket_thresholds,
                           answer_format=cfg.answer_format).many(range(n))
    r = data.cands.row_of(range(n))
    rows = data.shards.rows(data.cands.row_shard[r], data.cands.row_index[r])

    def crosses(i: int, s) -> bool:  # the labels run past the row's text and the next window is held out
        row, t = rows[i], int(data.cands.t[i])
        inside = len(row["text"].encode()[row["token_bytes"][t - 1]:].decode())
        nxt = {"doc_id": row["doc_id"], "window_index": row["window_index"] + 1}
        return len("".join(s.label_tokens)) > inside and data.held_out_row(nxt)

    dropped = [i for i in range(n) if before[i] is not None and got[i] is None]
    assert dropped and len(dropped) == data.build.crossing
    assert all(crosses(i, before[i]) for i in dropped)
    assert all(g == b for g, b in zip(got, before) if g is not None)
    assert not any(crosses(i, s) for i, s in enumerate(got) if s is not None)
    # the held-out side (export's, eval's) is built as it was
    held = data.builder(data.heldout_cands) if data.heldout_cands is not None else None
    assert held is None or held.held_out is None
