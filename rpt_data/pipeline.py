"""`rpt-data tag`: records -> windows -> proxy stats -> tags -> shards + manifest, resumable."""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import resource
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rpt_common.bos import NO_BOS
from rpt_common.errors import UserError, is_disk_full
from rpt_common.models import load_causal_lm
from rpt_common.shards import (MANIFEST, REJECTS, SCHEMA_VERSION, SHARD_LOG, rank_record_name, rank_rejects_name,
                                rank_shard_log_name, shard_metadata, shard_name, with_logged_shards)
from rpt_common.shards import DATA_DIR, DATASET_CARD, dataset_card
from rpt_data.config import TagConfig
from rpt_data.division import Division, divide
from rpt_data.merge import (changed_inputs, changed_units, merge_out, moved_revision, read_rank_records, same_inputs,
                            same_run_config, totals, unit_key)
from rpt_data.overlap import WriteBehind, read_ahead
from rpt_data.pools import pool_shards, score_pool, shard_pools
from rpt_data.proxy import Proxy, WindowStats, build_proxy, check_context_length
from rpt_data.ranks import RankInfo, process_group, rank_device, resolve_ranks, wait_for_ranks
from rpt_data.segments import cut_counts, divide_segments, read_segments, segment_of, segment_windows
from rpt_data.readers import (STREAM_PREFIX, BadRecord, Record, RecordParser, expand_inputs, read_all,
                              read_unit, reject_duplicate_ids, stream_fingerprint)
from rpt_data.windows import Window, windows_from_pieces
from rpt_data.writer import (append_json_line, build_table, file_rank, is_ours, is_temp, write_json_atomic,
                             write_shard, write_text_atomic)


# Read ahead and write behind in threads (rpt_data.overlap); off, the same loop runs in line, writing the same bytes.
OVERLAP = True


class BadRecordError(UserError):
    """--on-bad-record fail: the message names the file and the 1-based line or row."""


def no_text_error(cfg: TagConfig, reasons: dict[str, int], examples: dict[str, BadRecord]) -> UserError:
    """No record of the input yields text: one sentence with the input, the main reason (with the fields or
    columns that exist, which the reason names) and what to change."""
    inputs = ", ".join(f"'{i}'" for i in cfg.inputs)
    if not reasons:
        return UserError(f"no record of {inputs} yields text: the input holds no record")
    kind = max(reasons, key=reasons.get)
    ex = examples[kind]
    where = f"{ex.source}:{ex.line}" if ex.line else ex.source
    others = sum(reasons.values()) - reasons[kind]
    also = f" ({others:,} more for other reasons)" if others else ""
    fix = ("choose the text with --text-field NAME or --template over the fields that exist"
           if kind.startswith(("missing field", "null field", "no column", "field '", "column '")) else "fix the input")
    unit = "record" if ex.line else "file"  # line 0: the whole file was rejected (e.g. a parquet column missing)
    n = f"{reasons[kind]:,} {unit}{'s' if reasons[kind] > 1 else ''}"
    return UserError(f"no record of {inputs} yields text: {n} rejected for {ex.reason}, first at {where}{also}; "
                     f"{fix} and rerun with the same --out (rejects: '{Path(cfg.out) / rejects_name(cfg)}')")


def fingerprint(path: str) -> dict:
    if path.startswith(STREAM_PREFIX):
        return stream_fingerprint(path)
    p = Path(path)
    files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
    st = [f.stat() for f in files]
    # `resolved`: what resume compares (merge.same_inputs), so a path given relative to another directory is the
    # same input; `path` stays as given (rejects name files that way)
    return {"path": path, "resolved": str(p.resolve()), "bytes": sum(s.st_size for s in st),
            "mtime_ns": max((s.st_mtime_ns for s in st), default=0)}


def record_name(cfg: TagConfig) -> str:
    """Where a run records its progress: manifest.json for one rank, rank-RRRRR.json for each of several."""
    return MANIFEST if cfg.world_size == 1 else rank_record_name(cfg.rank)


def log_name(cfg: TagConfig) -> str:
    """The append-only log of the shards finished since the record was last written (one line each)."""
    return SHARD_LOG if cfg.world_size == 1 else rank_shard_log_name(cfg.rank)


