"""Continuous streams cut into segments: the unit of division between ranks in continuous mode.

A continuous stream (one input file) of a format whose reader gives each record's file offset (plain jsonl: each
line; text: each ~1 MiB block) and larger than SEGMENT_BYTES on disk is cut into segments: segment k holds the records
(or blocks) that start at file bytes [k, k + 1) x SEGMENT_BYTES. The cuts depend on the file alone (never on the world
size), so 1 rank and N ranks cut the same segments and write the same windows; a stream no larger than SEGMENT_BYTES
(and a .gz, parquet or hf input, whose readers give no byte offset) is one segment, tokenized as before.

Each segment is tokenized on its own, with a bounded lead-in (L = max(LEAD_BYTES, 64 x context_prefix) bytes of the
stream text before it) and tail (2 x LEAD_BYTES after it):
- the junction at cut c (a stream text byte, where a segment's first record or block starts) is the first token
  boundary t >= c of the junction span J = tokens of text [c - 2L, c + 3 LEAD_BYTES): both segments that meet there
  compute the same J from the same bytes, so they agree on t without talking;
- segment k's run is the text [c_k - L, c_k+1 + 2 LEAD_BYTES) tokenized as a long stream (`LongStream`); it scores the
  tokens ending in (t_k, t_k+1], and its first window takes the `context_prefix` tokens before t_k as context;
- the run's tokens around each junction (the context, and AGREE tokens on either side of t) must equal J's there
  (same ids, same byte spans): two tokenizations that start and end at different bytes agree, as `LongStream` asks
  of its spans, so they are the whole stream's tokens. Where they do not (a "word" longer than the lead-in), the run
  is refused in one sentence.
So every position of the stream is scored exactly once, with min(t, context_prefix) real tokens before it, and a
rank tokenizes only its segments plus about 5 L bytes per segment. A segment after the stream's first is its own
document: doc_id `PATH:segmentK`, window_index and token_start counted from its first window (token 0 = its first
context token). A rank of a `segments` division reads a cut file from its segments' byte ranges (`read_segments`):
it parses its segments' records plus a bounded number per run of them.
"""
from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator

from dataclasses import dataclass, field

import numpy as np

from rpt_common.errors import UserError
from rpt_data.division import Division
from rpt_data.windows import AGREE, SPAN_BYTES, LongStream, StreamWindower, TokenSpans, Window, windows_from_pieces

SEGMENT_BYTES = 64 << 20  # file bytes per segment of a continuous stream
LEAD_BYTES = 4 << 10  # the junction's lead-in (at least; x 64 tokens of context prefix) and tail unit


@dataclass(frozen=True, slots=True)
class SegmentDivision(Division):
    """`segments`: this rank tokenizes the segments in `units` ((path, k) pairs) of the files it reads; `owner` (as
    recorded) holds the rank of every segment of the run, one list per input file (a file not cut: one segment)."""
    units: frozenset = frozenset()
    counts: dict = field(default_factory=dict)  # path -> its segment count, for every cut file of the run

    def owns_unit(self, path: str, k: int) -> bool:
        return (path, k) in self.units  # a file that is not cut is its segment 0

    def describe(self) -> dict:
        return {"by": self.by, "files": [p for p, _ in self.files],
                "segments": [[p, k] for p, k in sorted(self.units)]} | \
            ({"owner": [list(o) for o in self.owner]} if self.owner is not None else {})


def cuttable(path: str, fmt: str) -> bool:
    """Whether the reader of this input gives each record's file offset (so the file can be cut into segments)."""
    return fmt in ("jsonl", "text") and not path.endswith(".gz")


