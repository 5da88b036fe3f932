"""The experiment's warm start on a held-out split by blocks (continuous shards, issue: warm blocks): the warm
units are split units (a document, or a block of --split-block-windows windows of a stream), never held out; the
warm SFT trains only on them, and its labels never run into a held-out window. A document split gives the same
warm documents and the same training positions as before. sft_train is replaced: what it would train on is checked,
nothing is trained."""
import json
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from shard_fixtures import tiny_tok, train_shards  # noqa: F401
from test_experiment import REPO, TINY, write_spec
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
    # the labels of a warm position never run into a held-out window, nor an excluded one (rest.txt, neither warm
    # nor held out): the same samples as a builder told so
    rest = set(lines(tmp_path / "work" / "warm" / "rest.txt"))

    def away(row: dict) -> bool:
        return held(row) or split_unit(row["doc_id"], row["window_index"], 2) in rest
    ref = SampleBuilder(data.shards, data.cands, tiny_tok, labels_length=cfg.labels_length,
                        max_context_tokens=cfg.max_context_tokens, thresholds=cfg.bucket_thresholds,
                        answer_format=cfg.answer_format, held_out=away)
    every = list(range(len(data.cands)))
    assert [s and s.key for s in data.build.many(every)] == [s and s.key for s in ref.many(every)]
    told = data.build.held_out  # the warm SFT's own builder is told the base's held-out windows and rest.txt's
    assert told is not None and all(told(r) == away(r) for r in ({"doc_id": d, "window_index": w} for d, w in rows))
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
    fake_sft(monkeypatch)
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
    older = {k: v for k, v in record.items() if k != "split_block_windows"}  # not recorded: not checked
    (tmp_path / "work" / "warm" / "warm.json").write_text(json.dumps(older))
    assert exp_of(**{"split-block-windows": 8}).warm_start() == older


def fake_sft(monkeypatch, first=None):
    """sft_train writes a model and metrics and trains nothing (`first(cfg)` called before, when given)."""
    def fake(cfg, contexts):
        if first is not None:
            first(cfg)
        out = experiment.Path(cfg.out)
        (out / "model").mkdir(parents=True, exist_ok=True)
        (out / "model" / "config.json").write_text("{}")
        (out / "metrics.jsonl").write_text(json.dumps({"loss": 1.0}) + "\n")
        return {"steps": 0}

    monkeypatch.setattr(sft, "sft_train", fake)
    monkeypatch.setattr(experiment.Experiment, "params", lambda self, model: 1)


def test_a_warm_start_made_before_units_is_refused_on_a_split_by_blocks(continuous_shards, train_shards, tiny_llama,
                                                                       tmp_path, monkeypatch):
    """A warm.json without `units` (made before warm units) trained on whole streams with the split off: on shards
    split by blocks it had held-out blocks; refused, saying to delete OUT/warm. On a document split it is accepted."""
    fake_sft(monkeypatch)
    for shards, refused, base in ((continuous_shards, True, {"split-block-windows": 2}), (train_shards, False, {})):
        root = tmp_path / ("blocks" if refused else "documents")
        spec = experiment.load_spec(str(write_spec(root, shards, tiny_llama, {"before": {"kind": "eval"}},
                                                   warm={**WARM, "fraction": 0.9}, **base)))
        exp = experiment.Experiment(spec)
        record = exp.warm_start()
        older = {k: v for k, v in record.items() if k not in ("units", "split_block_windows")}
        (root / "work" / "warm" / "warm.json").write_text(json.dumps(older))
        if refused:
            with pytest.raises(UserError, match="records no units.*blocks of 2 windows.*held-out blocks included; "
                                                f"delete '{root / 'work' / 'warm'}' to rebuild it"):
                exp.warm_start()
        else:
            assert exp.warm_start() == older