def rejects_name(cfg: TagConfig) -> str:
    return REJECTS if cfg.world_size == 1 else rank_rejects_name(cfg.rank)


def _mine(name: str, cfg: TagConfig) -> bool:
    """Files this process may remove: all of a 1-rank run's; only its own in a multi-rank run (the
    other ranks write into the same directory at the same time)."""
    return cfg.world_size == 1 or file_rank(name) == cfg.rank


def _names(out: Path) -> list[str]:
    """The files of an output directory, those under data/ as `data/NAME`."""
    data = out / DATA_DIR
    return os.listdir(out) + ([f"{DATA_DIR}/{n}" for n in os.listdir(data)] if data.is_dir() else [])


def _other_world_size(out: Path, cfg: TagConfig) -> None:
    """Refuse files of a run with another number of ranks (with --overwrite, remove the ones that no
    rank of this run owns), so that two runs never mix."""
    names = [n for n in _names(out) if n != DATA_DIR]
    if cfg.world_size == 1:
        stale = sorted(n for n in names if n.startswith(("rank-", "shards-")))
    else:
        stale = sorted(n for n in names if (file_rank(n) or 0) >= cfg.world_size)
        try:  # a merged manifest names its world size; a 1-rank one does not
            world_size = json.loads((out / MANIFEST).read_text()).get("world_size", 1)
        except FileNotFoundError:  # none, or another rank just removed it
            world_size = cfg.world_size
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            world_size = None  # unreadable: not known to be this run's
        if world_size != cfg.world_size:
            stale.insert(0, MANIFEST)
    if not stale or cfg.overwrite:
        for n in stale:  # the 1-rank case removes everything anyway
            (out / n).unlink(missing_ok=True)
        return
    raise UserError(f"'{out}' holds a run with a different config (world_size differs: it has '{stale[0]}'); "
                    "rerun with the same options to resume, --overwrite to start over, or a new --out")


