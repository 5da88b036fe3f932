"""Tagging throughput: `rpt-data tag` (run_tag, end to end) vs the naive tagger a user writes in an afternoon.

Both sides score the same token windows, in one process, alternated (ours, naive, ours, naive, ...):

* ours (`e2e`): `rpt_data.pipeline.run_tag` from the jsonl to Parquet shards + manifest: reading, tokenization,
  windows, token-budget batches, trunk forward, chunked LM head + stats (fused Triton kernel on CUDA), tags,
  shard writing. The model is loaded once beforehand (loading is not timed on either side).
* ours (`compute`, optional): `Proxy.score_batch` over `token_budget_batches` of the same windows: the compute alone.
* naive: the windows (taken from the shards ours wrote, so they are identical) in input order, `batch_rows` per
  batch, right-padded; `model(input_ids, attention_mask).logits` (the full [B, T, V] logits), then
  log_softmax / exp / topk / gather / argmax in torch. Its tokenization and IO are not timed (in its favour).

tokens/s = positions in the windows (context prefix included: what the forward processes) / wall seconds.
CPU (default): the demo model on CHAMP records, structured mode. GPU (`--preset gpu`): a Qwen2-1.5B-shaped proxy
with random weights, bf16, CHAMP text repeated into one continuous stream cut in 4k-token windows; MFU = forward
FLOPs of the windows (trunk, causal attention, LM head on every position) / seconds / the device's bf16 peak.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (apply_preset, alternate, champ_records, environment, forward_flops, median, peak_flops,  # noqa: E402
                    pick_device, results_path, setup_threads, synthetic_model, write_json, CHAMP_TEMPLATE)

import numpy as np  # noqa: E402
import torch  # noqa: E402

PRESETS = {
    "cpu": dict(model="demo", records=32, window=512, context_prefix=128, batch_tokens=8192, naive_batch_rows=8,
                mode="structured", repeat=1, reps=2, dtype="float32", sides="e2e,naive"),
    "gpu": dict(model="qwen2-1.5b", records=0, window=4096, context_prefix=128, batch_tokens=16384,
                naive_batch_rows=2, mode="continuous", repeat=6, reps=3, dtype="bfloat16", sides="e2e,compute,naive"),
}


def loaded_model(spec: str, device: torch.device, dtype: str):
    """A LoadedModel (rpt_common.models): the demo/HF model, or a random synthetic shape with the demo tokenizer."""
    from rpt_common.models import LoadedModel, load_causal_lm, load_tokenizer, pick_dtype, tokenizer_identity

    if spec == "demo" or Path(spec).exists():
        return load_causal_lm(spec, str(device), dtype)
    tok = load_tokenizer("demo")
    model = synthetic_model(spec, device, pick_dtype(dtype, device))
    return LoadedModel(model=model, tokenizer=tok, path=f"synthetic:{spec}", tokenizer_identity=tokenizer_identity(tok),
                       identity={"path": f"synthetic:{spec}", "config_hash": "random-weights"})


def write_input(path: Path, records: list[dict], repeat: int) -> None:
    with open(path, "w") as f:
        for r in range(repeat):
            for rec in records:
                f.write(json.dumps({**rec, "id": f"{rec['id']}#{r}"}) + "\n")


@contextlib.contextmanager
def preloaded(lm):
    """run_tag loads its model by name; hand it the model already in memory (loading is not what we time)."""
    import rpt_data.pipeline as pipeline

    saved = pipeline.load_causal_lm
    pipeline.load_causal_lm = lambda *a, **k: lm
    try:
        yield
    finally:
        pipeline.load_causal_lm = saved


def run_ours_e2e(lm, cfg_kw: dict) -> dict:
    from rpt_data.config import TagConfig
    from rpt_data.pipeline import run_tag

    with preloaded(lm), contextlib.redirect_stderr(io.StringIO()):  # the run's summary table
        return run_tag(TagConfig(**cfg_kw))


def read_windows(out: str):
    """(windows, stats columns) from the shards run_tag wrote, in shard order."""
    import pyarrow.parquet as pq

    from rpt_data.windows import Window

    windows, stats = [], {"entropy": [], "topk_entropy": [], "target_logprob": [], "proxy_argmax": []}
    for shard in sorted(Path(out).glob("**/shard-*.parquet")):
        t = pq.read_table(shard).to_pylist()
        for row in t:
            ids = np.asarray(row["token_ids"], dtype=np.int32)
            windows.append(Window(doc_id=row["doc_id"], window_index=row["window_index"], token_start=row["token_start"],
                                  text=row["text"], token_ids=ids, token_bytes=np.asarray(row["token_bytes"], np.int32),
                                  score_start=row["score_start"]))
            for k in stats:
                stats[k].append(np.asarray([np.nan if x is None else x for x in row[k]], dtype=np.float64))
    return windows, stats


def run_ours_compute(proxy, windows, batch_tokens: int):
    from rpt_data.proxy import token_budget_batches

    out = [None] * len(windows)
    for idx in token_budget_batches(windows, batch_tokens):
        for i, s in zip(idx, proxy.score_batch([windows[i] for i in idx])):
            out[i] = s
    return out


@torch.no_grad()
def run_naive(model, windows, batch_rows: int, pad_id: int, top_k: int = 16) -> list[dict]:
    """The afternoon version: fixed-size batches in input order, full logits, softmax-family stats in torch."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(windows), batch_rows):
        batch = windows[i:i + batch_rows]
        longest = max(len(w.token_ids) for w in batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), longest, dtype=torch.long)
        for b, w in enumerate(batch):
            ids[b, :len(w.token_ids)] = torch.from_numpy(w.token_ids.astype(np.int64))
            mask[b, :len(w.token_ids)] = 1
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # [B, T, V]
        logp = torch.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp).sum(-1)
        top_logp = torch.log_softmax(torch.topk(logits, top_k, dim=-1).values, dim=-1)
        topk_entropy = -(top_logp.exp() * top_logp).sum(-1)
        target_logprob = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        argmax = logits.argmax(-1)
        for b, w in enumerate(batch):  # stats of position t come from the logits at t - 1
            n, s = len(w.token_ids), w.score_start
            out.append({"entropy": entropy[b, s - 1:n - 1].cpu().numpy(),
                        "topk_entropy": topk_entropy[b, s - 1:n - 1].cpu().numpy(),
                        "target_logprob": target_logprob[b, s - 1:n - 1].cpu().numpy(),
                        "argmax": argmax[b, s - 1:n - 1].cpu().numpy()})
        del logits, logp
    return out