def test_an_arm_may_not_set_the_held_out_split(train_shards, tiny_llama, tmp_path):
    """Every arm's eval and the warm units depend on the base's split: an arm (or its eval:) setting it is refused
    at load, naming the spec, the arm and the key. The committed specs load."""
    for key, value in (("heldout-fraction", 0.5), ("split-seed", 7), ("split-block-windows", 4)):
        for arm in ({"kind": "rpt", key: value}, {"kind": "eval", "eval": {key: value}}):
            path = write_spec(tmp_path, train_shards, tiny_llama, {"before": {"kind": "eval"}, "odd": arm})
            with pytest.raises(UserError, match=f"spec '{path}', arm 'odd': sets {key}, but the held-out split is "
                                                "the base's for every arm"):
                experiment.load_spec(str(path))
    for path in sorted((REPO / "pipelines" / "experiments").glob("*.yaml")):
        assert experiment.load_spec(str(path)).arms, path


def test_the_eval_design_may_not_set_another_held_out_split(train_shards, tiny_llama, tmp_path):
    """The spec's eval: (or a recipe's) setting a held-out split other than base:'s would score positions the arms
    trained on: refused at load naming both values; the same value, or none, loads."""
    import yaml

    path = write_spec(tmp_path, train_shards, tiny_llama, {"before": {"kind": "eval"}})
    raw = yaml.safe_load(path.read_text())
    for key, value in (("heldout-fraction", 0.5), ("split-seed", 7), ("split-block-windows", 4)):
        path.write_text(yaml.safe_dump({**raw, "eval": {**raw["eval"], key: value}}))
        with pytest.raises(UserError, match=f"spec '{path}': the eval design sets {key} other than the training "
                                            f"base \\({value!r} vs {TINY.get(key)!r}\\)"):
            experiment.load_spec(str(path))
    path.write_text(yaml.safe_dump({**raw, "eval": {**raw["eval"], "split-seed": SEED}}))
    assert experiment.load_spec(str(path)).arms


def test_a_warm_sft_checkpointed_under_other_options_says_to_delete_the_warm_start(train_shards, tiny_llama,
                                                                                   tmp_path, monkeypatch):
    """The warm SFT's resume check (sft_train's real one: a checkpoint whose options differ, e.g. an older warm
    start's heldout_fraction 0.0) says this is the spec's warm start and to delete OUT/warm; no training."""
    import torch

    from rpt_train.config import to_dict
    from rpt_train.samples import resolve_shard_defaults

    _, cfg = warm_config(tmp_path, train_shards, tiny_llama, monkeypatch)
    monkeypatch.undo()
    resolve_shard_defaults(cfg, ShardSet(cfg.shards))
    ckpt = tmp_path / "work" / "warm" / "train" / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    torch.save({"step": 1, "scheduler": {}, "sampler": {}, "rng": {},
                "config": {**to_dict(cfg), "heldout_fraction": 0.0}}, ckpt / "trainer_state.pt")
    exp = experiment.Experiment(experiment.load_spec(str(tmp_path / "tiny-exp.yaml")))
    warm = tmp_path / "work" / "warm"
    with pytest.raises(UserError) as e:
        exp.warm_start()
    # one sentence: the trainer's option details, without its advice to resume (which the warm start contradicts)
    assert str(e.value) == (f"spec '{tmp_path / 'tiny-exp.yaml'}': its warm start in '{warm / 'train'}' was "
                            "checkpointed under other options (heldout_fraction differs: --heldout-fraction 0.0 "
                            "there; e.g. by an older version, without the held-out split); delete "
                            f"'{warm}' to rebuild it")
    # other UserErrors of sft_train pass unchanged
    (ckpt / "trainer_state.pt").write_text("damaged")
    with pytest.raises(UserError) as e:
        exp.warm_start()
    assert "is unreadable" in str(e.value) and "warm start in" not in str(e.value)


