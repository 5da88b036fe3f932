"""Shards -> samples: positions, byte cuts, policy-tokenizer labels, seeded order, held-out documents, bad shards."""
import json
import re
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shard_fixtures import TEXTS, train_shards, tiny_tok, write_shards_standin  # noqa: F401
from tiny import make_tokenizer

from rpt_common.errors import UserError
from rpt_train.config import EvalConfig, TrainConfig
from rpt_train.evaluate import select_positions
from rpt_train.samples import (PositionSampler, SampleBuilder, ShardSet, TrainSamples, answerable, bucket_of,
                               is_heldout, label_pieces, select_mask)

TH = [0.5, 1.0, 1.5]


def test_candidates_are_scored_positions(train_shards):
    shards = ShardSet(str(train_shards))
    cands = shards.candidates("topk_entropy")
    table = pq.read_table(shards.paths[0])
    expected = sum(1 for r in table.to_pylist() for t, v in enumerate(r["topk_entropy"])
                   if t >= max(r["score_start"], 1) and v is not None and np.isfinite(v)
                   and r["token_bytes"][t] > r["token_bytes"][t - 1])  # zero-width tokens are no candidates
    assert len(cands) == expected > 0
    for i in range(0, len(cands), 7):
        row = table.slice(int(cands.row[i]), 1).to_pylist()[0]
        t = int(cands.t[i])
        assert t >= max(row["score_start"], 1)
        assert cands.value[i] == pytest.approx(row["topk_entropy"][t], rel=2e-3)  # float16 table
        assert bool(cands.selected[i]) == (t in row["selected"])


def test_sample_cuts_context_and_labels_at_the_byte_offset(train_shards, tiny_tok):
    shards = ShardSet(str(train_shards))
    cands = shards.candidates("topk_entropy")
    build = SampleBuilder(shards, cands, tiny_tok, labels_length=4, max_context_tokens=0, thresholds=TH)
    n = 0
    for i in range(len(cands)):
        s = build(i)
        if s is None:
            continue
        row = shards.row(int(cands.shard[i]), int(cands.row[i]))
        cut = row["token_bytes"][int(cands.t[i]) - 1]
        data = row["text"].encode()
        assert s.context.encode() == data[:cut]
        # the labels are the document's next tokens, across the window's end (the next window's text) too
        following = doc_continuation(row, int(cands.t[i]))
        assert s.label_tokens == answerable(label_pieces(tiny_tok, following, 4))
        assert 1 <= len(s.label_tokens) <= 4 and all(s.label_tokens)
        assert s.bucket == bucket_of(s.entropy, TH)
        n += 1
    assert n > 0.8 * len(cands)


def doc_continuation(row: dict, t: int, texts=TEXTS) -> str:
    """The whole document's text after position t of `row` (a window of texts[i] for doc_id 'doc<i>')."""
    data = texts[int(row["doc_id"].removeprefix("doc"))].encode()
    return data[data.index(row["text"].encode()) + row["token_bytes"][t - 1]:].decode()


def test_labels_run_across_the_window_edge(tiny_llama, tiny_tok, tmp_path):
    """Short windows (16 tokens, prefix 4): a mid-stream window's last positions take their labels from the next
    window's text, so every position's labels equal the whole document's, and none is cut at the edge."""
    from shard_fixtures import write_shards

    shards = ShardSet(str(write_shards(tmp_path / "short", tiny_llama, window=16, context_prefix=4)))
    cands = shards.candidates("topk_entropy")
    build = SampleBuilder(shards, cands, tiny_tok, labels_length=6, max_context_tokens=0, thresholds=TH)
    samples = build.many(np.arange(len(cands)))
    rows = shards.rows(cands.shard, cands.row)
    edge = 0
    for i, (s, row) in enumerate(zip(samples, rows)):
        if s is None:
            continue
        t = int(cands.t[i])
        following = doc_continuation(row, t)
        assert s.label_tokens == answerable(label_pieces(tiny_tok, following, 6)), s.key
        inside = row["text"].encode()[row["token_bytes"][t - 1]:].decode()
        edge += not inside.startswith("".join(s.label_tokens))  # labels that run past the window's end
    assert edge > 10 and build.following_reads > 0


