"""Shards -> RPT samples: candidate positions by entropy bucket, a seeded resumable order without
replacement, held-out documents, and labels cut at the policy tokenizer's boundaries."""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rpt_common.errors import UserError
from rpt_common.shards import SHARD_SCHEMA, footer_problems, read_manifest, shard_paths

BUCKET_NAMES = ("easy", "medium", "hard")
_INDEX_COLUMNS = ["doc_id", "score_start", "selected"]
_ROW_COLUMNS = ["doc_id", "window_index", "text", "token_bytes"]


@dataclass(kw_only=True, slots=True)
class Sample:
    """One RPT task: predict the continuation of `context`; any prefix of `label_tokens` (joined) scores."""

    key: str  # doc_id/window_index/t: stable across runs
    doc_id: str
    context: str
    label_tokens: list[str]  # first labels_length policy tokens of the continuation, exact text pieces
    entropy: float  # proxy entropy at the position (nats, --entropy-metric)
    bucket: str  # hardest bucket the position belongs to: hard, medium, easy or none


@dataclass(kw_only=True, slots=True)
class Candidates:
    """Scored positions of a shard set, as aligned numpy arrays."""

    shard: np.ndarray  # int32 index into ShardSet.paths
    row: np.ndarray  # int64 row inside that shard
    t: np.ndarray  # int32 position inside the row (token predicted from x<t)
    value: np.ndarray  # float32 entropy (nats)
    selected: np.ndarray  # bool: in the tagger's `selected` list
    heldout: np.ndarray  # bool: document is in the held-out split

    def take(self, mask: np.ndarray) -> "Candidates":
        return Candidates(**{k: getattr(self, k)[mask] for k in self.__slots__})

    def __len__(self) -> int:
        return len(self.t)


