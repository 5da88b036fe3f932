"""Shards -> RPT samples: candidate positions by entropy bucket, a seeded resumable order without
replacement, held-out documents, and labels cut at the policy tokenizer's boundaries."""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rpt_common.errors import UserError
from rpt_common.shards import (DEFAULT_BUCKETS, DEFAULT_METRIC, METRIC_COLUMNS, SHARD_SCHEMA, footer_problems,
                               read_manifest, shard_paths)
from rpt_train.candidates import Candidates, TableSink, candidates_of, shuffled
from rpt_train.reward import extract_answer

BUCKET_NAMES = ("easy", "medium", "hard")
_INDEX_COLUMNS = ["doc_id", "window_index", "score_start", "token_bytes", "selected"]
SPLIT_BLOCK_WINDOWS = 16  # default held-out unit of a continuous stream: 16 consecutive windows
MIN_HELDOUT_SHARE = 0.1  # a split holding out under this share of --heldout-fraction is refused
_ROW_COLUMNS = ["doc_id", "window_index", "token_start", "text", "token_bytes"]


@dataclass(kw_only=True, slots=True)
class Sample:
    """One RPT task: predict the continuation of `context`; any prefix of `label_tokens` (joined) scores."""

    key: str  # doc_id/window_index/t: stable across runs
    doc_id: str
    context: str
    label_tokens: list[str]  # first labels_length policy tokens of the continuation, exact text pieces
    entropy: float  # proxy entropy at the position (nats, --entropy-metric)
    bucket: str  # hardest bucket the position belongs to: hard, medium, easy or none
    index: int = -1  # candidate index in the run's TrainSamples (same shards and options): rebuilds the sample


