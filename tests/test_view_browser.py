"""The heatmap page in a real browser: headless Chromium (Debian's `chromium`, which .ci/run installs), driven by
Playwright with that executable (it never downloads a browser). Renders the page of demo-sized shards (CHAMP
problems tagged by a tiny model) and of a --compare of two context prefixes, and checks from the DOM that every
scored token is there with its value and text, that hover and keyboard focus show the right numbers, that nothing
is fetched from the network, and keeps screenshots under out/view-browser/.

Also a tool: `python tests/test_view_browser.py PAGE.html SHOT.png` screenshots a page (the docs' image)."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "out" / "view-browser"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def open_browser(user_data_dir: Path, viewport=(1280, 900)):
    """(playwright, context) on a fresh profile; every non-file request is aborted and recorded in ctx.remote."""
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    ctx = pw.chromium.launch_persistent_context(str(user_data_dir), executable_path=chromium(), headless=True,
                                                args=ARGS, viewport={"width": viewport[0], "height": viewport[1]})
    ctx.remote = []

    def guard(route):
        if route.request.url.startswith("file://"):
            return route.continue_()
        ctx.remote.append(route.request.url)
        return route.abort()

    ctx.route("**/*", guard)
    return pw, ctx


def load(ctx, html: Path):
    page = ctx.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.goto(html.resolve().as_uri())
    page.wait_for_function("typeof D !== 'undefined' && document.querySelectorAll('.t[data-i]').length > 0")
    return page


def screenshot(html: Path, png: Path) -> None:
    """The page from its legend down (charts, first documents), the panel showing the hardest token in view."""
    import tempfile

    with tempfile.TemporaryDirectory() as profile:
        pw, ctx = open_browser(Path(profile), viewport=(1280, 1100))
        try:
            page = load(ctx, html)
            page.evaluate("""() => { const bar = document.querySelector('nav .bar'), l = document.getElementById('legend');
              window.scrollTo(0, l.getBoundingClientRect().top + window.scrollY - bar.offsetHeight - 4); }""")
            i = page.evaluate("""() => { let best = null;
              for (const el of document.querySelectorAll('.t[data-v]')) { const r = el.getBoundingClientRect();
                if (r.top > 80 && r.bottom < innerHeight - 20 && r.right < innerWidth - 460
                    && (!best || +el.dataset.v > +best.dataset.v)) best = el; }
              return best ? +best.dataset.i : null; }""")
            if i is not None:
                page.hover(f'.t[data-i="{i}"]')
            png.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(png))
        finally:
            ctx.close()
            pw.stop()


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
    from PIL import Image  # a 128-colour palette: a third of the bytes, for a picture kept in git

    Image.open(sys.argv[2]).convert("RGB").quantize(colors=128).save(sys.argv[2], optimize=True)
    sys.exit(0)

if chromium() is None:
    pytest.skip("no Chromium found (install Debian's `chromium`; .ci/run does)", allow_module_level=True)
pytest.importorskip("playwright.sync_api", reason="the playwright package (the [test] extra) is not installed")

import polars as pl  # noqa: E402

from view_helpers import positions, tag  # noqa: E402

from rpt_data.view import write_html  # noqa: E402
from rpt_data.view_html import text_on  # noqa: E402

CHAMP = "Problem: {problem}\n\nSolution: {solution}"  # pipelines/demo.yaml's template


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    pw, ctx = open_browser(tmp_path_factory.mktemp("chromium-profile"))
    yield ctx
    ctx.close()
    pw.stop()


@pytest.fixture(scope="module")
def demo(tiny_llama, tmp_path_factory):
    """The demo recipe's corpus and template (first 12 CHAMP problems), a tiny model, windows of 128 + prefix 32."""
    root = tmp_path_factory.mktemp("view-demo")
    out = root / "demo"
    from rpt_data.config import TagConfig
    from rpt_data.pipeline import run_tag

    run_tag(TagConfig(inputs=["demo:champ"], template=CHAMP, id_field="id", mode="structured", model=str(tiny_llama),
                      out=str(out), window=128, context_prefix=32, limit=12, progress=False))
    html = root / "demo.html"
    write_html(str(out), str(html), docs=8)
    return out, html


