"""`rpt-data prefix-study`: how much the context prefix of continuous windows changes entropy and tags.

A sample of each stream is tagged with the production window and each prefix, and once with a long-context
reference (every scored position has >= `reference_context` real tokens before it, or all of the stream);
stats are compared position by position (absolute stream position), so only the window layout differs.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rpt_common.errors import UserError
from rpt_data.config import TagConfig
from rpt_data.readers import READERS, BadRecord, RecordParser, expand_inputs

DEFAULT_PREFIXES = (0, 16, 32, 64, 128, 256)  # compared when --prefixes is not given (those below --window)
FIRST = 16  # positions counted as "the start of a window" (`*_first16`)
_TAG = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory
        for f in dataclasses.fields(TagConfig)}  # the tag job's defaults: one source of defaults


@dataclass(kw_only=True, slots=True)
class StudyConfig:
    inputs: list[str] = field(default_factory=list)
    format: str | None = None
    text_field: str | None = None
    template: str | None = None
    separator: str = _TAG["separator"]
    model: str = _TAG["model"]
    window: int = _TAG["window"]  # the production window (tokens, prefix included)
    prefixes: list[int] | None = None  # None: those of DEFAULT_PREFIXES smaller than the window
    reference_context: int = 1024  # real tokens before every position the reference scores
    tokens_per_stream: int = 16384  # sample: the first N tokens of every stream (file)
    tolerance: float = 0.02  # allowed tag disagreement of the first 16 positions (share of positions)
    top_k: int = _TAG["top_k"]
    metric: str = _TAG["metric"]
    select_above: float = _TAG["select_above"]
    buckets: list[float] = field(default_factory=_TAG["buckets"])
    batch_tokens: int = _TAG["batch_tokens"]
    chunk_rows: int | None = None
    device: str = _TAG["device"]
    dtype: str = _TAG["dtype"]
    out: str | None = None
    note: str | None = None  # free text for the report, e.g. what the corpus is

    def __post_init__(self):
        self.inputs = [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)
        if self.prefixes is None:
            self.prefixes = [p for p in DEFAULT_PREFIXES if p < self.window]
        if isinstance(self.prefixes, str):
            self.prefixes = [int(x) for x in self.prefixes.split(",") if x.strip()]
        self.prefixes = sorted({int(p) for p in self.prefixes})
        # the tag options are checked by the tag job's own config (one set of rules)
        tag = TagConfig(inputs=self.inputs, out=self.out or ".", format=self.format, text_field=self.text_field,
                        template=self.template, mode="continuous", window=self.window, context_prefix=0, top_k=self.top_k,
                        metric=self.metric, select_above=self.select_above, buckets=self.buckets)
        self.text_field, self.buckets = tag.text_field, tag.buckets
        checks = [
            (self.out is not None, "no output directory given: use --out DIR"),
            (bool(self.prefixes) and all(0 <= p < self.window for p in self.prefixes),
             "--prefixes must be integers >= 0 and smaller than --window"),
            (self.reference_context >= 1 and self.tokens_per_stream >= 2,
             "--reference-context must be >= 1 and --tokens-per-stream >= 2"),
            (0 <= self.tolerance <= 1, "--tolerance is a share of positions, in [0, 1]"),
        ]
        for ok, msg in checks:
            if not ok:
                raise UserError(msg)


def sample_streams(cfg: StudyConfig) -> list[tuple[str, list[tuple[str, str, bool]]]]:
    """(stream id, pieces) per input file: its first records, about 8 chars per wanted token (more than
    any tokenizer needs), as `pieces()` of the tag job would give them; bad records are skipped."""
    from rpt_data.pipeline import pieces

    parse = RecordParser(cfg.text_field, cfg.template, None)
    out = []
    for path, fmt in expand_inputs(cfg.inputs, cfg.format):
        chosen, chars = [], 0
        for item in READERS[fmt](path, parse):
            if isinstance(item, BadRecord):
                continue
            chosen.append(item)
            chars += len(item.text)
            if chars >= 8 * cfg.tokens_per_stream:
                break
        if chosen:
            out.append((path, list(pieces(iter(chosen), "continuous", cfg.separator))))
    if not out:
        raise UserError(f"no readable text in {', '.join(cfg.inputs)}")
    return out


def score_layout(proxy, tokenizer, stream: list, window: int, prefix: int, n: int, batch_tokens: int) -> dict:
    """Tag the first n tokens of one stream with (window, prefix): per absolute position the entropies, the
    offset from the window's first scored position, and whether the window is the stream's first."""
    from rpt_data.proxy import token_budget_batches
    from rpt_data.windows import windows_from_pieces

    ws = []
    for w in windows_from_pieces(stream, tokenizer, window, prefix, has_bos=proxy.bos is not None):
        if w.token_start + w.score_start >= n:
            break  # every later window starts beyond the sample
        ws.append(w)
    res = {k: np.full(n, np.nan, np.float32) for k in ("entropy", "topk_entropy")}
    res["offset"] = np.full(n, -1, np.int64)
    res["later"] = np.zeros(n, bool)  # scored in a window other than the stream's first
    fed = recomputed = 0
    for idx in token_budget_batches(ws, batch_tokens):
        for i, s in zip(idx, proxy.score_batch([ws[i] for i in idx])):
            w = ws[i]
            lo, hi = w.token_start + w.score_start, min(w.token_start + len(w.token_ids), n)
            if hi <= lo:
                continue
            sl = slice(w.score_start, w.score_start + hi - lo)
            res["entropy"][lo:hi], res["topk_entropy"][lo:hi] = s.entropy[sl], s.topk_entropy[sl]
            res["offset"][lo:hi] = np.arange(hi - lo)
            res["later"][lo:hi] = w.window_index > 0
            fed += len(w.token_ids)
            recomputed += prefix if w.window_index > 0 else 0  # prefix 0: x_0 of a window is lost, not redone
    res["tokens"] = int(min(n, max((w.token_start + len(w.token_ids) for w in ws), default=0)))
    res["windows"], res["fed"], res["recomputed"] = len(ws), fed, recomputed
    return res


def compare(run: dict, ref: dict, cfg: StudyConfig, key: str) -> dict:
    """The per-prefix numbers of the JSON: |difference| and tag disagreement against the reference."""
    h, r = run[key], ref[key]
    both = ~np.isnan(h) & ~np.isnan(r)
    first = both & run["later"] & (run["offset"] >= 0) & (run["offset"] < FIRST)
    scored = int((~np.isnan(h)).sum())
    out = {"scored": scored, "windows": run["windows"],
           "overhead": run["recomputed"] / scored if scored else float("nan")}
    for suffix, m in (("", both), ("_first16", first)):
        sel, ref_sel = h[m] > cfg.select_above, r[m] > cfg.select_above
        out[f"positions{suffix}"] = int(m.sum())
        out[f"mean_entropy{suffix}"] = _mean(h[m])
        out[f"reference_entropy{suffix}"] = _mean(r[m])
        out[f"mae_vs_reference" if not suffix else "mae_first16"] = _mean(np.abs(h[m] - r[m]))
        out[f"tag_disagreement{suffix}"] = _mean(sel != ref_sel)
        # selected here but not in the reference: made hard only by the missing context
        out[f"false_positive_share{suffix}"] = _mean(~ref_sel[sel]) if sel.any() else 0.0
        out[f"bucket_disagreement{suffix}"] = {
            name: _mean((h[m] > b) != (r[m] > b)) for b, name in zip(cfg.buckets, _bucket_names(cfg))}
    return out


def _mean(a: np.ndarray) -> float:
    return float(np.mean(a)) if a.size else float("nan")


def _bucket_names(cfg: StudyConfig) -> list[str]:
    return ["easy", "medium", "hard"] if len(cfg.buckets) == 3 else [f"gt_{b:g}" for b in cfg.buckets]


def offset_profile(runs: dict, ref_by_prefix: dict, key: str) -> dict:
    """Mean entropy by offset from a window's first scored position (later windows only), per prefix and for
    the reference at the same positions: offsets 0..15 one by one, then doubling bins."""
    edges = list(range(FIRST)) + [2 ** k for k in range(4, 12)]
    prof = {"offset_lo": edges}
    for p, run in runs.items():
        h, r, off = run[key], ref_by_prefix[key], run["offset"]
        ok = run["later"] & ~np.isnan(h) & ~np.isnan(r)
        means, refs = [], []
        for lo, hi in zip(edges, edges[1:] + [1 << 30]):
            m = ok & (off >= lo) & (off < hi)
            means.append(_mean(h[m]) if m.any() else None)
            refs.append(_mean(r[m]) if m.any() else None)
        prof[str(p)] = means
        prof[f"reference_at_{p}"] = refs
    return prof


def recommend(entries: list[dict], tolerance: float) -> int:
    """The smallest prefix whose first-16 tag disagreement is within `tolerance` of the reference's (0), else
    the prefix with the smallest such disagreement."""
    ok = [e["prefix"] for e in entries if e["tag_disagreement_first16"] <= tolerance]
    if ok:
        return min(ok)
    return min(entries, key=lambda e: (e["tag_disagreement_first16"], e["prefix"]))["prefix"]


def run_study(cfg: StudyConfig) -> dict:
    """Score every layout on every sampled stream, compare, and write prefix-study.{json,md,png} in cfg.out."""
    from rpt_common.models import load_causal_lm
    from rpt_data.pipeline import fingerprint
    from rpt_data.proxy import build_proxy

    t0 = time.perf_counter()
    streams = sample_streams(cfg)
    lm = load_causal_lm(cfg.model, cfg.device, cfg.dtype)
    proxy = build_proxy(lm, top_k=cfg.top_k, chunk_rows=cfg.chunk_rows)  # as the tag job: BOS rule, head check
    key = "topk_entropy" if cfg.metric == "topk" else "entropy"
    n = cfg.tokens_per_stream
    # reference: scores `window` positions per window after `reference_context` tokens of context
    ref_layout = (cfg.reference_context + cfg.window, cfg.reference_context)
    limit = getattr(lm.model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and ref_layout[0] + proxy.offset > limit:
        raise UserError(f"the reference layout (--reference-context {cfg.reference_context} + --window {cfg.window} "
                        f"tokens{' plus the BOS' if proxy.offset else ''}) is longer than the proxy's context of "
                        f"{limit} tokens (max_position_embeddings), so the reference would be scored past what it "
                        "was trained on; use a smaller --reference-context or --window")
    per_stream, merged = [], {}
    for doc, stream in streams:
        ref = score_layout(proxy, lm.tokenizer, stream, *ref_layout, n, cfg.batch_tokens)
        runs = {p: score_layout(proxy, lm.tokenizer, stream, cfg.window, p, n, cfg.batch_tokens) for p in cfg.prefixes}
        per_stream.append({"stream": doc, "tokens": ref["tokens"],
                           "prefixes": [{"prefix": p, **compare(runs[p], ref, cfg, key)} for p in cfg.prefixes]})
        for name, run in [("reference", ref), *runs.items()]:
            merged.setdefault(name, []).append(run)
    cat = {name: _concat(rs) for name, rs in merged.items()}
    entries = [{"prefix": p, **compare(cat[p], cat["reference"], cfg, key)} for p in cfg.prefixes]
    ref_scored = int((~np.isnan(cat["reference"][key])).sum())
    result = {
        "corpus": [fingerprint(p) for p, _ in expand_inputs(cfg.inputs, cfg.format)],
        "model": lm.identity, "bos": {"used": proxy.bos is not None, "token_id": proxy.bos},
        "config": dataclasses.asdict(cfg), "metric": key,
        "streams": [{"stream": s["stream"], "tokens": s["tokens"]} for s in per_stream],
        "reference": {"window": ref_layout[0], "context_prefix": ref_layout[1], "scored": ref_scored,
                      "overhead": cat["reference"]["recomputed"] / max(ref_scored, 1),
                      "mean_entropy": _mean(cat["reference"][key][~np.isnan(cat["reference"][key])])},
        "prefixes": entries,
        "recommended_prefix": recommend(entries, cfg.tolerance),
        "within_tolerance": any(e["tag_disagreement_first16"] <= cfg.tolerance for e in entries),
        "recommendation_rule": f"smallest prefix whose tag_disagreement_first16 <= {cfg.tolerance:g} "
                               "(share of the first 16 scored positions of later windows whose `selected` tag "
                               "differs from the reference's)",
        "by_stream": per_stream,
        "by_offset": offset_profile({p: cat[p] for p in cfg.prefixes}, cat["reference"], key),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix-study.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "prefix-study.md").write_text(report_markdown(result))
    plot_profile(result, str(out / "prefix-study.png"))
    return result


def _concat(runs: list[dict]) -> dict:
    """Several streams' per-position arrays as one; counts summed."""
    out = {k: np.concatenate([r[k] for r in runs]) for k in ("entropy", "topk_entropy", "offset", "later")}
    out.update({k: sum(r[k] for r in runs) for k in ("tokens", "windows", "fed", "recomputed")})
    return out


