"""Peak memory of streamed input: `hf://` parquet through datasets streaming, and the tagging path at 8 -> 128 MiB.

Default mode: writes N parquet files of synthetic English-like text (once, into --data), then streams them with
`--input hf://DIR` semantics (expand_inputs -> read_all -> RecordParser -> continuous pieces), with
--tokenize also through the windowing (tests/tiny's byte-level BPE: a fast stand-in for the proxy's).
Prints text bytes streamed, seconds, and peak RSS (ru_maxrss) sampled every 100 MB of text.

--tag-path: the tagging path's reading + tokenizing + windowing (read_all -> pieces -> windows_from_pieces, the
proxy's own tokenizer, --window 1024 --context-prefix 256) for each input size in --sizes (MiB), each size in a
fresh process, for a text file (continuous: one stream of the whole file) and a jsonl of ~4 KiB records
(structured: many short streams). Peak RSS must not grow with the size: the tokenizer holds at most
rpt_data.windows.SPAN_BYTES of text (plus one short stream) at a time. Prints a markdown table; --json writes it.
  python bench/stream.py --tag-path --sizes 8,16,32,64,128 --json bench/results/stream-tag.json
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


WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more time can people into "
         "only new some could these two may first then do any like my now over such our man me even most made after "
         "also did many naïve café 日本語").split()


def write_tag_input(path: Path, mib: int, kind: str) -> None:
    """`mib` MiB of random words: a text file of paragraphs, or a jsonl of ~4 KiB {"text"} records."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        written = 0
        while written < mib << 20:
            paras = [" ".join(rng.choice(words, 700)) + "." for _ in range(64)]
            chunk = "".join((json.dumps({"text": p}, ensure_ascii=False) if kind == "jsonl" else p + "\n\n") + (
                "\n" if kind == "jsonl" else "") for p in paras)
            f.write(chunk)
            written += len(chunk.encode())
    tmp.replace(path)


def tag_one(path: str, kind: str, model: str) -> dict:
    """Read + tokenize + window one input as `rpt-data tag` does; peak RSS of this (fresh) process."""
    from rpt_common.bos import bos_token_id
    from rpt_common.models import load_tokenizer
    from rpt_data.pipeline import pieces
    from rpt_data.readers import RecordParser, expand_inputs, read_all
    from rpt_data.windows import windows_from_pieces

    tok = load_tokenizer(model)
    rss_start = rss_mib()
    mode = "continuous" if kind == "text" else "structured"
    t0 = time.perf_counter()
    recs = (r for r in read_all(expand_inputs([path], None), RecordParser("text", None, None)))
    windows = tokens = 0
    for w in windows_from_pieces(pieces(recs, mode, "\n\n"), tok, 1024, 256, has_bos=bos_token_id(tok) is not None):
        windows += 1
        tokens += len(w.token_ids) - w.score_start
    seconds = time.perf_counter() - t0
    mib = Path(path).stat().st_size / (1 << 20)
    return {"kind": kind, "mode": mode, "input_mib": round(mib, 1), "windows": windows, "scored_tokens": tokens,
            "seconds": round(seconds, 1), "mib_per_s": round(mib / seconds, 2),
            "rss_after_load_mib": round(rss_start, 1),
            "peak_rss_mib": round(rss_mib(), 1), "growth_mib": round(rss_mib() - rss_start, 1)}


def tag_path(args) -> None:
    import subprocess

    data = Path(args.data) / "tag"
    data.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in args.kinds.split(","):
        for mib in (int(x) for x in args.sizes.split(",")):
            path = data / f"{kind}-{mib}mib.{'txt' if kind == 'text' else 'jsonl'}"
            if not path.exists():
                write_tag_input(path, mib, kind)
            cmd = [sys.executable, __file__, "--tag-one", str(path), "--kind", kind, "--model", args.model]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{kind} {mib} MiB: {rows[-1]}", file=sys.stderr, flush=True)
    from rpt_data.windows import SPAN_BYTES

    res = {"model": args.model, "window": 1024, "context_prefix": 256, "span_bytes": SPAN_BYTES, "rows": rows}
    print("| input | MiB | windows | seconds | MiB/s | RSS after load (MiB) | peak RSS (MiB) | growth (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} ({r['mode']}) | {r['input_mib']} | {r['windows']} | {r['seconds']} | {r['mib_per_s']} | "
              f"{r['rss_after_load_mib']} | {r['peak_rss_mib']} | {r['growth_mib']} |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/tmp/rpt-stream-bench")
    ap.add_argument("--gb", type=float, default=1.1)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--tokenize", action="store_true", help="also tokenize and window (slower)")
    ap.add_argument("--json", help="write the result here")
    ap.add_argument("--tag-path", action="store_true", help="the tagging path's memory at each of --sizes")
    ap.add_argument("--sizes", default="8,16,32,64,128", help="--tag-path input sizes in MiB")
    ap.add_argument("--kinds", default="text,jsonl", help="--tag-path inputs: text (continuous), jsonl (structured)")
    ap.add_argument("--model", default="demo", help="--tag-path: whose tokenizer (as --model of rpt-data tag)")
    ap.add_argument("--tag-one", help=argparse.SUPPRESS)  # one size, in the fresh process --tag-path starts
    ap.add_argument("--kind", default="text", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tag_one:
        print(json.dumps(tag_one(args.tag_one, args.kind, args.model)))
        return
    if args.tag_path:
        tag_path(args)
        return

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
