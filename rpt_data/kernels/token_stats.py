"""Fused per-row next-token statistics: one read of the [N, V] logits, one program per row.

Per row the kernel computes, in fp32 whatever the input dtype:

* full entropy (nats) with an online softmax: running max ``m`` (scalar) and per-lane running sums
  ``s = sum exp(x - m)`` and ``t = sum exp(x - m) * (x - m)``, both rescaled when ``m`` grows
  (``t <- scale * (t + s * (m_old - m_new))``, ``s <- scale * s``, ``scale = exp(m_old - m_new)``);
  entropy = ``log(s) - t / s``. Both terms are >= 0, so there is no cancellation.
* ``logsumexp = m + log(s)`` for the target log-probability (one extra scalar load per row).
* argmax (first occurrence, like ``torch.argmax``) from a per-lane running max and its index.
* the top-k logits, from which the top-k entropy is computed.

Top-k without a sort per block
------------------------------
A bitonic ``tl.topk`` of every block costs ~14 compare-and-swaps per element for k=16 (log2(k)
(log2(k)+1)/2 sorting rounds + log2(k) per halving), i.e. roughly 100 instructions per element, while
a pass over bf16 logits at HBM speed on an H100 leaves roughly 25-30 per element. Instead each lane ``j`` (column ``j`` of
the row folded into [V / BLOCK_V, BLOCK_V]) keeps its top-3 values ``m1 >= m2 >= m3`` with 5
min/max per element. At the end the candidates ``m1 U m2`` (2 x BLOCK_V values) go through one
``tl.topk``; with ``tau`` its k-th value, the result is exact whenever ``max(m3) <= tau``: every
value not among the candidates is <= its lane's ``m3``, so nothing missing can beat ``tau`` (ties at
``tau`` do not change the multiset of top-k values, which is all the top-k entropy needs). The check
fails only when one lane holds 3 of the row's top-k values (probability ~ C(k, 3) / BLOCK_V^2 for
logits whose order is unrelated to the token id: ~1e-4 at k=16, ~1% at k=64 with BLOCK_V = 2048).
Then the row is read a second time: tau is a lower bound of the row's k-th value, so the row's top-k
values are those of ``{x > tau} U {k copies of tau}``, and the ~k values above tau are inserted one
at a time (replace-the-minimum) into a k-slot working set: a few reductions per block, no sort. The
per-row ``flags`` output records when this ran.

NaN and -inf
------------
``-inf`` is a legal (masked) logit: it loads as ``-inf``, contributes ``exp(-inf) = 0`` to ``s`` and
0 to ``t`` (``d`` is clamped to -1e30 before ``e * d`` so that ``0 * -inf`` never appears), and the
running max is replaced by 0 while it is still ``-inf`` so no ``-inf - -inf`` appears either. A row
that is entirely ``-inf`` ends with ``s = 0``: entropy, top-k entropy and target log-prob are NaN and
argmax is 0, like the reference. A NaN anywhere makes ``s`` NaN (``exp(NaN)`` propagates through every
rescale), which costs nothing per element; only such rows are re-read to tell NaN from ``+inf``
(``+inf - +inf``), and a NaN row gets NaN stats and argmax -1. ``+inf`` logits are outside the
contract: they give NaN entropies (the torch reference gives 0) with the correct argmax.

Launch configuration
--------------------
One program per row: rows are long (V ~ 32k-256k) so a row already streams hundreds of KB, there
are thousands of rows to fill the SMs, and no cross-program reduction is needed (several rows per
program would only help small V, where the head matmul dominates anyway). For V > 2048: BLOCK_V =
2048 lanes, 8 warps, so each of the 6 per-lane state vectors is 8 registers per thread; UNROLL = 4
blocks are loaded per loop iteration (16 KiB of bf16 in flight per program) and share one
max-reduction and one rescale. Compiled offline for sm_90 (`compile_offline`) that is 128 registers,
no spills: 2 programs of 8 warps per SM. For V <= 2048 one block covers the row (next power of two,
fewer warps). These choices are reasoned, not tuned: no GPU was available when they were made.

Estimates above (instructions per element, bytes in flight) are estimates; bench/kernel.py measures.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from rpt_data.kernels.token_stats_ref import TokenStats, token_stats_torch

# Largest power-of-two k the kernel handles; larger top_k goes to the torch reference.
MAX_KP = 256
DEFAULT_BLOCK_V = 2048

FLAG_TOPK_SLOW = 1  # the exact top-k re-read ran (a lane held 3 of the top-k)
FLAG_NAN_RESCAN = 2  # s was NaN: the row was re-read to look for NaN


@triton.jit
def _lane_top3(x, offs, m1, m2, m3, i1):
    """Fold one block into the per-lane top-3 (m1 >= m2 >= m3) and the index of the first lane max."""
    i1 = tl.where(x > m1, offs, i1)  # strict: an equal value later in the row keeps the first index
    m3 = tl.maximum(m3, tl.minimum(m2, x))
    m2 = tl.maximum(m2, tl.minimum(m1, x))
    m1 = tl.maximum(m1, x)
    return m1, m2, m3, i1


@triton.jit
def _softmax_accum(x, m_safe, s_vec, t_vec):
    """s += exp(x - m), t += exp(x - m) * (x - m) per lane; -inf entries add exactly 0 to both."""
    d = x - m_safe
    e = tl.exp(d)
    # e == 0 where d == -inf; clamping d first turns 0 * -inf (NaN) into 0 * -1e30 = 0
    return s_vec + e, t_vec + e * tl.maximum(d, -1e30)


@triton.jit
def _load_row_block(base, offs, V, other):
    return tl.load(base + offs, mask=offs < V, other=other).to(tl.float32)


@triton.jit
def _token_stats_kernel(
    x_ptr,
    stride_row,
    tgt_ptr,
    ent_ptr,
    topk_ent_ptr,
    lp_ptr,
    amax_ptr,
    flags_ptr,
    V,
    K,
    BLOCK_V: tl.constexpr,
    KP: tl.constexpr,
    UNROLL: tl.constexpr,
    HAS_TARGETS: tl.constexpr,
):
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)

    s_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    t_vec = tl.zeros([BLOCK_V], dtype=tl.float32)
    m1 = tl.full([BLOCK_V], NEG_INF, tl.float32)
    m2 = tl.full([BLOCK_V], NEG_INF, tl.float32)
    m3 = tl.full([BLOCK_V], NEG_INF, tl.float32)
    i1 = cols  # index of the first occurrence of the lane max (block 0's index while it is -inf)
    m = tl.max(m1, axis=0)  # running row max, fp32 scalar, starts at -inf

    # UNROLL blocks per iteration: their loads are all issued before any math (more bytes in flight
    # per program without more state registers) and share one max-reduction and one rescale.
    for start in range(0, V, BLOCK_V * UNROLL):
        offs0 = start + cols
        x0 = _load_row_block(base, offs0, V, NEG_INF)
        if UNROLL >= 2:
            offs1 = offs0 + BLOCK_V
            x1 = _load_row_block(base, offs1, V, NEG_INF)
        if UNROLL >= 4:
            offs2 = offs1 + BLOCK_V
            offs3 = offs2 + BLOCK_V
            x2 = _load_row_block(base, offs2, V, NEG_INF)
            x3 = _load_row_block(base, offs3, V, NEG_INF)
        m1, m2, m3, i1 = _lane_top3(x0, offs0, m1, m2, m3, i1)
        if UNROLL >= 2:
            m1, m2, m3, i1 = _lane_top3(x1, offs1, m1, m2, m3, i1)
        if UNROLL >= 4:
            m1, m2, m3, i1 = _lane_top3(x2, offs2, m1, m2, m3, i1)
            m1, m2, m3, i1 = _lane_top3(x3, offs3, m1, m2, m3, i1)
        # online softmax with the scalar running max
        m_new = tl.max(m1, axis=0)
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        scale = tl.exp(m - m_safe)  # 0 while m is -inf (then s = t = 0 anyway)
        delta = tl.where(m == NEG_INF, 0.0, m - m_safe)  # never -inf: s * delta would be 0 * -inf
        t_vec = scale * (t_vec + s_vec * delta)
        s_vec = s_vec * scale
        s_vec, t_vec = _softmax_accum(x0, m_safe, s_vec, t_vec)
        if UNROLL >= 2:
            s_vec, t_vec = _softmax_accum(x1, m_safe, s_vec, t_vec)
        if UNROLL >= 4:
            s_vec, t_vec = _softmax_accum(x2, m_safe, s_vec, t_vec)
            s_vec, t_vec = _softmax_accum(x3, m_safe, s_vec, t_vec)
        m = m_new

    s = tl.sum(s_vec, axis=0)
    t = tl.sum(t_vec, axis=0)
    log_s = tl.log(s)
    entropy = log_s - t / s

    gmax = tl.max(m1, axis=0)
    amax = tl.min(tl.where(m1 == gmax, i1, 2147483647), axis=0).to(tl.int64)

    flags = tl.full((), 0, tl.int32)
    # s is NaN iff the row holds a NaN (or +inf): re-read only such rows to tell which.
    row_nan = s != s
    if row_nan:
        flags += 2
        nan_count = tl.full((), 0, tl.int32)
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            x = _load_row_block(base, offs, V, 0.0)
            nan_count += tl.sum((x != x).to(tl.int32), axis=0)
        row_nan = nan_count > 0

    # top-k: candidates m1 U m2; exact unless some lane's third value beats the k-th candidate
    kidx = tl.arange(0, KP)
    top = tl.topk(tl.reshape(tl.join(m1, m2), [2 * BLOCK_V]), KP)
    tau = tl.min(tl.where(kidx < K, top, float("inf")), axis=0)
    if tl.max(m3, axis=0) > tau:
        # Some lane held 3+ values above tau, so values may be missing from the candidates. tau is
        # a lower bound of the row's k-th value (k candidates are >= tau), hence the top-k values
        # of the row are those of {x > tau} U {tau repeated k times}: re-read the row and insert
        # its values > tau into an unordered working set that starts as k copies of tau (slots
        # >= K hold +inf so they are never replaced). Only ~k values are ever inserted.
        flags += 1
        top = tl.where(kidx < K, tau, float("inf"))
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            xc = _load_row_block(base, offs, V, NEG_INF)
            xc = tl.where(xc > tau, xc, NEG_INF)  # NaN fails the test too
            rmin = tl.min(top, axis=0)
            bmax = tl.max(xc, axis=0)
            while bmax > rmin:
                slot = tl.min(tl.where(top == rmin, kidx, KP), axis=0)
                top = tl.where(kidx == slot, bmax, top)
                pos = tl.min(tl.where(xc == bmax, cols, BLOCK_V), axis=0)
                xc = tl.where(cols == pos, NEG_INF, xc)
                rmin = tl.min(top, axis=0)
                bmax = tl.max(xc, axis=0)
    tv = tl.where(kidx < K, top, NEG_INF)
    tm = tl.max(tv, axis=0)
    tm_safe = tl.where(tm == NEG_INF, 0.0, tm)
    td = tv - tm_safe
    te = tl.exp(td)
    ts = tl.sum(te, axis=0)
    topk_entropy = tl.log(ts) - tl.sum(te * tl.maximum(td, -1e30), axis=0) / ts

    if HAS_TARGETS:
        tgt = tl.load(tgt_ptr + row)
        ok = (tgt >= 0) & (tgt < V)
        xt = tl.load(base + tgt, mask=ok, other=float("nan")).to(tl.float32)
        target_lp = (xt - m) - log_s
    else:
        target_lp = float("nan")

    nan = float("nan")
    tl.store(ent_ptr + row, tl.where(row_nan, nan, entropy))
    tl.store(topk_ent_ptr + row, tl.where(row_nan, nan, topk_entropy))
    tl.store(lp_ptr + row, tl.where(row_nan, nan, target_lp))
    tl.store(amax_ptr + row, tl.where(row_nan, -1, amax))
    tl.store(flags_ptr + row, flags)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def launch_config(vocab_size: int, kp: int, block_v: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_V, num_warps, UNROLL) for rows of `vocab_size` logits and a power-of-two top-k `kp`."""
    if block_v is None:
        block_v = min(DEFAULT_BLOCK_V, _next_pow2(vocab_size))
    if block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    block_v = max(block_v, kp, 16)  # tl.topk over the 2 x BLOCK_V candidates needs KP <= 2 x BLOCK_V
    num_warps = 8 if block_v >= 2048 else 4 if block_v >= 1024 else 2 if block_v >= 256 else 1
    unroll = 1 if vocab_size <= block_v else 2 if vocab_size <= 4 * block_v else 4
    return block_v, num_warps, unroll


