"""`rpt-data inspect OUT --html FILE`: a sample of documents as token streams with their statistics.

A document is shown as its stream of tokens, each with the stats of the one window that scored it
(DESIGN: every position of a stream is scored exactly once). Long streams are cut to a contiguous run
of windows (`doc_tokens`), so the page stays bounded whatever the size of OUT. `--compare OTHER` aligns
a second output on the same stream indices (two context prefixes, two proxies with one tokenizer).
The HTML itself is built by rpt_data.view_html.
"""
from __future__ import annotations

import codecs
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import polars as pl

from rpt_common.errors import UserError
from rpt_common.shards import DEFAULT_BUCKETS, DEFAULT_METRIC, METRIC_COLUMNS, read_manifest
from rpt_data.inspect import listed_shards, position_profile, positions_frame, unreadable
from rpt_data.view_html import HIST_BINS, render_page

# --metric of the page: the shading value per token (surprisal = -target_logprob, nats)
VIEW_METRICS = {"topk": "topk_entropy", "full": "entropy", "surprisal": "surprisal"}
PICKS = ("hardest", "random")


class Tok(NamedTuple):
    """One token of a shown stream; stats are None where the token is not scored."""
    piece: str  # its text, decoded from its UTF-8 bytes inside the row's `text`
    token_id: int
    entropy: float | None
    topk: float | None
    logprob: float | None
    argmax: int | None
    window: int
    pos: int  # index inside that window's row
    scored: bool
    selected: bool
    context_only: bool  # shown only as the context prefix of the first shown window (scored in an unshown one)
    prefix_next: bool  # also sits in the context prefix of the next window


@dataclass(kw_only=True, slots=True)
class Run:
    """One tag output: its manifest, shard paths, tag metric column, bucket thresholds and names."""
    out: str
    manifest: dict
    paths: list[str]
    tag_col: str
    buckets: list[float]
    bucket_names: list[str]
    context_prefix: int

    @classmethod
    def open(cls, out: str) -> "Run":
        manifest = read_manifest(out)
        cfg = manifest.get("config", {})
        paths = listed_shards(out, manifest)
        if not paths:
            raise UserError(f"'{out}' holds no shards yet (its manifest lists none)")
        buckets = [float(b) for b in cfg.get("buckets") or DEFAULT_BUCKETS]
        names = ["easy", "medium", "hard"] if len(buckets) == 3 else [f"gt_{b:g}" for b in buckets]
        return cls(out=out, manifest=manifest, paths=paths, buckets=buckets, bucket_names=names,
                   context_prefix=int(cfg.get("context_prefix") or 0),
                   tag_col=METRIC_COLUMNS.get(cfg.get("metric") or DEFAULT_METRIC, "topk_entropy"))

    def bucket(self, value: float | None) -> int:
        """0 = below every threshold, i = above the i-th (nested buckets, DESIGN)."""
        return 0 if value is None else sum(value > b for b in self.buckets)

    def value(self, t: Tok, col: str) -> float | None:
        return {"entropy": t.entropy, "topk_entropy": t.topk,
                "surprisal": None if t.logprob is None else -t.logprob}[col]


@dataclass(kw_only=True, slots=True)
class DocView:
    doc_id: str
    windows: tuple[int, int]  # first and last window shown
    windows_total: int
    tokens: dict[int, Tok]  # stream index -> token, in stream order
    other: dict[int, Tok] = field(default_factory=dict)  # --compare: the other output's tokens


def _metric_expr(col: str) -> pl.Expr:
    return -pl.col("target_logprob") if col == "surprisal" else pl.col(col)


def row_summary(run: Run, col: str) -> pl.DataFrame:
    """One line per row (window): doc, window, token range, and the sum and count of the metric's values."""
    m = pl.col("target_logprob").list.eval(-pl.element()) if col == "surprisal" else pl.col(col)
    return (
        pl.scan_parquet(run.paths)
        .select("doc_id", "window_index", "token_start", "score_start", n=pl.col("token_ids").list.len(),
                m_sum=m.list.eval(pl.element().drop_nulls().sum()).list.first(),
                m_cnt=m.list.eval(pl.element().drop_nulls().len()).list.first().cast(pl.Int64))
        .sort("doc_id", "window_index").collect()
    )


