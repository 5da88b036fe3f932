"""Does the device wait on CPU work? `rpt-data tag`'s real loop (reading, tokenizing, windowing, pooling, shard
writing with zstd, sha256 and fsync) around a stand-in proxy whose forward takes a fixed time per batch.

The stand-in models an asynchronous device: `launch` queues a batch on a timeline that is busy `--forward-ms` per
batch (it starts when the device is free and the batch is queued) and returns at once; `collect` sleeps until that
batch is done. So `wall / (batches x forward)` is 1.0 when the device never waits on the host, and every second of
CPU work left in line adds to it (target <= 1.10). `steady` counts from the first forward (the first pool must be
read before anything can be scored: a one-off of a few seconds per 8M tokens); `total` from the start of the run.

Run with the overlap on (the default) and off (the same loop in line), on a web-like mix: documents of lognormal
length (median ~0.6 windows, a long tail), the proxy's own tokenizer. The sizes are scaled down together from the
defaults (window 1024, budget 16,384, 8M-token pools of 8,192 windows): --window 256 gives a 4,096-token budget
and 2M-token pools, so the same number of windows per batch and per pool, and the run covers several pools. The
batch fill (real tokens / (batches x budget)) is reported for the pooled batching and, from the same windows, for
the earlier batching within each shard. Writes bench/results/overlap-cpu.json; on a shared machine only one run's
ratios mean much (loadavg recorded).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, environment, pick_device, write_json  # noqa: E402

import numpy as np  # noqa: E402

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more time can people into "
         "only new some could these two may first then do any like my now over such our man me even most made after "
         "also did many naïve café 日本語 https://example.com/a?b=1 2024 $19.99 (see above)").split()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_corpus(path: Path, tokens: int, window: int, seed: int = 0) -> int:
    """A jsonl of web-like documents, ~`tokens` tokens in all (~1.3 tokens per word); returns the document count."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    n = 0
    budget = tokens / 1.3
    with open(path, "w", encoding="utf-8") as f:
        while budget > 0:
            size = int(min(np.exp(rng.normal(np.log(0.6 * window), 1.2)), 40 * window)) + 2
            f.write(json.dumps({"id": f"d{n}", "text": " ".join(rng.choice(words, size))}, ensure_ascii=False) + "\n")
            budget -= size
            n += 1
    return n


class TimedStandIn:
    """A proxy whose device takes `seconds` per batch; scores are constant (the work around them is real)."""

    bos, offset = None, 0

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.free_at = 0.0
        self.first_launch: float | None = None
        self.batches: list[int] = []  # real tokens per batch
        self.windows: list[int] = []  # every window's length, in stream order per pool

    def precision(self) -> dict:
        return {"device": "stand-in", "dtype": "float32", "tf32": False}

    def launch(self, windows):
        now = time.perf_counter()
        if self.first_launch is None:
            self.first_launch = now
        self.free_at = max(now, self.free_at) + self.seconds
        self.batches.append(sum(len(w.token_ids) for w in windows))
        return windows, self.free_at

    def collect(self, pending):
        from rpt_data.proxy import constant_stats

        windows, done_at = pending
        wait = done_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return constant_stats(windows)


def run_once(args, src: Path, out: Path, overlap: bool, tokenizer) -> dict:
    from types import SimpleNamespace

    import rpt_data.pipeline as pipeline
    import rpt_data.pools as pools
    from rpt_data.config import TagConfig

    proxy = TimedStandIn(args.forward_ms / 1000)
    lm = SimpleNamespace(tokenizer=tokenizer, identity={"path": "stand-in"}, tokenizer_identity={"name": args.model},
                         model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=None)))
    pipeline.load_causal_lm = lambda *a, **k: lm
    pipeline.build_proxy = lambda *a, **k: proxy
    pipeline.OVERLAP = overlap
    pools.LOOKAHEAD_TOKENS = args.pool_windows * args.window
    cfg = TagConfig(inputs=[str(src)], model=args.model, out=str(out), window=args.window,
                    context_prefix=args.window // 4, batch_tokens=args.batch_tokens, shard_rows=args.shard_rows,
                    id_field="id", progress=False, overwrite=True)
    t0 = time.perf_counter()
    manifest = pipeline.run_tag(cfg)
    end = time.perf_counter()
    device = len(proxy.batches) * proxy.seconds
    return {"overlap": overlap, "batches": len(proxy.batches), "shards": len(manifest["shards"]),
            "tokens": sum(proxy.batches), "device_seconds": round(device, 2),
            "wall_seconds": round(end - t0, 2), "first_forward_after_s": round(proxy.first_launch - t0, 2),
            "ratio_total": round((end - t0) / device, 3),
            "ratio_steady": round((end - proxy.first_launch) / device, 3),
            "fill": round(sum(proxy.batches) / (len(proxy.batches) * args.batch_tokens), 4)}


