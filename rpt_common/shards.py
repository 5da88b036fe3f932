"""The shard contract shared by the writer (rpt_data) and the reader (rpt_train).

One Parquet row per window; per-position lists are aligned with `token_ids`; stats at index t
describe p(. | x<t) and are null where t < score_start. `token_bytes[i]` is the UTF-8 byte end of
token i inside `text` (token i spans bytes [token_bytes[i-1], token_bytes[i]), with -1 -> 0).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa

from rpt_common.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
SHARD_GLOB = "shard-*.parquet"
# Shards live under OUT/data/ (the hub's layout): `pl.scan_parquet(f"{OUT}/data")` and `pq.read_table(f"{OUT}/data")`
# read them, and OUT/README.md (a dataset card naming them) makes `datasets.load_dataset(OUT)` read them. Directories
# written before this layout hold their shards in OUT itself; every reader here looks in both places.
DATA_DIR = "data"
DATASET_CARD = "README.md"
# A multi-rank run: each rank records its own progress and rejects; `rpt-data merge` (or rank 0 under
# torchrun) writes manifest.json from the records once every rank is complete.
RANK_RECORD_GLOB = "rank-*.json"
# While a run goes, each finished shard's manifest entry is appended to a log (O(1) work per shard) beside the
# record (manifest.json or rank-RRRRR.json), which is written only at the start and at the end.
SHARD_LOG = "shards.jsonl"

SHARD_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("window_index", pa.int32(), nullable=False),
        pa.field("token_start", pa.int64(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("token_bytes", pa.list_(pa.int32()), nullable=False),
        pa.field("score_start", pa.int32(), nullable=False),
        pa.field("entropy", pa.list_(pa.float32())),
        pa.field("topk_entropy", pa.list_(pa.float32())),
        pa.field("target_logprob", pa.list_(pa.float32())),
        pa.field("proxy_argmax", pa.list_(pa.int32())),
        pa.field("selected", pa.list_(pa.int32()), nullable=False),
    ]
)
STAT_COLUMNS = ("entropy", "topk_entropy", "target_logprob", "proxy_argmax")
# The manifest's tagging `metric` names the entropy column tags and buckets use; old manifests without one, or
# without `buckets`, were tagged with these defaults.
METRIC_COLUMNS = {"topk": "topk_entropy", "full": "entropy"}
DEFAULT_METRIC = "topk"
DEFAULT_BUCKETS = (0.5, 1.0, 1.5)
# Windows per Parquet row group: the unit a training sample reads (old shards: one row group per shard).
DEFAULT_ROW_GROUP_ROWS = 32
# Parquet footer key-value metadata of every shard: what wrote it, so `rpt-data validate` can tell a
# shard of another run (another tokenizer, another schema version) from one of this run.
META_SCHEMA_VERSION = "rpt.schema_version"
META_VOCAB_HASH = "rpt.tokenizer_vocab_hash"


def shard_metadata(tokenizer_identity: dict) -> dict[str, str]:
    return {META_SCHEMA_VERSION: str(SCHEMA_VERSION), META_VOCAB_HASH: str(tokenizer_identity.get("vocab_hash", ""))}


def footer_problems(metadata: dict | None, manifest: dict) -> list[str]:
    """How a shard's footer stamp (Parquet key-value metadata) disagrees with its manifest: another schema
    version or another tokenizer. A shard without a stamp is not judged here."""
    meta = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in (metadata or {}).items()}
    version, vocab = str(manifest.get("schema_version")), str((manifest.get("tokenizer") or {}).get("vocab_hash"))
    problems = []
    if meta.get(META_SCHEMA_VERSION, version) != version:
        problems.append(f"written with shard schema version {meta[META_SCHEMA_VERSION]}, the manifest has version {version}")
    if meta.get(META_VOCAB_HASH, vocab) != vocab:
        problems.append(f"written with another tokenizer (vocabulary hash {meta[META_VOCAB_HASH]}, "
                        f"the manifest's tokenizer has {vocab})")
    return problems


def file_digest(path: str | os.PathLike) -> dict:
    """{"bytes", "sha256"} of a file, read in 1 MiB blocks."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
            n += len(block)
    return {"bytes": n, "sha256": h.hexdigest()}


def shard_name(rank: int, seq: int) -> str:
    return f"shard-{rank:05d}-{seq:05d}.parquet"


def rank_record_name(rank: int) -> str:
    return f"rank-{rank:05d}.json"


def rank_rejects_name(rank: int) -> str:
    return f"rejects-{rank:05d}.jsonl"


def rank_shard_log_name(rank: int) -> str:
    return f"shards-{rank:05d}.jsonl"