def expected(out: Path, docs: list[str]) -> dict:
    """(doc, window, pos) -> the position's values and its token's text, from the shards."""
    rows = pl.read_parquet(sorted(out.glob("**/shard-*.parquet"))).filter(pl.col("doc_id").is_in(docs))
    text = {}
    for r in rows.iter_rows(named=True):
        data, ends = r["text"].encode(), r["token_bytes"]
        for p in range(len(ends)):
            text[(r["doc_id"], r["window_index"], p)] = data[ends[p - 1] if p else 0:ends[p]].decode()
    pos = positions(out).filter(pl.col("doc_id").is_in(docs) & pl.col("topk_entropy").is_not_null())
    return {(r["doc_id"], r["window_index"], r["pos"]): {**r, "piece": text[(r["doc_id"], r["window_index"], r["pos"])]}
            for r in pos.iter_rows(named=True)}


DOM_TOKENS = """() => Array.from(document.querySelectorAll('.t[data-i]'), el => {
  const r = D.tok[+el.dataset.i];
  const box = el.getBoundingClientRect();
  return {i: +el.dataset.i, v: el.dataset.v, text: el.textContent, doc: el.closest('article').dataset.doc,
          window: r[F.window], pos: r[F.pos], underline: getComputedStyle(el).textDecorationLine,
          shown: el.getClientRects().length > 0 && box.height > 0};
})"""


def panel(page) -> dict:
    return page.evaluate("() => Object.fromEntries(Array.from(document.querySelectorAll('#panel td[id]'), "
                         "td => [td.id, td.textContent]))")


def check_panel(p: dict, want: dict, prefix: str = "p-", bucket_names=("none", "easy", "medium", "hard")) -> None:
    assert abs(float(p[prefix + "entropy"]) - want["entropy"]) <= 6e-5
    assert abs(float(p[prefix + "topk_entropy"]) - want["topk_entropy"]) <= 6e-5
    assert abs(float(p[prefix + "target_logprob"].split()[0]) - want["target_logprob"]) <= 6e-5
    assert f"(id {want['proxy_argmax']})" in p[prefix + "argmax"]
    assert p[prefix + "window"] == str(want["window_index"]) and p[prefix + "pos"] == str(want["pos"])
    assert p[prefix + "selected"] == ("yes" if want["selected"] else "no")
    assert p[prefix + "bucket"] == bucket_names[sum(want["topk_entropy"] > b for b in (0.5, 1.0, 1.5))]