def segment_sizes(files: list, sizes: list[int]) -> list[list[int]]:
    """The byte size of each segment of each file (one entry: the file is not cut)."""
    s = SEGMENT_BYTES
    return [[min(s, b - k * s) for k in range(-(-b // s))] if cuttable(p, f) and b > s else [b]
            for (p, f), b in zip(files, sizes)]


def cut_counts(files: list) -> dict[str, int]:
    """path -> segment count of each file of `files` ((path, format)) that is cut into segments (sizes on disk)."""
    import os

    counts = {}
    for p, f in files:
        if cuttable(p, f) and os.path.isfile(p):
            n = len(segment_sizes([(p, f)], [os.path.getsize(p)])[0])
            if n > 1:
                counts[p] = n
    return counts


def segment_of(count: int, offset: int) -> int:
    """The segment of a record starting at file byte `offset` of a file of `count` segments."""
    return 0 if count <= 1 or offset < 0 else min(offset // SEGMENT_BYTES, count - 1)


def segment_doc_id(source: str, k: int, first: bool) -> str:
    return source if first else f"{source}:segment{k}"


class _Junction:
    """The tokens of the junction span around cut `c` and the boundary t both segments use."""

    def __init__(self, spans: TokenSpans, data: bytes, base: int, end: int, c: int, lead: int, name: str):
        lo, hi = max(0, c - 2 * lead), min(end, c + 3 * LEAD_BYTES)
        lo, hi = _char(data, lo - base) + base, _char(data, hi - base) + base
        ids, ends = spans([data[lo - base : hi - base].decode()], names=[f"stream '{name}' from byte {lo}"])[0]
        ends = ends + lo
        trusted = np.ones(len(ids), bool)
        if lo > 0:  # the span's first tokens may see its start (a word cut, a word-start marker)
            trusted[:AGREE] = False
        if hi < end:
            trusted[-AGREE:] = False
        self.ids, self.ends, self.trusted = ids, ends, trusted
        after = ends[(ends >= c) & trusted]
        if len(after) and (hi == end or after[0] <= c + LEAD_BYTES):
            self.t = int(after[0])
        elif hi == end and not ((ends >= c) & ~trusted).any():
            self.t = end  # nothing but untokenized whitespace after the cut
        else:
            raise UserError(f"stream '{name}' cannot be cut into segments at byte {c}: no token boundary within "
                            f"{LEAD_BYTES:,} bytes after it (one 'word' that long?); split that text (e.g. at blank lines)")
        self.c, self.name = c, name

    def check(self, ends: np.ndarray, ids: np.ndarray, name: str, what: str) -> None:
        """The run's tokens (byte ends, ids) here must be J's, where J's are trusted (away from its ends)."""
        n = len(ends)
        if not n:
            return
        for j in np.nonzero(self.ends == ends[0])[0].tolist():  # several byte pieces of one character share an end
            if (j + n <= len(self.ends) and self.trusted[j : j + n].all() and np.array_equal(self.ends[j : j + n], ends)
                    and np.array_equal(self.ids[j : j + n], ids)):
                return
        self.fail(what, int(ends[0]))

    def fail(self, what: str, byte: int) -> None:
        raise UserError(f"stream '{self.name}' cannot be cut into segments at byte {self.c}: the tokens of {what} "
                        f"differ with another lead-in (at byte {byte}), so the cut could change them; split that "
                        "text (e.g. at blank lines) or put it in a file of its own")


def _char(data: bytes, pos: int) -> int:
    while 0 < pos < len(data) and (data[pos] & 0xC0) == 0x80:
        pos -= 1
    return pos


class _Run:
    """Between LongStream (tokenizing a segment's run, from byte r0) and the windower: the context tokens before t0
    seed the windower; tokens ending in (t0, t1] go on; the tokens around both junctions are checked."""

    def __init__(self, w: StreamWindower, doc_id: str, r0: int, start: _Junction | None, stop: _Junction | None,
                 prefix: int, name: str):
        self.w, self.doc_id, self.r0, self.start, self.stop, self.prefix, self.name = w, doc_id, r0, start, stop, prefix, name
        self.t0 = start.t if start else r0
        self.t1 = stop.t if stop else None
        self.ids, self.ends, self.buf = np.zeros(0, np.int32), np.zeros(0, np.int64), bytearray()  # before starting
        self.started = False
        self.tail_ids, self.tail_ends = np.zeros(0, np.int32), np.zeros(0, np.int64)  # the last tokens kept + after t1
        w.start(doc_id)

    def add(self, ids: np.ndarray, ends: np.ndarray, data: bytes) -> list[Window]:
        ends = ends + self.r0
        if not self.started:
            self.ids, self.ends = np.concatenate([self.ids, ids]), np.concatenate([self.ends, ends])
            self.buf += data
            if int((self.ends > self.t0).sum()) < AGREE:
                return []
            return self._begin()
        return self._pass(ids, ends, data)

    def finish(self) -> list[Window]:
        out = [] if self.started else self._begin()
        if self.stop is not None:  # a run token ends at t1 (unless only whitespace follows), as J's tokens there
            e, ids = self.tail_ends, self.tail_ids
            k = int(np.searchsorted(e, self.t1, "right"))
            if k < len(e) and (k == 0 or e[k - 1] != self.t1):
                self.stop.fail("the end of a segment", self.t1)
            self.stop.check(e[max(0, k - AGREE) : k + AGREE], ids[max(0, k - AGREE) : k + AGREE], self.name,
                            "the end of a segment")
        return out + self.w.finish()

    def _begin(self) -> list[Window]:
        self.started = True
        i = int(np.searchsorted(self.ends, self.t0, "right"))  # tokens ending at or before t0: the lead-in
        if self.start is not None:
            if i < len(self.ends) and (i == 0 or self.ends[i - 1] != self.t0):  # a run token straddles t0
                self.start.fail("a segment's lead-in", self.t0)
            lo = max(0, i - self.prefix)
            if self.r0 > 0 and lo == 0:  # too few tokens in the lead-in for the context the stream has there
                raise UserError(f"stream '{self.name}' cannot be cut into segments at byte {self.start.c}: the "
                                f"{self.start.c - self.r0:,} bytes before it hold fewer than {self.prefix + 1} tokens; "
                                "split that text (e.g. at blank lines) or put it in a file of its own")
            self.start.check(self.ends[max(0, lo - 1) : i + AGREE], self.ids[max(0, lo - 1) : i + AGREE], self.name,
                             "a segment's lead-in")
        else:
            lo = 0
        origin = int(self.ends[lo - 1]) if lo else self.r0  # the first context token's start
        w = self.w
        w.lead = i - lo
        w.start_byte = w.buf_base = origin
        ids, ends, data = self.ids[i:], self.ends[i:], bytes(self.buf[origin - self.r0 :])
        w.ids, w.ends, w.buf = self.ids[lo:i].copy(), self.ends[lo:i].copy(), bytearray()
        self.ids = self.ends = self.buf = None
        return self._pass(ids, ends, data)

    def _pass(self, ids: np.ndarray, ends: np.ndarray, data: bytes) -> list[Window]:
        if self.t1 is not None:  # the tokens around t1, for the check at the end
            e, d = np.concatenate([self.tail_ends, ends]), np.concatenate([self.tail_ids, ids])
            k = int(np.searchsorted(e, self.t1, "right"))
            lo = max(0, k - AGREE - 1)
            self.tail_ends, self.tail_ids = e[lo : k + AGREE], d[lo : k + AGREE]
            keep = int(np.searchsorted(ends, self.t1, "right"))
            ids, ends = ids[:keep], ends[:keep]
        return self.w.add(ids, ends, data)


def segment_windows(records: Iterable, counts: dict[str, int], owned: Callable[[str, int], bool], separator: str,
                    tokenizer, window: int, context_prefix: int, has_bos: bool = False,
                    span_bytes: int | None = None) -> Iterator[Window]:
    """Continuous-mode windows of `records` (one stream per source): the streams of files in `counts` (file ->
    its segment count, > 1) cut into segments, each segment's windows only where `owned(file, k)`; the other
    streams as `windows_from_pieces` makes them."""
    spans = tokenizer if isinstance(tokenizer, TokenSpans) else TokenSpans(tokenizer)
    for cut, group in itertools.groupby(records, key=lambda r: r.source in counts):
        if not cut:
            yield from windows_from_pieces(_pieces(group, separator), spans, window, context_prefix,
                                           has_bos=has_bos, span_bytes=span_bytes)
            continue
        for source, stream in itertools.groupby(group, key=lambda r: r.source):
            yield from _Cutter(source, counts[source], owned, spans, window, context_prefix, has_bos,
                               span_bytes or SPAN_BYTES).run(stream, separator)


def _pieces(records, separator: str):
    source = None
    for r in records:
        new = r.source != source
        source = r.source
        yield r.source, (r.text if new or r.cont else separator + r.text), new


class _Cutter:
    """One cut stream: its text arrives piece by piece; each owned segment is tokenized once its junction after it
    is known (2 x LEAD_BYTES after the next cut, or the stream's end)."""

    def __init__(self, source, count, owned, spans, window, prefix, has_bos, span_bytes):
        self.source, self.count, self.owned, self.spans = source, count, owned, spans
        self.window, self.prefix, self.has_bos, self.span_bytes = window, prefix, has_bos, span_bytes
        self.lead = lead_bytes(prefix)
        self.data, self.base, self.pos = bytearray(), 0, 0
        self.cuts: list[tuple[int, int]] = []  # (stream byte, segment) where each segment of the stream starts
        self.next = 0  # the first segment not yet done

    def run(self, records, separator: str) -> Iterator[Window]:
        first = True
        for r in records:
            text = (r.text if first or r.cont else separator + r.text).encode()
            first = False
            k = segment_of(self.count, r.offset)
            if not self.cuts or k > self.cuts[-1][1]:
                self.cuts.append((self.pos, k))
            self.data += text
            self.pos += len(text)
            yield from self._ready(final=False)
        yield from self._ready(final=True)

    def _ready(self, final: bool) -> Iterator[Window]:
        while self.next < len(self.cuts):
            i = self.next
            last = i + 1 == len(self.cuts)
            if last and not final:
                break
            if self.owned(self.source, self.cuts[i][1]):
                if not last and not final and self.pos < self.cuts[i + 1][0] + 3 * LEAD_BYTES:
                    break
                yield from self._segment(i, last)
            self.next += 1
        if self.next < len(self.cuts):  # keep what the next segments need: from 2L before the first of them
            i = self.next
            keep = self.cuts[i][0] if self.owned(self.source, self.cuts[i][1]) else self.pos
            keep = _char(self.data, max(self.base, keep - 2 * self.lead) - self.base) + self.base  # a character's start
            del self.data[: keep - self.base]
            self.base = keep

    def _segment(self, i: int, last: bool) -> Iterator[Window]:
        c, k = self.cuts[i]
        data, base, end = bytes(self.data), self.base, self.pos
        name = self.source
        start = None if i == 0 else _Junction(self.spans, data, base, end, c, self.lead, name)
        stop = None if last else _Junction(self.spans, data, base, end, self.cuts[i + 1][0], self.lead, name)
        r0 = 0 if i == 0 else _char(data, max(0, c - self.lead) - base) + base
        r1 = end if last else _char(data, min(end, self.cuts[i + 1][0] + 2 * LEAD_BYTES) - base) + base
        w = StreamWindower(self.window, self.prefix, self.has_bos)
        run = _Run(w, segment_doc_id(self.source, k, i == 0), r0, start, stop, self.prefix, name)
        long = LongStream(self.spans, run, self.span_bytes)
        yield from long.feed(data[r0 - base : r1 - base])
        yield from long.finish()


def divide_segments(files: list, sizes: list[int], mode: str, limit: int | None, rank: int, world_size: int,
                    owner: list | None = None):
    """The `segments` division (continuous mode, no --limit, a file cut into segments, at least as many segments
    as ranks): segments dealt by size with `balance`, each rank reading the files it holds a segment of; else None
    (the division of rpt_data.division.divide applies). `owner`: the rank of every segment (one list per file) as a
    record of this run gives it; when it has each file's segment count now, it stands (a resume keeps its deal: a
    file fixed in place to the same segment count moves no segment, whatever the new sizes)."""
    from rpt_data.division import balance

    if mode != "continuous" or limit is not None or world_size == 1:
        return None
    per_file = segment_sizes(files, sizes)
    if all(len(s) == 1 for s in per_file):
        return None
    units = [(i, k, b) for i, s in enumerate(per_file) for k, b in enumerate(s)]
    if len(units) < world_size:
        return None
    pinned = isinstance(owner, list) and len(owner) == len(per_file) and all(
        isinstance(o, list) and len(o) == len(s) and all(type(r) is int and 0 <= r < world_size for r in o)
        for o, s in zip(owner, per_file))
    owner = [r for o in owner for r in o] if pinned else balance([b for _, _, b in units], world_size)
    mine = frozenset((files[i][0], k) for (i, k, _), r in zip(units, owner) if r == rank)
    read = [f for f, s in zip(files, per_file) if any((f[0], k) in mine for k in range(len(s)))]
    ranks = iter(owner)  # the rank of every segment, one list per file
    return SegmentDivision("segments", rank, world_size, read, [[next(ranks) for _ in s] for s in per_file],
                           units=mine, counts={p: len(s) for (p, _), s in zip(files, per_file) if len(s) > 1})


def lead_bytes(context_prefix: int) -> int:
    """L: the stream bytes a segment's run reads before its cut (the junction span reaches 2 L back)."""
    return max(LEAD_BYTES, 64 * context_prefix)


def read_segments(path: str, fmt: str, parse, count: int, owned: Callable[[int], bool],
                  context_prefix: int) -> Iterator:
    """The records (and bad records) of a file cut into `count` segments that the segments `owned` (k -> bool) and
    their junctions need, read from their byte ranges: the file's first good record (the stream's start), then for
    each run of owned segments k1..k2 a lead-in of more than 2 L stream bytes (good records' text) before the first
    record starting at k1 x SEGMENT_BYTES, the run, and more than 3 x LEAD_BYTES of text after the first record
    starting at (k2 + 1) x SEGMENT_BYTES; the bytes between are seeked over (only their newlines are counted, for
    line numbers; a text file's are also checked for damage, which ends the stream as a whole read does). The items
    given are those a whole read gives, in order, less some of other segments, so `_Cutter` cuts the same segments
    and the pipeline owns each bad record as it would (one without an offset goes with the record before it, which
    after a seek lies between runs: another rank's). A read error is retried as read_unit retries one
    (rpt_data.readers.retried: read again, the items given passed over); one that does not heal ends the file with
    a BadRecord at the line after the last one read."""
    from rpt_data.readers import retried

    yield from retried(path, fmt, lambda: _read_segments_once(path, fmt, parse, count, owned, context_prefix))


def _read_segments_once(path: str, fmt: str, parse, count: int, owned: Callable[[int], bool],
                        context_prefix: int) -> Iterator:
    """read_segments' items from one read of the file; a read error (OSError) is raised."""
    from rpt_data.readers import Record, read_jsonl, read_text

    lead = lead_bytes(context_prefix)
    ks = [k for k in range(count) if owned(k)]
    groups = [list(g) for _, g in itertools.groupby(enumerate(ks), key=lambda e: e[1] - e[0])]
    runs = [(g[0][1], g[-1][1]) for g in groups]  # runs of consecutive owned segments
    if not runs:
        return
    open_at = (lambda st: read_jsonl(path, parse, start=st)) if fmt == "jsonl" else \
        (lambda st: read_text(path, parse, resume=st))
    items = read_jsonl(path, parse) if fmt == "jsonl" else read_text(path, parse)
    last = None  # the last Record given
    try:
        for k1, k2 in runs:
            if last is None:  # the stream's first good record is read from the file's start, whatever its segment
                for item in items:
                    yield item
                    if isinstance(item, Record):
                        last = item
                        break
                else:
                    return
            if k1 > 0:
                state = (_jsonl_lead_in if fmt == "jsonl" else _text_lead_in)(path, parse, last, k1 * SEGMENT_BYTES,
                                                                              lead)
                if state == "end":  # damage between: a whole read ends there (another rank's bad record)
                    return
                if state is not None:
                    items.close()
                    items = open_at(state)
            end = (k2 + 1) * SEGMENT_BYTES if k2 + 1 < count else None
            tail = 0
            for item in items:
                yield item
                if isinstance(item, Record):
                    last = item
                    if end is not None and item.offset >= end:
                        tail += len(item.text.encode())
                        if tail > 3 * LEAD_BYTES:
                            break
            else:
                return
    finally:
        items.close()


def _count_newlines(f, a: int, b: int) -> int:
    f.seek(a)
    n, left = 0, b - a
    while left > 0:
        raw = f.read(min(left, 16 << 20))
        if not raw:
            break
        n += raw.count(b"\n")
        left -= len(raw)
    return n


def _jsonl_lead_in(path: str, parse, last, c: int, lead: int):
    """(line start, line number) to read from so that the good records before file byte `c` hold more than 2 `lead`
    text bytes; None when that is not past the record read last (read on)."""
    from rpt_data.readers import Record, read_jsonl, rest_of_line

    a, la = last.offset, last.line
    width = 4 * lead
    with open(path, "rb") as f:
        while True:
            p = max(a, c - width)
            if p == a:
                return None
            f.seek(p - 1)
            s = p - 1 + rest_of_line(f)  # the first line start at or after p (a long line in pieces)
            if s < c:
                line = la + _count_newlines(f, a, s)
                text = 0
                with contextlib.closing(read_jsonl(path, parse, start=(s, line))) as items:
                    for item in items:
                        if item.offset >= c:
                            break
                        if isinstance(item, Record):
                            text += len(item.text.encode())
                            if text > 2 * lead:
                                return s, line
            width *= 4


def _text_lead_in(path: str, parse, last, c: int, lead: int):
    """read_text's state before the block read at file byte j x B (B = TEXT_BLOCK_BYTES), j the last with j x B <
    `c` - 2 `lead` (the blocks from the one starting in block j - 1 hold more than 2 `lead` bytes before `c`); None
    when that is not past the end of the block read last (read on); "end" when the bytes between are damaged."""
    import codecs

    from rpt_data import readers

    block = readers.TEXT_BLOCK_BYTES
    j = (c - 2 * lead - 1) // block
    a, la = last.offset, last.line
    if (j - 1) * block < a + len(last.text.encode()):
        return None
    decoder = codecs.getincrementaldecoder("utf-8")()
    newlines = 0
    with open(path, "rb") as f:
        f.seek(a)
        pos = a
        while pos < j * block:
            raw = f.read(min(j * block, (pos // block + 1) * block) - pos)
            if not raw or b"\0" in raw:
                return "end"
            try:
                text = decoder.decode(raw)
            except UnicodeDecodeError:
                return "end"
            if pos == (j - 1) * block:  # the whole block j - 1: its last newline ends the block read from it
                cut = raw.rfind(b"\n")
                pending = decoder.getstate()[0]
                if cut >= 0:
                    carry = text[text.rfind("\n") + 1 :]
                    at, line = pos + cut + 1, la + newlines + raw.count(b"\n")
                else:
                    carry, at, line = "", j * block - len(pending), la + newlines
                return j * block, at, carry, pending, line, la - 1 + newlines + raw.count(b"\n")
            newlines += raw.count(b"\n")
            pos += len(raw)
    return None
