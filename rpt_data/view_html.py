"""The self-contained heatmap page of `rpt-data inspect --html`: inline CSS, JS and SVG, no network.

Every token is a <span class="t"> holding its own text; a scored one carries `data-i` (its index in the
page's token table `D.tok`) and `data-v` (the shaded value, 4 decimals). Shading is one of a few CSS
classes (text colour picked for contrast), the selection mark is an underline (plus a glyph for flips
in --compare), and the statistics of the hovered or focused token fill the panel (#panel, cells
#p-<field> for OUT and #q-<field> for OTHER).
"""
from __future__ import annotations

import html
import json
import math

# Sequential (metric) and diverging (difference) scales: ColorBrewer YlOrRd-9 and RdBu-11 (blue = lower).
SEQ = ["#ffffcc", "#ffeda0", "#fed976", "#feb24c", "#fd8d3c", "#fc4e2a", "#e31a1c", "#bd0026", "#800026"]
DIV = ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b",
       "#67001f"]
BUCKET_BG = ["#ffffff", "#fee8c8", "#fdbb84", "#d7301f", "#7f0000", "#4d0000"]  # none, then one per threshold
HIST_BINS = 48  # bars of the page's histograms (rpt_data.view counts into them)
MUTED = "#595959"  # unscored text: 7:1 on white
FIELDS = ["doc", "j", "entropy", "topk_entropy", "target_logprob", "argmax", "window", "pos", "flags", "bucket"]
FLAG_SCORED, FLAG_SELECTED, FLAG_CONTEXT_ONLY, FLAG_PREFIX_NEXT = 1, 2, 4, 8