def shard_fill(out: Path, batch_tokens: int, shard_rows: int) -> dict:
    """The fill of the earlier batching (sorted within each shard) over the same windows, from the shards."""
    from types import SimpleNamespace

    import pyarrow.parquet as pq

    from rpt_data.proxy import token_budget_batches

    batches = tokens = 0
    for path in sorted(out.glob("**/shard-*.parquet")):
        lens = [len(x) for x in pq.read_table(path, columns=["token_ids"]).column("token_ids").to_pylist()]
        ws = [SimpleNamespace(token_ids=range(n)) for n in lens]
        batches += len(token_budget_batches(ws, batch_tokens))
        tokens += sum(lens)
    return {"batches": batches, "fill": round(tokens / (batches * batch_tokens), 4)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="whose tokenizer (as --model of rpt-data tag; default: the demo's)")
    p.add_argument("--tokens", type=int, default=6_000_000, help="corpus size in tokens (several pools)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--shard-rows", type=int, default=256)
    p.add_argument("--pool-windows", type=int, default=8192, help="windows per pool (LOOKAHEAD_TOKENS / window)")
    p.add_argument("--forward-ms", type=float, default=41.0,
                   help="device time per batch (default: 4,096 tokens at 100k tok/s, a 1.5B proxy on one GPU)")
    p.add_argument("--modes", default="on,off", help="overlap on, off or both")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "overlap-cpu.json"))
    args = p.parse_args(argv)
    import torch

    from rpt_common.models import load_tokenizer

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(args.model)
    result = {"environment": environment(pick_device("cpu"), 1), "loadavg_start": os.getloadavg()[0],
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "web.jsonl"
        result["settings"]["documents"] = write_corpus(src, args.tokens, args.window)
        for mode in args.modes.split(","):
            log(f"== overlap {mode} ==")
            run = run_once(args, src, Path(tmp) / f"out-{mode}", mode == "on", tokenizer)
            log(json.dumps(run))
            result["runs"].append(run)
        result["per_shard_batching"] = shard_fill(Path(tmp) / f"out-{args.modes.split(',')[0]}", args.batch_tokens,
                                                  args.shard_rows)
    result["loadavg_end"] = os.getloadavg()[0]
    on = next((r for r in result["runs"] if r["overlap"]), None)
    if on is not None:
        result["targets"] = {"ratio_steady<=1.10": on["ratio_steady"] <= 1.10, "fill>=0.90": on["fill"] >= 0.90}
    write_json(args.out, result)
    print(f"\n{'overlap':8s} {'batches':>8s} {'device s':>9s} {'wall s':>8s} {'steady':>7s} {'total':>7s} {'fill':>6s}")
    for r in result["runs"]:
        print(f"{'on' if r['overlap'] else 'off':8s} {r['batches']:8d} {r['device_seconds']:9.1f} "
              f"{r['wall_seconds']:8.1f} {r['ratio_steady']:7.3f} {r['ratio_total']:7.3f} {r['fill']:6.3f}")
    ps = result["per_shard_batching"]
    print(f"batching within each shard (before): {ps['batches']} batches, fill {ps['fill']:.3f}")
    print(f"results: {args.out} (load {result['loadavg_start']:.1f} -> {result['loadavg_end']:.1f})")
    return result


if __name__ == "__main__":
    main()