def is_heldout(doc_id: str, fraction: float, seed: int) -> bool:
    """Seeded split by document: a hash of (seed, doc_id) below `fraction` is held out."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def bucket_of(value: float, thresholds: list[float]) -> str:
    """Hardest bucket whose threshold the entropy exceeds (buckets are nested)."""
    name = "none"
    for b, th in zip(BUCKET_NAMES, thresholds):
        if value > th:
            name = b
    return name


class ShardSet:
    """Read-only view of an `rpt-data tag` output directory, checked against the shard schema."""

    def __init__(self, directory: str):
        self.directory = directory
        self.manifest = read_manifest(directory)
        if self.manifest.get("complete") is False:
            raise UserError(f"'{directory}' is incomplete (manifest complete: false); rerun `rpt-data tag` to finish it")
        self.paths = self._listed_paths()
        self.files = [self._open(p) for p in self.paths]
        self._cache: OrderedDict = OrderedDict()

    def _listed_paths(self) -> list[str]:
        entries = self.manifest.get("shards")
        if entries is None:
            paths = shard_paths(self.directory)
        else:
            names = [e["file"] if isinstance(e, dict) else str(e) for e in entries]
            paths = [os.path.join(self.directory, os.path.basename(n)) for n in names]
            for p in paths:
                if not os.path.exists(p):
                    raise UserError(f"shard '{p}' is listed in the manifest but missing; rerun `rpt-data tag`")
        if not paths:
            raise UserError(f"'{self.directory}' has no shards; run `rpt-data tag` first")
        return paths

    def _open(self, path: str) -> pq.ParquetFile:
        try:
            f = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"shard '{path}' is truncated or corrupt ({str(e).splitlines()[0]}); rerun `rpt-data tag`")
        schema = f.schema_arrow
        for fld in SHARD_SCHEMA:
            if fld.name not in schema.names:
                raise UserError(f"shard '{path}' has no column '{fld.name}'; it was not written by this rpt-data version")
            if not schema.field(fld.name).type.equals(fld.type):
                raise UserError(f"shard '{path}' column '{fld.name}' is {schema.field(fld.name).type}, expected {fld.type}")
        problems = footer_problems(schema.metadata, self.manifest)
        if problems:
            raise UserError(f"shard '{path}' was {problems[0]}; it does not belong to this directory "
                            "(`rpt-data validate` lists every such file)")
        entry = self._manifest_entry(path)
        if entry and "bytes" in entry and entry["bytes"] != os.path.getsize(path):
            raise UserError(f"shard '{path}' has {os.path.getsize(path)} bytes but the manifest recorded {entry['bytes']}; "
                            "it was modified or copied from another run, rerun `rpt-data tag`")
        if entry and "rows" in entry and entry["rows"] != f.metadata.num_rows:
            raise UserError(f"shard '{path}' has {f.metadata.num_rows} rows but the manifest says {entry['rows']}; "
                            "it is truncated or stale, rerun `rpt-data tag`")
        return f

    def _manifest_entry(self, path: str) -> dict | None:
        for e in self.manifest.get("shards") or []:
            if isinstance(e, dict) and os.path.basename(str(e.get("file", ""))) == os.path.basename(path):
                return e
        return None

    def _read(self, i: int, rg: int, columns: list[str]) -> pa.Table:
        try:
            return self.files[i].read_row_group(rg, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"shard '{self.paths[i]}' is corrupt (row group {rg}: {str(e).splitlines()[0]}); "
                            "rerun `rpt-data tag`")

    def candidates(self, metric: str, heldout_fraction: float = 0.0, split_seed: int = 0) -> Candidates:
        """Every scored position t >= max(score_start, 1) with a finite `metric`, in shard/row/t order."""
        parts = []
        for i, f in enumerate(self.files):
            row0 = 0
            for rg in range(f.metadata.num_row_groups):
                table = self._read(i, rg, _INDEX_COLUMNS + [metric])
                parts.append(_candidates_of(table, metric, i, row0, heldout_fraction, split_seed))
                row0 += table.num_rows
        return Candidates(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in Candidates.__slots__})

    def row(self, shard: int, row: int) -> dict:
        """doc_id, window_index, text, token_bytes of one row (row groups cached, LRU of 4)."""
        f = self.files[shard]
        rg, offset = 0, row
        while offset >= f.metadata.row_group(rg).num_rows:
            offset -= f.metadata.row_group(rg).num_rows
            rg += 1
        key = (shard, rg)
        if key not in self._cache:
            self._cache[key] = self._read(shard, rg, _ROW_COLUMNS).to_pylist()
            if len(self._cache) > 4:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key][offset]


def _candidates_of(table: pa.Table, metric: str, shard: int, row0: int, fraction: float, seed: int) -> Candidates:
    values = table.column(metric).combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(values), 0).to_numpy().astype(np.int64)
    flat = pc.list_flatten(values).to_numpy(zero_copy_only=False).astype(np.float32)
    parent = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    t = np.arange(len(flat)) - starts[parent]
    score_start = table.column("score_start").to_numpy()
    keep = (t >= np.maximum(score_start[parent], 1)) & np.isfinite(flat)
    sel = table.column("selected").combine_chunks()
    sel_len = pc.fill_null(pc.list_value_length(sel), 0).to_numpy().astype(np.int64)
    sel_keys = np.repeat(np.arange(len(sel_len)), sel_len) * (1 << 32) + pc.list_flatten(sel).to_numpy()
    selected = np.isin(parent * (1 << 32) + t, sel_keys)
    held = np.array([is_heldout(d, fraction, seed) for d in table.column("doc_id").to_pylist()], dtype=bool)
    return Candidates(shard=np.full(int(keep.sum()), shard, np.int32), row=(parent[keep] + row0).astype(np.int64),
                      t=t[keep].astype(np.int32), value=flat[keep], selected=selected[keep],
                      heldout=held[parent[keep]] if len(held) else np.zeros(0, bool))


def label_pieces(tokenizer, continuation: str, labels_length: int) -> list[str]:
    """The continuation's first `labels_length` policy tokens as text pieces whose concatenations are exact
    prefixes of it. Tokens that split a character merge with the next (no string can end mid-character)."""
    cut = continuation[: labels_length * 32 + 64]
    ids = tokenizer(cut, add_special_tokens=False)["input_ids"]
    if len(ids) <= labels_length and len(cut) < len(continuation):
        ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    pieces, done = [], 0
    for i in range(1, min(labels_length, len(ids)) + 1):
        text = tokenizer.decode(ids[:i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if len(text) > done and continuation.startswith(text):
            pieces.append(text[done:])
            done = len(text)
    return pieces


def context_tail(tokenizer, context: str, max_tokens: int) -> str:
    """The context cut to its last `max_tokens` policy tokens (cut at a character offset, 0 = keep all)."""
    if max_tokens <= 0 or len(context) <= max_tokens:
        return context
    enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return context
    return context[enc["offset_mapping"][-max_tokens][0]:]


class SampleBuilder:
    """Turns candidate indices into Samples for one policy tokenizer (None for unusable positions)."""

    def __init__(self, shards: ShardSet, cands: Candidates, tokenizer, *, labels_length: int,
                 max_context_tokens: int, thresholds: list[float]):
        self.shards, self.cands, self.tokenizer = shards, cands, tokenizer
        self.labels_length, self.max_context_tokens, self.thresholds = labels_length, max_context_tokens, thresholds
        self.skipped = 0

    def __call__(self, i: int) -> Sample | None:
        c = self.cands
        row = self.shards.row(int(c.shard[i]), int(c.row[i]))
        t = int(c.t[i])
        data = row["text"].encode("utf-8")
        cut = row["token_bytes"][t - 1]  # context = bytes [0, end of token t-1)
        try:
            context, continuation = data[:cut].decode("utf-8"), data[cut:].decode("utf-8")
        except UnicodeDecodeError:  # the proxy's token boundary falls inside a character
            self.skipped += 1
            return None
        labels = label_pieces(self.tokenizer, continuation, self.labels_length)
        if not labels or not context:
            self.skipped += 1
            return None
        return Sample(key=f"{row['doc_id']}/{row['window_index']}/{t}", doc_id=row["doc_id"],
                      context=context_tail(self.tokenizer, context, self.max_context_tokens), label_tokens=labels,
                      entropy=float(c.value[i]), bucket=bucket_of(float(c.value[i]), self.thresholds))


class PositionSampler:
    """Seeded order without replacement over N candidates; a new permutation per epoch; resumable cursor."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.cursor = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self) -> int:
        if self.cursor >= self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._perm = self._permutation()
        self.cursor += 1
        return int(self._perm[self.cursor - 1])

    def state_dict(self) -> dict:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise UserError(f"the checkpoint was trained on {state['n']} positions but the shards now give {self.n}; "
                            "resume with the same --shards and position options")
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._perm = self._permutation()


