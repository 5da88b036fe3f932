"""Continuous streams cut into segments (rpt_data.segments): every position scored once with the whole stream's
tokens and its context prefix, 2 ranks = 1 rank, and a rank tokenizes only its segments plus a bounded lead-in."""
import functools
import json

import numpy as np
import pytest

from data_helpers import NORMALIZED_TEXT, SENTENCES, make_tokenizer_of, records, stream_tokens, write_jsonl
import rpt_data.readers as readers
import rpt_data.segments as seg
from rpt_data.config import TagConfig
from rpt_data.pipeline import run_tag
from rpt_data.readers import Record, RecordParser, read_all
from rpt_data.windows import TokenSpans

KINDS = ("bytelevel", "metaspace", "wordpiece")
SEP = "\n\n"


@functools.lru_cache(maxsize=None)
def tokenizer(kind: str):
    return make_tokenizer_of(kind)


@pytest.fixture
def tiny_segments(monkeypatch):
    monkeypatch.setattr(seg, "SEGMENT_BYTES", 300)
    monkeypatch.setattr(seg, "LEAD_BYTES", 64)
    monkeypatch.setattr(readers, "TEXT_BLOCK_BYTES", 50)


def corpus(root, fmt: str):
    """One continuous stream of ~1.5 KB (5+ segments of 300 bytes) and its text as the pipeline joins it."""
    root.mkdir(parents=True, exist_ok=True)
    if fmt == "text":
        text = "\n".join(SENTENCES * 6) + "\n"
        (root / "a.txt").write_text(text)
        return [(str(root / "a.txt"), "text")], text
    rows = records(24)
    write_jsonl(root / "a.jsonl", rows[:9], {4: b"{cut"})
    with open(root / "a.jsonl", "ab") as f:  # a bad line with no offset of its own, inside a later segment
        f.write(b"\n")
    with open(root / "a.jsonl", "ab") as f:
        for r in rows[9:]:
            f.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
    return [(str(root / "a.jsonl"), "jsonl")], SEP.join(r["text"] for r in rows)


def good(files):
    return [r for r in read_all(files, RecordParser("text", None, None)) if isinstance(r, Record)]


def scored(ws, docs, prefix):
    """Per segment doc in order: (context ids, its own ids, its own text, windows) from its windows."""
    out = []
    for d in docs:
        mine = [w for w in ws if w.doc_id == d]
        ids, text = stream_tokens(mine)
        lead = min(mine[0].score_start, prefix) if d != docs[0] else 0
        cut = int(mine[0].token_bytes[lead - 1]) if lead else 0
        out.append((ids[:lead], ids[lead:], text[cut:], mine))
    return out


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window,prefix,has_bos", [(16, 4, False), (12, 0, False), (24, 11, True)])
def test_segments_score_every_position_once_with_the_whole_streams_tokens(tmp_path, tiny_segments, fmt, kind,
                                                                          window, prefix, has_bos):
    tok = tokenizer(kind)
    files, text = corpus(tmp_path, fmt)
    counts = seg.cut_counts(files)
    assert counts[files[0][0]] >= 5
    recs = good(files)
    ws = list(seg.segment_windows(recs, counts, lambda p, k: True, SEP, tok, window, prefix, has_bos, span_bytes=40))
    docs = list(dict.fromkeys(w.doc_id for w in ws))
    assert len(docs) >= 4 and docs[0] == files[0][0] and docs[1].startswith(files[0][0] + ":segment")
    ref_ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    ref_ends = TokenSpans(tok)([text])[0][1]
    ids, data, first = [], b"", 0 if has_bos else 1
    for context, mine, got, wins in scored(ws, docs, prefix):
        g = len(ids)  # the stream index of the segment's first scored token
        assert context == ids[g - len(context):] if context else True
        assert len(context) == (0 if g == 0 else min(g, prefix)) or (prefix == 0 and not context)
        for w in wins:  # each scored position has min(t, context_prefix) real tokens before it in its window
            assert w.score_start >= (first if w.window_index == 0 and g == 0 else min(prefix, g + w.token_start))
        ids += mine
        data += got
    assert ids == ref_ids
    whole = text.encode()
    assert data == whole  # WordPiece's trailing whitespace goes to its last token
    assert int(ref_ends[-1]) == len(data)
    # every scored position once: as many scored positions as the stream has tokens, less the lost first ones
    n_scored = sum(len(w.token_ids) - w.score_start for w in ws)
    lost = (0 if has_bos else 1) + (0 if prefix else sum(1 for w in ws if w.window_index > 0 or w.doc_id != docs[0]))
    assert n_scored == len(ref_ids) - lost


