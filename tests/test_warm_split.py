"""The experiment's warm start on a held-out split by blocks (continuous shards, issue: warm blocks): the warm
units are split units (a document, or a block of --split-block-windows windows of a stream), never held out; the
warm SFT trains only on them, and its labels never run into a held-out window. A document split gives the same
warm documents and the same training positions as before. sft_train is replaced: what it would train on is checked,
nothing is trained."""
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from shard_fixtures import tiny_tok, train_shards  # noqa: F401
from test_experiment import TINY, write_spec
from test_train_split import continuous_shards  # noqa: F401

from rpt_common.errors import UserError
from rpt_train import experiment, sft
from rpt_train.config import TrainConfig, load_config
from rpt_train.samples import SampleBuilder, ShardSet, TrainSamples, is_heldout, split_unit

WARM = {"fraction": 0.5, "steps": 2, "batch": 2}
HELD, SEED = TINY["heldout-fraction"], TINY["split-seed"]


class Stop(Exception):
    pass


def warm_config(tmp_path, shards, model, monkeypatch, **base) -> tuple[experiment.Experiment, TrainConfig]:
    """The spec's Experiment and the config its warm start hands to sft_train (stopped there)."""
    seen = {}

    def capture(cfg, contexts):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(sft, "sft_train", capture)
    spec = experiment.load_spec(str(write_spec(tmp_path, shards, model, {"before": {"kind": "eval"}}, warm=WARM,
                                               **base)))
    exp = experiment.Experiment(spec)
    with pytest.raises(Stop):
        exp.warm_start()
    return exp, seen["cfg"]


def lines(path) -> list[str]:
    return path.read_text().split()


def rows_of(data: TrainSamples) -> list[dict]:
    return data.shards.rows(data.cands.row_shard, data.cands.row_index, columns=["doc_id", "window_index"])


def stream_rows(shards) -> list[tuple[str, int]]:
    """(doc_id, window_index) of every row of the shards."""
    out = []
    for p in ShardSet(str(shards)).paths:
        t = pq.read_table(p, columns=["doc_id", "window_index"])
        out += zip(t.column("doc_id").to_pylist(), t.column("window_index").to_pylist())
    return out


def test_the_warm_start_never_trains_on_held_out_blocks(continuous_shards, tiny_llama, tiny_tok, tmp_path,
                                                        monkeypatch):
    """The repro: by documents, a warm stream had held-out blocks, and the warm SFT (split off) trained on them."""
    rows = stream_rows(continuous_shards)
    docs = sorted({d for d, _ in rows})

    def mixed(seed: int) -> bool:
        """A split seed (doc_ids are paths: they differ per run) where the rule by documents picks a warm stream
        with a held-out block, and the rule by blocks some stream with warm and other (not held-out) blocks."""
        held = {d for d, w in rows if is_heldout(split_unit(d, w, 2), HELD, seed)}
        old = {d for d in docs if not is_heldout(d, HELD, seed) and is_heldout(d, WARM["fraction"], seed + 1)}
        sides: dict[str, set] = {}
        for d, w in rows:
            if not is_heldout(u := split_unit(d, w, 2), HELD, seed):
                sides.setdefault(d, set()).add(is_heldout(u, WARM["fraction"], seed + 1))
        return bool(old & held) and any(len(s) == 2 for s in sides.values())
    seed = next(s for s in range(1000) if mixed(s))
    exp, cfg = warm_config(tmp_path, continuous_shards, tiny_llama, monkeypatch,
                           **{"split-block-windows": 2, "split-seed": seed})

    def held(row: dict) -> bool:
        return is_heldout(split_unit(row["doc_id"], row["window_index"], 2), HELD, seed)
    chosen = set(lines(tmp_path / "work" / "warm" / "docs.txt"))
    data = TrainSamples(cfg, tiny_tok)
    trained = rows_of(data)
    assert trained and not any(held(r) for r in trained)
    assert {split_unit(r["doc_id"], r["window_index"], 2) for r in trained} <= chosen
    # the warm units are blocks: some stream has warm and other (not held-out) blocks, not all or nothing
    sides: dict[str, set] = {}
    for d, w in rows:
        if not is_heldout(u := split_unit(d, w, 2), HELD, seed):
            sides.setdefault(d, set()).add(u in chosen)
    assert any(len(s) == 2 for s in sides.values())
    # the labels of a warm position never run into a held-out window: the same samples as a builder told so
    ref = SampleBuilder(data.shards, data.cands, tiny_tok, labels_length=cfg.labels_length,
                        max_context_tokens=cfg.max_context_tokens, thresholds=cfg.bucket_thresholds,
                        answer_format=cfg.answer_format, held_out=held)
    every = list(range(len(data.cands)))
    assert [s and s.key for s in data.build.many(every)] == [s and s.key for s in ref.many(every)]
    told = data.build.held_out  # the warm SFT's own builder is told the base's held-out windows
    assert told is not None and all(told(r) == held(r) for r in ({"doc_id": d, "window_index": w} for d, w in rows))
    # an arm never trains on a warm block (nor a held-out one)
    arm = TrainSamples(exp.train_config(exp.spec.arms["before"]), tiny_tok)
    assert not any(held(r) or split_unit(r["doc_id"], r["window_index"], 2) in chosen for r in rows_of(arm))


