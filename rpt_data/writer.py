"""Parquet shards (zstd, atomic) and the manifest of a tag output directory."""
from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rpt_common.shards import (DATA_DIR, DATASET_CARD, DEFAULT_ROW_GROUP_ROWS, MANIFEST, REJECTS, SHARD_LOG, SHARD_SCHEMA,
                                file_digest)
from rpt_data.proxy import WindowStats
from rpt_data.windows import Window


TEMP_NAME = re.compile(r"\.(.+)\.\d+-[0-9a-f]+\.tmp")


def temp_path(path: Path, directory: Path | None = None) -> Path:
    """A temp file for `path`: `.NAME.PID-RANDOM.tmp`, unique to this call, so that processes writing the
    same file at once (every rank writes the dataset card) never rename or remove each other's temp; hidden
    (a leading dot), so that readers of a directory (pyarrow, datasets) skip it. `directory` (default: beside
    `path`) must be on the same filesystem."""
    return (directory or path.parent) / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp"


def final_name(name: str) -> str:
    """The file a temp file (`.NAME.PID-RANDOM.tmp`, or `NAME.tmp` of older versions) stands for; else `name`."""
    base = os.path.basename(name)
    m = TEMP_NAME.fullmatch(base)
    return m.group(1) if m else base.removesuffix(".tmp")


def is_temp(name: str) -> bool:
    return final_name(name) != os.path.basename(name)


def write_json_atomic(path: Path, obj) -> None:
    """Write to a temp file, fsync, rename: a reader (or a resumed run) sees the old or the new file."""
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # e.g. a full disk: do not leave a partial file taking space
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """A small text file (the dataset card), replaced whole: readers see the old or the new one."""
    write_lines_atomic(path, [text])


def write_lines_atomic(path: Path, lines: Iterable[str]) -> None:
    """Like write_json_atomic, for a text file streamed line by line (e.g. the merged rejects.jsonl)."""
    tmp = temp_path(path)
    try:
        with open(tmp, "w") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def append_json_line(path: Path, obj) -> None:
    """Append one JSON line and fsync: O(1) work whatever the file holds (a kill leaves at most a torn last line)."""
    with open(path, "a") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: after a power cut the new name is there, not only the data."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _list_column(arrays: list[np.ndarray], dtype: pa.DataType, invalid: list[np.ndarray] | None = None) -> pa.Array:
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    mask = np.concatenate(invalid) if invalid is not None and arrays else None
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=dtype, mask=mask))


def build_table(windows: list[Window], stats: list[WindowStats], selected: list[np.ndarray]) -> pa.Table:
    """One row per window; stats are null before score_start and where the proxy gave NaN."""
    unscored = []
    for w in windows:
        m = np.zeros(len(w.token_ids), dtype=bool)
        m[: w.score_start] = True
        unscored.append(m)
    cols = {
        "doc_id": pa.array([w.doc_id for w in windows], pa.string()),
        "window_index": pa.array([w.window_index for w in windows], pa.int32()),
        "token_start": pa.array([w.token_start for w in windows], pa.int64()),
        "text": pa.array([w.text for w in windows], pa.string()),
        "token_ids": _list_column([w.token_ids for w in windows], pa.int32()),
        "token_bytes": _list_column([w.token_bytes for w in windows], pa.int32()),
        "score_start": pa.array([w.score_start for w in windows], pa.int32()),
    }
    for name in ("entropy", "topk_entropy", "target_logprob"):
        vals = [getattr(s, name) for s in stats]
        cols[name] = _list_column(vals, pa.float32(), [u | np.isnan(v) for u, v in zip(unscored, vals)])
    cols["proxy_argmax"] = _list_column([s.argmax for s in stats], pa.int32(),
                                        [u | (s.argmax < 0) for u, s in zip(unscored, stats)])
    cols["selected"] = _list_column(selected, pa.int32())
    return pa.Table.from_pydict(cols, schema=SHARD_SCHEMA)


def write_shard(path: Path, table: pa.Table, row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
                temp_dir: Path | None = None) -> dict:
    """Write to a temp file, fsync, rename: a shard file either is complete or does not exist. The temp file
    is hidden and goes to `temp_dir` (the output root, not data/ beside the finished shards), so that reading
    data/ (pyarrow, polars, datasets) never sees a duplicate or torn shard. Row groups of `row_group_rows`
    windows are what a training sample reads. Returns {"bytes", "sha256", "row_group_rows"} of the file, for
    the manifest (validate and resume check the digest)."""
    tmp = temp_path(path, temp_dir)
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd", row_group_size=row_group_rows)
            f.flush()
            os.fsync(f.fileno())
        digest = file_digest(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return {**digest, "row_group_rows": row_group_rows}


RANK_FILE = re.compile(r"(shard-(\d{5})-\d{5}\.parquet|rank-(\d{5})\.json|rejects-(\d{5})\.jsonl|shards-(\d{5})\.jsonl)")


def is_ours(name: str) -> bool:
    base = final_name(name)
    return base in (MANIFEST, REJECTS, SHARD_LOG, DATA_DIR, DATASET_CARD) or (base.startswith("shard-") and base.endswith(".parquet")) \
        or RANK_FILE.fullmatch(base) is not None


def file_rank(name: str) -> int | None:
    """The rank a shard, rank record or per-rank rejects file (or its .tmp) belongs to; None for others."""
    m = RANK_FILE.fullmatch(final_name(name))
    return None if m is None else int(next(g for g in m.groups()[1:] if g is not None))