@settings(max_examples=60, deadline=None)
@given(st.text(min_size=1, max_size=60), st.integers(1, 6))
def test_label_pieces_are_boundary_prefixes(tiny_tok, text, k):
    pieces = label_pieces(tiny_tok, text, k)
    assert text.startswith("".join(pieces))
    assert len(pieces) <= k and all(pieces)


def test_labels_use_the_policy_tokenizer():
    other = make_tokenizer(vocab_size=270)  # fewer merges than the proxy's tokenizer
    text = " the number of strings of length"
    a, b = label_pieces(make_tokenizer(), text, 3), label_pieces(other, text, 3)
    assert text.startswith("".join(a)) and text.startswith("".join(b))
    assert a != b


def test_context_tail_keeps_last_tokens(train_shards, tiny_tok):
    shards = ShardSet(str(train_shards))
    cands = shards.candidates("topk_entropy")
    full = SampleBuilder(shards, cands, tiny_tok, labels_length=2, max_context_tokens=0, thresholds=TH)
    short = SampleBuilder(shards, cands, tiny_tok, labels_length=2, max_context_tokens=5, thresholds=TH)
    i = int(np.argmax(cands.t))
    a, b = full(i), short(i)
    assert a.context.endswith(b.context) and len(b.context) < len(a.context)
    assert len(tiny_tok(b.context, add_special_tokens=False)["input_ids"]) <= 6


def test_context_tail_does_not_trust_trimmed_offsets():
    """A ByteLevel post-processor with trim_offsets moves a token's start past its leading space: the tail is the
    last tokens' own text (a suffix of the context, leading space included), not the trimmed offset's cut."""
    from data_helpers import make_tokenizer_of

    from rpt_train.samples import context_tail

    tok = make_tokenizer_of("bytelevel", trim_offsets=True)
    context = "Let x_n be the number of strings of length n; then the quick brown fox jumps over the lazy dog."
    ids = tok(context, add_special_tokens=False)["input_ids"]
    for k in range(1, 12):
        tail = context_tail(tok, context, k)
        assert context.endswith(tail) and tail == tok.decode(ids[-k:], clean_up_tokenization_spaces=False), k
        assert len(tok(tail, add_special_tokens=False)["input_ids"]) <= k + 1


def test_sampler_without_replacement_and_resumable():
    s = PositionSampler(10, seed=3)
    first = [s.next() for _ in range(10)]
    assert sorted(first) == list(range(10))
    head = [s.next() for _ in range(4)]
    state = s.state_dict()
    rest = [s.next() for _ in range(9)]
    t = PositionSampler(10, seed=3)
    t.load_state_dict(state)
    assert [t.next() for _ in range(9)] == rest
    assert sorted(head + rest[:6]) == list(range(10))
    assert PositionSampler(10, seed=4)._perm.tolist() != PositionSampler(10, seed=3)._perm.tolist()
    # a checkpoint of another number of positions (other shards, filters, or an --exclude-docs list edited between
    # stop and resume) is refused, naming what to keep
    with pytest.raises(UserError, match="trained on 10 positions but the shards now give 9; resume with the same "
                                        "--shards, position options and --exclude-docs list$"):
        PositionSampler(9, seed=3).load_state_dict(state)