def test_labels_never_run_into_an_excluded_block(continuous_shards, train_shards, tiny_tok, tmp_path):
    """--exclude-docs: a position whose labels run into an excluded unit (the next block of its stream) is dropped,
    as one running into a held-out window is; with no list, or a list of documents on a document split, the
    samples are what they were (a label window never crosses documents)."""
    def data_of(shards, **kw):
        return TrainSamples(TrainConfig(**{"shards": str(shards), "model": "demo", "bucket": "all",
                                           "split_seed": 0, **kw}), tiny_tok)

    base = data_of(continuous_shards, heldout_fraction=0.0, split_block_windows=1)
    assert base.build.held_out is None  # no split, no list: as before
    n = len(base)
    every = base.build.many(range(n))
    rows = base.shards.rows(base.cands.row_shard, base.cands.row_index)
    r = base.cands.row_of(np.arange(n))

    def runs_on(i: int, s) -> bool:  # the labels run past the row's own text
        row = rows[r[i]]
        inside = row["text"].encode()[row["token_bytes"][int(base.cands.t[i]) - 1]:].decode()
        return len("".join(s.label_tokens)) > len(inside)
    first = next(i for i, s in enumerate(every) if s is not None and runs_on(i, s))
    d, w = rows[r[first]]["doc_id"], rows[r[first]]["window_index"]
    (tmp_path / "skip.txt").write_text(f"  {d}#{w + 1}\n")
    data = data_of(continuous_shards, heldout_fraction=0.0, split_block_windows=1,
                   exclude_docs=str(tmp_path / "skip.txt"))
    got = data.build.many(range(len(data)))
    keys = {s.key: s for s in every if s is not None}
    assert f"{d}/{w}/" in every[first].key and every[first].key not in {s.key for s in got if s is not None}
    assert data.build.crossing > 0
    # only positions before the excluded window of d, whose labels run into it, are dropped; the rest as before
    kept = {s.key for s in got if s is not None}
    for key in keys:
        doc, win, _ = key.rsplit("/", 2)
        if (doc, int(win)) == (d, w + 1):
            assert key not in kept
        elif key not in kept:
            assert doc == d and int(win) <= w
    assert all((s.context, s.label_tokens) == (keys[s.key].context, keys[s.key].label_tokens) for s in got if s)
    # a document split: a list of documents changes no sample (and the held-out ones are dropped as before)
    docs = sorted({x["doc_id"] for x in rows_of(data_of(train_shards, heldout_fraction=0.3))})
    (tmp_path / "docs.txt").write_text(docs[0] + "\n")
    told = data_of(train_shards, heldout_fraction=0.3, exclude_docs=str(tmp_path / "docs.txt"))
    ref = SampleBuilder(told.shards, told.cands, tiny_tok, labels_length=told.cfg.labels_length,
                        max_context_tokens=told.cfg.max_context_tokens, thresholds=told.cfg.bucket_thresholds,
                        answer_format=told.cfg.answer_format,
                        held_out=lambda row: is_heldout(row["doc_id"], 0.3, 0))
    idx = range(len(told))
    assert [s and s.key for s in told.build.many(idx)] == [s and s.key for s in ref.many(idx)]


def test_the_report_says_what_the_warm_start_trained_on():
    """Blocks are counted as blocks (of how many windows, in how many documents); a document split, or an older
    record without units, keeps the wording by documents."""
    from rpt_train.report import markdown

    def said(**w) -> str:
        res = {"title": "t", "spec": "s.yaml", "eval_design": {}, "compute": {}, "arms": {}, "comparisons": {},
               "verdict": "", "warm_start": {"documents": 3, "steps": 2, "batch": 4, "lr": 1e-5, "loss_first": 2.0,
                                             "loss_last": 1.0, **w}}
        return next(line for line in markdown(res, "p.png").splitlines() if line.startswith("Warm start"))
    assert "SFT on 7 blocks of 16 windows in 3 documents neither held out nor trained on by an arm" in said(
        units=7, split_block_windows=16)
    for w in ({"units": 3, "split_block_windows": 0}, {}, {"split_block_windows": 16}):
        assert "SFT on 3 documents neither held out nor trained on by an arm, 2 steps" in said(**w), w