def kernel_is_interpreted() -> bool:
    """True when the kernel *and* triton's own @jit helpers (tl.zeros, tl.topk, ...) were built for
    the CPU interpreter, i.e. TRITON_INTERPRET=1 was set before triton was first imported."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_token_stats_kernel, InterpretedFunction) and isinstance(standard.topk, InterpretedFunction)


def launch_kernel(x, tgt, outs, v, k, block_v, kp, unroll, has_targets, num_warps) -> None:
    """One launch of the kernel over the rows of `x` (one program per row); tests spy on this function
    to prove the Triton path, not the torch fallback, ran."""
    _token_stats_kernel[(x.shape[0],)](
        x, x.stride(0), tgt, *outs, v, k,
        BLOCK_V=block_v, KP=kp, UNROLL=unroll, HAS_TARGETS=has_targets, num_warps=num_warps,
    )


def token_stats_triton(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    top_k: int = 16,
    *,
    block_v: int | None = None,
    return_flags: bool = False,
):
    """Fused `token_stats` (see `rpt_data.entropy.token_stats` for the contract).

    Out-of-range targets (e.g. an ignore index of -100) give NaN `target_logprob` instead of an
    indexing error. `block_v` overrides the lane count (tests use small blocks to exercise the
    multi-block paths on tiny inputs); `return_flags=True` also returns the per-row int32 flags
    (FLAG_TOPK_SLOW | FLAG_NAN_RESCAN) saying which slow paths ran.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating tensor, got {logits.dtype}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    n, v = logits.shape
    if v == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    if targets is not None and tuple(targets.shape) != (n,):
        raise ValueError(f"targets must be [N]={n}, got shape {tuple(targets.shape)}")
    k = min(int(top_k), v)
    kp = _next_pow2(k)
    if kp > MAX_KP:  # register-resident top-k this wide is not what the kernel is built for
        st = token_stats_torch(logits, targets, top_k)
        return (st, None) if return_flags else st
    if not logits.is_cuda and not kernel_is_interpreted():
        raise RuntimeError(
            "token_stats_triton got CPU tensors but triton was imported without TRITON_INTERPRET=1; "
            "set TRITON_INTERPRET=1 before anything imports triton (it is read when @triton.jit runs)"
        )

    dev = logits.device
    entropy = torch.empty(n, dtype=torch.float32, device=dev)
    topk_entropy = torch.empty(n, dtype=torch.float32, device=dev)
    target_lp = torch.empty(n, dtype=torch.float32, device=dev)
    argmax = torch.empty(n, dtype=torch.int64, device=dev)
    flags = torch.empty(n, dtype=torch.int32, device=dev)
    if n > 0:
        x = logits if (logits.stride(1) == 1 or v == 1) else logits.contiguous()
        tgt = targets.to(device=dev, dtype=torch.int64).contiguous() if targets is not None else flags
        bv, num_warps, unroll = launch_config(v, kp, block_v)
        launch_kernel(x, tgt, (entropy, topk_entropy, target_lp, argmax, flags), v, k, bv, kp, unroll,
                      targets is not None, num_warps)
    st = TokenStats(entropy, topk_entropy, target_lp, argmax)
    return (st, flags) if return_flags else st


