"""Tokens with byte spans, and windows with the context-prefix rule.

A stream (one record in structured mode, one file in continuous mode) is cut into windows of at
most `window` tokens. Consecutive windows overlap by `context_prefix` tokens, which are context
only in the later window (`score_start = context_prefix`), so every position t >= 1 of a stream
is scored exactly once with at least min(t, context_prefix) tokens before it. The first window of
a stream has `score_start = 1`: position 0 has no context. With context_prefix = 0 (plain
windowing) the first token of every later window cannot be scored at all.

`has_bos`: the proxy sees its BOS in front of every window (never stored in `token_ids`), so position 0
of a window has context: the first window has `score_start = 0`, later ones `context_prefix`, and every
position t >= 0 of a stream is scored exactly once.

The invariant (tests/test_data_invariant.py): a stream's tokens are the tokenization of its whole text
(special-token strings in it are text, not control tokens), and their byte spans tile that text. The
tokenizer sees at most `span_bytes` of text per call: a stream longer than that is tokenized in
overlapping spans, cut only where two spans agree on the tokens around the cut (see `LongStream`).
"""
from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from rpt_common.errors import UserError

SPAN_BYTES = 1 << 18  # text per tokenizer call (bytes): what bounds the tokenizer's memory
MAX_SPAN_BYTES = 64 << 20  # a span that must grow past this to find a safe cut is refused
AGREE = 4  # tokens that two overlapping spans must agree on, on each side of a cut


@dataclass(slots=True)
class Window:
    doc_id: str
    window_index: int
    token_start: int  # index of token_ids[0] within its stream
    text: str
    token_ids: np.ndarray  # int32 [n]
    token_bytes: np.ndarray  # int32 [n], byte end of each token inside `text`
    score_start: int
    unit: int = -1  # the input unit (index into the run's inputs) of its stream, when the pipeline knows it; not stored