def test_a_recipes_run_only_split_is_the_evals_too(train_shards, tiny_llama, tmp_path):
    """A recipe setting heldout-fraction (and split-seed) under run: only: the eval design takes the training
    base's split (it loads, and the eval holds out what the arms do); an explicit other value stays refused."""
    import yaml

    path = write_spec(tmp_path, train_shards, tiny_llama, {"before": {"kind": "eval"}})
    raw = yaml.safe_load(path.read_text())
    base = {k: v for k, v in raw["base"].items() if k not in ("heldout-fraction", "split-seed")}
    recipe = tmp_path / "recipe.yaml"
    for run_eval_section, refused in (({}, False), ({"heldout-fraction": 0.2}, True)):
        recipe.write_text(yaml.safe_dump({"run": {"heldout-fraction": 0.1, "split-seed": 3},
                                          "eval": run_eval_section}))
        path.write_text(yaml.safe_dump({**raw, "recipe": str(recipe), "base": base}))
        if refused:
            with pytest.raises(UserError, match=r"the eval design sets heldout-fraction other than the training base "
                                                r"\(0\.2 vs 0\.1\)"):
                experiment.load_spec(str(path))
            continue
        spec = experiment.load_spec(str(path))
        assert spec.train["heldout_fraction"] == 0.1 and spec.eval["heldout_fraction"] == 0.1
        cfg = experiment.Experiment(spec).eval_config("demo")
        assert (cfg.heldout_fraction, cfg.split_seed) == (0.1, 3)


def test_a_warm_start_before_units_is_accepted_when_nothing_is_held_out(continuous_shards, tiny_llama, tmp_path,
                                                                         monkeypatch):
    """heldout-fraction 0: the old warm start (split by documents, nothing held out) trained on no held-out text: a
    warm.json without units is reused on a split by blocks (an eval of split: all: a spec holding nothing out)."""
    import yaml

    fake_sft(monkeypatch)
    path = write_spec(tmp_path, continuous_shards, tiny_llama, {"before": {"kind": "eval"}},
                      warm={**WARM, "fraction": 0.9}, **{"split-block-windows": 2, "heldout-fraction": 0.0})
    raw = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**raw, "eval": {**raw["eval"], "split": "all"}}))
    spec = experiment.load_spec(str(path))
    exp = experiment.Experiment(spec)
    record = exp.warm_start()
    older = {k: v for k, v in record.items() if k not in ("units", "split_block_windows")}
    (tmp_path / "work" / "warm" / "warm.json").write_text(json.dumps(older))
    assert exp.warm_start() == older