def pick_docs(rows: pl.DataFrame, n: int, pick: str, seed: int, among: set[str] | None = None) -> list[str]:
    """`hardest`: the n documents of highest mean metric over their scored positions (ties by id);
    `random`: n documents drawn with `seed`, in id order."""
    docs = rows.group_by("doc_id").agg(s=pl.col("m_sum").sum(), c=pl.col("m_cnt").sum())
    if among is not None:
        docs = docs.filter(pl.col("doc_id").is_in(sorted(among)))
    if pick == "hardest":
        docs = docs.with_columns(mean=pl.col("s") / pl.col("c").clip(1)).sort(["mean", "doc_id"], descending=[True, False])
        return docs["doc_id"].head(n).to_list()
    ids = sorted(docs["doc_id"].to_list())
    return sorted(random.Random(seed).sample(ids, min(n, len(ids))))


def window_run(doc_rows: pl.DataFrame, budget: int, pick: str, rng: random.Random) -> tuple[int, int]:
    """A contiguous run of windows [a, b] (indices into doc_rows) whose scored tokens fit in `budget`
    (at least one window): around the hardest window, or from a seeded random one."""
    scored = (doc_rows["n"] - doc_rows["score_start"]).to_list()
    k = len(scored)
    if sum(scored) <= budget:
        return 0, k - 1
    if pick == "hardest":
        mean = (doc_rows["m_sum"] / doc_rows["m_cnt"].clip(1)).fill_null(0).to_list()
        a = b = max(range(k), key=lambda i: (mean[i], -i))
    else:
        a = b = rng.randrange(k)
    used = scored[a]
    while True:  # grow right, then left, while the budget holds
        if b + 1 < k and used + scored[b + 1] <= budget:
            b += 1
            used += scored[b]
        elif a > 0 and used + scored[a - 1] <= budget:
            a -= 1
            used += scored[a]
        else:
            return a, b


def stream_tokens(rows: list[dict], next_start: dict[int, int | None], context_prefix: int) -> dict[int, Tok]:
    """Stream index -> token over `rows` (one document, consecutive windows in order). `next_start`:
    window index -> token_start of the following window (None for the last)."""
    toks: dict[int, Tok] = {}
    expect = None  # stream index where the previous row's tokens end
    for r in rows:
        start, ss, w = r["token_start"], r["score_start"], r["window_index"]
        own_from = 0 if expect is None else expect - start  # the first shown row also shows its context prefix
        if not 0 <= own_from <= ss:
            raise UserError(f"document '{r['doc_id']}': window {w} starts at token {start} and scores from token "
                            f"{start + ss}, the previous window ended at token {expect}; the shards are not "
                            "contiguous (run `rpt-data validate`)")
        data, ends = r["text"].encode(), r["token_bytes"]
        short = [c for c in ("token_bytes", "entropy", "topk_entropy", "target_logprob", "proxy_argmax")
                 if r[c] is not None and len(r[c]) != len(r["token_ids"])]
        if short or (ends and ends[-1] != len(data)):
            what = (f"{', '.join(short)} of another length than token_ids ({len(r['token_ids'])})" if short else
                    f"token_bytes ending at byte {ends[-1]} of a {len(data)}-byte text")
            raise UserError(f"document '{r['doc_id']}', window {w}: a damaged row ({what}); run `rpt-data validate` "
                            "to find its shard")
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a split character goes to its last token
        sel = set(r["selected"] or ())
        nxt = next_start.get(w)
        for p in range(len(ends)):
            piece = dec.decode(data[ends[p - 1] if p else 0:ends[p]], final=p == len(ends) - 1)
            if p < own_from:
                continue
            j = start + p
            scored = p >= ss
            stats = [(r[c][p] if r[c] is not None else None) for c in ("entropy", "topk_entropy", "target_logprob",
                                                                         "proxy_argmax")]
            toks[j] = Tok(piece, r["token_ids"][p], *stats, window=w, pos=p, scored=scored, selected=p in sel,
                          context_only=w > 0 and p < context_prefix, prefix_next=nxt is not None and j >= nxt)
        expect = start + len(ends)
    return toks