def rgb(css: str) -> str:
    r, g, b = (int(x) for x in re.findall(r"\d+", css)[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


def test_demo_page_in_chromium(browser, demo, tiny_llama):
    out, html = demo
    page = load(browser, html)
    docs = page.evaluate("D.docs")
    want = expected(out, docs)
    toks = page.evaluate(DOM_TOKENS)
    # every scored token is on the page, shown, with its value and its own text
    got = {(t["doc"], t["window"], t["pos"]): t for t in toks}
    assert len(got) == len(toks) == len(want) > 100
    for key, w in want.items():
        t = got[key]
        assert t["shown"] and t["text"] == w["piece"] and abs(float(t["v"]) - w["topk_entropy"]) <= 6e-5
        assert ("underline" in t["underline"]) == w["selected"]  # the selection mark is carried by the text
    # hover shows the right numbers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    hardest = page.evaluate("D.hardest")
    picks = [toks[0], toks[len(toks) // 3], toks[-1], next(t for t in toks if t["i"] == hardest)]
    for t in picks:
        page.hover(f'.t[data-i="{t["i"]}"]')
        p = panel(page)
        w = want[(t["doc"], t["window"], t["pos"])]
        check_panel(p, w)
        assert json.dumps(tok.decode([w["proxy_argmax"]]), ensure_ascii=False) in p["p-argmax"]
        assert p["p-doc"] == t["doc"] and p["p-value"] == t["v"]
    # keyboard: Tab from the search box reaches the first document's token; arrows, n and h move the focus
    page.focus("#search")
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.matches('.t[data-i]')"):
            break
    first = page.evaluate("+document.activeElement.dataset.i")
    assert first == toks[0]["i"]
    page.keyboard.press("ArrowRight")
    now = page.evaluate("+document.activeElement.dataset.i")
    assert now == first + 1
    check_panel(panel(page), want[(toks[now]["doc"], toks[now]["window"], toks[now]["pos"])])
    page.keyboard.press("h")
    doc0 = [t for t in toks if t["doc"] == toks[0]["doc"]]
    assert float(page.evaluate("document.activeElement.dataset.v")) == max(float(t["v"]) for t in doc0)
    page.keyboard.press("Home")
    page.keyboard.press("n")
    at = page.evaluate("+document.activeElement.dataset.i")
    assert want[(toks[at]["doc"], toks[at]["window"], toks[at]["pos"])]["selected"]
    # jump to the hardest token of the page; search by document id
    page.click("#hardest")
    assert page.evaluate("+document.activeElement.dataset.i") == hardest
    assert float(toks[hardest]["v"]) == max(float(t["v"]) for t in toks)
    page.fill("#search", docs[1])
    visible = page.evaluate("Array.from(document.querySelectorAll('article.doc'), a => [a.dataset.doc, a.hidden])")
    assert all(hidden == (docs[1] not in d) for d, hidden in visible)
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.closest('article').dataset.doc") == docs[1]
    page.fill("#search", "")
    # readable: the text colour the browser paints on each shade keeps 4.5:1 (metric and bucket shading)
    page.hover("h1")
    for mode in ("metric", "bucket"):
        page.check(f'input[name=shade][value="{mode}"]')
        styles = page.evaluate("Array.from(document.querySelectorAll('.t[data-i]'), el => "
                               "[getComputedStyle(el).color, getComputedStyle(el).backgroundColor])")
        from rpt_data.view_html import contrast

        assert all(contrast(rgb(fg), rgb(bg)) >= 4.5 for fg, bg in styles if "rgba(0, 0, 0, 0)" not in bg)
        assert {rgb(fg) for fg, bg in styles} <= {text_on(rgb(bg)) for _, bg in styles}
    page.check('input[name=shade][value="metric"]')
    page.click("#hardest")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "demo-tiny.png"))
    assert (SHOTS / "demo-tiny.png").stat().st_size > 10_000
    assert page.errors == [] and browser.remote == []
    page.close()


def test_compare_of_two_prefixes_in_chromium(browser, tiny_llama, tmp_path):
    from shard_fixtures import TEXTS

    stream = tmp_path / "stream.txt"
    stream.write_text(" ".join(TEXTS * 3))
    base = tag(tiny_llama, tmp_path / "p8", text_file=stream, window=32, context_prefix=8)
    other = tag(tiny_llama, tmp_path / "p0", text_file=stream, window=32, context_prefix=0)
    html = tmp_path / "cmp.html"
    write_html(str(base), str(html), compare=str(other))
    page = load(browser, html)
    a = {r["j"]: r for r in positions(base).iter_rows(named=True)}
    b = {r["j"]: r for r in positions(other).iter_rows(named=True)}
    toks = page.evaluate("() => Array.from(document.querySelectorAll('.t[data-i]'), el => "
                         "({i: +el.dataset.i, v: el.dataset.v, j: D.tok[+el.dataset.i][F.j], cls: el.className}))")
    assert len(toks) == len(set(a) | set(b))
    both = [t for t in toks if t["j"] in a and t["j"] in b]
    flipped = [t for t in toks if " fa" in t["cls"] or " fb" in t["cls"]]
    assert flipped
    for t in both[:3] + [x for x in flipped if x["j"] in a and x["j"] in b][:3]:
        page.hover(f'.t[data-i="{t["i"]}"]')
        p = panel(page)
        check_panel(p, {**a[t["j"]], "window_index": a[t["j"]]["window_index"]}, "p-")
        check_panel(p, {**b[t["j"]], "window_index": b[t["j"]]["window_index"]}, "q-")
        assert math.isclose(float(p["p-value"]), b[t["j"]]["topk_entropy"] - a[t["j"]]["topk_entropy"], abs_tol=1.2e-4)
    page.focus(f'.t[data-i="{toks[0]["i"]}"]')
    page.keyboard.press("n")  # the next flipped selection
    at = page.evaluate("+document.activeElement.dataset.i")
    assert at == flipped[0]["i"] or (toks[0] in flipped and at == flipped[1]["i"])
    page.screenshot(path=str(SHOTS / "compare-tiny.png"))
    assert page.errors == [] and browser.remote == []
    page.close()