@pytest.mark.parametrize("kind", ["bytelevel-nfc", "metaspace-nfkc", "wordpiece"])
def test_segments_of_text_a_normalizer_drops_or_merges_tile_it(tmp_path, tiny_segments, kind):
    """Text whose normalized form drops or merges characters (NFC, NFKC, BertNormalizer), cut into segments and
    spans: the segments' tokens are the whole stream's and their text tiles it (the dropped text included)."""
    tok = tokenizer(kind)
    odd = [x for x in NORMALIZED_TEXT if "\x00" not in x] * 3  # a NUL makes a text file binary (a bad record)
    text = "\n".join(f"{s} {x}{s[:9]}{x} {x}" for s, x in zip(SENTENCES * 6, odd)) + "\n"
    (tmp_path / "a.txt").write_text(text)
    files = [(str(tmp_path / "a.txt"), "text")]
    counts = seg.cut_counts(files)
    assert counts[files[0][0]] >= 5
    ws = list(seg.segment_windows(good(files), counts, lambda p, k: True, SEP, tok, 16, 4, span_bytes=40))
    docs = list(dict.fromkeys(w.doc_id for w in ws))
    ids, data = [], b""
    for context, mine, got, _ in scored(ws, docs, 4):
        ids += mine
        data += got
    assert ids == tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert data == text.encode()


@pytest.mark.parametrize("kind", KINDS)
def test_owned_segments_tokenize_only_their_share(tmp_path, tiny_segments, kind):
    """Two owners of alternate segments write the same windows as one owner of all, and each gives the tokenizer
    at most its segments' bytes plus a bounded lead-in and tail per segment."""
    files, text = corpus(tmp_path, "text")
    counts = seg.cut_counts(files)
    recs = good(files)
    seen = []

    class Counting(TokenSpans):
        def __call__(self, texts, **kw):
            seen[-1] += sum(len(t.encode()) for t in texts)
            return super().__call__(texts, **kw)

    spans = Counting(tokenizer(kind))
    got = []
    for owned in (lambda p, k: True, lambda p, k: k % 2 == 0, lambda p, k: k % 2 == 1):
        seen.append(0)
        got.append(list(seg.segment_windows(recs, counts, owned, SEP, spans, 16, 4, span_bytes=1 << 16)))
    key = lambda w: (w.doc_id, w.window_index, w.token_ids.tolist(), w.text, w.score_start, w.token_start)
    assert sorted(map(key, got[0])) == sorted(map(key, got[1] + got[2]))
    lead = max(seg.LEAD_BYTES, 64 * 4)
    per_segment = 2 * lead + 3 * seg.LEAD_BYTES + 2 * (2 * lead + 3 * seg.LEAD_BYTES)  # run's lead-in, tail, 2 junctions
    total = len(text.encode())
    for r in (1, 2):
        share = sum(min(seg.SEGMENT_BYTES, total - k * seg.SEGMENT_BYTES) for k in range(counts[files[0][0]])
                    if k % 2 == r - 1)
        segments = sum(1 for k in range(counts[files[0][0]]) if k % 2 == r - 1)
        assert seen[r] <= share + segments * per_segment


def test_a_stream_no_longer_than_a_segment_is_not_cut(tmp_path, monkeypatch):
    files, text = corpus(tmp_path, "text")
    monkeypatch.setattr(seg, "SEGMENT_BYTES", len(text.encode()))
    assert seg.cut_counts(files) == {}
    assert seg.cut_counts([(files[0][0] + ".gz", "jsonl")]) == {}


