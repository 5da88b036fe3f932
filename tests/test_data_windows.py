"""Windowing: every position of a stream scored exactly once, with the context-prefix guarantee."""
import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from rpt_data.windows import StreamWindower, char_to_byte, tokenize_batch, windows_from_pieces


def run_windower(n_tokens: int, window: int, prefix: int, piece: int, has_bos: bool = False):
    w = StreamWindower(window, prefix, has_bos)
    w.start("d")
    out = []
    for s in range(0, n_tokens, piece):
        e = min(s + piece, n_tokens)
        ids = np.arange(s, e, dtype=np.int32)
        ends = np.arange(s + 1, e + 1, dtype=np.int64)  # one byte per token, "a" * n
        out += w.add(ids, ends, b"a" * (e - s))
    return out + w.finish()


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), window=st.integers(2, 40), prefix=st.integers(1, 39), piece=st.integers(1, 50))
def test_each_position_scored_once_with_prefix(n, window, prefix, piece):
    prefix = min(prefix, window - 1)
    wins = run_windower(n, window, prefix, piece)
    scored = []
    for i, w in enumerate(wins):
        assert w.window_index == i and len(w.token_ids) <= window
        assert w.score_start == (1 if i == 0 else prefix)
        assert np.array_equal(w.token_ids, np.arange(w.token_start, w.token_start + len(w.token_ids)))
        assert w.text == "a" * len(w.token_ids) and w.token_bytes[-1] == len(w.text)
        for t in range(w.score_start, len(w.token_ids)):
            pos = w.token_start + t
            assert t >= min(pos, prefix)  # at least min(t, context_prefix) real tokens of context
            scored.append(pos)
    assert scored == list(range(1, n))  # position 0 has no context; every other exactly once


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 200), window=st.integers(2, 40), prefix=st.integers(0, 39), piece=st.integers(1, 50))
def test_with_a_bos_every_position_is_scored_once(n, window, prefix, piece):
    """The proxy sees its BOS before every window: position 0 has context, so a stream's positions 0..n-1 are each
    scored exactly once (plain windowing too), with min(t, context_prefix) real tokens before them."""
    prefix = min(prefix, window - 1)
    wins = run_windower(n, window, prefix, piece, has_bos=True)
    scored = []
    for i, w in enumerate(wins):
        assert w.score_start == (0 if i == 0 else prefix)
        for t in range(w.score_start, len(w.token_ids)):
            assert t >= min(w.token_start + t, prefix)
            scored.append(w.token_start + t)
    assert scored == list(range(n))


def test_plain_windowing_loses_window_starts():
    wins = run_windower(30, 10, 0, 7)
    scored = {w.token_start + t for w in wins for t in range(w.score_start, len(w.token_ids))}
    assert scored == set(range(1, 30)) - {10, 20}


def test_char_to_byte_multibyte():
    text = "aé日🙂"
    assert list(char_to_byte(text)) == [0, 1, 3, 6, 10]


def test_token_bytes_cover_text_exactly(tiny_llama):
    from rpt_common.models import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    text = "Hello wörld, naïve café 日本語 🙂.\n\nThe quick brown fox."
    ids, ends = tokenize_batch(tok, [text])[0]
    assert ends[-1] == len(text.encode()) and np.all(np.diff(ends) >= 0)
    wins = list(windows_from_pieces([("d", text, True)], tok, window=8, context_prefix=3))
    data = text.encode()
    for w in wins:
        start = 0 if w.token_start == 0 else int(ends[w.token_start - 1])
        assert w.text.encode() == data[start : int(ends[w.token_start + len(w.token_ids) - 1])]
        assert np.array_equal(w.token_ids, ids[w.token_start : w.token_start + len(w.token_ids)])


def test_windows_stream_lazily(tiny_llama):
    """Input is consumed as windows are needed: an endless corpus still yields its first windows."""
    from rpt_common.models import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    endless = (("d", "The quick brown fox jumps over the lazy dog. ", i == 0) for i in itertools.count())
    first = list(itertools.islice(windows_from_pieces(endless, tok, window=16, context_prefix=4, batch=8), 50))
    assert len(first) == 50 and first[-1].window_index == 49


def test_structured_streams_do_not_mix(tiny_llama):
    from rpt_common.models import load_tokenizer

    tok = load_tokenizer(str(tiny_llama))
    texts = ["first record text here", "second one", "third record is a little longer than the others"]
    wins = list(windows_from_pieces([(str(i), t, True) for i, t in enumerate(texts)], tok, 6, 2))
    for i, t in enumerate(texts):
        mine = [w for w in wins if w.doc_id == str(i)]
        ids = tokenize_batch(tok, [t])[0][0]
        assert mine[0].token_start == 0
        got = np.concatenate([mine[0].token_ids] + [w.token_ids[2:] for w in mine[1:]])
        assert np.array_equal(got, ids)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 300), min_size=0, max_size=60), st.integers(1, 2000))
def test_token_budget_batches_cover_every_window_once_within_budget_and_padding_cap(lengths, budget):
    from types import SimpleNamespace

    from rpt_data.proxy import token_budget_batches

    windows = [SimpleNamespace(token_ids=[0] * n) for n in lengths]
    batches = token_budget_batches(windows, budget, max_pad=0.125)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * longest <= budget
        assert all(lengths[i] >= 0.875 * longest for i in b)  # padding under 12.5% of every row