def test_read_doc_ids_ignores_a_bom_and_refuses_other_encodings(tmp_path):
    from rpt_train.samples import read_doc_ids

    path = tmp_path / "bench.txt"
    path.write_bytes("\ufeffdoc-a\r\ndoc-b#3\n\n".encode())
    assert read_doc_ids(str(path)) == {"doc-a", "doc-b#3"}
    path.write_bytes("doc-a\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=f"--exclude-docs '{path}' is not UTF-8 text"):
        read_doc_ids(str(path))


def test_the_users_exclude_list_holds_under_a_warm_start(continuous_shards, tiny_llama, tiny_tok, tmp_path,
                                                         monkeypatch):
    """base: exclude-docs (e.g. a benchmark's documents) under warm:: no warm unit is listed there nor in a listed
    document; rest.txt still lists every unit neither warm nor held out (the warm SFT excludes them); docs.txt holds
    the warm units and the user's lines, so no arm trains on either; warm.json records the list's path (a change is
    refused on reuse, an older record without it accepted). An arm's own exclude-docs is refused at load."""
    fake_sft(monkeypatch)
    rows = stream_rows(continuous_shards)
    units = sorted({split_unit(d, w, 2) for d, w in rows})
    held = {u for u in units if is_heldout(u, HELD, SEED)}
    warm_of = [u for u in units if u not in held and is_heldout(u, WARM["fraction"], SEED + 1)]
    # a document with a warm unit, listed whole, and a warm unit of another document, listed, leaving a warm unit
    pairs = [(d, u) for d in dict.fromkeys(w.rsplit("#", 1)[0] for w in warm_of) for u in warm_of
             if not u.startswith(d + "#") and any(c != u and not c.startswith(d + "#") for c in warm_of)]
    assert pairs, f"the fixture's warm units allow no such pair: {warm_of}"
    doc, unit = pairs[0]
    bench = tmp_path / "bench.txt"
    bench.write_text(f"{doc}\n{unit}\n")

    def exp_of(**base):
        return experiment.Experiment(experiment.load_spec(str(write_spec(
            tmp_path, continuous_shards, tiny_llama, {"before": {"kind": "eval"}}, warm=WARM,
            **{"split-block-windows": 2, "exclude-docs": str(bench), **base}))))
    exp = exp_of()
    record = exp.warm_start()
    warm = tmp_path / "work" / "warm"
    chosen = [u for u in warm_of if u != unit and not u.startswith(doc + "#")]
    assert chosen and lines(warm / "docs.txt") == chosen + sorted([doc, unit])
    assert lines(warm / "rest.txt") == [u for u in units if u not in held and u not in chosen]
    assert record["exclude_docs"] == str(bench) and record["units"] == len(chosen)
    arm = TrainSamples(exp.train_config(exp.spec.arms["before"]), tiny_tok)
    trained = {(r["doc_id"], split_unit(r["doc_id"], r["window_index"], 2)) for r in rows_of(arm)}
    assert trained and not any(d == doc or u == unit or u in chosen or u in held for d, u in trained)
    other = tmp_path / "other.txt"
    other.write_text(f"{doc}\n")
    with pytest.raises(UserError, match=f"exclude_docs: '{bench}' there, '{other}' now"):
        exp_of(**{"exclude-docs": str(other)}).warm_start()
    bench.write_text(f"{unit}\n\n{doc}\n")  # the same list, reordered: the same warm start
    assert exp_of().warm_start() == record
    bench.write_text(f"{doc}\n")  # edited in place: refused though the path is the same
    with pytest.raises(UserError, match="exclude_docs_sha256: '[0-9a-f]{64}' there, '[0-9a-f]{64}' now"):
        exp_of().warm_start()
    older = {k: v for k, v in record.items() if k not in ("exclude_docs", "exclude_docs_sha256")}
    (warm / "warm.json").write_text(json.dumps(older))
    assert exp_of(**{"exclude-docs": str(other)}).warm_start() == older
    # an arm's own list: dropped under warm (the arms exclude docs.txt), else it would replace base:'s: refused
    for warm_section, base in ((WARM, {}), (None, {"exclude-docs": str(bench)})):
        path = write_spec(tmp_path, continuous_shards, tiny_llama,
                          {"before": {"kind": "eval"}, "odd": {"kind": "rpt", "exclude-docs": str(other)}},
                          warm=warm_section, **base)
        with pytest.raises(UserError, match=f"spec '{path}', arm 'odd': sets exclude-docs, but .*list every "
                                            "document to exclude in one file under base: exclude-docs"):
            experiment.load_spec(str(path))
    path = write_spec(tmp_path, continuous_shards, tiny_llama,
                      {"before": {"kind": "eval"}, "odd": {"kind": "rpt", "exclude-docs": str(other)}})
    assert experiment.load_spec(str(path)).arms["odd"].options["exclude_docs"] == str(other)


def test_the_warm_start_reads_the_users_exclude_list_once(train_shards, tiny_llama, tmp_path, monkeypatch):
    """Building the warm start read base:'s exclude-docs file twice (its ids, then again for warm.json's digest):
    once now, and warm.json records the digest of the ids it read (that of the file, reordered or not)."""
    from rpt_train import samples

    fake_sft(monkeypatch)
    docs = sorted({d for d, _ in stream_rows(train_shards)})
    bench = tmp_path / "bench.txt"
    bench.write_text(f"{docs[-1]}\n{docs[0]}\n")
    reads = []
    real = samples.read_doc_ids
    monkeypatch.setattr(samples, "read_doc_ids", lambda path: reads.append(path) or real(path))
    spec = experiment.load_spec(str(write_spec(tmp_path, train_shards, tiny_llama, {"before": {"kind": "eval"}},
                                               warm=WARM, **{"exclude-docs": str(bench)})))
    record = experiment.Experiment(spec).warm_start()
    assert reads.count(str(bench)) == 1
    assert record["exclude_docs_sha256"] == samples.ids_digest(frozenset(docs[:1] + docs[-1:]))
    assert experiment.Experiment(spec).warm_start() == record  # reused: checked against the file


def test_an_exclude_list_drops_the_rows_the_builder_calls_excluded(continuous_shards, tiny_tok, tmp_path):
    """The candidates a list drops and the rows the sample builder treats as excluded are one rule (is_excluded:
    a row's doc_id or split unit listed), for a list of documents, of units, and of both."""
    from rpt_train.samples import is_excluded

    assert is_excluded("d", "d#1", frozenset({"d"})) and is_excluded("d", "d#1", frozenset({"d#1"}))
    assert not is_excluded("d", "d#1", frozenset({"d#2", "e"})) and not is_excluded("d", "d", frozenset())
    rows = stream_rows(continuous_shards)
    docs = sorted({d for d, _ in rows})
    units = sorted({split_unit(d, w, 2) for d, w in rows})
    for listed in ([docs[0]], units[1::3], [docs[-1], units[0]]):
        (tmp_path / "skip.txt").write_text("\n".join(listed) + "\n")
        data = TrainSamples(TrainConfig(shards=str(continuous_shards), model="demo", bucket="all",
                                        heldout_fraction=0.0, split_block_windows=2,
                                        exclude_docs=str(tmp_path / "skip.txt")), tiny_tok)
        kept = {(r["doc_id"], r["window_index"]) for r in rows_of(data)}
        for d, w in set(rows):
            if data.held_out_row({"doc_id": d, "window_index": w}):
                assert (d, w) not in kept
        assert kept and all(not data.held_out_row({"doc_id": d, "window_index": w}) for d, w in kept)


def test_processes_started_together_build_the_warm_start_once(train_shards, tiny_llama, tmp_path, monkeypatch):
    """Two runners of one spec (one per GPU) started together: the second waits on OUT/warm/.lock while the first
    builds the warm start, then reuses it (one SFT, the same record). Without the lock both trained it."""
    calls, second_started = [], threading.Event()

    def building(cfg):
        calls.append(cfg.out)
        second_started.wait(10)  # the second runner has started (it could now build too, were there no lock)
        deadline = time.monotonic() + 5
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)

    fake_sft(monkeypatch, building)
    spec = experiment.load_spec(str(write_spec(tmp_path, train_shards, tiny_llama, {"before": {"kind": "eval"}},
                                               warm=WARM)))
    records = {}

    def runner(name):
        if name == "second":
            second_started.set()
        records[name] = experiment.Experiment(spec).warm_start()

    first = threading.Thread(target=runner, args=("first",))
    first.start()
    while not calls and first.is_alive():
        time.sleep(0.01)
    second = threading.Thread(target=runner, args=("second",))
    second.start()
    first.join(30)
    second.join(30)
    assert len(calls) == 1 and records["first"] == records["second"]


