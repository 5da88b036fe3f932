"""Benchmark of the fused token_stats kernel (issue 3). GPU only: `python bench/kernel.py`.

Times, in one run on one device, with CUDA events (warm-up first, L2 flushed before every timed
iteration, median over many iterations):

* token_stats on [8192, 151936] bf16 logits: Triton kernel vs torch eager (`token_stats_torch`,
  the usual log_softmax / softmax / topk composition) vs `torch.compile` of that same function;
* the device's copy bandwidth (a device-to-device copy of a tensor the size of the logits);
* a sweep over N in (1024, 4096, 8192) x V in (32000, 49152, 151936);
* head fusion: `head_token_stats` (chunked lm_head + kernel) vs the bare `hidden @ W.T` into a full
  [N, V] output, for hidden [8192, 1536] and W [151936, 1536] bf16, with the peak extra memory of both.

Writes bench/results/kernel-<device-slug>.json and prints a table. See bench/README_kernel.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGETS = {
    "frac_of_copy_bw": 0.80,  # token_stats reads logits at >= 80% of the measured copy bandwidth
    "speedup_vs_eager": 8.0,
    "speedup_vs_compile": 1.5,
    "head_fused_over_matmul": 1.25,  # head_token_stats time / bare lm_head matmul time
}


# RPT_BENCH_SMOKE=1 (with TRITON_INTERPRET=1) runs the whole script on CPU at toy sizes with wall-clock
# "events": it checks the script's plumbing where no GPU is available, and measures nothing.
SMOKE = os.environ.get("RPT_BENCH_SMOKE") == "1"
DEVICE = "cpu" if SMOKE else "cuda"


class _WallEvent:
    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, other) -> float:
        return (other.t - self.t) * 1e3


def _event(torch):
    return _WallEvent() if SMOKE else torch.cuda.Event(enable_timing=True)


def _sync(torch):
    if not SMOKE:
        torch.cuda.synchronize()


def _mem(torch, what: str) -> int:
    return 0 if SMOKE else getattr(torch.cuda, what)()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Timer:
    """Median milliseconds of `fn()` with CUDA events; the L2 is flushed before each timed call."""

    def __init__(self, torch, flush_bytes: int = 256 * 2**20, budget_ms: float = 3000.0):
        self.torch = torch
        self.flush = torch.empty(flush_bytes if not SMOKE else 1024, dtype=torch.int8, device=DEVICE)
        self.budget_ms = budget_ms

    def __call__(self, fn, warmup: int = 3, min_iters: int = 5, max_iters: int = 100) -> float:
        torch = self.torch
        for _ in range(warmup):
            fn()
        _sync(torch)
        # one timed call to size the number of iterations to the time budget
        s, e = _event(torch), _event(torch)
        self.flush.zero_()
        s.record()
        fn()
        e.record()
        _sync(torch)
        est = max(s.elapsed_time(e), 1e-3)
        iters = int(min(max_iters, max(min_iters, self.budget_ms // est)))
        if SMOKE:
            iters = 2
        starts = [_event(torch) for _ in range(iters)]
        ends = [_event(torch) for _ in range(iters)]
        for i in range(iters):
            self.flush.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        _sync(torch)
        return statistics.median(a.elapsed_time(b) for a, b in zip(starts, ends))


def peak_extra_bytes(torch, fn) -> int:
    """Peak memory `fn()` allocates beyond what is allocated before it (inputs, warm caches)."""
    _sync(torch)
    if not SMOKE:
        torch.cuda.reset_peak_memory_stats()
    base = _mem(torch, "memory_allocated")
    out = fn()
    _sync(torch)
    peak = _mem(torch, "max_memory_allocated") - base
    del out
    return int(peak)


def _maybe(fn, *args, **kwargs):
    """Run a measurement; out-of-memory (eager at large N) becomes None instead of a crash."""
    import torch

    try:
        return fn(*args, **kwargs)
    except torch.cuda.OutOfMemoryError:
        _empty_cache(torch)
        return None


def _empty_cache(torch):
    if not SMOKE:
        torch.cuda.empty_cache()


def bench_token_stats(torch, timer, n, v, compiled, with_compile=True):
    from rpt_data import entropy as E
    from rpt_data.kernels import token_stats as ks

    g = torch.Generator(device=DEVICE).manual_seed(0)
    scale = torch.linspace(0.5, 6.0, n, device=DEVICE).view(n, 1)  # flat to peaked rows
    logits = (torch.randn(n, v, device=DEVICE, generator=g) * scale).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    nbytes = logits.numel() * logits.element_size()

    st, flags = ks.token_stats_triton(logits, targets, 16, return_flags=True)
    ms_triton = timer(lambda: ks.token_stats_triton(logits, targets, 16))
    ms_eager = _maybe(timer, lambda: E.token_stats_torch(logits, targets, 16), warmup=1, max_iters=20)
    ms_compile = None
    if with_compile:
        ms_compile = _maybe(timer, lambda: compiled(logits, targets, 16), warmup=2, max_iters=50)
    # sanity: the kernel against the eager reference on this very input
    ref = _maybe(E.token_stats_torch, logits, targets, 16)
    max_err = None
    if ref is not None:
        max_err = max(
            float((getattr(st, f) - getattr(ref, f)).abs().max()) for f in ("entropy", "topk_entropy", "target_logprob")
        )
        max_err = {"max_abs_diff_vs_eager": max_err, "argmax_equal": bool(torch.equal(st.argmax, ref.argmax))}
    del ref
    row = {
        "N": n,
        "V": v,
        "dtype": "bfloat16",
        "top_k": 16,
        "ms_triton": ms_triton,
        "ms_torch_eager": ms_eager,
        "ms_torch_compile": ms_compile,
        "gbps_triton": nbytes / (ms_triton * 1e-3) / 1e9,
        "speedup_vs_eager": None if ms_eager is None else ms_eager / ms_triton,
        "speedup_vs_compile": None if ms_compile is None else ms_compile / ms_triton,
        "slow_topk_rows": int((flags & ks.FLAG_TOPK_SLOW).ne(0).sum()),
        "check": max_err,
    }
    del logits, targets, st, flags
    _empty_cache(torch)
    return row


def bench_copy(torch, timer, n, v):
    src = torch.empty(n, v, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    nbytes = src.numel() * src.element_size()
    del src, dst
    _empty_cache(torch)
    return {"ms_copy": ms, "copy_gbps": 2 * nbytes / (ms * 1e-3) / 1e9}


def bench_head(torch, timer, n, d, v, chunk_rows_list):
    from rpt_data import entropy as E

    g = torch.Generator(device=DEVICE).manual_seed(1)
    hidden = torch.randn(n, d, device=DEVICE, generator=g, dtype=torch.bfloat16)
    weight = (torch.randn(v, d, device=DEVICE, generator=g) * 0.02).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device=DEVICE, generator=g)

    ms_matmul = _maybe(timer, lambda: hidden @ weight.t(), warmup=2)
    peak_matmul = _maybe(peak_extra_bytes, torch, lambda: hidden @ weight.t())
    out = {
        "N": n,
        "D": d,
        "V": v,
        "dtype": "bfloat16",
        "ms_head_matmul_only": ms_matmul,
        "peak_extra_bytes_matmul_only": peak_matmul,
        "fused": [],
    }
    for rows in chunk_rows_list:
        fn = lambda: E.head_token_stats(hidden, weight, targets, top_k=16, chunk_rows=rows)  # noqa: E731
        ms = timer(fn, warmup=2)
        peak = peak_extra_bytes(torch, fn)
        out["fused"].append({
            "chunk_rows": rows,
            "ms_head_fused": ms,
            "peak_extra_bytes_fused": peak,
            "chunk_budget_bytes": rows * v * 2,
            "fused_over_matmul": None if not ms_matmul else ms / ms_matmul,
        })
    best = min(out["fused"], key=lambda r: r["ms_head_fused"])
    out.update(
        chunk_rows=best["chunk_rows"],
        ms_head_fused=best["ms_head_fused"],
        peak_extra_bytes_fused=best["peak_extra_bytes_fused"],
        fused_over_matmul=best["fused_over_matmul"],
    )
    del hidden, weight, targets
    _empty_cache(torch)
    return out


def _fmt(x, spec=".3f"):
    width = int(re.match(r"\d*", spec).group() or 0)
    return "-".rjust(width) if x is None else format(x, spec)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/kernel-<device>.json)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves minutes of compiling)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--quick", action="store_true", help="one small shape, to check the script itself")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("bench/kernel.py: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() and not SMOKE:
        print("bench/kernel.py needs a CUDA GPU (the Triton kernel is timed on the device); none is visible here.",
              file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench/kernel.py needs triton (pip install -e '.[gpu]')", file=sys.stderr)
        return 2
    import torch._dynamo

    from rpt_data import entropy as E

    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    compiled = torch.compile(E.token_stats_torch, dynamic=False)
    timer = Timer(torch)
    device = "smoke-cpu-interpreter" if SMOKE else torch.cuda.get_device_name()
    main_n, main_v = (1024, 32000) if args.quick else (8192, 151936)
    sweep_n = (1024,) if args.quick else (1024, 4096, 8192)
    sweep_v = (32000,) if args.quick else (32000, 49152, 151936)
    head_n, head_d, chunks = (1024, 1536, (512,)) if args.quick else (8192, 1536, (1024, 2048))
    if SMOKE:  # toy sizes for the interpreter; the numbers mean nothing
        main_n, main_v, sweep_n, sweep_v, head_n, head_d, chunks = 2, 300, (2,), (300, 257), 5, 16, (2, 4)

    print(f"device: {device}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    copy = bench_copy(torch, timer, main_n, main_v)
    main_row = bench_token_stats(torch, timer, main_n, main_v, compiled, not args.no_compile)
    sweep = []
    if not args.no_sweep:
        for v in sweep_v:
            for n in sweep_n:
                if (n, v) == (main_n, main_v):
                    sweep.append(main_row)
                    continue
                print(f"  sweep N={n} V={v} ...", flush=True)
                sweep.append(bench_token_stats(torch, timer, n, v, compiled, not args.no_compile))
    head = bench_head(torch, timer, head_n, head_d, main_v, chunks)

    frac = main_row["gbps_triton"] / copy["copy_gbps"]
    result = {
        "device": device,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **{k: main_row[k] for k in ("N", "V", "dtype", "top_k", "ms_triton", "ms_torch_eager", "ms_torch_compile",
                                    "gbps_triton", "speedup_vs_eager", "speedup_vs_compile", "slow_topk_rows", "check")},
        **copy,
        "frac_of_copy_bw": frac,
        "sweep": sweep,
        "head": head,
        "targets": TARGETS,
    }
    result["targets_met"] = {
        "frac_of_copy_bw": frac >= TARGETS["frac_of_copy_bw"],
        "speedup_vs_eager": (main_row["speedup_vs_eager"] or 0) >= TARGETS["speedup_vs_eager"],
        "speedup_vs_compile": None if main_row["speedup_vs_compile"] is None
        else main_row["speedup_vs_compile"] >= TARGETS["speedup_vs_compile"],
        "head_fused_over_matmul": None if head["fused_over_matmul"] is None
        else head["fused_over_matmul"] <= TARGETS["head_fused_over_matmul"],
        "head_peak_extra_memory": head["peak_extra_bytes_fused"] <= head["chunk_rows"] * main_v * 2 + 16 * 2**20,
    }
    out = args.out or REPO / "bench" / "results" / f"kernel-{_slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\ncopy bandwidth: {copy['copy_gbps']:.0f} GB/s (read + write of {main_n}x{main_v} bf16)")
    print(f"{'N':>6} {'V':>7} {'triton ms':>10} {'GB/s':>7} {'eager ms':>9} {'compile ms':>10} {'x eager':>8} {'x compile':>9}")
    for r in sweep or [main_row]:
        print(f"{r['N']:>6} {r['V']:>7} {r['ms_triton']:>10.3f} {r['gbps_triton']:>7.0f} {_fmt(r['ms_torch_eager'], '9.2f')} "
              f"{_fmt(r['ms_torch_compile'], '10.2f')} {_fmt(r['speedup_vs_eager'], '8.1f')} {_fmt(r['speedup_vs_compile'], '9.2f')}")
    print(f"\nmain ({main_n}x{main_v} bf16): {frac:.0%} of copy bandwidth; check {main_row['check']}")
    print(f"head {head['N']}x{head['D']} @ {main_v}x{head['D']}: matmul only {_fmt(head['ms_head_matmul_only'])} ms, "
          f"peak extra {_fmt(head['peak_extra_bytes_matmul_only'] and head['peak_extra_bytes_matmul_only'] / 2**20, '.0f')} MiB")
    for f in head["fused"]:
        print(f"  fused chunk_rows={f['chunk_rows']}: {f['ms_head_fused']:.3f} ms "
              f"({_fmt(f['fused_over_matmul'], '.2f')}x matmul), peak extra {f['peak_extra_bytes_fused'] / 2**20:.0f} MiB "
              f"(budget {f['chunk_budget_bytes'] / 2**20:.0f} MiB)")
    print("\ntargets met:", json.dumps(result["targets_met"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