def test_a_resume_refuses_an_exclude_list_edited_in_place(train_shards, tiny_tok, tmp_path):
    """An --exclude-docs list edited between stop and resume so that it keeps the number of positions (one document
    swapped for another of as many) resumed silently on other positions (only the count was checked): the checkpoint
    now records the digest of the list's ids and such a resume is refused, naming the file and what to do. The same
    ids (reordered, blank lines) resume as before; a checkpoint written before the digest: the count check only."""
    shards = ShardSet(str(train_shards))
    cands = shards.candidates("topk_entropy")
    docs = [pq.read_table(p, columns=["doc_id"])["doc_id"].to_pylist() for p in shards.paths]
    count = Counter(docs[s][r] for s, r in zip(cands.shard.tolist(), cands.row.tolist()))
    a, b = next((a, b) for a in sorted(count) for b in sorted(count) if a < b and count[a] == count[b])
    listed = tmp_path / "exclude.txt"
    listed.write_text(f"{a}\n")
    cfg = TrainConfig(shards=str(train_shards), bucket="all", labels_length=2, exclude_docs=str(listed),
                      out=str(tmp_path / "run"))
    run = TrainSamples(cfg, tiny_tok)
    run.next_batch(3)
    state = run.state_dict()
    after = [s.key for s in run.next_batch(4)]
    listed.write_text(f"{b}\n")  # edited in place: as many positions, other ones
    swapped = TrainSamples(cfg, tiny_tok)
    rows = [set(zip(d.cands.row_shard.tolist(), d.cands.row_index.tolist())) for d in (run, swapped)]
    assert len(swapped) == len(run) and rows[0] != rows[1]
    with pytest.raises(UserError, match=re.escape(f"--exclude-docs '{listed}' lists other doc_ids / units than when "
                                                  f"the run in '{tmp_path / 'run'}' started") +
                       ".*restore the list as it was, or start a new run in another --out"):
        swapped.load_state_dict(state)
    older = {k: v for k, v in state.items() if k != "exclude_sha256"}  # a checkpoint of an older version
    swapped.load_state_dict(older)
    listed.write_text(f"\n  {a}\n\n")  # the same ids: resumes where it stopped
    same = TrainSamples(cfg, tiny_tok)
    same.load_state_dict(state)
    assert [s.key for s in same.next_batch(4)] == after
    (tmp_path / "empty.txt").write_text("\n")  # no list and an empty one: the same (no) ids
    TrainSamples(TrainConfig(shards=str(train_shards), bucket="all", labels_length=2), tiny_tok).load_state_dict(
        TrainSamples(TrainConfig(shards=str(train_shards), bucket="all", labels_length=2,
                                 exclude_docs=str(tmp_path / "empty.txt")), tiny_tok).state_dict())


def test_heldout_documents_are_never_trained_on(train_shards, tiny_tok):
    cfg = TrainConfig(shards=str(train_shards), bucket="all", heldout_fraction=0.5, split_seed=1, labels_length=2)
    docs = set(pq.read_table(ShardSet(str(train_shards)).paths[0], columns=["doc_id"])["doc_id"].to_pylist())
    held = {d for d in docs if is_heldout(d, 0.5, 1)}
    assert 0 < len(held) < len(docs)
    data = TrainSamples(cfg, tiny_tok)
    seen = {s.doc_id for _ in range(3) for s in data.next_batch(len(data) // 2)}
    assert seen and not seen & held
    chosen = select_positions(ShardSet(str(train_shards)), tiny_tok,
                              EvalConfig(shards=str(train_shards), heldout_fraction=0.5, split_seed=1, limit=50))
    assert {s.doc_id for s in chosen["all"]} <= held


def test_bucket_and_min_entropy_selection(train_shards, tiny_tok):
    cands = ShardSet(str(train_shards)).candidates("topk_entropy")
    hard = select_mask(cands, bucket="hard", min_entropy=None, thresholds=TH)
    assert (cands.value[hard] > 1.5).all() and hard.sum() < len(cands)
    assert (select_mask(cands, bucket="selected", min_entropy=None, thresholds=TH) == cands.selected).all()
    assert select_mask(cands, bucket="hard", min_entropy=0.1, thresholds=TH).sum() == (cands.value > 0.1).sum()
    with pytest.raises(UserError, match="no training position"):
        TrainSamples(TrainConfig(shards=str(train_shards), min_entropy=1e9), tiny_tok)


def _copy(src, tmp_path):
    dst = tmp_path / "shards"
    shutil.copytree(src, dst)
    return dst


def test_bad_shards_are_refused(train_shards, tiny_llama, tmp_path):
    old = write_shards_standin(tmp_path / "old", tiny_llama, schema_version=0)
    with pytest.raises(UserError, match="schema version 0"):
        ShardSet(str(old))
    broken = _copy(train_shards, tmp_path)
    shard = next(broken.glob("**/shard-*.parquet"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        ShardSet(str(broken))
    with pytest.raises(UserError, match="not an `rpt-data tag` output"):
        ShardSet(str(tmp_path / "nowhere"))


def test_incomplete_or_mismatched_manifest(train_shards, tmp_path):
    d = _copy(train_shards, tmp_path)
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(UserError, match="incomplete"):
        ShardSet(str(d))
    table = pq.read_table(next(d.glob("**/shard-*.parquet")))
    pq.write_table(table.drop_columns(["topk_entropy"]), next(d.glob("**/shard-*.parquet")))
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="no column 'topk_entropy'"):
        ShardSet(str(d))