def test_segments_are_dealt_by_size(tmp_path, tiny_segments):
    """64 similar files and 2 huge ones: whole files leave the slowest rank far above the mean; segments do not."""
    from rpt_data.division import balance

    files = [(f"f{i}.txt", "text") for i in range(66)]
    sizes = [1000] * 64 + [40_000, 40_000]  # whole files: the slowest rank at 2.2x the mean
    whole = np.bincount(balance(sizes, 8), weights=sizes, minlength=8)
    per = seg.segment_sizes(files, sizes)
    flat = [b for s in per for b in s]
    cut = np.bincount(balance(flat, 8), weights=flat, minlength=8)
    assert whole.max() / whole.mean() > 1.8 and cut.max() <= cut.mean() + seg.SEGMENT_BYTES
    d = [seg.divide_segments(files, sizes, "continuous", None, r, 8) for r in range(8)]
    assert all(x.by == "segments" for x in d)
    units = [u for x in d for u in x.units]
    assert len(units) == len(set(units)) == len(flat)  # every segment on exactly one rank
    assert seg.divide_segments(files, sizes, "structured", None, 0, 8) is None
    assert seg.divide_segments(files, sizes, "continuous", 10, 0, 8) is None  # --limit: a stripe, as before
    assert seg.divide_segments(files[:1], [900], "continuous", None, 0, 8) is None  # 3 segments < 8 ranks


def test_two_ranks_tag_the_segments_of_one_file_as_one_rank_does(tmp_path, tiny_llama, tiny_segments, monkeypatch):
    """One big text file and one big jsonl file, 2 ranks by --rank/--world-size, merged: the rows of 1 rank (today:
    a `windows` stripe where every rank tokenizes everything); each rank tokenizes well under the whole input."""
    from test_data_multirank import opts, same_content, tag_ranks

    a, _ = corpus(tmp_path / "in" / "t", "text")
    b, _ = corpus(tmp_path / "in" / "j", "jsonl")
    inputs = [a[0][0], b[0][0]]
    tokenized = []
    call = TokenSpans.__call__

    def counting(self, texts, **kw):
        tokenized[-1] += sum(len(t.encode()) for t in texts)
        return call(self, texts, **kw)

    monkeypatch.setattr(TokenSpans, "__call__", counting)
    kw = dict(mode="continuous")
    tokenized.append(0)
    run_tag(TagConfig(inputs=inputs, out=str(tmp_path / "one"), **opts(tiny_llama, **kw)))
    world = 2
    for r in range(world):
        tokenized.append(0)
        run_tag(TagConfig(inputs=inputs, out=str(tmp_path / "two"), rank=r, world_size=world, **opts(tiny_llama, **kw)))
    from rpt_data.merge import merge_out

    manifest = merge_out(str(tmp_path / "two"))
    assert manifest["division"] == "segments"
    same_content(tmp_path / "one", tmp_path / "two", world)
    assert max(tokenized[1:]) < 0.6 * tokenized[0]  # today: each rank tokenizes all the run does


