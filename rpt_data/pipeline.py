"""`rpt-data tag`: records -> windows -> proxy stats -> tags -> shards + manifest, resumable."""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rpt_common.errors import UserError
from rpt_common.models import load_causal_lm
from rpt_common.shards import MANIFEST, REJECTS, SCHEMA_VERSION, shard_metadata, shard_name
from rpt_data.config import RUNTIME_ONLY, TagConfig
from rpt_data.proxy import Proxy, WindowStats, token_budget_batches
from rpt_data.readers import BadRecord, Record, RecordParser, expand_inputs, read_all, reject_duplicate_ids
from rpt_data.windows import Window, windows_from_pieces
from rpt_data.writer import build_table, is_ours, write_json_atomic, write_shard


class BadRecordError(UserError):
    """--on-bad-record fail: the message names the file and the 1-based line or row."""


def fingerprint(path: str) -> dict:
    p = Path(path)
    files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
    st = [f.stat() for f in files]
    return {"path": path, "bytes": sum(s.st_size for s in st), "mtime_ns": max((s.st_mtime_ns for s in st), default=0)}


def prepare_out(cfg: TagConfig, inputs: list[dict]) -> dict | None:
    """Check the output directory; return the manifest to resume from (None = start fresh)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    foreign = sorted(n for n in os.listdir(out) if not is_ours(n))
    if foreign:
        raise UserError(f"output directory '{out}' already holds files that rpt-data did not write "
                        f"(e.g. '{foreign[0]}'); choose an empty or new --out directory")
    if cfg.overwrite:  # the manifest goes first: shards without one are never trusted
        for n in sorted(os.listdir(out), key=lambda n: n != MANIFEST):
            os.remove(out / n)
        return None
    if not (out / MANIFEST).exists():
        for n in os.listdir(out):  # shards without a manifest were never recorded as complete
            os.remove(out / n)
        return None
    try:
        old = json.loads((out / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{out / MANIFEST} is corrupt; rerun with --overwrite to start over")
    if old.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"'{out}' was written with schema version {old.get('schema_version')}; "
                        "rerun with --overwrite or choose a new --out")
    old_cfg, new_cfg = old.get("config", {}), cfg.content_dict()
    # `out` may differ: a stopped run may be moved or copied (e.g. to a disk with space) and resumed there
    ignored = {"out", *RUNTIME_ONLY}  # an older manifest may still record knobs that are runtime-only now
    diff = sorted(k for k in set(old_cfg) | set(new_cfg) if k not in ignored and old_cfg.get(k) != new_cfg.get(k))
    if diff:
        raise UserError(f"'{out}' holds a run with a different config ({', '.join(diff)} differ); "
                        "rerun with the same options to resume, --overwrite to start over, or a new --out")
    if old.get("inputs") != inputs:
        raise UserError(f"the input files changed since '{out}' was started; rerun with --overwrite to start over")
    kept = []  # recorded shards still on disk as written; the first one that is not and all later are redone
    for entry in old.get("shards", []):
        path = out / entry["file"]
        if not path.is_file() or path.stat().st_size != entry.get("bytes", path.stat().st_size):
            print(f"warning: {path} is missing or changed since it was recorded; redoing it and the shards after it",
                  file=sys.stderr)
            break
        kept.append(entry)
    old["shards"] = kept
    listed = {s["file"] for s in kept}
    for n in os.listdir(out):  # half-written or unrecorded shards are redone
        if n.endswith(".tmp") or (n.startswith("shard-") and n not in listed):
            os.remove(out / n)
    return old


@contextlib.contextmanager
def disk_full_is_a_user_error(out: Path):
    """A full disk (or quota) while writing: one sentence, exit 2, and the output stays resumable
    (temp files are removed, the manifest on disk lists only complete shards)."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
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


def totals(shards: list[dict]) -> dict:
    keys = ("rows", "positions", "scored", "nan", "selected")
    t = {k: sum(s[k] for s in shards) for k in keys}
    t["buckets"] = {b: sum(s["buckets"][b] for s in shards) for b in (shards[0]["buckets"] if shards else {})}
    return t


