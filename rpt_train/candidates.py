"""The candidate table: every usable scored position of a shard set in a compact row-grouped (CSR) layout,
about 4 bytes per position (uint16 t, float16 entropy, 1 selected bit) plus 17 bytes per window."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rpt_common.errors import UserError


@dataclass(kw_only=True, slots=True)
class Candidates:
    """Scored positions, grouped by window: window r owns positions offsets[r]:offsets[r + 1]."""

    row_shard: np.ndarray  # int32 [R]: index into ShardSet.paths
    row_index: np.ndarray  # int32 [R]: row inside that shard
    row_heldout: np.ndarray  # bool [R]: the window's document is in the held-out split
    offsets: np.ndarray  # int64 [R + 1]
    t: np.ndarray  # uint16 [N] (uint32 past 65,535 tokens per window): token predicted from x<t
    value: np.ndarray  # float16 [N]: entropy (nats), rounded so that `value > cut` is exact for the build's cuts
    selected_bits: np.ndarray  # uint8 [ceil(N / 8)]: the tagger's `selected`, little-endian bit order

    def __len__(self) -> int:
        return len(self.t)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k).nbytes for k in self.__slots__)

    def row_of(self, idx) -> np.ndarray:
        """Window (index into the row_* arrays) of each candidate index."""
        return np.searchsorted(self.offsets, np.asarray(idx, dtype=np.int64), side="right") - 1

    def per_position(self, row_values: np.ndarray) -> np.ndarray:
        return np.repeat(row_values, np.diff(self.offsets))

    # Per-position views (N-sized temporaries, for selection and tests; the table itself stays compact).
    @property
    def selected(self) -> np.ndarray:
        return np.unpackbits(self.selected_bits, count=len(self), bitorder="little").astype(bool)

    @property
    def heldout(self) -> np.ndarray:
        return self.per_position(self.row_heldout)

    @property
    def shard(self) -> np.ndarray:
        return self.per_position(self.row_shard)

    @property
    def row(self) -> np.ndarray:
        return self.per_position(self.row_index)

    def above(self, cut: float) -> np.ndarray:
        """value > cut, compared in float64 (exact for the cuts the table was built with)."""
        return self.value > np.float64(cut)

    def take(self, mask: np.ndarray) -> "Candidates":
        """The candidates where the boolean `mask` is true, order kept; windows left empty are dropped."""
        mask = np.asarray(mask, dtype=bool)
        kept = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        counts = kept[self.offsets[1:]] - kept[self.offsets[:-1]]
        rows = counts > 0
        return Candidates(row_shard=self.row_shard[rows], row_index=self.row_index[rows],
                          row_heldout=self.row_heldout[rows], offsets=_offsets(counts[rows]), t=self.t[mask],
                          value=self.value[mask], selected_bits=np.packbits(self.selected[mask], bitorder="little"))

    @staticmethod
    def concat(parts: list["Candidates"]) -> "Candidates":
        if not parts:
            return Candidates.concat([_empty()])
        counts = np.concatenate([np.diff(p.offsets) for p in parts])
        cat = {k: np.concatenate([getattr(p, k) for p in parts]) for k in ("row_shard", "row_index", "row_heldout",
                                                                           "t", "value")}
        selected = np.concatenate([p.selected for p in parts])
        return Candidates(**cat, offsets=_offsets(counts), selected_bits=np.packbits(selected, bitorder="little"))


class TableSink:
    """A Candidates table appended part by part (a row group's at a time) to unlinked scratch files and read back
    memory-mapped: building holds one part in memory, and the positions (t, value, a selected byte: 5 bytes each)
    live in the page cache, not in the process's heap; only the per-window arrays (17 bytes a window) and the
    packed selected bits (1 bit a position) are in memory. The files vanish with the process."""

    def __init__(self, directory: str | None = None):
        self.directory = directory or self.scratch_dir()
        self.files = {k: tempfile.TemporaryFile(dir=self.directory) for k in ("t", "value", "selected")}
        self.rows: dict[str, list[np.ndarray]] = {"row_shard": [], "row_index": [], "row_heldout": []}
        self.counts: list[np.ndarray] = []
        self.n, self.t_dtype, self.value_dtype = 0, np.dtype(np.uint16), None

    @staticmethod
    def scratch_dir() -> str:
        """Where scratch tables go: $RPT_SCRATCH, else the temporary directory ($TMPDIR)."""
        return os.environ.get("RPT_SCRATCH") or tempfile.gettempdir()

    @staticmethod
    def scratch(directory: str, name: str, dtype, n: int) -> np.ndarray:
        """A writable memory-mapped array of n elements in an unlinked file under `directory`."""
        if n == 0:
            return np.zeros(0, dtype)
        f = tempfile.TemporaryFile(dir=directory, prefix=f"rpt-{name}-")
        f.truncate(n * np.dtype(dtype).itemsize)
        return np.memmap(f, dtype=dtype, mode="r+", shape=(n,))

    def add(self, part: Candidates) -> None:
        if len(part) and part.t.dtype.itemsize > self.t_dtype.itemsize:  # a row past 65,535 tokens: widen
            self.t_dtype = self._widen("t", self.t_dtype, part.t.dtype)
        if len(part) and self.value_dtype is None:
            self.value_dtype = part.value.dtype
        if len(part) and part.value.dtype.itemsize > self.value_dtype.itemsize:  # float32 (cuts too close)
            self.value_dtype = self._widen("value", self.value_dtype, part.value.dtype)
        self.files["t"].write(part.t.astype(self.t_dtype).tobytes())
        self.files["value"].write(part.value.astype(self.value_dtype or part.value.dtype).tobytes())
        self.files["selected"].write(part.selected.astype(np.uint8).tobytes())
        for k in self.rows:
            self.rows[k].append(getattr(part, k))
        self.counts.append(np.diff(part.offsets))
        self.n += len(part)

    WIDEN_BLOCK = 8 << 20  # entries converted at a time: the heap holds one block, not the file (10 GB at 1B)

    def _widen(self, name: str, was, dtype) -> np.dtype:
        """Rewrite file `name` from dtype `was` to the wider `dtype` (as np.concatenate would upcast), a block at a
        time into a new unlinked file that replaces it."""
        was, dtype = np.dtype(was), np.dtype(dtype)
        old, new = self.files[name], tempfile.TemporaryFile(dir=self.directory)
        old.flush()
        old.seek(0)
        while block := old.read(self.WIDEN_BLOCK * was.itemsize):
            new.write(np.frombuffer(block, dtype=was).astype(dtype).tobytes())
        old.close()
        self.files[name] = new
        return dtype

    def _map(self, name: str, dtype) -> np.ndarray:
        f = self.files[name]
        f.flush()
        return np.memmap(f, dtype=dtype, mode="r", shape=(self.n,)) if self.n else np.zeros(0, dtype)

    def finish(self) -> Candidates:
        selected = self._map("selected", np.uint8)
        step = 8 << 20  # packed in blocks of whole bytes: no n-sized temporary
        bits = np.concatenate([np.packbits(selected[i:i + step], bitorder="little")
                               for i in range(0, self.n, step)] or [np.zeros(0, np.uint8)])
        rows = {k: np.concatenate(v) if v else getattr(_empty(), k) for k, v in self.rows.items()}
        counts = np.concatenate(self.counts) if self.counts else np.zeros(0, np.int64)
        return Candidates(**rows, offsets=_offsets(counts), t=self._map("t", self.t_dtype),
                          value=self._map("value", self.value_dtype or np.float16), selected_bits=bits)


def shuffled(n: int, seed, directory: str | None = None, *, out: np.ndarray | None = None) -> np.ndarray:
    """np.random.default_rng(seed).permutation(n), as uint32 below 2**32 (4 bytes a candidate; shuffling it draws
    what shuffling Generator.permutation's int64 arange does: the same order), in a memory-mapped scratch file under
    `directory` when given (page cache, not the heap), or into `out` (n entries of that dtype, e.g. a scratch file
    reused for each epoch), filled a block at a time and shuffled in place."""
    dtype = np.uint32 if n < 2**32 else np.int64
    if out is not None:
        perm = out
    else:
        perm = TableSink.scratch(directory, "order", dtype, n) if directory else np.empty(n, dtype=dtype)
    step = 1 << 16  # filled in blocks of 256 KiB: no n-sized temporary
    for i in range(0, n, step):
        perm[i:i + step] = np.arange(i, min(i + step, n), dtype=dtype)
    # a plain ndarray view: Generator.shuffle swaps a memmap (an ndarray subclass) element by element in Python
    np.random.default_rng(seed).shuffle(perm.view(np.ndarray))
    return perm


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _empty() -> Candidates:
    return Candidates(row_shard=np.zeros(0, np.int32), row_index=np.zeros(0, np.int32),
                      row_heldout=np.zeros(0, bool), offsets=np.zeros(1, np.int64), t=np.zeros(0, np.uint16),
                      value=np.zeros(0, np.float16), selected_bits=np.zeros(0, np.uint8))


def to_float16(values: np.ndarray, cuts=()) -> np.ndarray:
    """float32 -> float16 (nearest), nudged by at most two float16 steps next to each cut c so that `v > c`
    keeps its answer whether it is asked in float16 (numpy's rule for a Python float), float32 or float64.
    Cuts too close together for that (under float16 resolution): float32 values, exact as they are."""
    out = values.astype(np.float16)
    wide = values.astype(np.float64)
    for c in cuts:
        c = float(c)
        if not abs(c) < float(np.finfo(np.float16).max):  # every stored entropy is on one side already
            continue
        near = (float(np.float16(c)), float(np.float32(c)), c)
        down, up = np.float16(min(near)), np.float16(max(near))
        if float(down) > min(near):
            down = np.nextafter(down, np.float16(-np.inf))
        if float(up) <= max(near):
            up = np.nextafter(up, np.float16(np.inf))
        above = wide > c
        out = np.where(above, np.maximum(out, up), np.minimum(out, down)).astype(np.float16)
    for c in cuts:  # two cuts within a few float16 steps of each other can undo one another's nudge
        truth = wide > float(c)
        if not all(np.array_equal(out > k, truth) for k in (np.float64(c), np.float32(c), float(c))):
            return values.astype(np.float32)  # (a Python float is compared in float16: numpy's rule)
    return out


def _flat(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(per-row list lengths, flattened values as numpy; nulls -> NaN for floats) of a list column."""
    col = table.column(name).combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
    return lengths, pc.list_flatten(col).to_numpy(zero_copy_only=False)


def candidates_of(table: pa.Table, metric: str, shard: int, row0: int, heldout: np.ndarray,
                  cuts=(), dropped: np.ndarray | None = None) -> tuple[Candidates, int]:
    """Candidates of one row group (rows row0.. of `shard`): positions t >= max(score_start, 1) with a finite
    `metric` whose proxy token has a byte width (a later piece of a multi-byte character has none: its context
    and continuation are its neighbour's); rows flagged in `dropped` give none. Returns them and the number of
    zero-width positions left out."""
    lengths, flat = _flat(table, metric)
    flat = flat.astype(np.float32)
    tb_lengths, tb = _flat(table, "token_bytes")
    if not np.array_equal(lengths, tb_lengths):
        raise UserError(f"a shard row of shard {shard} has {metric} and token_bytes of different lengths; "
                        "it was not written by rpt-data, rerun `rpt-data tag`")
    starts = _offsets(lengths)
    parent = np.repeat(np.arange(len(lengths)), lengths)
    t = np.arange(len(flat)) - starts[parent]
    score_start = table.column("score_start").to_numpy()
    scored = (t >= np.maximum(score_start[parent], 1)) & np.isfinite(flat)
    zero_width = np.zeros(len(flat), dtype=bool)
    zero_width[1:] = tb[1:] == tb[:-1]
    zero_width &= t >= 1  # t = 0 compares with the previous row's last token: never a zero width
    keep = scored & ~zero_width
    if dropped is not None:
        keep &= ~dropped[parent]
    sel_lengths, sel = _flat(table, "selected")
    sel_flag = np.zeros(len(flat), dtype=bool)
    sel_parent = np.repeat(np.arange(len(sel_lengths)), sel_lengths)
    ok = (sel >= 0) & (sel < lengths[sel_parent])
    sel_flag[starts[sel_parent[ok]] + sel[ok]] = True
    counts = np.bincount(parent[keep], minlength=len(lengths))
    rows = counts > 0
    t_type = np.uint16 if len(lengths) == 0 or lengths.max() <= np.iinfo(np.uint16).max else np.uint32
    cands = Candidates(row_shard=np.full(int(rows.sum()), shard, np.int32),
                       row_index=(np.flatnonzero(rows) + row0).astype(np.int32), row_heldout=heldout[rows],
                       offsets=_offsets(counts[rows]), t=t[keep].astype(t_type), value=to_float16(flat[keep], cuts),
                       selected_bits=np.packbits(sel_flag[keep], bitorder="little"))
    return cands, int((scored & zero_width).sum())