def prepare_out(cfg: TagConfig, inputs: list[dict], units: list[int] | None = None) -> dict | None:
    """Check the output directory; return this rank's record to resume from (None = start fresh).
    The record is manifest.json for a 1-rank run, rank-RRRRR.json for each rank of a multi-rank run.
    `units`: the indices (into `inputs`) of the units this rank reads (default: all), for `redo_changed_units`."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(n for n in os.listdir(out) if not is_ours(n))
    if foreign:
        raise UserError(f"output directory '{out}' already holds files that rpt-data did not write "
                        f"(e.g. '{foreign[0]}'); choose an empty or new --out directory")
    _other_world_size(out, cfg)
    record = out / record_name(cfg)
    mine = sorted((n for n in _names(out) if n != DATA_DIR and _mine(n, cfg)), key=lambda n: n != record.name)
    if cfg.overwrite or not record.exists():
        # the record goes first: shards without one are never trusted (nor recorded as complete)
        for n in mine:
            os.remove(out / n)
        return None
    try:
        old = with_logged_shards(json.loads(record.read_text()), out / log_name(cfg))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{record} is corrupt; rerun with --overwrite to start over")
    if old.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"'{out}' was written with schema version {old.get('schema_version')}; "
                        "rerun with --overwrite or choose a new --out")
    # `out` may differ: a stopped run may be moved or copied (e.g. to a disk with space) and resumed there; an
    # older manifest may still record knobs that are runtime-only now; `rank` names this very record
    diff = same_run_config(old.get("config", {}), cfg.content_dict())
    if diff:
        verb = "differs" if len(diff) == 1 else "differ"
        raise UserError(f"'{out}' holds a run with a different config ({', '.join(diff)} {verb}); "
                        "rerun with the same options to resume, --overwrite to start over, or a new --out")
    if moved_revision(old.get("inputs"), inputs):
        raise UserError(moved_revision(old.get("inputs"), inputs))
    if not same_inputs(old.get("inputs"), inputs):
        fixed = changed_units(old.get("inputs"), inputs)  # None: files added, removed or reordered
        # a record from before `units`, or with a shard whose windows' unit was unknown (-1, as an intermediate
        # version wrote for segment windows): which shards hold windows of the changed units is not known
        if fixed is None or any(not known_units(s) for s in old.get("shards", [])):
            changed = changed_inputs(old.get("inputs"), inputs)
            shown = ", ".join(f"'{n}'" for n in changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
            raise UserError(f"the input files changed since '{out}' was started ({shown}); rerun with --overwrite "
                            "to start over")
        redo_changed_units(cfg, old, inputs, fixed, range(len(inputs)) if units is None else units)
    kept = []  # recorded shards still on disk as written; the first one that is not and all later are redone
    for entry in old.get("shards", []):
        path = out / entry["file"]
        if not path.is_file() or path.stat().st_size != entry.get("bytes", path.stat().st_size):
            print(f"warning: {path} is missing or changed since it was recorded; redoing it and the shards after it",
                  file=sys.stderr)
            old["complete"] = False
            break
        kept.append(entry)
    old["shards"] = kept
    listed = {s["file"] for s in kept}
    for n in mine:  # half-written or unrecorded shards are redone
        if is_temp(n) or (os.path.basename(n).startswith("shard-") and n not in listed):
            os.remove(out / n)
    return old


def known_units(entry: dict) -> bool:
    """Whether a recorded shard names the input units its windows come from (`units`, [first, last], both >= 0)."""
    units = entry.get("units")
    return isinstance(units, list) and len(units) == 2 and all(isinstance(i, int) and i >= 0 for i in units)


def redo_changed_units(cfg: TagConfig, old: dict, inputs: list[dict], fixed: list[int], units) -> None:
    """Input units changed in place since `old` was recorded (same units, same order): keep the shards that a run on
    the new inputs writes the same, drop the others from `old` (they are redone), and say so in one line.

    A shard stands when it is full and all its windows come from units before this rank's first changed unit (its
    `units`, [first, last] indices into `inputs`, end before it): reading restarts from the top, so the windows up
    to there are the same. Shards are scored in pools (rpt_data.pools) and batching rounds stats differently, so
    the cut goes back to the start of its pool, as a fresh run on the new inputs pools them: the kept shards are
    those bytes. A rank that reads no changed unit keeps all its shards (and records the new fingerprints)."""
    shards = old.get("shards", [])
    mine = sorted(set(units) & set(fixed))
    names = [inputs[i]["path"] if inputs[i].get("shard") is None else unit_key(inputs[i]) for i in fixed]
    shown = ", ".join(f"'{n}'" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    who = "" if cfg.world_size == 1 else f" of rank {cfg.rank} of {cfg.world_size}"
    changed = f"warning: {len(names)} input file(s) changed since '{cfg.out}' was started ({shown})"
    if not mine:
        print(f"{changed}; rank {cfg.rank} reads none of them: its {len(shards)} shard(s) stand", file=sys.stderr)
        return
    cut = next((k for k, s in enumerate(shards)  # (prepare_out refuses shards of unknown units first)
                if not known_units(s) or s["units"][1] >= mine[0] or s["rows"] < cfg.shard_rows),
               len(shards))
    size = pool_shards(cfg.shard_rows, cfg.window)
    cut = cut // size * size
    print(f"{changed}; keeping the first {cut} shard(s){who} and redoing the other {len(shards) - cut} recorded, "
          f"from the first shard that may hold windows of '{names[fixed.index(mine[0])]}'", file=sys.stderr)
    old["shards"], old["complete"] = shards[:cut], False


def same_division(cfg: TagConfig, division: Division, files: list, inputs: list[dict]) -> None:
    """A multi-rank resume keeps shards only under the division they were written for: this rank's kind of division,
    the files it reads and (segments) the segments it tokenizes must be those its record names. A file fixed in place
    to another size can change them (grown past SEGMENT_BYTES it is cut into segments, so a `files` or `windows`
    division becomes `segments`; a segmented file may get another segment count, and segments are then dealt afresh
    by size; while every count stands the recorded deal is kept, recorded_owner): then this rank refuses in one
    sentence, naming the file (or, for a record without `owner` that today's rule deals otherwise on its own sizes,
    saying the dealing rule changed: files went round-robin), and asks for --overwrite. A rank whose own part
    is unchanged keeps its shards (those of an unchanged file are the same windows: segment cuts depend on the file
    alone; `redo_changed_units` redoes from a changed one) and records the new division, so every rank ends up with
    the division computed from the new sizes, each unit with exactly one rank (`rpt-data merge` checks it)."""
    from rpt_data.segments import segment_sizes

    record = Path(cfg.out) / record_name(cfg)
    if cfg.world_size == 1 or cfg.overwrite or not record.is_file():
        return
    try:
        rec = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # prepare_out says so
    old, new = rec.get("division") or {}, division.describe()
    if all(old.get(k) == new.get(k) for k in ("by", "files", "segments")):
        return
    fixed = changed_units(rec.get("inputs"), inputs)
    if fixed is None:
        return  # files added, removed or reordered: prepare_out refuses, naming them
    was = {i: f.get("bytes") for i, f in enumerate(rec.get("inputs") or [])}
    resized = [i for i in fixed if was[i] != inputs[i].get("bytes")]
    recut = [i for i in resized if isinstance(was[i], int) and
             len(segment_sizes([files[i]], [was[i]])[0]) != len(segment_sizes([files[i]], [inputs[i]["bytes"]])[0])]
    named = (recut or resized)[:1]
    who = f"rank {cfg.rank} of {cfg.world_size}"
    if old.get("by") != new["by"]:
        why = f"the input is now divided between the ranks by {new['by']}, not by {old.get('by')}"
    elif old.get("files") != new["files"]:
        why = f"{who} would now read other files"
    else:
        why = f"{who} would now tokenize other segments ({len(new['segments'])} instead of {len(old.get('segments', []))})"
    if "owner" not in old and old.get("by") == "files" and all(isinstance(b, int) for b in was.values()):
        sizes = [was[i] for i in range(len(files))]  # a record from before `owner`: dealt by today's rule?
        then = divide_segments(files, sizes, cfg.mode, cfg.limit, cfg.rank, cfg.world_size) or \
            divide(files, cfg.mode, cfg.limit, cfg.rank, cfg.world_size, sizes)
        if any(then.describe().get(k) != old.get(k) for k in ("by", "files", "segments")):
            raise UserError(f"{who} cannot resume: the rule that deals the input to the ranks changed since "
                            f"'{cfg.out}' was started (an older version dealt files round-robin and recorded no "
                            f"owners; they are dealt by size now), so {why}, and the shards it recorded belong to the "
                            "old division; rerun it with --overwrite to start over (every rank whose part changed "
                            "refuses alike)")
    if named:
        i = named[0]
        cut = len(segment_sizes([files[i]], [inputs[i]["bytes"]])[0])
        size = f"{was[i]:,} -> {inputs[i]['bytes']:,} bytes" + (f", now cut into {cut} segments" if i in recut else "")
        what = f"'{inputs[i]['path']}' changed size since '{cfg.out}' was started ({size}), so {why}"
    else:
        what = f"{why} than when '{cfg.out}' was started"
    raise UserError(f"{who} cannot resume: {what}, and the shards it recorded belong to the old division; rerun it "
                    "with --overwrite to start over (every rank whose part changed refuses alike)")


def recorded_owner(cfg: TagConfig, inputs: list[dict], by: str = "files") -> list | None:
    """The division of the files (`by` files: a rank per file) or of their segments (`by` segments: a list of ranks
    per file) between ranks that this run's records give (this rank's own first, else another rank's), when they
    name the same units in the same order: a file fixed since keeps its rank (its segments theirs, while it has as
    many: divide_segments checks), whatever its new size. None for one rank, --overwrite, or no such record (the
    files are dealt by their sizes now)."""
    if cfg.world_size == 1 or cfg.overwrite or not Path(cfg.out).is_dir():
        return None
    try:
        records = read_rank_records(Path(cfg.out))
    except UserError:  # a corrupt record: prepare_out says so for this rank's own; another rank's is no guide
        return None
    keys = [unit_key(f) for f in inputs]
    for rank in sorted(records, key=lambda r: r != cfg.rank):
        rec = records[rank]
        owner = rec.get("division", {}).get("owner")
        if (rec.get("world_size") == cfg.world_size and rec.get("division", {}).get("by") == by
                and owner is not None and len(owner) == len(keys)
                and [unit_key(f) for f in rec.get("inputs", [])] == keys):
            return owner
    return None


@contextlib.contextmanager
def disk_full_is_a_user_error(out: Path):
    """A full disk (or quota) while writing: one sentence, exit 2, and the output stays resumable
    (temp files are removed, the manifest on disk lists only complete shards)."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        where = f"'{e.filename}'" if e.filename else f"'{out}'"
        raise UserError(f"no space left on the device while writing {where} ({e.strerror}); free some space "
                        "and rerun the same command: it resumes after the last complete shard") from None