def luminance(hex_colour: str) -> float:
    """WCAG 2 relative luminance of #rrggbb."""
    def channel(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def text_on(bg: str) -> str:
    """Black or white, whichever reads better on `bg`."""
    return "#000000" if contrast("#000000", bg) >= contrast("#ffffff", bg) else "#ffffff"


def seq_level(v: float, hi: float) -> int:
    return max(0, min(len(SEQ) - 1, int(v / hi * len(SEQ)))) if hi > 0 else 0


def div_level(d: float, r: float) -> int:
    half = len(DIV) // 2
    return max(0, min(len(DIV) - 1, half + round(d / r * half))) if r > 0 else half


def nice_ceil(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k not below x."""
    if x <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(x))
    return next(m * e for m in (1, 2, 2.5, 5, 10) if m * e >= x - 1e-12)


def scale_top(x: float) -> float:
    """x rounded up to two significant digits (the top of the colour scale: 2.77 -> 2.8)."""
    if x <= 0:
        return 1.0
    step = 10 ** (math.floor(math.log10(x)) - 1)
    return round(math.ceil(x / step - 1e-9) * step, 12)


def _r(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 4)


def _e(x) -> str:
    return html.escape(str(x), quote=True)


# ---------------------------------------------------------------------------------------------- SVG charts
W, H, ML, MR, MT, MB = 420, 190, 52, 12, 26, 38


def _axes(title: str, x0: float, x1: float, y1: float, xlabel: str, ylabel: str) -> list[str]:
    pw, ph = W - ML - MR, H - MT - MB
    out = [f'<text x="{W / 2}" y="16" text-anchor="middle" class="ct">{_e(title)}</text>',
           f'<line x1="{ML}" y1="{MT + ph}" x2="{ML + pw}" y2="{MT + ph}" class="ax"/>',
           f'<line x1="{ML}" y1="{MT}" x2="{ML}" y2="{MT + ph}" class="ax"/>',
           f'<text x="{ML + pw / 2}" y="{H - 4}" text-anchor="middle">{_e(xlabel)}</text>',
           f'<text x="12" y="{MT + ph / 2}" text-anchor="middle" transform="rotate(-90 12 {MT + ph / 2})">{_e(ylabel)}</text>']
    step = nice_ceil((x1 - x0) / 5)
    xv = math.ceil(x0 / step - 1e-9) * step
    while xv <= x1 + 1e-9:
        x = ML + (xv - x0) / (x1 - x0) * pw
        out.append(f'<line x1="{x:.1f}" y1="{MT + ph}" x2="{x:.1f}" y2="{MT + ph + 4}" class="ax"/>'
                   f'<text x="{x:.1f}" y="{MT + ph + 15}" text-anchor="middle">{xv:.3g}</text>')
        xv += step
    for k in range(5):
        y = MT + ph - ph * k / 4
        yv = y1 * k / 4
        label = f"{yv / 1000:g}k" if y1 >= 1000 and yv else f"{yv:.3g}"
        out.append(f'<text x="{ML - 5}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
    return out


def svg_chart(title: str, series: list[tuple[str, list[float], list[float | None]]], *, xlabel: str, ylabel: str,
              bars: bool = False, vlines: list[tuple[float, str]] = (), x_range: tuple[float, float] | None = None) -> str:
    """A small inline SVG: bars (one series) or lines (one per series, told apart by dash pattern and a legend).
    vlines: (x, label) marks such as bucket thresholds."""
    xs_all = [x for _, xs, _ in series for x in xs]
    x0, x1 = x_range or (min(xs_all, default=0.0), max(xs_all, default=1.0))
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = nice_ceil(max((y for _, _, ys in series for y in ys if y is not None), default=1.0))
    pw, ph = W - ML - MR, H - MT - MB
    sx = lambda x: ML + (x - x0) / (x1 - x0) * pw  # noqa: E731
    sy = lambda y: MT + ph - y / y1 * ph  # noqa: E731
    parts = _axes(title, x0, x1, y1, xlabel, ylabel)
    dashes = ["", "6 3", "2 2"]
    for s, (name, xs, ys) in enumerate(series):
        if bars:
            bw = pw / max(len(xs), 1)
            parts += [f'<rect x="{sx(x):.1f}" y="{sy(y):.1f}" width="{max(bw - 0.5, 0.5):.1f}" height="{MT + ph - sy(y):.1f}" '
                      f'class="bar"><title>{x:.3g}: {y:g}</title></rect>' for x, y in zip(xs, ys) if y]
        else:
            pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys) if y is not None)
            parts.append(f'<polyline points="{pts}" class="ln ln{s}" stroke-dasharray="{dashes[s % 3]}"/>')
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" class="pt{s}"><title>{_e(name)}: '
                      f'{x:g} -&gt; {y:.4f}</title></circle>' for x, y in zip(xs, ys) if y is not None]
        if len(series) > 1:
            ly = MT + 4 + 13 * s
            parts.append(f'<line x1="{W - 150}" y1="{ly}" x2="{W - 128}" y2="{ly}" class="ln ln{s}" '
                         f'stroke-dasharray="{dashes[s % 3]}"/><text x="{W - 124}" y="{ly + 4}">{_e(name)}</text>')
    for x, label in vlines:
        if x0 <= x <= x1:
            parts.append(f'<line x1="{sx(x):.1f}" y1="{MT}" x2="{sx(x):.1f}" y2="{MT + ph}" class="vl"/>'
                         f'<text x="{sx(x) + 2:.1f}" y="{MT + 9}" class="vt">{_e(label)}</text>')
    return (f'<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{_e(title)}">'
            f'<title>{_e(title)}</title>{"".join(parts)}</svg>')


# ---------------------------------------------------------------------------------------------- the page
CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;color:#111;background:#fff;margin:0 1.2em 14em}
h1{font-size:1.3em;margin:.6em 0 .2em}h2{font-size:1.05em;margin:1.2em 0 .3em}h2 small{font-weight:400;color:#444}
table.kv{border-collapse:collapse;font-size:.85em}table.kv td,table.kv th{border:1px solid #ccc;padding:1px 6px;text-align:left;vertical-align:top}
.bar{fill:#4477aa}.ax{stroke:#333}.vl{stroke:#b2182b;stroke-dasharray:4 3}.vt{fill:#b2182b;font-size:10px}
svg text{font-size:11px;fill:#222}.ct{font-weight:600;font-size:12px}
.ln{fill:none;stroke-width:2}.ln0{stroke:#222}.ln1{stroke:#b2182b}.pt0{fill:#222}.pt1{fill:#b2182b}
#charts{display:flex;flex-wrap:wrap;gap:1em}
nav .bar{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:.4em 0;z-index:2}
#search{font-size:1em;width:16em}nav button,nav label{font-size:.9em;margin-left:.6em}
#toc{max-height:12em;overflow:auto;font-size:.85em}#toc td{padding:0 .5em}
.legend{display:flex;flex-wrap:wrap;gap:2px;align-items:center;margin:.25em 0;font-size:.8em}
.legend .sw{padding:1px 6px;border:1px solid #999}.legend .lab{margin-right:.6em;font-weight:600}
.legend .t{margin-right:1em}
.text{white-space:pre-wrap;word-wrap:break-word;font:14px/1.9 ui-monospace,"DejaVu Sans Mono",monospace;
 border:1px solid #ddd;padding:.5em;max-width:110ch}
.t{border-radius:2px}
.t.u,.t.ctx{color:#595959}.t.ctx{font-style:italic;outline:1px dotted #595959}
.t.n{outline:1px dashed #000}
.t.z{display:inline-block;min-width:.35em;height:1.1em;vertical-align:text-bottom}
.t.nl::before{content:"\\21B5";color:#595959}
.t.px{box-shadow:inset 0 2px 0 #595959}
.t.s{text-decoration:underline 2px;text-underline-offset:3px;font-weight:700}
.t.fb{text-decoration:underline dashed 2px;text-underline-offset:3px;font-weight:700}
.t.fa{text-decoration:underline dotted 2px;text-underline-offset:3px}
.t.fb::after{content:"\\25B2";font-size:.6em;vertical-align:super}
.t.fa::after{content:"\\25BD";font-size:.6em;vertical-align:super}
.t:focus{outline:3px solid #1a56db;outline-offset:1px}
.t[data-i]:hover{outline:2px solid #1a56db}
.wb{font:11px system-ui,sans-serif;color:#fff;background:#333;border-radius:3px;padding:0 3px;margin:0 2px;
 vertical-align:super}
#panel{position:fixed;right:.6em;bottom:.6em;background:#fff;border:2px solid #333;padding:.4em .6em;
 font-size:.85em;min-width:20em;max-width:34em;box-shadow:0 2px 8px rgba(0,0,0,.3);z-index:3}
#panel th{text-align:left;padding-right:.8em;font-weight:600}#panel td{font-family:ui-monospace,monospace;padding-right:.8em}
body:not(.cmp) .q{display:none}
.hint{font-size:.8em;color:#444}
"""

JS = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const F = Object.fromEntries(D.fields.map((f, i) => [f, i]));
const T = document.querySelectorAll('.t[data-i]');
const rover = {};
const fmt = x => x == null ? 'null' : x.toFixed(4);
const setc = (id, s) => { const el = document.getElementById(id); if (el) el.textContent = s; };
function context(r, o) {
  const f = r[o + F.flags], w = r[o + F.window];
  if (f & 4) return 'context prefix only (scored in window ' + (w - 1) + ', not shown)';
  if (!(f & 1)) return 'not scored (no context before it)';
  return (f & 8) ? 'scored; also context prefix of window ' + (w + 1) : 'scored';
}
function argmax(a) {
  if (a == null) return 'null';
  const s = D.vocab[a];
  return s == null ? 'id ' + a : JSON.stringify(s) + ' (id ' + a + ')';
}
function fill(r, o, p) {
  const lp = r[o + F.target_logprob];
  setc(p + 'entropy', fmt(r[o + F.entropy]));
  setc(p + 'topk_entropy', fmt(r[o + F.topk_entropy]));
  setc(p + 'target_logprob', lp == null ? 'null' : fmt(lp) + ' (p = ' + Math.exp(lp).toPrecision(3) + ')');
  setc(p + 'argmax', argmax(r[o + F.argmax]));
  setc(p + 'bucket', D.buckets[r[o + F.bucket]]);
  setc(p + 'window', String(r[o + F.window]));
  setc(p + 'pos', String(r[o + F.pos]));
  setc(p + 'context', context(r, o));
  setc(p + 'selected', (r[o + F.flags] & 2) ? 'yes' : 'no');
}
function show(i) {
  const r = D.tok[i], el = T[i];
  setc('p-doc', D.docs[r[F.doc]]);
  setc('p-token', JSON.stringify(el.textContent) + '  (token ' + r[F.j] + ' of the stream)');
  setc('p-value', el.dataset.v == null ? 'null' : el.dataset.v);
  fill(r, 0, 'p-');
  if (D.compare) fill(r, D.fields.length, 'q-');
}
function focusTok(i) {
  const el = T[i]; if (!el) return;
  const d = D.tok[i][F.doc];
  if (rover[d] && rover[d] !== el) rover[d].tabIndex = -1;
  el.tabIndex = 0; rover[d] = el; el.focus(); el.scrollIntoView({block: 'nearest'}); show(i);
}
function step(i, dir, pred) {
  const d = D.tok[i][F.doc];
  for (let k = i + dir; k >= 0 && k < T.length && D.tok[k][F.doc] === d; k += dir) if (pred(k)) return k;
  return i;
}
const marked = k => D.compare ? (D.tok[k][F.flags] & 2) !== (D.tok[k][D.fields.length + F.flags] & 2)
                              : (D.tok[k][F.flags] & 2);
document.querySelectorAll('.text .t[tabindex="0"]').forEach(el => { rover[D.tok[+el.dataset.i][F.doc]] = el; });
const main = document.querySelector('main');
main.addEventListener('mouseover', e => { const t = e.target.closest('.t[data-i]'); if (t) show(+t.dataset.i); });
main.addEventListener('focusin', e => { const t = e.target.closest('.t[data-i]'); if (t) show(+t.dataset.i); });
main.addEventListener('keydown', e => {
  const t = e.target.closest('.t[data-i]'); if (!t) return;
  const i = +t.dataset.i, d = D.tok[i][F.doc];
  const moves = {ArrowRight: () => step(i, 1, () => true), ArrowLeft: () => step(i, -1, () => true),
    n: () => step(i, 1, marked), p: () => step(i, -1, marked), h: () => D.doc_hardest[d],
    Home: () => step(i, -1, k => k === 0 || D.tok[k - 1][F.doc] !== d), End: () => step(i, 1, k => k === T.length - 1 || D.tok[k + 1][F.doc] !== d)};
  if (moves[e.key]) { e.preventDefault(); focusTok(moves[e.key]()); }
});
document.getElementById('hardest').addEventListener('click', () => focusTok(D.hardest));
document.querySelectorAll('[data-jump]').forEach(b => b.addEventListener('click', () => focusTok(+b.dataset.jump)));
const search = document.getElementById('search');
search.addEventListener('input', () => {
  const q = search.value.toLowerCase();
  document.querySelectorAll('article.doc, #toc tr[data-doc]').forEach(el => {
    el.hidden = q !== '' && !el.dataset.doc.toLowerCase().includes(q); });
});
search.addEventListener('keydown', e => {
  if (e.key !== 'Enter') return;
  const a = document.querySelector('article.doc:not([hidden])');
  if (a) { const el = a.querySelector('.t[tabindex="0"]') || a.querySelector('.t[data-i]'); if (el) focusTok(+el.dataset.i); }
});
document.querySelectorAll('input[name=shade]').forEach(r => r.addEventListener('change', () => {
  document.body.classList.toggle('by-bucket', r.value === 'bucket' && r.checked);
  document.body.classList.toggle('by-metric', r.value === 'metric' && r.checked);
}));
"""


def _scale_css(cmp: bool, n_buckets: int) -> str:
    rules = []
    for i, bg in enumerate(SEQ):
        rules.append(f".by-metric .t.c{i},.sw.c{i}{{background:{bg};color:{text_on(bg)}}}")
    for i, bg in enumerate(BUCKET_BG[:n_buckets + 1]):
        rules.append(f".by-bucket .t.b{i},.sw.b{i}{{background:{bg};color:{text_on(bg)}}}")
    for i, bg in enumerate(DIV):
        rules.append(f".by-diff .t.d{i},.sw.d{i}{{background:{bg};color:{text_on(bg)}}}")
    return "\n".join(rules)


def _settings(run) -> list[tuple[str, str]]:
    m, cfg = run.manifest, run.manifest.get("config", {})
    tot = m.get("totals") or {}
    keys = ["mode", "window", "context_prefix", "top_k", "metric", "select_above", "buckets", "template",
            "text_field", "inputs"]
    rows = [("output", run.out), ("complete", str(m.get("complete"))),
            ("proxy", str((m.get("proxy") or {}).get("path", cfg.get("model")))),
            ("tokenizer", f"{(m.get('tokenizer') or {}).get('name', '?')} (vocab {(m.get('tokenizer') or {}).get('vocab_size', '?')})"),
            ("bos", str((m.get("bos") or {}).get("used", "?"))),
            ("precision", ", ".join(f"{k} {v}" for k, v in (m.get("precision") or {}).items()) or "?")]
    rows += [(k, json.dumps(cfg[k], ensure_ascii=False) if isinstance(cfg[k], (list, dict)) else str(cfg[k]))
             for k in keys if cfg.get(k) is not None]
    rows += [("totals", ", ".join(f"{k} {v:,}" for k, v in tot.items() if isinstance(v, int)))] if tot else []
    return rows


def _settings_table(run, other) -> str:
    a = _settings(run)
    b = dict(_settings(other)) if other else {}
    head = "<tr><th></th><th>OUT</th><th>OTHER</th></tr>" if other else ""
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td>" + (f"<td>{_e(b.get(k, ''))}</td>" if other else "") + "</tr>"
                   for k, v in a)
    return f'<table class="kv">{head}{body}</table>'


def _flags(t) -> int:
    return (FLAG_SCORED * t.scored | FLAG_SELECTED * t.selected | FLAG_CONTEXT_ONLY * t.context_only
            | FLAG_PREFIX_NEXT * t.prefix_next)


def _row(run, t, d: int, j: int) -> list:
    return [d, j, _r(t.entropy), _r(t.topk), _r(t.logprob), t.argmax, t.window, t.pos, _flags(t),
            run.bucket(run.value(t, run.tag_col)) if t.scored else 0]


def _marks(run, other, t, o, col: str, hi: float, r_div: float) -> tuple[list[str], float | None, float]:
    """A scored token's shading and selection classes, the value it shows (data-v: its metric, or OTHER - OUT
    with --compare) and its key for "hardest" (the value, or the absolute difference)."""
    a = run.value(t, col) if t.scored else None
    if other is None:
        if a is None:  # scored, but the proxy's logits were NaN: stats stored as null
            return ["n"] + ["s"] * t.selected, None, -math.inf
        return [f"c{seq_level(a, hi)}", f"b{run.bucket(run.value(t, run.tag_col))}"] + ["s"] * t.selected, a, a
    b = other.value(o, col) if o.scored else None
    diff = None if a is None or b is None else b - a
    cls = [f"d{div_level(diff, r_div)}"] if diff is not None else []
    cls += ["s"] if t.selected and o.selected else ["fb"] if o.selected else ["fa"] if t.selected else []
    return cls, diff, abs(diff) if diff is not None else -math.inf


def render_page(*, run, other, views, col: str, metric: str, pick: str, seed: int, docs: int, doc_tokens: int,
                charts: dict, vocab: dict[int, str], vocab_note: str) -> str:
    cmp = other is not None
    hi = scale_top(charts["hi"])
    tok_rows, spans_by_doc, doc_hardest, doc_meta = [], [], [], []
    diffs = []
    for d, v in enumerate(views):
        for j, t in v.tokens.items():
            a = run.value(t, col) if t.scored else None
            o = v.other.get(j) if cmp else None
            b = other.value(o, col) if o is not None and o.scored else None
            diffs.append(None if a is None or b is None else b - a)
    r_div = _p99_abs(diffs) if cmp else 1.0
    k = 0
    best = (-math.inf, 0)
    for d, v in enumerate(views):
        parts, first_w, roving = [], None, None
        d_best = (-math.inf, None)
        vals, n_sel, gained, lost = [], 0, 0, 0
        for j, t in v.tokens.items():
            o = v.other.get(j) if cmp else None
            if t.window != first_w:  # stream order: a new window's tokens start here
                parts.append(f'<span class="wb" aria-hidden="true" title="window {t.window}">w{t.window}</span>')
                first_w = t.window
            piece, attrs = t.piece, ""
            cls = ["t"] + ["z"] * (piece == "") + ["nl"] * ("\n" in piece) + ["px"] * t.prefix_next
            cls += ["ctx"] if t.context_only else [] if t.scored else ["u"]
            if t.scored or (cmp and o is not None and o.scored):
                tok_rows.append(_row(run, t, d, j) + (_row(other, o, d, j) if cmp else []))
                marks, shown, key = _marks(run, other, t, o, col, hi, r_div)
                cls += marks
                gained += "fb" in marks
                lost += "fa" in marks
                if shown is not None:
                    vals.append(shown)
                n_sel += t.selected
                if key > d_best[0]:
                    d_best = (key, k)
                if key > best[0]:
                    best = (key, k)
                tab = ' tabindex="0"' if roving is None else ""
                roving = k if roving is None else roving
                attrs = f' data-i="{k}"' + (f' data-v="{shown:.4f}"' if shown is not None else "") + tab
                k += 1
            parts.append(f'<span class="{" ".join(cls)}"{attrs}>{html.escape(piece, quote=False)}</span>')
        doc_hardest.append(d_best[1] if d_best[1] is not None else roving)
        spans_by_doc.append("".join(parts))
        doc_meta.append(dict(n=len(v.tokens), scored=len(vals), mean=(sum(vals) / len(vals)) if vals else None,
                             sel=n_sel, gained=gained, lost=lost))
    data = {"fields": FIELDS, "compare": cmp, "docs": [v.doc_id for v in views], "tok": tok_rows,
            "vocab": {str(i): s for i, s in vocab.items()}, "buckets": ["none"] + run.bucket_names,
            "hardest": best[1], "doc_hardest": doc_hardest}
    # every '<' as \u003c (JSON's own escape): neither '</script' nor '<!--<script' can end or bend the data block
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")
    what = "difference OTHER - OUT of " if cmp else ""
    title = f"rpt-data heatmap: {run.out}" + (f" vs {other.out}" if cmp else "")
    body_class = "cmp by-diff" if cmp else "by-metric"
    charts_html = _charts(run, other, col, charts, diffs, r_div)
    return "".join([
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{CSS}\n{_scale_css(cmp, len(run.buckets))}</style></head>",
        f'<body class="{body_class}"><header><h1>{_e(title)}</h1>',
        f'<p>{len(views)} documents ({pick}{f", seed {seed}" if pick == "random" else ""}; --docs {docs}, '
        f'at most {doc_tokens:,} scored tokens each), shaded by {what}<b>{_e(col)}</b> (nats); {_e(vocab_note)}.</p>',
        _settings_table(run, other), "</header>",
        _nav(views, doc_meta, doc_hardest, cmp),
        _legend(run, col, hi, r_div, cmp),
        f'<section id="charts" aria-label="charts">{charts_html}</section>',
        "<main>", *(_article(d, v, doc_meta[d], spans_by_doc[d], cmp) for d, v in enumerate(views)), "</main>",
        _panel(cmp),
        f'<script type="application/json" id="data">{payload}</script><script>{JS}</script></body></html>',
    ])


def _p99_abs(xs: list[float | None]) -> float:
    """Half-width of the diverging scale: the 99th percentile of |x|, rounded up to a nice number."""
    a = sorted(abs(x) for x in xs if x is not None)
    return nice_ceil(a[int(0.99 * (len(a) - 1))] if a else 1.0)


def _mean(m) -> str:
    return "-" if m["mean"] is None else f"{m['mean']:.3f}"


def _nav(views, meta, doc_hardest, cmp) -> str:
    extra = "<th>flips +/-</th>" if cmp else "<th>selected</th>"
    rows = "".join(
        f'<tr data-doc="{_e(v.doc_id)}"><td><a href="#doc-{d}">{_e(v.doc_id)}</a></td><td>{m["n"]:,}</td>'
        f'<td>{_mean(m)}</td>'
        + (f'<td>+{m["gained"]} / -{m["lost"]}</td>' if cmp else f'<td>{m["sel"]}</td>')
        + (f'<td><button type="button" data-jump="{doc_hardest[d]}">hardest</button></td>' if doc_hardest[d] is not None
           else "<td></td>") + "</tr>"
        for d, (v, m) in enumerate(zip(views, meta)))
    shade = ("" if cmp else
             '<label><input type="radio" name="shade" value="metric" checked> shade by value</label>'
             '<label><input type="radio" name="shade" value="bucket"> shade by bucket</label>')
    return (f'<nav aria-label="documents"><div class="bar"><label for="search">document id: </label>'
            f'<input id="search" type="search" placeholder="filter, Enter jumps" autocomplete="off">'
            f'<button type="button" id="hardest">jump to the {"largest difference" if cmp else "hardest token"}</button>'
            f'{shade}</div><p class="hint">Keys on a token: &larr;/&rarr; previous/next token, n/p next/previous '
            f'{"flipped selection" if cmp else "selected token"}, h hardest in the document, Home/End; Tab moves '
            f'between documents.</p><div id="toc"><table><tr><th>document</th><th>tokens</th>'
            f'<th>mean {"difference" if cmp else "value"}</th>{extra}<th></th></tr>{rows}</table></div></nav>')


def _legend(run, col, hi, r_div, cmp) -> str:
    if cmp:
        half = len(DIV) // 2
        sw = "".join(f'<span class="sw d{i}">{(i - half) / half * r_div:+.2f}</span>' for i in range(len(DIV)))
        marks = ('<span class="t s">selected in both</span> <span class="t fb">selected only in OTHER</span> '
                 '<span class="t fa">selected only in OUT</span>')
        scale = f'<div class="legend"><span class="lab">{_e(col)} OTHER - OUT (nats), bin centres:</span>{sw}</div>'
    else:
        step = hi / len(SEQ)
        sw = "".join(f'<span class="sw c{i}">{i * step:.2f}{"–" + f"{(i + 1) * step:.2f}" if i < len(SEQ) - 1 else "+"}</span>'
                     for i in range(len(SEQ)))
        names = ["none"] + run.bucket_names
        edges = [f"&le; {run.buckets[0]:g}"] + [f"&gt; {b:g}" for b in run.buckets]
        bk = "".join(f'<span class="sw b{i}">{_e(n)} {e}</span>' for i, (n, e) in enumerate(zip(names, edges)))
        marks = '<span class="t s">selected</span>'
        scale = (f'<div class="legend"><span class="lab">{_e(col)} (nats):</span>{sw}</div>'
                 f'<div class="legend"><span class="lab">buckets ({_e(run.tag_col)}):</span>{bk}</div>')
    return (f'<section id="legend" aria-label="legend">{scale}<div class="legend"><span class="lab">marks:</span>{marks} '
            '<span class="t u">not scored</span> <span class="t ctx">context prefix only</span> '
            '<span class="t px">also in the next window&#39;s context prefix</span> '
            '<span class="wb">w3</span> scoring of window 3 starts</div></section>')


def _article(d, v, m, spans, cmp) -> str:
    w0, w1 = v.windows
    mean = _mean(m)
    stats = (f"flips +{m['gained']} / -{m['lost']}, mean difference {mean}" if cmp
             else f"{m['sel']} selected, mean {mean}")
    return (f'<article class="doc" id="doc-{d}" data-doc="{_e(v.doc_id)}"><h2>{_e(v.doc_id)} <small>windows {w0}-{w1} '
            f'of {v.windows_total}, {m["n"]:,} tokens, {m["scored"]:,} scored, {stats}</small></h2>'
            f'<div class="text" role="group" aria-label="text of {_e(v.doc_id)}">{spans}</div></article>')


def _panel(cmp) -> str:
    keys = [("entropy", "entropy (nats)"), ("topk_entropy", "top-k entropy"), ("target_logprob", "target log-prob"),
            ("argmax", "proxy argmax"), ("bucket", "bucket"), ("window", "window"), ("pos", "position in window"),
            ("context", "context"), ("selected", "selected")]
    head = '<tr class="q"><th></th><td>OUT</td><td>OTHER</td></tr>'
    rows = "".join(f'<tr><th>{lab}</th><td id="p-{k}"></td><td id="q-{k}" class="q"></td></tr>' for k, lab in keys)
    return (f'<aside id="panel" aria-live="polite" aria-label="token statistics"><table>'
            f'<tr><th>document</th><td id="p-doc" colspan="2">hover or focus a token</td></tr>'
            f'<tr><th>token</th><td id="p-token" colspan="2"></td></tr>'
            f'<tr><th>{"difference" if cmp else "value"}</th><td id="p-value" colspan="2"></td></tr>'
            f'{head}{rows}</table></aside>')


def _charts(run, other, col, charts, diffs, r_div) -> str:
    top = charts["hist_hi"]

    xs = [top * (i + 0.5) / HIST_BINS for i in range(HIST_BINS)]
    runs = [r for r in (run, other) if r is not None]
    vl = [(b, f"{n} > {b:g}") for b, n in zip(run.buckets, run.bucket_names)] if col == run.tag_col else []
    names = {run.out: "OUT", **({other.out: "OTHER"} if other else {})}
    out = [svg_chart(f"{col}: all scored positions", [(names[r.out], xs, charts["hist"][r.out]) for r in runs],
                     xlabel=f"{col} (nats)", ylabel="positions", bars=len(runs) == 1, vlines=vl, x_range=(0, top))]
    cp = [(float(r.manifest["config"]["context_prefix"]), f"prefix {r.manifest['config']['context_prefix']}")
          for r in runs if r.manifest.get("config", {}).get("context_prefix")]
    prof = [(names[r.out] + f" (prefix {r.manifest['config'].get('context_prefix')})", charts["profile"][r.out]["lo"].to_list(),
             charts["profile"][r.out]["mean"].to_list()) for r in runs]
    out.append(svg_chart(f"mean {col} by position in window", prof, xlabel="position in window (tokens)",
                         ylabel=f"mean {col}", vlines=cp))
    if other is not None:
        got = [x for x in diffs if x is not None]
        bins = 40
        counts = [0] * bins
        for x in got:
            counts[max(0, min(bins - 1, int((x + r_div) / (2 * r_div) * bins)))] += 1
        cx = [-r_div + 2 * r_div * (i + 0.5) / bins for i in range(bins)]
        out.append(svg_chart(f"OTHER - OUT per token on this page ({len(got):,} tokens)", [("diff", cx, counts)],
                             xlabel=f"{col} difference (nats)", ylabel="tokens", bars=True, x_range=(-r_div, r_div),
                             vlines=[(0.0, "0")]))
    return "".join(out)
