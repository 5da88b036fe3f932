"""The windowing invariant: a stream's tokens are the tokenization of its whole text and their bytes tile it,
whatever the pieces it arrives in (records, text blocks) and however small the tokenizer's spans are, and whatever
the tokenizer's normalizer drops or merges."""
import functools
import json
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_helpers import NORMALIZED_TEXT, make_tokenizer_of, read_rows, stream_tokens
from rpt_common.errors import UserError
from rpt_data.windows import TokenSpans, windows_from_pieces

KINDS = ("bytelevel", "metaspace", "wordpiece", "bytelevel-nfc", "metaspace-nfkc")  # wordpiece: BertNormalizer
FRAGMENTS = ["The", " quick", " brown", "fox", ".", ",", " ", "  ", "\n", "\n\n", "\t", "é", "naïve", "日本語", "🙂",
             "<|endoftext|>", "</s>", "[SEP]", "<s>", "a" * 40, "x_(n+1)", "café", "239"] + NORMALIZED_TEXT


@functools.lru_cache(maxsize=None)
def tokenizer(kind: str):
    return make_tokenizer_of(kind)


def reference(tok, text: str) -> tuple[list, np.ndarray]:
    ids = tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids, TokenSpans(tok)([text])[0][1]


texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text("ab é日🙂\n<>|", max_size=12)), max_size=40).map("".join)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), streams=st.lists(texts, min_size=1, max_size=3), data=st.data(),
       span=st.integers(8, 160), window=st.integers(2, 24), prefix=st.integers(0, 23))
def test_stream_tokens_equal_whole_text_tokens_and_tile_it(kind, streams, data, span, window, prefix):
    tok = tokenizer(kind)
    prefix = min(prefix, window - 1)
    pieces = []
    for d, text in enumerate(streams):  # each stream in random pieces: records joined, text blocks, cut anywhere
        cuts = sorted(set(data.draw(st.lists(st.integers(0, len(text)), max_size=6))))
        parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        pieces += [(f"d{d}", p, i == 0) for i, p in enumerate(parts)]
    wins = list(windows_from_pieces(pieces, tok, window, prefix, batch=2, span_bytes=span))
    for d, text in enumerate(streams):
        mine = [w for w in wins if w.doc_id == f"d{d}"]
        ids, got = stream_tokens(mine)
        ref_ids, ref_ends = reference(tok, text)
        assert ids == ref_ids
        ends = np.concatenate([w.token_bytes[(0 if w.window_index == 0 else prefix):] + (
            0 if w.window_index == 0 else int(ref_ends[w.token_start - 1])) for w in mine]) if mine else []
        assert list(ends) == list(ref_ends)
        assert got == (text.encode() if ids else b"")  # the windows' text tiles the stream's, in order


@pytest.mark.parametrize("count", [255, 256, 257])
def test_round_counts_of_streams_end_cleanly(count):
    """The old batcher flushed once more after its loop and crashed (IndexError) when the count was a multiple
    of its batch of 256 streams."""
    tok = tokenizer("bytelevel")
    wins = list(windows_from_pieces([(str(i), "The quick fox.", True) for i in range(count)], tok, 8, 2))
    assert len({w.doc_id for w in wins}) == count


@pytest.mark.parametrize("kind", KINDS)
def test_special_token_strings_are_text(kind):
    tok = tokenizer(kind)
    text = "one <|endoftext|> two </s> three [SEP] four <s>"
    specials = set(tok.all_special_ids)
    wins = list(windows_from_pieces([("d", text, True)], tok, 64, 8))
    assert not specials & set(wins[0].token_ids.tolist())


def test_metaspace_adds_no_word_start_marker_at_joins_or_blocks():
    """Records joined into one stream, and a file read in blocks, put no '▁' token where a piece starts."""
    tok = tokenizer("metaspace")
    text = "The quick brown fox.\n\nThe lazy dog."
    pieces = [("d", "The quick brown fox.", True), ("d", "\n\nThe lazy", False), ("d", " dog.", False)]
    wins = list(windows_from_pieces(pieces, tok, 64, 8))
    assert wins[0].token_ids.tolist() == reference(tok, text)[0]


def test_trimmed_offsets_give_the_tokens_own_bytes():
    """A ByteLevel post-processor with trim_offsets=True moves token ends off trailing spaces; the spans are
    rebuilt from the tokens' bytes, so each token's span holds exactly its own bytes."""
    tok = make_tokenizer_of("bytelevel", trim_offsets=True)
    text = "The quick brown fox jumps over the lazy dog. " * 3
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
    assert any(p.endswith("Ġ") for p in pieces) and offsets[-1][1] < len(text)  # the trimmed case is exercised
    w = next(iter(windows_from_pieces([("d", text, True)], tok, 256, 8)))
    data, prev = w.text.encode(), 0
    for tid, end in zip(w.token_ids.tolist(), w.token_bytes.tolist()):
        assert data[prev:end] == tok.convert_tokens_to_string([tok.convert_ids_to_tokens(tid)]).encode()
        prev = end
    assert prev == len(text.encode())