def char_to_byte(text: str) -> np.ndarray:
    """[len(text) + 1] UTF-8 byte offset of each character index."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lens = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    out = np.zeros(len(cp) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    return out


def _gpt2_byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (tokenizers' ByteLevel): the character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _has_byte_level(node) -> bool:
    if isinstance(node, dict):
        return node.get("type") == "ByteLevel" or any(_has_byte_level(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_byte_level(v) for v in node)
    return False


# Python's whitespace code points (str.isspace): where uncovered text stops going to the token before it.
_WHITESPACE = np.array([c for c in range(0x3100) if chr(c).isspace()], dtype=np.uint32)


class TokenSpans:
    """A fast tokenizer's ids and UTF-8 byte ends per text, checked before they are trusted.

    Special-token strings in the text are tokenized as text (`split_special_tokens`): a corpus that contains
    `<|endoftext|>` does not reset the proxy's context. Byte ends: for a byte-level tokenizer whose tokens' own
    bytes concatenate to the text they are rebuilt from those bytes; otherwise (WordPiece, Metaspace, or a normalizer
    that changed the text: NFC in Qwen2-style byte-level BPE, BertNormalizer) they come from `offset_mapping`.
    Token k's span is the text from token k-1's end (the text's start for k = 0) to its own end, so the spans tile
    the text: every byte belongs to exactly one token, in order, and labels are the original text's bytes.
    Text no token's offsets cover (a soft hyphen, zero-width space, BOM, U+FFFD or control character the normalizer
    drops; the combining mark or Hangul jamo NFC merges into the character before; accents stripped; whitespace)
    is attributed so: the characters that follow a token up to the next whitespace go to that token, the rest (from
    the whitespace on) to the next token, a gap before the first token to the first token, and everything after
    the last token to the last token. Ends fall on character boundaries: the byte pieces of one character all end
    where the character (and what it took of the gap after it) ends, in the first piece. Offsets that go backwards
    or overlap by more than one character cannot be repaired: a UserError names the tokenizer and the stream.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        self.piece = self._byte_pieces()  # list[bytes | None] per id, or None when not byte-level
        if self.piece is not None:
            self.piece_len = np.array([-1 if p is None else len(p) for p in self.piece], dtype=np.int64)

    def _byte_pieces(self) -> list | None:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        spec = json.loads(backend.to_str())
        if not (_has_byte_level(spec.get("decoder")) or _has_byte_level(spec.get("pre_tokenizer"))):
            return None
        alphabet = _gpt2_byte_alphabet()
        pieces: list[bytes | None] = [None] * backend.get_vocab_size(with_added_tokens=True)
        for tok, i in backend.get_vocab(with_added_tokens=False).items():
            if i < len(pieces) and all(c in alphabet for c in tok):
                pieces[i] = bytes(alphabet[c] for c in tok)
        for i, added in getattr(self.tokenizer, "added_tokens_decoder", {}).items():
            if i < len(pieces):
                pieces[i] = added.content.encode()  # added tokens match their text as is
        return pieces

    def __call__(self, texts: list[str], names: list[str] | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """(token ids int32, byte ends int64 relative to the text) per text; one batched tokenizer call. `names`:
        what each text is (e.g. "stream 'web.jsonl:31'"), for the error when a tokenizer's offsets are broken."""
        if not texts:
            return []
        enc = self._encode(texts, offsets=self.piece is None)
        out = []
        for k, (text, ids) in enumerate(zip(texts, enc["input_ids"])):
            ids = np.asarray(ids, dtype=np.int32)
            ends = self._from_bytes(text, ids) if self.piece is not None else None
            if ends is None:
                again = enc if self.piece is None else self._encode([text], True)  # offsets were not asked for
                offsets = again["offset_mapping"][k if self.piece is None else 0]
                ends = self._from_offsets(text, ids, offsets, names[k] if names else "")
            out.append((ids, ends))
        return out

    def _encode(self, texts: list[str], offsets: bool):
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True,
                              return_offsets_mapping=offsets, return_attention_mask=False)

    def _from_bytes(self, text: str, ids: np.ndarray) -> np.ndarray | None:
        """Ends from the tokens' bytes, or None when they do not spell the text (a normalizer changed it)."""
        data = text.encode()
        lens = self.piece_len[ids] if len(ids) else np.zeros(0, np.int64)
        if (lens < 0).any() or int(lens.sum()) != len(data) or b"".join(self.piece[i] for i in ids.tolist()) != data:
            return None
        ends = np.cumsum(lens)
        cont = (np.frombuffer(data, np.uint8) & 0xC0) == 0x80  # UTF-8 continuation bytes
        inside = cont[np.minimum(ends, len(data) - 1)] & (ends < len(data)) if len(data) else np.zeros(0, bool)
        if inside.any():  # a token ending inside a character: it ends where the character ends
            boundary = np.append(np.nonzero(~cont)[0], len(data))
            ends = boundary[np.searchsorted(boundary, ends)]
        return ends

    def _from_offsets(self, text: str, ids: np.ndarray, offsets, where: str = "") -> np.ndarray:
        """Byte ends from character offsets, repaired where a normalizer dropped or merged characters (the rule in
        the class docstring); offsets that go backwards or overlap by more than one character are refused."""
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        if not len(off):  # no token (whitespace, or text the normalizer drops entirely): no span
            return np.zeros(0, np.int64)
        s, e = off[:, 0].copy(), off[:, 1].copy()
        n = len(text)
        if len(off) > 1:  # a word-start marker put in front of a word gets that word's start: it takes no text
            marker = (s[1:] == s[:-1]) & (e[:-1] < e[1:])
            e[:-1][marker] = s[:-1][marker]
        bad = (s < 0) | (e < s) | (e > n)
        taken = np.maximum.accumulate(e)  # text up to here belongs to this token or an earlier one
        if len(off) > 1:
            same = (s[1:] == s[:-1]) & (e[1:] == e[:-1])  # byte pieces of one character share its span
            # in order; a token may start inside the last character taken before it (its other byte pieces)
            bad[1:] |= (s[1:] < s[:-1]) | (~same & (s[1:] < taken[:-1] - 1))
        if bad.any():
            k = int(np.argmax(bad))
            raise UserError(
                f"the tokenizer '{self.name}' gives character offsets that go backwards or overlap (token {k} "
                f"{self.tokenizer.convert_ids_to_tokens(int(ids[k]))!r} at characters {tuple(int(x) for x in off[k])}"
                + (f" after {tuple(int(x) for x in off[k - 1])}" if k else "") + f" of a text of {n} characters"
                + (f" in {where}" if where else "") + "), so its tokens' byte spans cannot be trusted and no shard "
                "was written past it; use a tokenizer whose offsets follow the text")
        # text no token covers (dropped or merged by the normalizer, or whitespace): the characters that follow a
        # token up to the next whitespace go to that token, the rest (from the whitespace on) to the next token,
        # and everything after the last token to the last token; so the spans tile the text
        nxt = np.append(s[1:], n)
        cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        space = np.append(np.nonzero(np.isin(cp, _WHITESPACE))[0], n)
        ends = np.where(nxt > taken, np.minimum(space[np.searchsorted(space, taken)], nxt), taken)
        ends[-1] = n
        # tokens that add nothing past the text already taken (pieces of one character) end where the last of them
        # ends: the character and what follows it stay in the first piece
        last = np.append(np.nonzero(taken[1:] != taken[:-1])[0], len(taken) - 1)
        group = np.concatenate([[0], np.cumsum(taken[1:] != taken[:-1])])
        ends = ends[last][group]
        return char_to_byte(text)[ends]