def test_a_document_split_gives_the_warm_documents_and_positions_as_before(train_shards, tiny_llama, tiny_tok,
                                                                           tmp_path, monkeypatch):
    exp, cfg = warm_config(tmp_path, train_shards, tiny_llama, monkeypatch)
    assert cfg.split_block_windows == 0
    # the rule before blocks: documents, held out by the base split, warm by a second hash; the SFT excluded every
    # other document and split nothing
    shards = ShardSet(str(train_shards))
    docs = sorted({d for p in shards.paths for d in pq.read_table(p, columns=["doc_id"]).column("doc_id").to_pylist()})
    held = {d for d in docs if is_heldout(d, HELD, SEED)}
    chosen = [d for d in docs if d not in held and is_heldout(d, WARM["fraction"], SEED + 1)]
    assert chosen and held
    warm = tmp_path / "work" / "warm"
    assert lines(warm / "docs.txt") == chosen
    # rest.txt leaves the held-out documents to the split (kept in the warm SFT): the same positions
    assert lines(warm / "rest.txt") == [d for d in docs if d not in held and d not in chosen]
    (tmp_path / "old-rest.txt").write_text("".join(d + "\n" for d in docs if d not in chosen))
    old = load_config(TrainConfig, None, {**experiment.to_dict(cfg), "heldout_fraction": 0.0,
                                          "exclude_docs": str(tmp_path / "old-rest.txt")})
    new_data, old_data = TrainSamples(cfg, tiny_tok), TrainSamples(old, tiny_tok)
    for name in ("row_shard", "row_index", "t"):
        assert np.array_equal(getattr(new_data.cands, name), getattr(old_data.cands, name)), name
    assert ([s.key for s in new_data.next_batch(4)] + [s.key for s in new_data.next_batch(4)] ==
            [s.key for s in old_data.next_batch(4)] + [s.key for s in old_data.next_batch(4)])


def test_warm_json_records_the_units_and_their_size(continuous_shards, tiny_llama, tmp_path, monkeypatch):
    """warm.json: 'units' (chosen), 'documents' (their distinct documents), 'split_block_windows' (resolved:
    the continuous shards' default 16 here); reuse with another --split-block-windows is refused; an older record
    without it is accepted."""
    def fake(cfg, contexts):
        out = experiment.Path(cfg.out)
        (out / "model").mkdir(parents=True, exist_ok=True)
        (out / "model" / "config.json").write_text("{}")
        (out / "metrics.jsonl").write_text(json.dumps({"loss": 1.0}) + "\n")
        return {"steps": 0}

    monkeypatch.setattr(sft, "sft_train", fake)
    monkeypatch.setattr(experiment.Experiment, "params", lambda self, model: 1)

    docs = sorted({d for d, _ in stream_rows(continuous_shards)})  # one block of 16 windows each (12 windows)
    seed = next(s for s in range(1000) if any(not is_heldout(f"{d}#0", HELD, s)
                                              and is_heldout(f"{d}#0", WARM["fraction"], s + 1) for d in docs))

    def exp_of(**base):
        return experiment.Experiment(experiment.load_spec(str(write_spec(
            tmp_path, continuous_shards, tiny_llama, {"before": {"kind": "eval"}}, warm=WARM,
            **{"split-seed": seed, **base}))))
    record = exp_of().warm_start()
    chosen = lines(tmp_path / "work" / "warm" / "docs.txt")
    assert record["split_block_windows"] == 16 and record["units"] == len(chosen)
    assert record["documents"] == len({u.rsplit("#", 1)[0] for u in chosen})
    assert all(u.rsplit("#", 1)[1].isdigit() for u in chosen)
    assert exp_of().warm_start() == record
    with pytest.raises(UserError, match="split_block_windows: 16 there, 8 now"):
        exp_of(**{"split-block-windows": 8}).warm_start()
    older = {k: v for k, v in record.items() if k not in ("split_block_windows", "units")}
    (tmp_path / "work" / "warm" / "warm.json").write_text(json.dumps(older))
    assert exp_of(**{"split-block-windows": 8}).warm_start() == older
