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
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class Window:
    doc_id: str
    window_index: int
    token_start: int  # index of token_ids[0] within its stream
    text: str
    token_ids: np.ndarray  # int32 [n]
    token_bytes: np.ndarray  # int32 [n], byte end of each token inside `text`
    score_start: int


def char_to_byte(text: str) -> np.ndarray:
    """[len(text) + 1] UTF-8 byte offset of each character index."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    lens = 1 + (cp >= 0x80).astype(np.int64) + (cp >= 0x800) + (cp >= 0x10000)
    out = np.zeros(len(cp) + 1, dtype=np.int64)
    np.cumsum(lens, out=out[1:])
    return out


def tokenize_batch(tokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids int32, byte ends int64 relative to the text) per text; one batched tokenizer call.

    Byte ends come from character offsets, so they fall on character boundaries: a token that is
    part of a multi-byte character ends where that character ends (later parts get zero width).
    """
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    out = []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        c2b = char_to_byte(text)
        ends = c2b[np.asarray([e for _, e in offsets], dtype=np.int64)] if offsets else np.zeros(0, np.int64)
        out.append((np.asarray(ids, dtype=np.int32), np.maximum.accumulate(ends) if len(ends) else ends))
    return out


class StreamWindower:
    """Accumulates one stream's tokens and bytes; emits windows as soon as they are full."""

    def __init__(self, window: int, context_prefix: int, has_bos: bool = False):
        self.window, self.prefix = window, context_prefix
        self.first_scored = 0 if has_bos else 1  # the first window position that has context
        self.doc_id: str | None = None

    def start(self, doc_id: str) -> None:
        self.doc_id = doc_id
        self.ids = np.zeros(0, np.int32)
        self.ends = np.zeros(0, np.int64)  # global byte ends within the stream
        self.buf = bytearray()
        self.buf_base = 0  # stream byte offset of buf[0]
        self.stream_bytes = 0
        self.start_byte = 0  # stream byte offset where the pending window's text begins
        self.token_start = 0
        self.window_index = 0

    def add(self, ids: np.ndarray, ends: np.ndarray, text: str) -> list[Window]:
        data = text.encode("utf-8")
        self.ids = np.concatenate([self.ids, ids])
        self.ends = np.concatenate([self.ends, ends + self.stream_bytes])
        self.buf += data
        self.stream_bytes += len(data)
        out = []
        while len(self.ids) >= self.window:
            out.append(self._emit(self.window))
        return out

    def finish(self) -> list[Window]:
        """The stream's last window, when it still holds tokens that were not scored."""
        n = len(self.ids)
        already = 0 if self.window_index == 0 else self.prefix
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
            score_start=self.first_scored if first else max(self.prefix, self.first_scored),
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


def windows_from_pieces(
    pieces: Iterable[tuple[str, str, bool]], tokenizer, window: int, context_prefix: int, batch: int = 256,
    has_bos: bool = False,
) -> Iterator[Window]:
    """pieces: (doc_id, text, new_stream). Tokenizes in batches and yields windows in stream order."""
    w = StreamWindower(window, context_prefix, has_bos)
    pending: list[tuple[str, str, bool]] = []

    def flush():
        for (doc_id, text, new), (ids, ends) in zip(pending, tokenize_batch(tokenizer, [p[1] for p in pending])):
            if new:
                if w.doc_id is not None:
                    yield from w.finish()
                w.start(doc_id)
            yield from w.add(ids, ends, text)
        pending.clear()

    for piece in pieces:
        pending.append(piece)
        if len(pending) >= batch:
            yield from flush()
    yield from flush()
    if w.doc_id is not None:
        yield from w.finish()