def tokenize_batch(tokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids int32, byte ends int64 relative to the text) per text, as `TokenSpans` gives them."""
    spans = tokenizer if isinstance(tokenizer, TokenSpans) else TokenSpans(tokenizer)
    return spans(texts)


class StreamWindower:
    """Accumulates one stream's tokens and bytes; emits windows as soon as they are full."""

    def __init__(self, window: int, context_prefix: int, has_bos: bool = False):
        self.window, self.prefix = window, context_prefix
        self.first_scored = 0 if has_bos else 1  # the first window position that has context
        self.doc_id: str | None = None

    def start(self, doc_id: str) -> None:
        self.doc_id = doc_id
        self.ids = np.zeros(0, np.int32)
        self.ends = np.zeros(0, np.int64)  # byte ends within the stream
        self.buf = bytearray()
        self.buf_base = 0  # stream byte offset of buf[0]
        self.start_byte = 0  # stream byte offset where the pending window's text begins
        self.token_start = 0
        self.window_index = 0
        self.lead = 0  # context tokens in front of the first window (a segment's lead-in: rpt_data.segments)

    def add(self, ids: np.ndarray, ends: np.ndarray, data: bytes) -> list[Window]:
        """The stream's next tokens (`ends`: byte ends within the stream) and next bytes of its text."""
        self.ids = np.concatenate([self.ids, ids])
        self.ends = np.concatenate([self.ends, ends])
        self.buf += data
        out = []
        while len(self.ids) >= self.window:
            out.append(self._emit(self.window))
        return out

    def finish(self) -> list[Window]:
        """The stream's last window, when it still holds tokens that were not scored."""
        n = len(self.ids)
        already = self.lead if self.window_index == 0 else self.prefix
        out = [self._emit(n)] if n > already else []
        self.doc_id = None
        return out

    def _emit(self, n: int) -> Window:
        first = self.window_index == 0
        ends = self.ends[:n]
        lo = self.start_byte - self.buf_base
        text = bytes(self.buf[lo : int(ends[-1]) - self.buf_base]).decode("utf-8")
        w = Window(
            doc_id=self.doc_id, window_index=self.window_index, token_start=self.token_start, text=text,
            token_ids=self.ids[:n].copy(), token_bytes=(ends - self.start_byte).astype(np.int32),
            score_start=max(self.first_scored, self.lead) if first else max(self.prefix, self.first_scored),
        )
        drop = n - self.prefix if n == self.window else n
        if drop > 0:
            self.start_byte = int(self.ends[drop - 1])
            self.ids, self.ends = self.ids[drop:], self.ends[drop:]
            self.token_start += drop
            del self.buf[: self.start_byte - self.buf_base]
            self.buf_base = self.start_byte
        self.window_index += 1
        return w


def _release_freed_memory() -> None:
    """Hand memory freed by the last span back to the OS (glibc's malloc_trim; nothing elsewhere). Without it,
    glibc's growing mmap threshold puts each span's large buffers on the heap, and RSS creeps up span by span."""


try:
    import ctypes

    _libc = ctypes.CDLL("libc.so.6")
    _release_freed_memory = functools.partial(_libc.malloc_trim, 0)  # noqa: F811
except (OSError, AttributeError):
    pass


def _char_floor(data: bytes | bytearray, pos: int) -> int:
    """The largest character boundary <= pos in UTF-8 `data`."""
    while 0 < pos < len(data) and (data[pos] & 0xC0) == 0x80:
        pos -= 1
    return pos


@dataclass(slots=True)
class _Span:
    lo: int  # stream byte offsets of the tokenized text [lo, hi)
    hi: int
    ids: np.ndarray
    ends: np.ndarray  # stream byte ends

    def starts(self) -> np.ndarray:
        return np.concatenate([[self.lo], self.ends[:-1]]) if len(self.ends) else self.ends