def is_heldout(doc_id: str, fraction: float, seed: int) -> bool:
    """Seeded split by document: a hash of (seed, doc_id) below `fraction` is held out."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest(), "little")
    return h / 2**64 < fraction


def split_unit(doc_id: str, window_index: int, block_windows: int) -> str:
    """What the held-out split draws: the document, or (block_windows > 0) its block of that many consecutive
    windows, so a continuous stream (one document per file) is split inside it rather than whole."""
    return doc_id if block_windows <= 0 else f"{doc_id}#{window_index // block_windows}"


def read_doc_ids(path: str) -> frozenset[str]:
    """The doc_ids (or split units, doc_id#block) listed in a text file, one per line (blank lines ignored); none
    for an empty path. UTF-8, a byte-order mark at its start ignored."""
    if not path:
        return frozenset()
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as e:
        raise UserError(f"cannot read --exclude-docs '{path}': {e.strerror or e}")
    except UnicodeDecodeError as e:
        raise UserError(f"--exclude-docs '{path}' is not UTF-8 text ({e.reason}); save it as UTF-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def ids_digest(ids: frozenset[str]) -> str:
    """sha256 of a set of doc_ids / units (as read_doc_ids reads them, sorted: order, blank lines and a BOM of the
    file do not count): what a run or a warm start records of its --exclude-docs list, to refuse an edited one."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def excluded_digest(path: str) -> str | None:
    """ids_digest of the ids an --exclude-docs file lists; None without a list."""
    return ids_digest(read_doc_ids(path)) if path else None


def is_excluded(doc_id: str, unit: str, exclude: frozenset[str]) -> bool:
    """Whether an --exclude-docs list names a row: its doc_id or its split unit (doc_id#block)."""
    return doc_id in exclude or unit in exclude


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
        # first row of each row group, per shard: old shards have one row group, new ones a few dozen windows each
        self._group_starts = [np.cumsum([0] + [f.metadata.row_group(g).num_rows
                                               for g in range(f.metadata.num_row_groups)]) for f in self.files]
        self.row_groups_read = 0  # row-group reads by rows(): one per needed row group per call
        self.zero_width = 0  # positions the last candidates() call left out for a zero-width proxy token

    def _listed_paths(self) -> list[str]:
        entries = self.manifest.get("shards")
        if entries is None:
            paths = shard_paths(self.directory)
        else:
            names = [e["file"] if isinstance(e, dict) else str(e) for e in entries]
            # as listed (data/NAME, or NAME in directories written before data/); else by name in the directory
            paths = [p if os.path.exists(p := os.path.join(self.directory, n)) else
                     os.path.join(self.directory, os.path.basename(n)) for n in names]
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

    @property
    def continuous(self) -> bool:
        return (self.manifest.get("config") or {}).get("mode") == "continuous"

    def candidates(self, metric: str, heldout_fraction: float = 0.0, split_seed: int = 0, *,
                   cuts=(), exclude: frozenset[str] = frozenset(), block_windows: int = 0) -> Candidates:
        """Every scored position t >= max(score_start, 1) with a finite `metric` and a proxy token of non-zero byte
        width, in shard/row/t order, none of a row whose doc_id or split unit (doc_id#block) is in `exclude`;
        `cuts`: entropy thresholds whose comparisons stay exact in the float16 table. The held-out split draws
        split_unit(doc_id, window_index, block_windows);
        `heldout_units` / `heldout_docs` are then the units and documents with a held-out window."""
        return Candidates.concat(list(self.candidate_parts(metric, heldout_fraction, split_seed, cuts=cuts,
                                                           exclude=exclude, block_windows=block_windows)))

    def candidate_parts(self, metric: str, heldout_fraction: float = 0.0, split_seed: int = 0, *,
                        cuts=(), exclude: frozenset[str] = frozenset(), block_windows: int = 0):
        """candidates() one row group at a time (a generator of Candidates), for tables built in bounded memory."""
        self.zero_width = 0
        self.heldout_units, self.heldout_docs = set(), set()
        for i, f in enumerate(self.files):
            for rg in range(f.metadata.num_row_groups):
                table = self._read(i, rg, _INDEX_COLUMNS + [metric])
                docs = table.column("doc_id").to_pylist()
                units = [split_unit(d, w, block_windows) for d, w in zip(docs, table.column("window_index").to_pylist())]
                held = np.array([is_heldout(u, heldout_fraction, split_seed) for u in units], dtype=bool)
                self.heldout_units.update(u for u, h in zip(units, held) if h)
                self.heldout_docs.update(d for d, h in zip(docs, held) if h)
                dropped = np.array([is_excluded(d, u, exclude) for d, u in zip(docs, units)],
                                   dtype=bool) if exclude else None
                part, zero = candidates_of(table, metric, i, int(self._group_starts[i][rg]), held, cuts, dropped)
                self.zero_width += zero
                yield part

    def rows(self, shard, row, columns=None) -> list[dict]:
        """Rows (doc_id, window_index, text, token_bytes by default) at the aligned arrays shard[j], row[j], in
        that order; each needed row group is read once, and only the asked rows are turned into Python objects."""
        shard, row = np.asarray(shard, dtype=np.int64), np.asarray(row, dtype=np.int64)
        out: list = [None] * len(row)
        groups: dict[tuple[int, int], list[int]] = {}
        for j, (s, r) in enumerate(zip(shard.tolist(), row.tolist())):
            rg = int(np.searchsorted(self._group_starts[s], r, side="right")) - 1
            groups.setdefault((s, rg), []).append(j)
        for (s, rg), js in sorted(groups.items()):
            table = self._read(s, rg, columns or _ROW_COLUMNS)
            self.row_groups_read += 1
            local = row[js] - int(self._group_starts[s][rg])
            for j, values in zip(js, table.take(pa.array(local)).to_pylist()):
                out[j] = values
        return out

    def row(self, shard: int, row: int) -> dict:
        """doc_id, window_index, token_start, text, token_bytes of one row."""
        return self.rows([shard], [row])[0]

    def after(self, shard: int, row: int) -> tuple[int, int] | None:
        """Where the row after (shard, row) is: the next one in its shard, else the next shard's first."""
        if row + 1 < int(self._group_starts[shard][-1]):
            return shard, row + 1
        return (shard + 1, 0) if shard + 1 < len(self.files) else None

    def defaults(self) -> tuple[str, list[float]]:
        """(entropy metric column, bucket thresholds) the shards were tagged with, from the manifest's config."""
        conf = self.manifest.get("config") or {}
        metric, buckets = conf.get("metric", DEFAULT_METRIC), conf.get("buckets", list(DEFAULT_BUCKETS))
        if metric not in METRIC_COLUMNS:
            raise UserError(f"the manifest of '{self.directory}' has metric '{metric}', expected one of "
                            f"{', '.join(METRIC_COLUMNS)}; pass --entropy-metric")
        return METRIC_COLUMNS[metric], [float(b) for b in buckets]


def resolve_shard_defaults(cfg, shards: ShardSet) -> None:
    """Fill the config's unset (None) `entropy_metric` and `bucket_thresholds` in place from the shards' manifest,
    so shards tagged with --metric full or other --buckets are read as tagged; explicit values win."""
    metric, buckets = shards.defaults()
    if getattr(cfg, "split_block_windows", 0) is None:
        cfg.split_block_windows = SPLIT_BLOCK_WINDOWS if shards.continuous else 0
    if cfg.entropy_metric is None:
        cfg.entropy_metric = metric
    if cfg.bucket_thresholds is None:
        if len(buckets) != len(BUCKET_NAMES):
            raise UserError(f"the shards in '{shards.directory}' were tagged with {len(buckets)} bucket thresholds "
                            f"({buckets}); rpt-train needs three: pass --bucket-thresholds easy,medium,hard")
        cfg.bucket_thresholds = buckets


def cuts_of(cfg) -> list[float]:
    """Entropy thresholds a run compares against (kept exact in the float16 candidate table)."""
    extra = [cfg.min_entropy] if getattr(cfg, "min_entropy", None) is not None else []
    return [*cfg.bucket_thresholds, *extra]


def expressible(answer: str, fmt: str = "boxed") -> bool:
    """Whether some completion can answer `answer`: extract_answer gives it back from its own markup. `{x` cannot
    (`\\boxed{{x}` never closes), `{x}` can (`\\boxed{{x}}`); tests check nothing else is ever extracted."""
    wrapped = f"\\boxed{{{answer}}}" if fmt == "boxed" else f"<answer>{answer}</answer>"
    return extract_answer(wrapped, fmt) == answer


def answerable(labels: list[str], fmt: str = "boxed") -> list[str]:
    """`labels` cut after the last boundary prefix an answer can express ([] when none can): the prefixes beyond
    it could never be rewarded."""
    last, prefix = 0, ""
    for j, piece in enumerate(labels, 1):
        prefix += piece
        if expressible(prefix, fmt):
            last = j
    return labels[:last]


def label_chars(labels_length: int) -> int:
    """Characters of the continuation that label_pieces tokenizes first (more only when they give too few tokens)."""
    return labels_length * 32 + 64


LEFT_CHARS = 64  # characters of the context label_pieces tokenizes with the continuation (the cut's word and more)


def label_pieces(tokenizer, continuation: str, labels_length: int, left: str = "") -> list[str]:
    """The continuation's first `labels_length` policy tokens as text pieces whose concatenations are exact
    prefixes of it. The continuation is tokenized and decoded with its left context (the end of `left`, the text
    before it): decoders that strip a leading space or join tokens with spaces give a token's text only after the
    tokens before it, and a word-start marker must not be put where the continuation starts mid-word. A policy
    token across the cut gives the first piece its part after the cut. Tokens that split a character merge with the
    next (no string can end mid-character); a token the decoder cannot give back exactly ends the pieces."""
    left = left[-LEFT_CHARS:]
    cut = continuation[: label_chars(labels_length)]
    ids, rest, j0 = _joint_tokens(tokenizer, left, cut)
    if len(ids) - j0 <= 4 * labels_length and len(cut) < len(continuation):
        ids, rest, j0 = _joint_tokens(tokenizer, left, continuation)
    def decode(i: int) -> str:
        return tokenizer.decode(ids[:j0 + i], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    head, pieces, done = decode(0), [], 0
    # byte tokens of one character make one piece: up to 4 tokens a piece
    for i in range(1, min(4 * labels_length, len(ids) - j0) + 1):
        full = decode(i)
        if not full.startswith(head) or not full[len(head):].startswith(rest):
            continue  # the decoder rewrote the left context (a character split across the cut)
        text = full[len(head) + len(rest):]
        if len(text) > done and continuation.startswith(text):
            pieces.append(text[done:])
            done = len(text)
            if len(pieces) == labels_length:
                break
    return pieces


def _joint_tokens(tokenizer, left: str, text: str) -> tuple[list[int], str, int]:
    """(ids of left + text, the end of `left` that the first j0 tokens do not cover, j0): the first j0 tokens end
    inside `left`, the others are the text's (the first may start inside `left`: a policy token across the cut)."""
    enc = tokenizer(left + text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], [list(o) for o in enc["offset_mapping"]]
    for a, b in zip(offsets, offsets[1:]):
        if a[0] == b[0] and a[1] < b[1]:  # a word-start marker given its word's first character: it takes no text
            a[1] = a[0]
    j0 = 0
    while j0 < len(ids) and offsets[j0][1] <= len(left):
        j0 += 1
    rest = left[offsets[j0 - 1][1]:] if j0 else left
    if rest.isspace() and j0 and len(tokenizer.decode(ids[j0 - 1:j0], clean_up_tokenization_spaces=False)) > \
            offsets[j0 - 1][1] - offsets[j0 - 1][0]:
        rest = ""  # the offsets were trimmed off the token's own trailing space (ByteLevel trim_offsets)
    return ids, rest, j0


def ends_within(continuation: str, labels_length: int) -> bool:
    """Whether `continuation` is shorter than what label_pieces tokenizes: its label boundaries (the last word's
    tokens too) may then depend on the text after it."""
    return len(continuation) < label_chars(labels_length)


def following_text(row: dict, nxt: dict) -> str | None:
    """The text of `nxt` (the next window of row's stream) after the end of `row`: windows overlap by the context
    prefix, so it starts at the byte end of row's last token inside nxt. None when nxt is no such window."""
    if nxt["doc_id"] != row["doc_id"] or nxt["window_index"] != row["window_index"] + 1:
        return None
    k = row["token_start"] + len(row["token_bytes"]) - 1 - nxt["token_start"]  # row's last token, in nxt
    if not -1 <= k < len(nxt["token_bytes"]):
        return None
    try:
        return nxt["text"].encode("utf-8")[nxt["token_bytes"][k] if k >= 0 else 0:].decode("utf-8")
    except UnicodeDecodeError:
        return None


def context_tail(tokenizer, context: str, max_tokens: int) -> str:
    """The context cut to its last `max_tokens` policy tokens (0 = keep all): the decoded text of those tokens
    when it is a suffix of the context, else the cut at the tokenizer's character offset, which is only trusted
    when it lies inside the context (a ByteLevel post-processor with trim_offsets moves a token's start past its
    leading space: the tail is then one space shorter, never longer)."""
    if max_tokens <= 0 or len(context) <= max_tokens:
        return context
    enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if len(ids) <= max_tokens:
        return context
    tail = tokenizer.decode(ids[-max_tokens:], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if tail and context.endswith(tail):
        return tail
    start = enc["offset_mapping"][-max_tokens][0]
    return context[min(max(start, 0), len(context)):]


class SampleBuilder:
    """Turns candidate indices into Samples for one policy tokenizer (None for unusable positions, counted in
    `skipped`; `unexpressible` counts those whose label no answer can express; `answer_format` None: the labels
    are the true next tokens, uncut, as --objective rlp scores them, none unexpressible). `held_out(row)`, given for the
    training side of a split: a position whose labels run into the text of a held-out (or excluded) window (the
    next window of its stream) is unusable too, counted in `crossing`: training never rewards held-out text."""

    def __init__(self, shards: ShardSet, cands: Candidates, tokenizer, *, labels_length: int,
                 max_context_tokens: int, thresholds: list[float], answer_format: str | None = "boxed",
                 held_out=None):
        self.shards, self.cands, self.tokenizer = shards, cands, tokenizer
        self.labels_length, self.max_context_tokens, self.thresholds = labels_length, max_context_tokens, thresholds
        self.answer_format, self.held_out = answer_format, held_out
        self.skipped = self.unexpressible = self.crossing = 0
        self.following_reads = 0  # row-group reads for the text after a window (labels across its edge)

    def __call__(self, i: int) -> Sample | None:
        return self.many([i])[0]

    def many(self, indices) -> list[Sample | None]:
        """Samples of several candidates, in order, reading each needed row group once (and, for positions whose
        labels run past their window's end, the rows after it)."""
        idx = np.asarray(indices, dtype=np.int64)
        r = self.cands.row_of(idx)
        shard, row = self.cands.row_shard[r], self.cands.row_index[r]
        rows = self.shards.rows(shard, row)
        cuts = [self._cut(rw, int(self.cands.t[i])) for i, rw in zip(idx, rows)]
        tails, bounds = self._following([(int(a), int(b)) for a, b in zip(shard, row)], rows, cuts)
        samples = [self._sample(rw, cut, tail, int(self.cands.t[i]), float(self.cands.value[i]), bound)
                   for i, rw, cut, tail, bound in zip(idx, rows, cuts, tails, bounds)]
        for i, s in zip(idx.tolist(), samples):
            if s is not None:
                s.index = i
        return samples

    def _cut(self, row: dict, t: int) -> tuple[str, str] | None:
        """(context, continuation inside the row) at position t, or None when the proxy's token boundary falls
        inside a character."""
        data = row["text"].encode("utf-8")
        cut = row["token_bytes"][t - 1]  # context = bytes [0, end of token t-1)
        try:
            return data[:cut].decode("utf-8"), data[cut:].decode("utf-8")
        except UnicodeDecodeError:
            return None

    def _following(self, where: list[tuple[int, int]], rows: list[dict], cuts) -> tuple[list[str], list]:
        """The stream's text after each row, as far as the labels of its position need it (the next windows of the
        same document, read a hop at a time for all positions at once); '' where none is needed or there is none.
        With `held_out`, also each position's bound: the characters of continuation + tail before the first
        held-out window's text (None: no held-out text)."""
        tails, bounds = [""] * len(rows), [None] * len(rows)
        todo = [j for j, c in enumerate(cuts) if c is not None and ends_within(c[1], self.labels_length)]
        here = {j: (where[j], rows[j]) for j in todo}
        while todo:
            nxt = {j: self.shards.after(*here[j][0]) for j in todo}
            todo = [j for j in todo if nxt[j] is not None]
            before = self.shards.row_groups_read
            read = self.shards.rows([nxt[j][0] for j in todo], [nxt[j][1] for j in todo]) if todo else []
            self.following_reads += self.shards.row_groups_read - before
            still = []
            for j, nx in zip(todo, read):
                more = following_text(here[j][1], nx)
                if not more:
                    continue
                if self.held_out is not None and bounds[j] is None and self.held_out(nx):
                    bounds[j] = len(cuts[j][1]) + len(tails[j])
                tails[j] += more
                here[j] = (nxt[j], nx)
                if ends_within(cuts[j][1] + tails[j], self.labels_length):
                    still.append(j)
            todo = still
        return tails, bounds

    def _sample(self, row: dict, cut: tuple[str, str] | None, tail: str, t: int, value: float,
                bound: int | None = None) -> Sample | None:
        if cut is None:  # the proxy's token boundary falls inside a character
            self.skipped += 1
            return None
        context, continuation = cut
        labels = label_pieces(self.tokenizer, continuation + tail, self.labels_length, left=context)
        if not labels or not context:
            self.skipped += 1
            return None
        labels = answerable(labels, self.answer_format) if self.answer_format is not None else labels
        if not labels:  # e.g. a continuation "{x": no boundary prefix has balanced braces
            self.skipped += 1
            self.unexpressible += 1
            return None
        if bound is not None and len("".join(labels)) > bound:  # the labels reach into a held-out window
            self.skipped += 1
            self.crossing += 1
            return None
        return Sample(key=f"{row['doc_id']}/{row['window_index']}/{t}", doc_id=row["doc_id"],
                      context=context_tail(self.tokenizer, context, self.max_context_tokens), label_tokens=labels,
                      entropy=value, bucket=bucket_of(value, self.thresholds))


class PositionSampler:
    """Seeded order without replacement over N candidates; a new permutation per epoch; resumable cursor."""

    def __init__(self, n: int, seed: int, directory: str | None = None):
        """`directory`: keep the permutation in a memory-mapped file there (page cache, not this process's heap)."""
        self.n, self.seed, self.epoch, self.cursor = n, seed, 0, 0
        self._dtype = np.uint32 if self.n < 2**32 else np.int64
        self._file = TableSink.scratch(directory, "order", self._dtype, n) if directory else None
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        # one seeded permutation per epoch, in place in the scratch file when there is one
        return shuffled(self.n, [self.seed, self.epoch], out=self._file)

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
                            "resume with the same --shards, position options and --exclude-docs list")
        self.seed, self.epoch, self.cursor = state["seed"], state["epoch"], state["cursor"]
        self._perm = self._permutation()


def select_mask(cands: Candidates, *, bucket: str, min_entropy: float | None, thresholds: list[float]) -> np.ndarray:
    """Candidates a training run draws from: above --min-entropy, in --bucket, or the tagger's `selected`."""
    if min_entropy is not None:
        return cands.above(min_entropy)
    if bucket == "all":
        return np.ones(len(cands), bool)
    if bucket == "selected":
        return cands.selected.copy()
    return cands.above(thresholds[BUCKET_NAMES.index(bucket)])


def heldout_summary(cfg, shards: ShardSet, scored: int, positions: int) -> dict:
    """How much the split held out (`positions` of `scored`, share, units, documents); refuses, in one sentence, a
    split asked for (--heldout-fraction > 0) that holds out nothing or almost nothing (under a tenth of the
    fraction asked)."""
    share = positions / max(scored, 1)
    unit = f"blocks of {cfg.split_block_windows} windows" if cfg.split_block_windows else "documents"
    summary = {"positions": positions, "share": share, "units": len(shards.heldout_units),
               "documents": len(shards.heldout_docs), "unit": unit}
    if cfg.heldout_fraction > 0 and share < MIN_HELDOUT_SHARE * cfg.heldout_fraction:
        raise UserError(f"--heldout-fraction {cfg.heldout_fraction} holds out {positions} of {scored} scored "
                        f"positions of '{cfg.shards}' ({len(shards.heldout_units)} {unit}): too few {unit} to split; "
                        "raise --heldout-fraction, lower --split-block-windows, or pass --heldout-fraction 0")
    return summary


def heldout_line(summary: dict) -> str:
    """`run`'s one-line report of the split."""
    where = (f"{summary['documents']} documents" if summary["unit"] == "documents" else
             f"{summary['units']} {summary['unit']} of {summary['documents']} documents")
    return f"held out: {summary['positions']} positions ({summary['share']:.1%}) in {where}"


def split_candidates(shards: ShardSet, cfg, split: str) -> Candidates:
    """The candidates of one side of cfg's held-out split ('heldout', 'train' or 'all'), built a row group at a time
    into a memory-mapped table (TableSink): what eval scores, in bounded memory on every rank."""
    sink = TableSink()
    for part in shards.candidate_parts(cfg.entropy_metric, cfg.heldout_fraction, cfg.split_seed, cuts=cuts_of(cfg),
                                       block_windows=cfg.split_block_windows):
        sink.add(part if split == "all" else part.take(part.heldout if split == "heldout" else ~part.heldout))
    return sink.finish()


class TrainSamples:
    """The training stream: held-out documents excluded, positions filtered, order seeded and resumable."""

    def __init__(self, cfg, tokenizer, *, keep_heldout: bool = False, shards: ShardSet | None = None,
                 answers: bool | None = None):
        """`keep_heldout`: also keep the held-out documents' positions under the same filter (`heldout_cands`);
        `shards`: the ShardSet of cfg.shards when the caller has opened it already; `answers`: whether the labels
        are cut to what an answer can express (see builder); default: unless --objective rlp."""
        self.cfg, self.tokenizer = cfg, tokenizer
        self.answers = getattr(cfg, "objective", "rpt") != "rlp" if answers is None else answers
        self.shards = shards or ShardSet(cfg.shards)
        resolve_shard_defaults(cfg, self.shards)
        # built a row group at a time into memory-mapped files: this process holds O(windows) arrays, the
        # positions (~5 bytes each) and their order (4 bytes each) stay in the page cache
        train, held = TableSink(), TableSink() if keep_heldout else None
        scored = heldout = 0
        self.exclude = read_doc_ids(cfg.exclude_docs)
        for part in self.shards.candidate_parts(cfg.entropy_metric, cfg.heldout_fraction, cfg.split_seed,
                                                cuts=cuts_of(cfg), exclude=self.exclude,
                                                block_windows=cfg.split_block_windows):
            mask = select_mask(part, bucket=cfg.bucket, min_entropy=cfg.min_entropy, thresholds=cfg.bucket_thresholds)
            part_held = part.heldout
            scored, heldout = scored + len(part), heldout + int(part_held.sum())
            train.add(part.take(mask & ~part_held))
            if held is not None:
                held.add(part.take(mask & part_held))
        self.split = heldout_summary(cfg, self.shards, scored, heldout)
        self.heldout_cands = held.finish() if held is not None else None
        self.cands = train.finish()
        if len(self.cands) == 0:
            what = f"entropy above {cfg.min_entropy}" if cfg.min_entropy is not None else f"bucket '{cfg.bucket}'"
            raise UserError(f"no training position in '{cfg.shards}' has {what} ({scored} scored positions, "
                            f"{heldout} held out); choose an easier --bucket or a lower --min-entropy")
        self.build = self.builder(self.cands)
        self.sampler = PositionSampler(len(self.cands), cfg.seed, directory=TableSink.scratch_dir())

    def builder(self, cands: Candidates) -> SampleBuilder:
        """A SampleBuilder over `cands` with this run's tokenizer, labels, context cut and answer format; over the
        training table, one that drops a position whose labels run into a held-out window or an excluded one
        (--exclude-docs: its doc_id or split unit listed; a stream split by blocks only, as a label window never
        crosses documents: no change for a document split or an empty list). Under --objective rlp
        (`answers` False) the labels are not cut to what an answer can express: rlp writes no answer, its reward
        scores the true next tokens (a continuation starting with '}' included). The sft arm always cuts: its
        targets are answers, whatever --objective says."""
        c = self.cfg
        return SampleBuilder(self.shards, cands, self.tokenizer, labels_length=c.labels_length,
                             max_context_tokens=c.max_context_tokens, thresholds=c.bucket_thresholds,
                             answer_format=c.answer_format if self.answers else None,
                             held_out=self.held_out_row if cands is self.cands and (c.heldout_fraction > 0
                                                                                    or self.exclude) else None)

    def held_out_row(self, row: dict) -> bool:
        """Whether a shard row (doc_id, window_index) is on the held-out side of this run's split, or excluded
        (--exclude-docs lists its doc_id or split unit): text whose windows training never rewards."""
        c = self.cfg
        unit = split_unit(row["doc_id"], row["window_index"], c.split_block_windows)
        return is_heldout(unit, c.heldout_fraction, c.split_seed) or is_excluded(row["doc_id"], unit, self.exclude)

    def __len__(self) -> int:
        return len(self.cands)

    @functools.cached_property
    def exclude_sha256(self) -> str:
        """ids_digest of the --exclude-docs ids this run read at its start (that of no id without a list), hashed
        once: a checkpoint records it, a resume whose list differs is refused (check_excluded)."""
        return ids_digest(self.exclude)

    def state_dict(self) -> dict:
        return {**self.sampler.state_dict(), "skipped": self.build.skipped, "unexpressible": self.build.unexpressible,
                "exclude_sha256": self.exclude_sha256}

    def load_state_dict(self, state: dict) -> None:
        self.check_excluded(state.get("exclude_sha256"))
        self.sampler.load_state_dict(state)
        self.build.skipped, self.build.unexpressible = state.get("skipped", 0), state.get("unexpressible", 0)

    def check_excluded(self, saved: str | None) -> None:
        """Refuses a resume whose --exclude-docs ids differ from those the checkpoint records (a list edited in place
        that keeps the number of positions would resume on other ones); a checkpoint written before the digest was
        recorded (`saved` None) is checked by the number of positions only."""
        if saved is None or saved == self.exclude_sha256:
            return
        c = self.cfg
        given = f"--exclude-docs '{c.exclude_docs}'" if c.exclude_docs else "--exclude-docs (none given)"
        raise UserError(f"{given} lists other doc_ids / units than when the run in '{c.out}' started (its checkpoint "
                        "records the sha256 of the list's ids): it would resume on other positions; restore the list "
                        "as it was, or start a new run in another --out")

    def next_batch(self, k: int) -> list[Sample]:
        """The next k usable samples; unusable positions are skipped (and counted). Draws come in rounds of the
        number still missing, so the samples equal one-by-one drawing while each row group is read once a round."""
        out, tries = [], 0
        while len(out) < k:
            if tries > 100 * k + len(self.cands):
                raise UserError(f"almost no position in '{self.shards.directory}' gives a usable sample "
                                f"({self.build.skipped} skipped): the policy tokenizer cannot reproduce the continuations")
            drawn = [self.sampler.next() for _ in range(k - len(out))]
            tries += len(drawn)
            out += [s for s in self.build.many(drawn) if s is not None]
        return out