def _f(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def report_markdown(res: dict) -> str:
    cfg = res["config"]
    lines = [
        "# Context-prefix study", "", *([cfg["note"], ""] if cfg.get("note") else []),
        f"Model `{res['model']['path']}`; window {cfg['window']} tokens; metric `{res['metric']}` (nats), "
        f"selected above {cfg['select_above']:g}; reference: every position with >= {cfg['reference_context']} "
        "tokens of real context (or all of the stream).", "",
        "Streams (the first tokens of each): " + ", ".join(f"`{s['stream']}` ({s['tokens']:,} tokens)"
                                                             for s in res["streams"]) + ".", "",
        "| prefix | overhead | MAE | MAE first 16 | entropy first 16 (ref) | tag disagreement | first 16 "
        "| false positives | first 16 |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in res["prefixes"]:
        lines.append(f"| {e['prefix']} | {_f(e['overhead'])} | {_f(e['mae_vs_reference'])} | {_f(e['mae_first16'])} "
                     f"| {_f(e['mean_entropy_first16'])} ({_f(e['reference_entropy_first16'])}) "
                     f"| {_f(e['tag_disagreement'], 4)} | {_f(e['tag_disagreement_first16'], 4)} "
                     f"| {_f(e['false_positive_share'], 4)} | {_f(e['false_positive_share_first16'], 4)} |")
    met = res.get("within_tolerance", True)
    first = [e["positions_first16"] for e in res["prefixes"]]
    lines += ["", f"Recommended prefix: **{res['recommended_prefix']}** ({res['recommendation_rule']}"
              + ("" if met else "; no prefix met the tolerance, so this is the prefix with the least disagreement")
              + f"). First-16 figures cover {min(first):,}-{max(first):,} positions per prefix, the others "
              f"{res['prefixes'][-1]['positions']:,}.", "",
              "By stream (tag disagreement of the first 16 positions per prefix):", ""]
    for s in res["by_stream"]:
        lines.append(f"- `{s['stream']}`: " + ", ".join(f"{e['prefix']}: {_f(e['tag_disagreement_first16'], 4)}"
                                                          for e in s["prefixes"]))
    lines += ["", f"Measured in {res['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def plot_profile(res: dict, path: str) -> None:
    """Mean entropy by offset in window (later windows) per prefix, with the reference at the same positions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prof = res["by_offset"]
    x = np.asarray(prof["offset_lo"], float)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    for p in [e["prefix"] for e in res["prefixes"]]:
        y = np.asarray([np.nan if v is None else v for v in prof[str(p)]], float)
        r = np.asarray([np.nan if v is None else v for v in prof[f"reference_at_{p}"]], float)
        (line,) = ax.plot(x + 1, y, marker=".", label=f"prefix {p}")
        bx.plot(x + 1, y - r, marker=".", color=line.get_color(), label=f"prefix {p}")
    r0 = np.asarray([np.nan if v is None else v for v in prof[f"reference_at_{res['prefixes'][0]['prefix']}"]], float)
    ax.plot(x + 1, r0, "k--", label="reference (same positions)")
    for a, title in ((ax, f"mean {res['metric']} (nats)"), (bx, "difference to the reference (nats)")):
        a.set_xscale("log")
        a.set_xlabel("offset from the window's first scored position + 1 (bins double after 16)")
        a.set_title(title)
        a.grid(alpha=0.3)
    bx.axhline(0, color="k", lw=0.8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
