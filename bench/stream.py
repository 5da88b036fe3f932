"""Peak memory of an `hf://` streamed input: >= 1 GB of text through datasets streaming and the readers.

Writes N parquet files of synthetic English-like text (once, into --data), then streams them with
`--input hf://DIR` semantics (expand_inputs -> read_all -> RecordParser -> continuous pieces), with
--tokenize also through the windowing (tests/tiny's byte-level BPE: a fast stand-in for the proxy's).
Prints text bytes streamed, seconds, and peak RSS (ru_maxrss) sampled every 100 MB of text.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_data(root: Path, gb: float, files: int) -> int:
    """Parquet files of ~4 KiB records of random words (drawn from a pool); returns the text bytes written."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = np.array("the of and to in a is that for it as was with be by on not he this are or his from at "
                     "which but have an they you were her she there been one all we their has would when if "
                     "so no will more time can people into only new some could these two may first then do "
                     "any like my now over such our man me even most made after also did many".split())
    rng = np.random.default_rng(0)
    pool = np.array([" ".join(rng.choice(words, 800)) + "." for _ in range(4096)], dtype=object)  # cheap to draw
    total, per_file = 0, int(gb * 1e9 / files)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        path = root / f"part-{f:03d}.parquet"
        writer, done = None, 0
        while done < per_file:
            texts = list(pool[rng.integers(0, len(pool), 2048)])
            table = pa.table({"text": texts})
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
            done += sum(len(t) for t in texts)
        writer.close()
        total += done
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/rpt-stream-bench")
    ap.add_argument("--gb", type=float, default=1.1)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--tokenize", action="store_true", help="also tokenize and window (slower)")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()

    from rpt_data.pipeline import pieces
    from rpt_data.readers import RecordParser, expand_inputs, read_all

    data = Path(args.data)
    if not list(data.glob("*.parquet")):
        write_data(data, args.gb, args.files)
    on_disk = sum(p.stat().st_size for p in data.glob("*.parquet"))
    rss_start = rss_mib()
    files = expand_inputs([f"hf://{data}"], None)
    stream = (r for r in read_all(files, RecordParser("text", None, None)))
    src = pieces(stream, "continuous", "\n\n")
    if args.tokenize:
        from tiny import make_tokenizer

        from rpt_data.windows import windows_from_pieces

        counted = []

        def tee(it):
            for p in it:
                counted.append(len(p[1]))
                yield p

        items = windows_from_pieces(tee(src), make_tokenizer(), 1024, 128)
    t0 = time.perf_counter()
    text_bytes, samples, step, windows = 0, [], 100_000_000, 0  # a sample every 100 MB
    for item in (items if args.tokenize else src):
        if args.tokenize:
            windows += 1
            text_bytes = sum(counted)
        else:
            text_bytes += len(item[1])
        if text_bytes >= (len(samples) + 1) * step:
            samples.append({"text_gb": round(text_bytes / 1e9, 3), "peak_rss_mib": round(rss_mib(), 1)})
    seconds = time.perf_counter() - t0
    res = {"input": f"hf://{data}", "units": len(files), "parquet_gb_on_disk": round(on_disk / 1e9, 3),
           "text_gb_streamed": round(text_bytes / 1e9, 3), "tokenize": args.tokenize, "windows": windows,
           "seconds": round(seconds, 1), "mb_per_s": round(text_bytes / 1e6 / seconds, 1),
           "rss_before_mib": round(rss_start, 1), "peak_rss_mib": round(rss_mib(), 1), "rss_trace": samples}
    print(json.dumps(res, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