def agreement(windows, shard_stats: dict, naive: list[dict]) -> dict:
    """How close the naive stats are to the shards' (a check that both sides compute the same thing)."""
    diff = {"entropy": 0.0, "topk_entropy": 0.0, "target_logprob": 0.0}
    same, total = 0, 0
    for i, w in enumerate(windows):
        s = w.score_start
        for k in diff:
            ours = shard_stats[k][i][s:]
            ok = np.isfinite(ours)
            if ok.any():
                diff[k] = max(diff[k], float(np.abs(ours[ok] - naive[i][k][ok]).max()))
        a = shard_stats["proxy_argmax"][i][s:]
        same += int((a == naive[i]["argmax"]).sum())
        total += len(a)
    return {f"max_abs_diff_{k}": v for k, v in diff.items()} | {"argmax_agreement": same / max(total, 1)}


def padded_tokens(windows, rows: int) -> int:
    return sum(len(windows[i:i + rows]) * max(len(w.token_ids) for w in windows[i:i + rows])
               for i in range(0, len(windows), rows))


def profile_sides(lm, proxy, windows, args, out_dir: Path) -> dict:
    """torch.profiler op tables of one batch of each side, and cProfile of one run_tag; written to `out_dir`."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile

    from rpt_data.proxy import token_budget_batches

    out_dir.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    batch = [windows[i] for i in token_budget_batches(windows, args.batch_tokens)[0]]
    files = {}
    with profile(activities=acts) as prof:
        proxy.score_batch(batch)
    (out_dir / "tag-ours-ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=25))
    with profile(activities=acts) as prof:
        run_naive(lm.model, batch, args.naive_batch_rows, lm.tokenizer.pad_token_id or 0)
    (out_dir / "tag-naive-ops.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=25))
    cp = cProfile.Profile()
    cp.enable()
    run_ours_e2e(lm, args.cfg_kw)
    cp.disable()
    s = io.StringIO()
    pstats.Stats(cp, stream=s).sort_stats("cumulative").print_stats(40)
    (out_dir / "tag-run_tag-cprofile.txt").write_text(s.getvalue())
    files = [str(out_dir / n) for n in ("tag-ours-ops.txt", "tag-naive-ops.txt", "tag-run_tag-cprofile.txt")]
    return {"profile_files": files, "profile_batch_windows": len(batch)}


def run(args, log=print) -> dict:
    device = pick_device(args.device)
    threads = setup_threads(args.threads)
    env = environment(device, threads)
    lm = loaded_model(args.model, device, args.dtype)
    from rpt_data.proxy import Proxy, token_budget_batches

    proxy = Proxy(lm.model, top_k=16)
    work = Path(tempfile.mkdtemp(prefix="rpt-bench-tag-"))
    src = work / "input.jsonl"
    write_input(src, champ_records(args.records or None), args.repeat)
    out = str(work / "out")
    args.cfg_kw = dict(inputs=[str(src)], template=CHAMP_TEMPLATE, id_field="id", mode=args.mode, model=args.model,
                       window=args.window, context_prefix=args.context_prefix, batch_tokens=args.batch_tokens,
                       device=str(device), dtype=args.dtype, out=out, overwrite=True, progress=False, shard_rows=128)
    t0 = time.perf_counter()
    manifest = run_ours_e2e(lm, args.cfg_kw)  # warm-up; its shards give both sides their windows
    warm = time.perf_counter() - t0
    windows, shard_stats = read_windows(out)
    tokens = sum(len(w.token_ids) for w in windows)
    assert tokens == manifest["totals"]["positions"], "the shards do not hold the windows the manifest lists"
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    if device.type == "cuda":  # warm-up of the naive side (kernels, allocator); on CPU there is nothing to warm
        run_naive(lm.model, windows[:args.naive_batch_rows], args.naive_batch_rows, pad)
    log(f"tag: {len(windows)} windows, {tokens} tokens (window {args.window}, {args.mode}); warm-up run_tag {warm:.1f} s")
    naive_out: list = []  # the first naive run's stats, for the agreement check
    sides = {"e2e": lambda: run_ours_e2e(lm, args.cfg_kw),
             "compute": lambda: run_ours_compute(proxy, windows, args.batch_tokens),
             "naive": lambda: naive_out.append(run_naive(lm.model, windows, args.naive_batch_rows, pad))}
    chosen = [s.strip() for s in args.sides.split(",") if s.strip()]
    if "naive" not in chosen or not set(chosen) <= set(sides):
        sys.exit(f"error: --sides must be a comma list of {', '.join(sides)} that includes naive")
    times = alternate({k: sides[k] for k in chosen}, args.reps, device, log)
    med = {k: median(v) for k, v in times.items()}
    result = {
        **env,
        "benchmark": "tag",
        "config": {k: getattr(args, k) for k in ("model", "records", "repeat", "window", "context_prefix",
                                                  "batch_tokens", "naive_batch_rows", "mode", "dtype", "reps")},
        "windows": len(windows), "tokens": tokens, "scored": manifest["totals"]["scored"],
        "naive_padded_tokens": padded_tokens(windows, args.naive_batch_rows),
        "ours_padded_tokens": sum(len(b) * max(len(windows[i].token_ids) for i in b)
                                  for b in token_budget_batches(windows, args.batch_tokens)),
        "seconds": times, "warmup_seconds": warm,
        "naive_tokens_per_s": tokens / med["naive"],
        **agreement(windows, shard_stats, naive_out[0]),
    }
    if "e2e" in med:
        result["tokens_per_s"] = tokens / med["e2e"]
        result["speedup_vs_naive"] = med["naive"] / med["e2e"]
    if "compute" in med:
        result["compute_tokens_per_s"] = tokens / med["compute"]
        result["compute_speedup_vs_naive"] = med["naive"] / med["compute"]
    peak = peak_flops(device)
    if peak:
        flops = forward_flops(lm.model, [len(w.token_ids) for w in windows])
        result["peak_flops"] = peak
        result["forward_flops"] = flops
        for k, key in (("e2e", "mfu"), ("compute", "compute_mfu"), ("naive", "naive_mfu")):
            if k in med:
                result[key] = flops / med[k] / peak
    if device.type == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.profile:
        result |= profile_sides(lm, proxy, windows, args, Path(args.profile))
    result["loadavg_end"] = environment(device, threads)["loadavg_start"]
    result["shards_dir"] = out  # a complete `rpt-data tag` output (the trainer benchmark can train from it)
    return result


def sweep(args, log=print) -> dict:
    """Scaling on this device: (a) window length, demo model, ours compute vs naive on the same ~N tokens;
    (b) vocabulary, the LM head + stats alone on random hidden states: head_token_stats vs full logits + naive stats."""
    from rpt_data.entropy import head_token_stats
    from rpt_data.proxy import Proxy
    from rpt_data.windows import Window

    device = pick_device(args.device)
    threads = setup_threads(args.threads)
    lm = loaded_model(args.model, device, args.dtype)
    proxy = Proxy(lm.model, top_k=16)
    res = {**environment(device, threads), "benchmark": "tag-sweep", "window": [], "vocab": []}
    g = torch.Generator().manual_seed(0)
    vocab = lm.model.config.vocab_size
    for window in args.sweep_windows:
        rows = max(1, args.sweep_tokens // window)
        ids = torch.randint(0, min(vocab, 49152), (rows, window), generator=g).numpy().astype(np.int32)
        ws = [Window(doc_id=str(i), window_index=0, token_start=0, text="", token_ids=ids[i],
                     token_bytes=np.zeros(window, np.int32), score_start=1) for i in range(rows)]
        naive_rows = max(1, args.batch_tokens // window // 2)
        t = alternate({"compute": lambda: run_ours_compute(proxy, ws, args.batch_tokens),
                       "naive": lambda: run_naive(lm.model, ws, naive_rows, 0)}, args.reps, device, log)
        c, nv = median(t["compute"]), median(t["naive"])
        res["window"].append({"window": window, "tokens": rows * window, "compute_tokens_per_s": rows * window / c,
                              "naive_tokens_per_s": rows * window / nv, "speedup": nv / c})
        log(f"  window {window}: x{nv / c:.2f}")
    d = lm.model.config.hidden_size
    dt = next(lm.model.parameters()).dtype
    n = args.sweep_head_rows
    for v in args.sweep_vocab:
        hidden = torch.randn(n, d, generator=g).to(device, dt)
        weight = (torch.randn(v, d, generator=g) * 0.05).to(device, dt)
        targets = torch.randint(0, v, (n,), generator=g).to(device)

        def naive_head():
            logits = (hidden @ weight.t()).float()
            logp = torch.log_softmax(logits, -1)
            _ = -(logp.exp() * logp).sum(-1)
            top = torch.log_softmax(torch.topk(logits, 16, -1).values, -1)
            _ = -(top.exp() * top).sum(-1), logp.gather(-1, targets[:, None]), logits.argmax(-1)

        t = alternate({"fused": lambda: head_token_stats(hidden, weight, targets), "naive": naive_head},
                      args.reps, device, log)
        f, nv = median(t["fused"]), median(t["naive"])
        res["vocab"].append({"vocab": v, "rows": n, "head_stats_rows_per_s": n / f, "naive_rows_per_s": n / nv,
                             "speedup": nv / f})
        log(f"  vocab {v}: x{nv / f:.2f}")
    return res


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="defaults for cpu or gpu (default: by device)")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", help="demo, an HF directory, or a synthetic shape: qwen2-1.5b, qwen2-0.5b")
    p.add_argument("--records", type=int, help="CHAMP records (0 = all 270)")
    p.add_argument("--repeat", type=int, help="copies of the records in the input (GPU: more tokens)")
    p.add_argument("--window", type=int)
    p.add_argument("--context-prefix", type=int)
    p.add_argument("--batch-tokens", type=int)
    p.add_argument("--naive-batch-rows", type=int, help="windows per naive batch")
    p.add_argument("--mode", choices=["structured", "continuous"])
    p.add_argument("--dtype", help="float32 or bfloat16")
    p.add_argument("--reps", type=int, help="alternated rounds (median)")
    p.add_argument("--sides", help="comma list of e2e, compute, naive")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--profile", help="write torch.profiler / cProfile tables to this directory")
    p.add_argument("--sweep", action="store_true", help="scaling with window length and vocabulary instead")
    p.add_argument("--sweep-windows", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512, 2048])
    p.add_argument("--sweep-tokens", type=int, default=2048)
    p.add_argument("--sweep-vocab", type=lambda s: [int(x) for x in s.split(",")], default=[32000, 49152, 151936])
    p.add_argument("--sweep-head-rows", type=int, default=1024)
    p.add_argument("--out", help="result JSON (default bench/results/tag-<device>.json)")
    return p


def resolve(args) -> argparse.Namespace:
    return apply_preset(args, PRESETS)


def main(argv=None) -> None:
    args = resolve(parser().parse_args(argv))
    result = sweep(args) if args.sweep else run(args)
    path = results_path("tag-sweep" if args.sweep else "tag", pick_device(args.device), args.out)
    write_json(path, result)
    keys = ("tokens_per_s", "compute_tokens_per_s", "naive_tokens_per_s", "speedup_vs_naive", "compute_speedup_vs_naive",
            "mfu", "compute_mfu", "naive_mfu")
    print(json.dumps({k: result[k] for k in keys if k in result} | {"written": str(path)}))


if __name__ == "__main__":
    main()