def test_a_filesystem_without_flock_builds_the_warm_start_under_the_fallback_lock(train_shards, tiny_llama, tmp_path,
                                                                                  monkeypatch, capsys):
    """flock failing with another error than 'held' (ENOLCK: NFSv3 without lockd; ENOSYS: Lustre without -o flock)
    is a note, and the warm start is built under the lock by exclusive creation, OUT/warm/.lock.held, deleted after
    (it was an uncaught OSError, then a build unlocked); a lock taken names its holder."""
    import errno
    import fcntl

    fake_sft(monkeypatch)
    spec = experiment.load_spec(str(write_spec(tmp_path, train_shards, tiny_llama, {"before": {"kind": "eval"}},
                                               warm=WARM)))

    def no_lock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_lock)
        record = experiment.Experiment(spec).warm_start()
    assert record["units"] > 0 and "locking by exclusive creation" in capsys.readouterr().err
    assert not (tmp_path / "work" / "warm" / ".lock.held").exists()
    # in one process the note is said once, not again on each arm that reuses the warm start
    with monkeypatch.context() as m:
        m.setattr(fcntl, "flock", no_lock)
        again = [experiment.Experiment(spec).warm_start() for _ in range(2)]
    assert again == [record, record] and "exclusive creation" not in capsys.readouterr().err
    (tmp_path / "work" / "warm" / "warm.json").unlink()
    experiment.Experiment(spec).warm_start()
    assert (tmp_path / "work" / "warm" / ".lock").read_text().startswith("pid ")