def _read_rows(run: Run, wanted: dict[str, list[int]]) -> dict[str, list[dict]]:
    """doc id -> its rows of the wanted window indices, in window order (one scan of the shards)."""
    cols = ["doc_id", "window_index", "token_start", "score_start", "text", "token_ids", "token_bytes",
            "entropy", "topk_entropy", "target_logprob", "proxy_argmax", "selected"]
    keys = pl.DataFrame([(d, w) for d, ws in wanted.items() for w in ws], schema={"doc_id": pl.String,
                        "window_index": pl.Int32}, orient="row")
    df = (pl.scan_parquet(run.paths).select(cols).filter(pl.col("doc_id").is_in(list(wanted)))
          .join(keys.lazy(), on=["doc_id", "window_index"], how="semi").sort("doc_id", "window_index").collect())
    got: dict[str, list[dict]] = {d: [] for d in wanted}
    for r in df.iter_rows(named=True):
        got[r["doc_id"]].append(r)
    return got


def _next_starts(doc_rows: pl.DataFrame) -> dict[int, int | None]:
    w, s = doc_rows["window_index"].to_list(), doc_rows["token_start"].to_list()
    return {w[i]: (s[i + 1] if i + 1 < len(w) else None) for i in range(len(w))}


def load_docs(run: Run, rows: pl.DataFrame, doc_ids: list[str], doc_tokens: int, pick: str, seed: int) -> list[DocView]:
    rng = random.Random(seed)
    spans, per_doc = {}, {}
    for d in doc_ids:
        per_doc[d] = doc_rows = rows.filter(pl.col("doc_id") == d)
        a, b = window_run(doc_rows, doc_tokens, pick, rng)
        spans[d] = doc_rows["window_index"].to_list()[a:b + 1]
    read = _read_rows(run, spans)
    return [DocView(doc_id=d, windows=(spans[d][0], spans[d][-1]), windows_total=per_doc[d].height,
                    tokens=stream_tokens(read[d], _next_starts(per_doc[d]), run.context_prefix)) for d in doc_ids]


def attach_other(run: Run, other: Run, other_rows: pl.DataFrame, views: list[DocView]) -> None:
    """Fill each view's `other` with OTHER's tokens at the same stream indices; refuse when the tokens differ."""
    spans, per_doc = {}, {}
    for v in views:
        lo, hi = min(v.tokens), max(v.tokens) + 1
        per_doc[v.doc_id] = doc_rows = other_rows.filter(pl.col("doc_id") == v.doc_id)
        hit = doc_rows.filter((pl.col("token_start") < hi) & (pl.col("token_start") + pl.col("n") > lo))
        spans[v.doc_id] = hit["window_index"].to_list()
    read = _read_rows(other, spans)
    for v in views:
        toks = stream_tokens(read[v.doc_id], _next_starts(per_doc[v.doc_id]), other.context_prefix)
        for j, t in v.tokens.items():
            o = toks.get(j)
            if o is None or o.token_id != t.token_id:
                got = "no token" if o is None else f"token id {o.token_id}"
                raise UserError(f"--compare: document '{v.doc_id}' token {j} is id {t.token_id} in '{run.out}' "
                                f"but {got} in '{other.out}'; both outputs must tokenize the same text with one "
                                "tokenizer")
            v.other[j] = o


def histogram(run: Run, col: str, hi: float, bins: int = HIST_BINS) -> list[int]:
    """Counts of the metric over every scored position of the output, in `bins` equal bins on [0, hi]
    (the last bin also holds what lies above)."""
    lf = positions_frame(run.out, run.paths, stats=("entropy", "topk_entropy", "target_logprob"))
    v = _metric_expr(col).drop_nulls()
    width = hi / bins
    counts = (lf.select(b=(v / width).floor().clip(0, bins - 1).cast(pl.Int64))
              .group_by("b").len().collect())
    out = [0] * bins
    for b, n in counts.iter_rows():
        out[b] = n
    return out


def metric_max(run: Run, col: str) -> float:
    """The largest value of the metric over the output (a streaming aggregate, whatever its size)."""
    lf = positions_frame(run.out, run.paths, stats=("entropy", "topk_entropy", "target_logprob"))
    return float(lf.select(_metric_expr(col).max()).collect().item() or 0.0)


def page_scale(views: list[DocView], run: Run, col: str, q: float = 0.995) -> float:
    """Top of the colour scale: the q-quantile of the metric over the page's tokens (outliers saturate)."""
    vals = sorted(v for d in views for t in d.tokens.values() if t.scored and (v := run.value(t, col)) is not None)
    return vals[int(q * (len(vals) - 1))] if vals else 1.0