def pieces(records: Iterator[Record], mode: str, separator: str) -> Iterator[tuple[str, str, bool]]:
    """(doc_id, text, new_stream): structured = a stream per record, continuous = a stream per file."""
    source = None
    for r in records:
        if mode == "structured":
            yield r.doc_id, r.text, not r.cont
        else:
            new = r.source != source
            source = r.source
            yield r.source, (r.text if new or r.cont else separator + r.text), new


def shard_summary(name: str, windows: list[Window], stats: list[WindowStats], cfg: TagConfig) -> tuple[dict, list]:
    """The manifest entry of one shard, and each window's selected positions."""
    entry = {"file": name, "rows": len(windows), "positions": 0, "scored": 0, "nan": 0, "selected": 0,
             "buckets": dict.fromkeys(cfg.bucket_names(), 0)}
    if windows and windows[0].unit >= 0:  # the input units (indices into the record's `inputs`) it holds windows of
        entry["units"] = [min(w.unit for w in windows), max(w.unit for w in windows)]
    selected = []
    for w, s in zip(windows, stats):
        metric = (s.topk_entropy if cfg.metric == "topk" else s.entropy)[w.score_start :]
        entry["positions"] += len(w.token_ids)
        entry["scored"] += len(metric)
        entry["nan"] += int(np.isnan(metric).sum())
        with np.errstate(invalid="ignore"):
            sel = np.nonzero(metric > cfg.select_above)[0] + w.score_start
            for b, name_ in zip(cfg.buckets, cfg.bucket_names()):
                entry["buckets"][name_] += int((metric > b).sum())
        entry["selected"] += len(sel)
        selected.append(sel.astype(np.int32))
    return entry, selected