class LongStream:
    """The tokens of a stream longer than `span_bytes`, equal to its whole-text tokenization, from spans of text.

    Span k+1 starts at a token boundary of span k about `overlap` bytes before span k's end. The stream is cut
    at a token boundary next to whitespace (never inside a word, whose tokens may depend on all of it: WordPiece
    turns an over-long word into [UNK]) where the two spans agree on >= AGREE consecutive tokens (same ids, same
    byte spans) on each side: tokens before the cut come from span k, tokens after it from span k+1, so the edge
    effects of either span (a word cut at its end, a word-start marker or prefix space at its start) never reach
    the stream's tokens. Where there is no such cut (a word longer than the overlap), span k is re-tokenized wider
    (its cut before is checked again), up to MAX_SPAN_BYTES; beyond that the stream is refused in one sentence.
    """

    def __init__(self, spans: TokenSpans, windower: StreamWindower, span_bytes: int, max_bytes: int | None = None):
        self.spans, self.w, self.doc_id = spans, windower, windower.doc_id
        self.span_bytes, self.max_bytes = span_bytes, max(max_bytes or MAX_SPAN_BYTES, 2 * span_bytes)
        self.overlap = max(1, min(span_bytes // 2, max(span_bytes // 16, 1024)))
        self.data = bytearray()  # stream bytes from self.base on
        self.base = 0
        self.cur: _Span | None = None
        self.cut = -1  # tokens ending at or before this stream byte were handed to the windower (-1: none yet)
        self.check: tuple[np.ndarray, np.ndarray] | None = None  # the agreed tokens just before `cut`
        self.wait_until = 0  # no cut agreed on in the current span: try again with this much text (a wider span)

    @property
    def end(self) -> int:
        return self.base + len(self.data)

    def feed(self, data: bytes) -> Iterator[Window]:
        self.data += data
        while (out := self._step(final=False)) is not None:
            yield from out

    def finish(self) -> Iterator[Window]:
        while (out := self._step(final=True)) is not None:
            yield from out
        yield from self.w.finish()

    def _tokenize(self, lo: int, hi: int) -> _Span:
        ids, ends = self.spans([bytes(self.data[lo - self.base : hi - self.base]).decode()],
                               names=[f"stream '{self.doc_id}' from byte {lo}"])[0]
        _release_freed_memory()
        return _Span(lo, hi, ids, ends + lo)

    def _hand_over(self, upto: int | None) -> list[Window]:
        """Give the windower the current span's tokens after `cut` up to stream byte `upto` (None: all, and the
        text to the stream's end)."""
        s = self.cur
        i = int(np.searchsorted(s.ends, self.cut, "right"))
        j = len(s.ends) if upto is None else int(np.searchsorted(s.ends, upto, "right"))
        stop = self.end if upto is None else upto
        out = self.w.add(s.ids[i:j], s.ends[i:j], bytes(self.data[max(self.cut, 0) - self.base : stop - self.base]))
        self.cut = stop
        return out

    def _step(self, final: bool) -> list[Window] | None:
        """One tokenizer call and what it settles; None when nothing can be done until more text comes."""
        if self.cur is None:  # the stream's first span starts at its true start
            if self.end == 0 or (not final and self.end < self.span_bytes):
                return None
            hi = self.end if final else _char_floor(self.data, self.span_bytes)
            self.cur = self._tokenize(0, hi)
            return []
        cur = self.cur
        if cur.hi == self.end and final:
            if self.cut == self.end:
                return None
            return self._hand_over(None)
        if not final and self.end < self.wait_until:
            return None
        starts = cur.starts()
        k = int(np.searchsorted(cur.ends, cur.hi - self.overlap, "right"))
        lo = max(self.cut, int(starts[k]) if k < len(starts) else cur.hi)
        hi = lo + self.span_bytes
        if hi > self.end and not final:
            return None
        nxt = self._tokenize(lo, self.end if hi >= self.end else _char_floor(self.data, hi - self.base) + self.base)
        cut = _agreed_cut(cur, nxt, self.data, self.base)
        if cut is not None:
            out = self._hand_over(cut)
            i = int(np.searchsorted(cur.ends, cut, "right"))
            self.check = (cur.ids[i - AGREE : i].copy(), cur.starts()[i - AGREE : i + 1].copy())
            self.cur = nxt
            del self.data[: nxt.lo - self.base]
            self.base = nxt.lo
            return out
        hi = self.end if cur.hi + self.span_bytes >= self.end else \
            _char_floor(self.data, cur.hi + self.span_bytes - self.base) + self.base
        if hi == cur.hi or (not final and cur.hi + self.span_bytes > self.end):
            self.wait_until = cur.hi + self.span_bytes  # the wider span needs more text
            return None
        if hi - cur.lo > self.max_bytes:
            raise UserError(
                f"stream '{self.doc_id}' cannot be tokenized in pieces: the tokenizer '{self.spans.name}' gives no "
                f"token boundary that overlapping spans agree on within {self.max_bytes:,} bytes from byte "
                f"{cur.lo} (one 'word' that long?), so its tokens could differ from the whole text's and no shard "
                "was written past it; split that text (e.g. at blank lines)")
        self.cur = wide = self._tokenize(cur.lo, hi)  # a wider span: its cut before must hold again
        self.wait_until = 0
        if self.check is not None:
            i = int(np.searchsorted(wide.ends, self.cut, "right"))
            ids, starts = self.check
            ok = i >= len(ids) and np.array_equal(wide.ids[i - len(ids) : i], ids) and \
                np.array_equal(wide.starts()[i - len(ids) : i + 1], starts)
            if not ok:
                raise UserError(
                    f"stream '{self.doc_id}' cannot be tokenized in pieces: the tokenizer '{self.spans.name}' "
                    f"changes tokens before byte {self.cut} when more text follows, so no shard was written past it; "
                    "split that text (e.g. at blank lines)")
        return []


_SPACE = frozenset(b" \t\n\r\x0b\x0c")


def _agreed_cut(a: _Span, b: _Span, data: bytearray, base: int) -> int | None:
    """The last stream byte where spans a and b (b.lo inside a) agree on >= AGREE tokens on each side and the text
    has whitespace on one side (never inside a word: a word's tokens may depend on all of it), or None."""
    a_start, b_start = a.starts(), b.starts()
    i, j, prev_j, run, cut = int(np.searchsorted(a_start, b.lo, "left")), 0, -2, 0, None
    agreed: list[int] = []  # a's token indices of the current run
    while i < len(a.ids) and j < len(b.ids):
        ka, kb = (int(a_start[i]), int(a.ends[i])), (int(b_start[j]), int(b.ends[j]))
        if ka == kb and a.ids[i] == b.ids[j]:
            if j != prev_j + 1:
                agreed = []
            agreed.append(i)
            prev_j, i, j = j, i + 1, j + 1
            if len(agreed) >= 2 * AGREE:  # a.ends[k] with AGREE agreed tokens up to it and AGREE after it
                k = agreed[-AGREE - 1]
                pos = int(a.ends[k]) - base
                if 0 < pos < len(data) and (data[pos - 1] in _SPACE or data[pos] in _SPACE):
                    cut = pos + base
            continue
        agreed, prev_j = [], -2
        if ka[1] < kb[1]:
            i += 1
        elif kb[1] < ka[1]:
            j += 1
        else:
            i, j = i + 1, j + 1
    return cut


def windows_from_pieces(
    pieces: Iterable[tuple[str, str, bool]], tokenizer, window: int, context_prefix: int, batch: int = 256,
    has_bos: bool = False, span_bytes: int | None = None,
) -> Iterator[Window]:
    """pieces: (doc_id, text, new_stream). Yields windows in stream order, each stream tokenized as one text.

    Streams of at most `span_bytes` (default SPAN_BYTES) are tokenized whole, up to `batch` of them and
    `span_bytes` of text per call; a longer stream goes through `LongStream`. So the tokenizer never holds
    much more than `span_bytes` of text, however long a stream or a file is.
    """
    span = span_bytes or SPAN_BYTES
    spans = tokenizer if isinstance(tokenizer, TokenSpans) else TokenSpans(tokenizer)
    w = StreamWindower(window, context_prefix, has_bos)
    queue: list[tuple[str, bytes]] = []  # whole short streams, tokenized together
    queued = 0
    doc_id, parts, size, long = None, [], 0, None

    def flush() -> Iterator[Window]:
        nonlocal queued
        for (d, data), (ids, ends) in zip(queue, spans([data.decode() for _, data in queue],
                                                              names=[f"stream '{d}'" for d, _ in queue])):
            w.start(d)
            yield from w.add(ids, ends, data)
            yield from w.finish()
        queue.clear()
        queued = 0

    def end_stream() -> Iterator[Window]:
        nonlocal queued
        if long is not None:
            yield from long.finish()
        elif doc_id is not None:
            queue.append((doc_id, b"".join(parts)))
            queued += size
            if queued >= span or len(queue) >= batch:
                yield from flush()

    for piece_id, text, new in pieces:
        data = text.encode("utf-8")
        if new or doc_id is None:
            yield from end_stream()
            doc_id, parts, size, long = piece_id, [], 0, None
        if long is not None:
            yield from long.feed(data)
            continue
        parts.append(data)
        size += len(data)
        if size > span:  # too long to tokenize whole: earlier streams first, then this one in spans
            yield from flush()
            w.start(doc_id)
            long = LongStream(spans, w, span)
            yield from long.feed(b"".join(parts))
            parts = []
    yield from end_stream()
    yield from flush()