def profile(run: Run, col: str, bins: int = 32) -> pl.DataFrame:
    lf = positions_frame(run.out, run.paths, stats=("entropy", "topk_entropy", "target_logprob"))
    if col == "surprisal":
        lf = lf.with_columns(surprisal=-pl.col("target_logprob"))
    return position_profile(lf, col, int(run.manifest["config"]["window"]), bins=bins)


def argmax_vocab(run: Run, ids: set[int]) -> tuple[dict[int, str], str]:
    """Decoded proxy tokens for `ids` via the manifest's proxy tokenizer, and a note on where they came from
    (empty dict and the reason when it cannot be loaded or is not the tokenizer that wrote the shards)."""
    from rpt_common.models import load_tokenizer, tokenizer_identity

    spec = run.manifest.get("config", {}).get("model")
    if not spec:
        return {}, "no proxy named in the manifest: argmax shown as ids"
    try:
        tok = load_tokenizer(spec)
    except (UserError, OSError, ValueError) as e:
        return {}, f"tokenizer of '{spec}' not loadable ({e}): argmax shown as ids"
    want = (run.manifest.get("tokenizer") or {}).get("vocab_hash")
    if want and tokenizer_identity(tok)["vocab_hash"] != want:
        return {}, f"the tokenizer of '{spec}' is not the one that wrote the shards: argmax shown as ids"
    return {i: tok.decode([i]) for i in sorted(ids)}, f"argmax decoded with the tokenizer of '{spec}'"


def write_html(out: str, html_path: str, *, docs: int = 20, pick: str = "hardest", seed: int = 0,
               metric: str | None = None, compare: str | None = None, doc_tokens: int = 2000) -> dict:
    """Build the page for OUT (and OTHER) and write it to html_path; returns a small summary."""

    if docs < 1 or doc_tokens < 1:
        raise UserError("--docs and --doc-tokens must be at least 1")
    if pick not in PICKS:
        raise UserError(f"--pick must be one of {', '.join(PICKS)}")
    run = Run.open(out)
    metric = metric or (run.manifest.get("config", {}).get("metric") or DEFAULT_METRIC)
    if metric not in VIEW_METRICS:
        raise UserError(f"--metric must be one of {', '.join(VIEW_METRICS)}")
    col = VIEW_METRICS[metric]
    other = None
    try:
        rows = row_summary(run, col)
        other = other_rows = None
        among = None
        if compare:
            other = Run.open(compare)
            a, b = ((r.manifest.get("tokenizer") or {}).get("vocab_hash") for r in (run, other))
            if a and b and a != b:
                raise UserError(f"--compare: '{out}' and '{compare}' were tagged with different tokenizers "
                                f"(vocabulary hashes {a} and {b}); compare outputs of one tokenizer")
            other_rows = row_summary(other, col)
            among = set(rows["doc_id"].unique().to_list()) & set(other_rows["doc_id"].unique().to_list())
            if not among:
                raise UserError(f"--compare: '{out}' and '{compare}' have no document id in common")
        ids = pick_docs(rows, docs, pick, seed, among)
        views = load_docs(run, rows, ids, doc_tokens, pick, seed)
        if other is not None:
            attach_other(run, other, other_rows, views)
        runs = [r for r in (run, other) if r is not None]
        hi = max(page_scale(views, run, col), 1e-3)
        top = max(max(metric_max(r, col) for r in runs), hi)  # right end of the histograms
        charts = {"hist": {r.out: histogram(r, col, top) for r in runs}, "hist_hi": top,
                  "profile": {r.out: profile(r, col) for r in runs}, "hi": hi}
    except (pl.exceptions.PolarsError, OSError) as e:  # a damaged shard: named when its footer does not read
        raise unreadable(out, run.paths + (other.paths if other is not None else []), e,
                         f" or {compare!r}" if compare else "")
    argmax_ids = {t.argmax for v in views for d in (v.tokens, v.other) for t in d.values() if t.argmax is not None}
    vocab, vocab_note = argmax_vocab(run, argmax_ids)
    page = render_page(run=run, other=other, views=views, col=col, metric=metric, pick=pick, seed=seed,
                       docs=docs, doc_tokens=doc_tokens, charts=charts, vocab=vocab, vocab_note=vocab_note)
    Path(html_path).parent.mkdir(parents=True, exist_ok=True)
    Path(html_path).write_text(page, encoding="utf-8")
    return {"docs": len(views), "tokens": sum(len(v.tokens) for v in views), "bytes": len(page.encode())}