def run_tag(cfg: TagConfig, console=None, ranks: RankInfo | None = None) -> dict:
    """Run this rank's part of the tagging job; returns its record (the final manifest for one rank).
    `ranks` says how the rank was found (default: cfg.rank/world_size as explicit flags): under
    torchrun, rank 0 writes manifest.json once every rank is done; otherwise `rpt-data merge` does."""
    ranks = ranks or resolve_ranks(cfg.rank, cfg.world_size)
    if cfg.world_size > 1 and ranks.torch_distributed:
        with process_group(ranks) as dist:  # joined before the work: a missing rank is said in minutes
            record = _tag_rank(cfg, ranks)
            wait_for_ranks(dist)  # every rank's record is complete once all of them got here
            if cfg.rank == 0:
                manifest = merge_out(cfg.out)
                print(f"all {cfg.world_size} ranks are done: {cfg.out}/{MANIFEST} lists "
                      f"{len(manifest['shards'])} shards", file=sys.stderr)
        return record
    record = _tag_rank(cfg, ranks)
    if cfg.world_size > 1:
        print(f"rank {cfg.rank} of {cfg.world_size} is done; "
              f"run `rpt-data merge {cfg.out}` once all ranks are done", file=sys.stderr)
    return record


def _tag_rank(cfg: TagConfig, ranks: RankInfo) -> dict:
    files = expand_inputs(cfg.inputs, cfg.format)
    inputs = [fingerprint(p) for p, _ in files]
    division = divide_segments(files, [f["bytes"] for f in inputs], cfg.mode, cfg.limit, cfg.rank, cfg.world_size,
                               recorded_owner(cfg, inputs, "segments")) or \
        divide(files, cfg.mode, cfg.limit, cfg.rank, cfg.world_size, [f["bytes"] for f in inputs],
                      recorded_owner(cfg, inputs))
    parse = RecordParser(cfg.text_field, cfg.template, cfg.id_field)
    same_division(cfg, division, files, inputs)
    read = {p for p, _ in division.files}
    old = prepare_out(cfg, inputs, [i for i, (p, _) in enumerate(files) if p in read])
    out = Path(cfg.out)
    if old and old.get("complete"):
        what = f"'{out}'" if cfg.world_size == 1 else f"rank {cfg.rank} of {cfg.world_size} in '{out}'"
        if not same_inputs(old.get("inputs"), inputs):  # files this rank does not read were fixed: the record names them as now
            old["inputs"] = inputs
            if cfg.world_size > 1:  # its own part is unchanged (same_division); other ranks' may not be
                old["division"] = division.describe()
            write_json_atomic(out / record_name(cfg), old)
        print(f"{what} is already complete ({len(old['shards'])} shards); nothing to do "
              "(use --overwrite to redo it)", file=sys.stderr)
        return old
    if cfg.world_size > 1:  # a merged manifest would no longer describe the shards
        (out / MANIFEST).unlink(missing_ok=True)
    lm = load_causal_lm(cfg.model, rank_device(cfg.device, ranks.local_rank), cfg.dtype)
    proxy = build_proxy(lm, top_k=cfg.top_k, chunk_rows=cfg.chunk_rows)  # exit 2 here if its head is not exact
    check_context_length(lm.model, cfg.window, proxy.offset)
    bos = {"used": proxy.bos is not None, "token_id": proxy.bos}
    if old and (old.get("proxy") != lm.identity or old.get("tokenizer") != lm.tokenizer_identity
                or old.get("bos", NO_BOS) != bos):  # a record without `bos` predates BOS support: none was used
        raise UserError(f"the model behind --model {cfg.model} changed since '{out}' was started; "
                        "rerun with --overwrite to start over")
    precision = proxy.precision()
    if old and old.get("precision", precision) != precision:  # a record without one predates this check
        raise UserError(f"'{out}' was started with the proxy in {_precision_words(old['precision'])} and this run "
                        f"would use {_precision_words(precision)} (--device {cfg.device} --dtype {cfg.dtype}), which "
                        "gives other stats; rerun on such a device or with that --dtype, or --overwrite to start over")
    record = {
        "schema_version": SCHEMA_VERSION, "complete": False, "config": cfg.content_dict(),
        "tokenizer": lm.tokenizer_identity, "proxy": lm.identity, "bos": bos, "precision": precision, "inputs": inputs,
        "shards": list(old["shards"]) if old else [], "records": 0, "bad_records": 0, "bad_reasons": {},
    }
    if cfg.world_size > 1:
        record.update(rank=cfg.rank, world_size=cfg.world_size, division=division.describe())
    with disk_full_is_a_user_error(out):
        _tag(cfg, division, parse, lm, proxy, record, unit_of={p: i for i, (p, _) in enumerate(files)})
    return record