def read_shard_log(path: str | os.PathLike) -> list[dict]:
    """The shard entries appended to a log; a last line torn by a kill is not an entry."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    entries = []
    for line in lines:
        try:
            entries.append(json.loads(line))
        except ValueError:
            break
    return entries


def with_logged_shards(record: dict, log: str | os.PathLike) -> dict:
    """A run's record with the shards its log lists after the ones the record holds (each shard once)."""
    listed = {s["file"] for s in record.get("shards", [])}
    extra = [e for e in read_shard_log(log) if e.get("file") not in listed]
    return {**record, "shards": [*record.get("shards", []), *extra]} if extra else record


def unfinished_ranks(out: str | os.PathLike) -> str | None:
    """For a multi-rank directory without a manifest: which ranks are not done, as a sentence
    ("rank 1 of 2 has not finished"); None when the directory holds no rank record."""
    paths = sorted(Path(out).glob(RANK_RECORD_GLOB))
    if not paths:
        return None
    records = {}
    for p in paths:
        try:
            r = json.loads(p.read_text())
            records[int(r["rank"])] = with_logged_shards(r, Path(out) / rank_shard_log_name(int(r["rank"])))
        except (ValueError, KeyError, TypeError):
            continue  # a damaged record counts as an unfinished rank below
    world = max((int(r.get("world_size", 0)) for r in records.values()), default=0)
    if not world:
        return "its rank records (rank-*.json) are unreadable"
    todo = [r for r in range(world) if not records.get(r, {}).get("complete")]
    if not todo:
        return f"all {world} ranks are complete but not merged yet"
    ranks = ", ".join(map(str, todo[:8])) + (", ..." if len(todo) > 8 else "")
    return f"rank{'s' if len(todo) > 1 else ''} {ranks} of {world} {'have' if len(todo) > 1 else 'has'} not finished"


def shards_identity(out: str | os.PathLike) -> str | None:
    """The identity of a finished tag output wherever it is copied or moved: sha256 over its whole manifest (its
    settings - bucket thresholds, metric, tokenizer... - which the shard files alone do not fix, and every shard's
    name and digest). None when it has no complete manifest or a shard without a digest."""
    try:
        manifest = json.loads((Path(out) / MANIFEST).read_text())
        known = manifest.get("complete") and manifest["shards"] and all(s["sha256"] for s in manifest["shards"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest() if known else None


def read_manifest(out: str | os.PathLike) -> dict:
    """The manifest of a tag output directory, checked for the schema version this code reads."""
    path = Path(out) / MANIFEST
    if not path.exists():
        pending = unfinished_ranks(out)
        if pending:
            raise UserError(f"'{out}' is a multi-rank output without {MANIFEST} yet: {pending}; "
                            f"run `rpt-data merge {out}` once all ranks are done")
        raise UserError(f"'{out}' has no {MANIFEST}; it is not an `rpt-data tag` output directory")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the directory is corrupt, rerun `rpt-data tag`")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards", []), list):
        raise UserError(f"{path} is not an rpt-data manifest (expected an object with a list of shards)")
    if not manifest.get("complete"):  # a run under way (or stopped): its shards so far
        manifest = with_logged_shards(manifest, Path(out) / SHARD_LOG)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(f"{path} has schema version {version}, this toolkit reads version {SCHEMA_VERSION}; "
                        "re-tag the corpus with this version of rpt-data")
    return manifest


def shard_file(rank: int, seq: int) -> str:
    """A shard's path relative to the output directory, as the manifest records it."""
    return f"{DATA_DIR}/{shard_name(rank, seq)}"


def shard_paths(out: str | os.PathLike) -> list[str]:
    """The shard files of an output directory: under data/, or in the directory itself (written before data/)."""
    return sorted(glob.glob(os.path.join(out, DATA_DIR, SHARD_GLOB)) + glob.glob(os.path.join(out, SHARD_GLOB)))


def dataset_card() -> str:
    """OUT/README.md: tells `datasets.load_dataset(OUT)` that the dataset is the Parquet shards under data/ (without
    it, datasets would also try the JSON records beside them)."""
    return (f"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: {DATA_DIR}/{SHARD_GLOB}\n"
            "---\n# rpt-data tag output\n\nOne row per window, Parquet shards under `data/` (see docs/shards.md of the "
            "RPT toolkit). Read them with `datasets.load_dataset(OUT)`, `polars.scan_parquet(OUT + \"/data\")` or "
            "`pyarrow.parquet.read_table(OUT + \"/data\")`; `manifest.json` describes the run.\n")
