"""Small corpus writers and readers shared by the rpt_data tests."""
from __future__ import annotations

import json
from pathlib import Path

import polars as pl

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Let x_n be the number of strings of length n; then x_(n+1) = 2 x_n + 1.",
    "Thus, in total, there are 239 such strings. Hello wörld, naïve café 日本語 🙂.",
    "def f(n):\n    return n * (n + 1) // 2",
    "In 1905 Einstein wrote four papers; the third introduced special relativity.",
]


def records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "text": " ".join(SENTENCES[j % len(SENTENCES)] for j in range(i, i + 1 + i % 4))}
            for i in range(n)]


def write_jsonl(path: Path, rows: list, raw_lines: dict[int, bytes] | None = None) -> Path:
    """rows as JSON lines; raw_lines {index: bytes} inserts verbatim (bad) lines before row `index`."""
    raw_lines = raw_lines or {}
    with open(path, "wb") as f:
        for i, r in enumerate(rows):
            if i in raw_lines:
                f.write(raw_lines[i] + b"\n")
            f.write(json.dumps(r, ensure_ascii=False).encode() + b"\n")
    return path


def read_rows(out: Path) -> pl.DataFrame:
    return pl.read_parquet(sorted(out.glob("shard-*.parquet"))).sort("doc_id", "window_index")