def _precision_words(p: dict) -> str:
    return f"{p.get('dtype')} on {p.get('device')}" + (" with TF32" if p.get("tf32") else "")


def _tag(cfg: TagConfig, division: Division, parse: RecordParser, lm, proxy: Proxy, manifest: dict,
         overlap: bool | None = None, unit_of: dict[str, int] | None = None) -> None:
    """Read, window, score and write this rank's shards after the `done` ones, updating its record
    (`manifest`: manifest.json for one rank, rank-RRRRR.json otherwise) in place. `overlap` (default OVERLAP):
    read ahead and write behind in threads; off, the same work runs in line and writes the same bytes.
    `unit_of`: the index of each input path in the run's `inputs` (default: this rank's files in order); each
    shard entry records the range of units its windows come from (`units`), so a resume after a file is fixed
    knows which shards stand."""
    from rpt_data.progress import TagProgress

    out = Path(cfg.out)
    overlap = OVERLAP if overlap is None else overlap
    write_json_atomic(out / record_name(cfg), manifest)
    (out / log_name(cfg)).unlink(missing_ok=True)  # the record now lists its shards
    # shards go under data/ with a dataset card beside them; a run started before that layout keeps its own
    layout = "" if manifest["shards"] and "/" not in manifest["shards"][0]["file"] else f"{DATA_DIR}/"
    if layout:
        (out / DATA_DIR).mkdir(exist_ok=True)
        if cfg.rank == 0:  # one writer (the card is the same for every rank)
            write_text_atomic(out / DATASET_CARD, dataset_card())
    done = len(manifest["shards"])
    if done:
        print(f"resuming after {done} shard{'s' if done > 1 else ''} already in '{out}'", file=sys.stderr, flush=True)
    counts = {"records": 0, "bad": 0, "seen": 0}  # seen: good records of the whole run (for --limit)
    # continuous streams cut into segments (rpt_data.segments): path -> segment count; the segment of the last record
    cut = (division.counts if division.by == "segments" else cut_counts(division.files)) if cfg.mode == "continuous" \
        else {}
    segment = {}
    unit_of = unit_of or {p: i for i, (p, _) in enumerate(division.files)}
    unit = {"last": -1}  # the unit of the record read last (pieces() reads one record per piece, no further)
    streams: deque[tuple[str, int]] = deque()  # (doc_id, unit) of each stream begun and not yet windowed
    reasons: dict[str, int] = {}
    # a stripe (every rank reads and numbers every record): the read errors that ended a unit, whoever owns them
    striped = division.by in ("records", "windows")
    read_errors: list[list] = []
    examples: dict[str, BadRecord] = {}  # the first bad record of each reason
    progress = TagProgress(enabled=cfg.progress)
    t0 = time.perf_counter()

    with open(out / rejects_name(cfg), "w") as rejects, progress:
        def good_records() -> Iterator[Record]:
            """This rank's records (every record when windows are striped); bad ones go to its rejects."""
            if division.by == "segments":  # a cut file is read from its segments' byte ranges (rpt_data.segments)
                items = itertools.chain.from_iterable(
                    read_segments(p, f, parse, cut[p], functools.partial(division.owns_unit, p), cfg.context_prefix)
                    if p in cut else read_unit(p, f, parse) for p, f in division.files)
            else:
                # a stripe: every rank numbers every record, so a read error must heal or stop (rpt_data.readers)
                items = read_all(division.files, parse, striped=striped)
            if cfg.mode == "structured" and cfg.id_field:
                items = reject_duplicate_ids(items)
            index = -1  # record number in reading order, good and bad (a text file's later blocks share it)
            for item in items:
                if isinstance(item, BadRecord) or not item.cont:
                    index += 1
                if division.by == "segments":  # a bad record without an offset goes with the record before it
                    if item.offset >= 0 or item.source not in segment:
                        segment[item.source] = segment_of(cut.get(item.source, 1), item.offset)
                    mine = division.owns_unit(item.source, segment[item.source])
                else:
                    mine = division.owns(index)
                if isinstance(item, BadRecord):
                    if striped and item.kind == "read error":  # every rank lists it: merge checks they agree
                        read_errors.append([item.source, item.line])
                    if not mine:
                        continue
                    if cfg.on_bad_record == "fail":
                        where = f"{item.source}:{item.line}" if item.line else item.source
                        raise BadRecordError(f"bad record at {where}: {item.reason}; fix or remove it, or rerun with "
                                             "--on-bad-record skip to list it in rejects.jsonl and go on")
                    counts["bad"] += 1
                    reasons[item.kind] = reasons.get(item.kind, 0) + 1
                    examples.setdefault(item.kind, item)
                    rejects.write(json.dumps({"file": item.source, "line": item.line, "reason": item.reason}) + "\n")
                    continue
                if not item.cont:
                    if cfg.limit is not None and counts["seen"] >= cfg.limit:
                        return
                    counts["seen"] += 1
                    if mine:
                        counts["records"] += 1
                        progress.records(counts["records"])
                if mine or division.by in ("windows", "segments"):
                    unit["last"] = unit_of.get(item.source, unit["last"])
                    yield item

        def stream_units(texts):
            """The pieces, noting the unit of each stream they begin."""
            for doc_id, text, new in texts:
                if new:
                    streams.append((doc_id, unit["last"]))
                yield doc_id, text, new

        def with_units(ws: Iterator[Window]) -> Iterator[Window]:
            """Each window with the unit of its stream: a stream's windows come in order, window 0 first (a stream
            that gave no window is passed over; a stream's doc_id is unique in a run, ids are checked)."""
            current = -1
            for w in ws:
                if w.window_index == 0:
                    while streams and streams[0][0] != w.doc_id:
                        streams.popleft()
                    current = streams.popleft()[1] if streams else -1
                w.unit = current
                yield w

        def windows() -> Iterator[Window]:
            if cut:  # a stream longer than SEGMENT_BYTES: segments, this rank's only (rpt_data.segments)
                owned = division.owns_unit if division.by == "segments" else (lambda path, k: True)
                ws = segment_windows(good_records(), cut, owned, cfg.separator, lm.tokenizer, cfg.window,
                                     cfg.context_prefix, has_bos=proxy.bos is not None)
                ws = (w for g, w in enumerate(ws) if division.owns(g)) if division.by == "windows" else ws
                for w in ws:  # the unit of a segment's window is its file (a fixed file redoes from its first shard)
                    w.unit = unit_of.get(w.doc_id, unit_of.get(w.doc_id.rpartition(":segment")[0], -1))
                    yield w
                return
            texts = stream_units(pieces(good_records(), cfg.mode, cfg.separator))
            first = next(texts, None)  # no good record: no window (and no empty batch for the tokenizer)
            if first is None:
                return
            ws = with_units(windows_from_pieces(itertools.chain([first], texts), lm.tokenizer, cfg.window,
                                                cfg.context_prefix, has_bos=proxy.bos is not None))
            if division.by == "windows":  # every rank builds every window of the run and scores its stripe
                ws = (w for g, w in enumerate(ws) if division.owns(g))
            yield from ws

        def write(seq: int, chunk: list[Window], stats: list[WindowStats]) -> None:
            entry, selected = shard_summary(layout + shard_name(cfg.rank, seq), chunk, stats, cfg)
            table = build_table(chunk, stats, selected).replace_schema_metadata(shard_metadata(lm.tokenizer_identity))
            entry.update(write_shard(out / entry["file"], table, cfg.row_group_rows, out))  # temp file in out/
            manifest["shards"].append(entry)
            append_json_line(out / log_name(cfg), entry)  # O(1) per shard; the record is rewritten at the end
            progress.shard(entry["file"], len(manifest["shards"]))

        # reading, tokenizing and windowing run one pool ahead of the scorer, writing one pool behind it
        size = pool_shards(cfg.shard_rows, cfg.window)
        pools = read_ahead(shard_pools(windows(), cfg.shard_rows, size), depth=1, enabled=overlap)
        with contextlib.closing(pools), WriteBehind(write, depth=size, enabled=overlap) as writer:
            for pool in pools:
                stats = score_pool(proxy, pool, done, cfg.batch_tokens, progress.tokens)
                for (seq, chunk), st in zip(pool, stats):
                    if seq >= done:  # earlier ones were completed by an earlier run: same windows, on disk
                        writer.submit(seq, chunk, st)

    # none of the whole run's records yields text (a rank of a by-files division knows only its files)
    if counts["seen"] == 0 and cfg.limit != 0 and (cfg.world_size == 1 or division.by not in ("files", "segments")):
        (out / record_name(cfg)).unlink()  # nothing to resume: the corrected command starts over here
        raise no_text_error(cfg, reasons, examples)
    manifest.update(complete=True, records=counts["records"], bad_records=counts["bad"],
                    bad_reasons=dict(sorted(reasons.items(), key=lambda kv: -kv[1])), totals=totals(manifest["shards"]))
    if striped:
        manifest["read_errors"] = read_errors
    write_json_atomic(out / record_name(cfg), manifest)
    (out / log_name(cfg)).unlink(missing_ok=True)
    elapsed = time.perf_counter() - t0
    progress.summary(manifest, elapsed, progress.token_count, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