def run_tag(cfg: TagConfig, console=None) -> dict:
    """Run the whole tagging job; returns the final manifest."""
    files = expand_inputs(cfg.inputs, cfg.format)
    inputs = [fingerprint(p) for p, _ in files]
    parse = RecordParser(cfg.text_field, cfg.template, cfg.id_field)
    old = prepare_out(cfg, inputs)
    out = Path(cfg.out)
    if old and old.get("complete"):
        print(f"'{out}' is already complete ({len(old['shards'])} shards); nothing to do "
              "(use --overwrite to redo it)", file=sys.stderr)
        return old
    lm = load_causal_lm(cfg.model, cfg.device, cfg.dtype)
    if old and (old.get("proxy") != lm.identity or old.get("tokenizer") != lm.tokenizer_identity):
        raise UserError(f"the model behind --model {cfg.model} changed since '{out}' was started; "
                        "rerun with --overwrite to start over")
    proxy = Proxy(lm.model, top_k=cfg.top_k, chunk_rows=cfg.chunk_rows)
    manifest = {
        "schema_version": SCHEMA_VERSION, "complete": False, "config": cfg.content_dict(),
        "tokenizer": lm.tokenizer_identity, "proxy": lm.identity, "inputs": inputs,
        "shards": list(old["shards"]) if old else [], "records": 0, "bad_records": 0, "bad_reasons": {},
    }
    with disk_full_is_a_user_error(out):
        _tag(cfg, files, parse, lm, proxy, manifest)
    return manifest


def _tag(cfg: TagConfig, files: list, parse: RecordParser, lm, proxy: Proxy, manifest: dict) -> None:
    """Read, window, score and write shards after the `done` ones, updating `manifest` in place."""
    from rpt_data.progress import TagProgress

    out = Path(cfg.out)
    write_json_atomic(out / MANIFEST, manifest)
    done = len(manifest["shards"])
    counts = {"records": 0, "bad": 0}
    reasons: dict[str, int] = {}
    progress = TagProgress(enabled=cfg.progress)
    t0 = time.perf_counter()

    with open(out / REJECTS, "w") as rejects, progress:
        def good_records() -> Iterator[Record]:
            items = read_all(files, parse)
            if cfg.mode == "structured" and cfg.id_field:
                items = reject_duplicate_ids(items)
            for item in items:
                if isinstance(item, BadRecord):
                    if cfg.on_bad_record == "fail":
                        where = f"{item.source}:{item.line}" if item.line else item.source
                        raise BadRecordError(f"bad record at {where}: {item.reason}; fix or remove it, or rerun with "
                                             "--on-bad-record skip to list it in rejects.jsonl and go on")
                    counts["bad"] += 1
                    reasons[item.kind] = reasons.get(item.kind, 0) + 1
                    rejects.write(json.dumps({"file": item.source, "line": item.line, "reason": item.reason}) + "\n")
                    continue
                if not item.cont:
                    if cfg.limit is not None and counts["records"] >= cfg.limit:
                        return
                    counts["records"] += 1
                    progress.records(counts["records"])
                yield item

        windows = windows_from_pieces(
            pieces(good_records(), cfg.mode, cfg.separator), lm.tokenizer, cfg.window, cfg.context_prefix
        )
        for seq in itertools.count():
            chunk = list(itertools.islice(windows, cfg.shard_rows))
            if not chunk:
                break
            if seq < done:  # completed by an earlier run: same windows, already on disk
                continue
            stats: list[WindowStats | None] = [None] * len(chunk)
            for idx in token_budget_batches(chunk, cfg.batch_tokens):
                for i, s in zip(idx, proxy.score_batch([chunk[i] for i in idx])):
                    stats[i] = s
                progress.tokens(sum(len(chunk[i].token_ids) for i in idx))
            entry, selected = shard_summary(shard_name(cfg.rank, seq), chunk, stats, cfg)
            table = build_table(chunk, stats, selected).replace_schema_metadata(shard_metadata(lm.tokenizer_identity))
            entry.update(write_shard(out / entry["file"], table))
            manifest["shards"].append(entry)
            write_json_atomic(out / MANIFEST, manifest)

    manifest.update(complete=True, records=counts["records"], bad_records=counts["bad"],
                    bad_reasons=dict(sorted(reasons.items(), key=lambda kv: -kv[1])), totals=totals(manifest["shards"]))
    write_json_atomic(out / MANIFEST, manifest)
    elapsed = time.perf_counter() - t0
    progress.summary(manifest, elapsed, progress.token_count, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