def owned_bad(items, count, owned):
    """The bad records the pipeline reports for the segments `owned` (one without an offset goes with the one before)."""
    out, k = [], 0
    for item in items:
        if item.offset >= 0:
            k = seg.segment_of(count, item.offset)
        if not isinstance(item, Record) and owned(k):
            out.append((item.line, item.reason))
    return out


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
def test_a_rank_reads_its_segments_from_their_byte_ranges(tmp_path, monkeypatch, fmt):
    """A rank holding some segments of a file parses only those and a bounded lead-in and tail per run of them, and
    gives the windows, bad records and line numbers of a whole read."""
    monkeypatch.setattr(seg, "SEGMENT_BYTES", 2000)
    monkeypatch.setattr(seg, "LEAD_BYTES", 64)
    monkeypatch.setattr(readers, "TEXT_BLOCK_BYTES", 50)
    path = tmp_path / ("a.jsonl" if fmt == "jsonl" else "a.txt")
    if fmt == "jsonl":
        rows = records(240)
        write_jsonl(path, rows, {i: b"{cut" for i in range(7, 240, 23)} | {i: b"" for i in range(11, 240, 31)})
    else:
        path.write_text("\n".join(SENTENCES * 120) + "\n")
    files = [(str(path), fmt)]
    count = seg.cut_counts(files)[str(path)]
    assert count >= 12
    parse = RecordParser("text", None, None)
    calls = []
    counting = lambda obj, source, line: calls.append(line) or RecordParser.__call__(parse, obj, source, line)
    whole = list(read_all(files, parse))
    key = lambda w: (w.doc_id, w.window_index, w.token_ids.tolist(), w.text, w.score_start, w.token_start)
    tok = tokenizer("bytelevel")
    lines = path.read_bytes().split(b"\n")
    per_run = 4 * (4 * 256) + 2 * 3 * 64 + 2 * max(map(len, lines))  # lead-in (read twice), tail, first record (bytes)
    for world in (4, 7):
        for rank in range(world):
            d = seg.divide_segments(files, [path.stat().st_size], "continuous", None, rank, world)
            owned = functools.partial(d.owns_unit, str(path))
            calls.clear()
            got = list(seg.read_segments(str(path), fmt, counting if fmt == "jsonl" else parse, count, owned, 4))
            assert owned_bad(got, count, owned) == owned_bad(whole, count, owned)
            assert [(r.line, r.offset, r.text) for r in got if isinstance(r, Record)] == \
                   [(r.line, r.offset, r.text) for r in whole if isinstance(r, Record) and r in got]
            ws = [list(seg.segment_windows([r for r in items if isinstance(r, Record)], {str(path): count},
                                           lambda p, k: owned(k), SEP, tok, 16, 4)) for items in (whole, got)]
            assert ws[0] and list(map(key, ws[1])) == list(map(key, ws[0]))
            mine = [k for k in range(count) if owned(k)]
            runs = 1 + sum(1 for a, b in zip(mine, mine[1:]) if b > a + 1)
            own = sum(1 for r in whole if seg.segment_of(count, r.offset) in mine) if fmt == "jsonl" else 0
            read_bytes = sum(len(r.text.encode()) for r in got if isinstance(r, Record))
            assert read_bytes <= len(mine) * seg.SEGMENT_BYTES + runs * per_run
            if fmt == "jsonl":  # records parsed: its segments' plus a bounded number a run
                assert len(calls) <= own + runs * per_run // min(len(x) for x in lines if x)
                assert len(calls) < 0.6 * sum(1 for r in whole if r.offset >= 0)


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
def test_a_read_error_in_a_segmented_file_names_the_line_a_whole_read_does(tmp_path, monkeypatch, fmt):
    """A read error (OSError) ends a segmented file at the line after the last one read, as read_unit reports it: a
    text block covers several lines, so the line is the block's first plus its newlines, not its first plus one."""
    monkeypatch.setattr(seg, "SEGMENT_BYTES", 2000)
    monkeypatch.setattr(seg, "LEAD_BYTES", 64)
    monkeypatch.setattr(readers, "TEXT_BLOCK_BYTES", 50)
    path = tmp_path / ("a.jsonl" if fmt == "jsonl" else "a.txt")
    if fmt == "jsonl":
        write_jsonl(path, records(240), {3: b"{cut"})
    else:
        path.write_text("\n".join(SENTENCES * 120) + "\n")
    name = "read_jsonl" if fmt == "jsonl" else "read_text"
    reader = getattr(readers, name)

    def failing(*args, **kw):  # the disk fails after 5 items
        for i, item in enumerate(reader(*args, **kw)):
            if i == 5:
                raise OSError(5, "Input/output error")
            yield item

    monkeypatch.setattr(readers, name, failing)
    monkeypatch.setitem(readers.READERS, fmt, failing)
    parse = RecordParser("text", None, None)
    count = seg.cut_counts([(str(path), fmt)])[str(path)]
    assert count > 1
    bad = lambda items: [(b.line, b.reason) for b in items if not isinstance(b, Record)]
    whole = bad(readers.read_unit(str(path), fmt, parse))
    assert len(whole) == 1 + (fmt == "jsonl") and "read error (OSError" in whole[-1][1]
    assert bad(seg.read_segments(str(path), fmt, parse, count, lambda k: True, 4)) == whole