def compile_offline(
    dtype: str = "bf16", vocab_size: int = 151936, top_k: int = 16, has_targets: bool = True, arch: int = 90
) -> dict:
    """Compile the kernel for an NVIDIA arch without a GPU (ptxas ships with triton) and report its
    resources: catches code the CPU interpreter accepts but the compiler rejects, and shows register
    pressure. Needs triton imported *without* TRITON_INTERPRET=1 (use a subprocess in tests)."""
    import subprocess
    from pathlib import Path
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kp = _next_pow2(min(top_k, vocab_size))
    block_v, num_warps, unroll = launch_config(vocab_size, kp)
    sig = {"x_ptr": f"*{dtype}", "stride_row": "i64", "tgt_ptr": "*i64", "ent_ptr": "*fp32", "topk_ent_ptr": "*fp32",
           "lp_ptr": "*fp32", "amax_ptr": "*i64", "flags_ptr": "*i32", "V": "i32", "K": "i32",
           "BLOCK_V": "constexpr", "KP": "constexpr", "UNROLL": "constexpr", "HAS_TARGETS": "constexpr"}
    # the divisibility a launch on 16-aligned pointers / strides / vocab sizes gets (vectorised loads)
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(9)}
    consts = {"BLOCK_V": block_v, "KP": kp, "UNROLL": unroll, "HAS_TARGETS": has_targets}
    src = ASTSource(_token_stats_kernel, sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    usage = ""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cuobjdump.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True)
            usage = " ".join(line.strip() for line in out.stdout.splitlines() if "REG:" in line)
    regs = int(usage.split("REG:")[1].split()[0]) if "REG:" in usage else None
    return {"block_v": block_v, "num_warps": num_warps, "unroll": unroll, "kp": kp, "registers": regs,
            "resource_usage": usage, "ttgir": k.asm["ttgir"]}