class OverlappingOffsets:
    """A stand-in fast tokenizer whose offsets overlap (token 1 re-covers token 0's text)."""
    name_or_path = "overlapping-offsets"

    def __call__(self, texts, **kw):
        return {"input_ids": [[1, 2] for _ in texts], "offset_mapping": [[(0, 3), (1, len(t))] for t in texts]}

    def convert_ids_to_tokens(self, i):
        return f"t{i}"


def test_offsets_that_overlap_are_refused_naming_the_tokenizer_and_the_stream():
    with pytest.raises(UserError, match="overlapping-offsets.*go backwards or overlap.*in stream 'in.jsonl:7'"):
        list(windows_from_pieces([("in.jsonl:7", "hello world", True)], OverlappingOffsets(), 8, 2))


def _nfc_bytes(tok, token: str) -> bytes:
    from rpt_data.windows import _gpt2_byte_alphabet

    alphabet = _gpt2_byte_alphabet()
    return bytes(alphabet[c] for c in token)


@pytest.mark.parametrize("kind", ["bytelevel-nfc", "metaspace-nfkc", "wordpiece"])
def test_text_the_normalizer_drops_or_merges_goes_to_an_adjacent_token(kind):
    """NFC (Qwen2-style byte-level BPE) merges e + U+0301 and Hangul jamo into one character whose offsets cover only
    the first; BertNormalizer drops soft hyphens, zero-width spaces, BOMs, U+FFFD, control characters and accents:
    no token's offsets cover that text. The old check refused it (exit 2: the whole tagging run stopped on ordinary
    web text). Now the spans tile the text (the labels are the original text's bytes, cut at token boundaries), the
    dropped text goes with the token before it (up to whitespace), and each label normalizes to its token."""
    tok = tokenizer(kind)
    spans = TokenSpans(tok)
    norm = tok.backend_tokenizer.normalizer
    texts = [f"The {x} quick" for x in NORMALIZED_TEXT] + [f"{x}fox{x} {x}" for x in NORMALIZED_TEXT] + \
        ["".join(NORMALIZED_TEXT), " ".join(NORMALIZED_TEXT), "Un cafe\u0301 au lait, \u1112\u1161\u11ab text."]
    for text, (ids, ends) in zip(texts, spans(texts)):
        data = text.encode()
        assert len(ids) == len(ends)
        if not len(ids):
            continue
        assert (np.diff(ends) >= 0).all() and ends[0] >= 0 and ends[-1] == len(data), (text, ends)
        labels = [data[a:b].decode() for a, b in zip([0, *ends[:-1]], ends)]  # each on character boundaries
        assert "".join(labels) == text
        pieces = tok.convert_ids_to_tokens(ids.tolist())
        if kind == "bytelevel-nfc":  # the tokens' bytes up to each cut are the normalized text up to it (a
            done = b""  # character split in byte pieces goes whole with the first piece)
            for k, p in enumerate(pieces):
                done += _nfc_bytes(tok, p)
                want = unicodedata.normalize("NFC", data[: ends[k]].decode()).encode()
                rest = want[len(done):]
                assert want.startswith(done) and all(b & 0xC0 == 0x80 for b in rest), (text, k, labels)
            assert done == unicodedata.normalize("NFC", text).encode()
        elif kind == "wordpiece":  # each label, normalized, is its token (whitespace aside)
            for p, label in zip(pieces, labels):
                if p != tok.unk_token:
                    assert "".join(norm.normalize_str(label).split()) == p.removeprefix("##"), (text, pieces, labels)
        else:  # NFKC: each label, normalized, is its token's text (word-start marker, byte fallback aside)
            got = b"".join(bytes([int(p[3:5], 16)]) if p.startswith("<0x") else p.replace("\u2581", " ").encode()
                           for p in pieces)
            assert got.lstrip(b" ") == norm.normalize_str(text).encode().lstrip(b" ")
    # what the normalizer merges or drops is never cut from the character before it: a combining accent stays with
    # its letter, jamo with their syllable (NFC, NFKC), a soft hyphen with the word piece before it, and a gap before
    # the first token goes to the first token (BertNormalizer drops both)
    keep = ["e\u0301", "a\u0323"] + (["k\u00ad", "\ufeffT"] if kind == "wordpiece" else ["\u1112\u1161\u11ab"])
    for piece in keep:
        text = f"\ufeffThe quick\u00adbrown cafe\u0301 {piece}x \u1112\u1161\u11ab\u1100\u1173\u11af a\u0323\u0301."
        ids, ends = spans([text])[0]
        cuts = {len(text.encode()[:e].decode()) for e in ends.tolist()}
        at = [i for i in range(len(text)) if text.startswith(piece, i)]
        assert at and not any(i < c < i + len(piece) for i in at for c in cuts), (piece, cuts)