def select_mask(cands: Candidates, *, bucket: str, min_entropy: float | None, thresholds: list[float]) -> np.ndarray:
    """Candidates a training run draws from: above --min-entropy, in --bucket, or the tagger's `selected`."""
    if min_entropy is not None:
        return cands.value > min_entropy
    if bucket == "all":
        return np.ones(len(cands), bool)
    if bucket == "selected":
        return cands.selected.copy()
    return cands.value > thresholds[BUCKET_NAMES.index(bucket)]


class TrainSamples:
    """The training stream: held-out documents excluded, positions filtered, order seeded and resumable."""

    def __init__(self, cfg, tokenizer):
        self.shards = ShardSet(cfg.shards)
        cands = self.shards.candidates(cfg.entropy_metric, cfg.heldout_fraction, cfg.split_seed)
        mask = select_mask(cands, bucket=cfg.bucket, min_entropy=cfg.min_entropy, thresholds=cfg.bucket_thresholds)
        mask &= ~cands.heldout
        if not mask.any():
            what = f"entropy above {cfg.min_entropy}" if cfg.min_entropy is not None else f"bucket '{cfg.bucket}'"
            raise UserError(f"no training position in '{cfg.shards}' has {what} ({len(cands)} scored positions, "
                            f"{int(cands.heldout.sum())} held out); choose an easier --bucket or a lower --min-entropy")
        self.cands = cands.take(mask)
        self.build = SampleBuilder(self.shards, self.cands, tokenizer, labels_length=cfg.labels_length,
                                   max_context_tokens=cfg.max_context_tokens, thresholds=cfg.bucket_thresholds)
        self.sampler = PositionSampler(len(self.cands), cfg.seed)

    def __len__(self) -> int:
        return len(self.cands)

    def state_dict(self) -> dict:
        return {**self.sampler.state_dict(), "skipped": self.build.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self.build.skipped = state.get("skipped", 0)

    def next_batch(self, k: int) -> list[Sample]:
        """The next k usable samples; unusable positions are skipped (and counted)."""
        out, tries = [], 0
        while len(out) < k:
            tries += 1
            if tries > 100 * k + len(self.cands):
                raise UserError(f"almost no position in '{self.shards.directory}' gives a usable sample "
                                f"({self.build.skipped} skipped): the policy tokenizer cannot reproduce the continuations")
            s = self.build(self.sampler.next())
            if s is not None:
                out.append(s)
        return out