def test_tagging_completes_with_a_normalizing_proxy_tokenizer(tmp_path):
    """The paper's proxy family (Qwen2: byte-level BPE with an NFC normalizer) on scraped text with a decomposed
    accent: the run stopped with exit 2 at that record (not a bad record, so --on-bad-record skip did not help, and
    a resume hit it again). Now it completes and each row's text is its window of the record, tiled by its tokens."""
    from types import SimpleNamespace

    import polars as pl
    from transformers import AutoTokenizer

    from data_helpers import write_jsonl
    from rpt_data.config import TagConfig
    from rpt_data.pipeline import run_tag
    from tiny import make_model_dir

    model = make_model_dir(tmp_path / "m", hidden=16, layers=1)
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "NFC"}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    texts = [f"page {i}: The quick brown fox." + (" Un cafe\u0301 au lait, \u1112\u1161\u11ab." if i == 3 else "")
             for i in range(6)]
    write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in texts])
    manifest = run_tag(TagConfig(inputs=[str(tmp_path / "web.jsonl")], model=str(model), window=8, context_prefix=2,
                                 out=str(tmp_path / "out"), device="cpu", progress=False))
    assert manifest["complete"] and manifest["bad_records"] == 0
    rows = read_rows(tmp_path / "out")
    spans = TokenSpans(AutoTokenizer.from_pretrained(model))
    for i, text in enumerate(texts):
        ws = [SimpleNamespace(**(r | {k: np.array(r[k]) for k in ("token_ids", "token_bytes")}))
              for r in rows.filter(pl.col("doc_id") == f"{tmp_path / 'web.jsonl'}:{i + 1}").iter_rows(named=True)]
        ids, data = stream_tokens(ws)
        assert data == text.encode() and ids == spans([text])[0][0].tolist()


def test_a_word_longer_than_the_span_is_tokenized_whole():
    """WordPiece turns a word over 100 characters into [UNK]: spans must not cut inside it."""
    tok = tokenizer("wordpiece")
    text = "the quick fox " * 4 + "a" * 300 + " the end"
    pieces = [("d", text[i : i + 16], i == 0) for i in range(0, len(text), 16)]
    ids, _ = stream_tokens(windows_from_pieces(pieces, tok, 32, 4, span_bytes=16))
    assert ids == reference(tok, text)[0] and tok.unk_token_id in ids


def test_a_stream_without_a_safe_cut_is_refused(monkeypatch):
    import rpt_data.windows as windows

    monkeypatch.setattr(windows, "MAX_SPAN_BYTES", 64)
    with pytest.raises(UserError, match="cannot be tokenized in pieces.*split that text"):
        list(windows_from_pieces([("d", "a" * 400, True)], tokenizer("bytelevel"), 16, 4, span_bytes=16))


class CallSizes:
    """A tokenizer that records the bytes of text it is given per call."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def __call__(self, texts, **kw):
        self.sizes.append(sum(len(t.encode()) for t in texts))
        return self.tok(texts, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("kind", ["bytelevel", "metaspace"])
def test_tokenizer_calls_are_bounded_by_bytes_not_by_input_size(kind):
    """Memory bound of the tagging path: the old batcher tokenized 256 pending pieces (records, or 1 MiB blocks of a
    text file) in one call, so one call held up to 256 MiB of text. Each call now holds about `span_bytes`, for many
    records and for one long stream in blocks alike, and the windows stay the whole text's tokenization."""
    tok = tokenizer(kind)
    sentence = "The quick brown fox jumps over the lazy dog. "
    records = [(f"r{i}", sentence * 3, True) for i in range(300)]  # 300 records of 135 bytes
    book = sentence * 400  # one 18 KB stream read in 1 KiB blocks
    blocks = [("book", book[i : i + 1024], i == 0) for i in range(0, len(book), 1024)]
    for pieces, text in ((records, None), (blocks, book)):
        spy = CallSizes(tok)
        wins = list(windows_from_pieces(pieces, spy, 64, 8, span_bytes=512))
        assert max(spy.sizes) <= 2 * 512, spy.sizes
        if text is not None:
            assert stream_tokens(wins)[0] == reference(tok, text)[0]
        else:
            assert len({w.doc_id for w in wins}) == 300
