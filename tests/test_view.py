"""`rpt-data inspect OUT --html FILE`: the page builder on tiny tagged outputs (structured and continuous, every
tokenizer kind, --compare of two context prefixes), checked against the shards read with polars."""
import functools
import math
import re
import shutil

import polars as pl
import pytest
from click.testing import CliRunner

from shard_fixtures import TEXTS
from view_helpers import Page, model_of_kind, positions, tag

from rpt_common.errors import UserError
from rpt_data.cli import main
from rpt_data.view import write_html
from rpt_data.view_html import BUCKET_BG, DIV, MUTED, SEQ, contrast, text_on

KINDS = ("bytelevel", "bytelevel-bos", "metaspace", "wordpiece")
STREAM = " ".join(TEXTS * 3)  # one continuous stream of ~200 tokens


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("view")


@functools.cache
def _model(root, kind):
    return model_of_kind(kind, root / f"model-{kind}")


@functools.cache
def _structured(root, kind):
    return tag(_model(root, kind), root / f"struct-{kind}", texts=TEXTS, window=24, context_prefix=6)


@functools.cache
def _continuous(root, prefix):
    f = root / "stream.txt"
    f.write_text(STREAM)
    return tag(_model(root, "bytelevel"), root / f"cont-{prefix}", text_file=f, window=32, context_prefix=prefix)


def page_of(out, path, **kw) -> Page:
    write_html(str(out), str(path), **kw)
    return Page(path.read_text())


def page_windows(path, doc: str) -> int:
    """How many window labels the article of `doc` holds."""
    article = re.search(rf'<article class="doc" id="doc-\d+" data-doc="{re.escape(doc)}">(.*?)</article>',
                        path.read_text(), re.S).group(1)
    return article.count('class="wb"')


def doc_text(page: Page, doc: str) -> str:
    return "".join(s["text"] for s in page.spans if s["doc"] == doc)


@pytest.mark.parametrize("kind", KINDS)
def test_every_scored_token_is_on_the_page_with_its_value_and_the_text_is_whole(root, kind, tmp_path):
    """Property over tokenizer kinds: each document's spans spell its text, and every scored position of the
    shards (value not null) is one span whose data-v is its value, at its window and position."""
    out = _structured(root, kind)
    page = page_of(out, tmp_path / "p.html", docs=len(TEXTS))
    want = positions(out).filter(pl.col("topk_entropy").is_not_null())
    got = {(s["doc"], s["window"], s["pos"]): s for s in page.scored()}
    assert len(got) == len(page.scored()) == want.height
    for r in want.iter_rows(named=True):
        s = got[(r["doc_id"], r["window_index"], r["pos"])]
        assert abs(float(s["data-v"]) - r["topk_entropy"]) <= 6e-5
        assert abs(s["entropy"] - r["entropy"]) <= 6e-5 and abs(s["target_logprob"] - r["target_logprob"]) <= 6e-5
        assert s["argmax"] == r["proxy_argmax"] and bool(s["flags"] & 2) == r["selected"] == ("s" in s["classes"])
    rows = pl.read_parquet(sorted(out.glob("**/shard-*.parquet"))).sort("doc_id", "window_index")
    nxt = {(d, w): s for d, w, s in rows.select("doc_id", pl.col("window_index") - 1, "token_start").iter_rows()}
    for s in page.scored():  # the over-line: the token is also in the next window's context prefix
        start = nxt.get((s["doc"], s["window"]))
        assert bool(s["flags"] & 8) == ("px" in s["classes"]) == (start is not None and s["j"] >= start)
    for d, n in rows.group_by("doc_id").len().iter_rows():  # one window label per window
        assert sum(x["doc"] == d for x in page.spans) and page_windows(tmp_path / "p.html", d) == n
    for i, text in enumerate(TEXTS):
        assert doc_text(page, f"doc{i}") == text  # WordPiece's trailing whitespace goes to its last token
    first = [s for s in page.spans if s["doc"] == "doc0"][0]
    assert ("data-v" in first) == (kind == "bytelevel-bos")  # position 0 is scored only after a BOS


def test_values_are_shaded_by_the_requested_metric(root, tmp_path):
    out = _structured(root, "bytelevel")
    page = page_of(out, tmp_path / "p.html", docs=2, metric="surprisal")
    for s in page.scored():
        assert abs(float(s["data-v"]) + s["target_logprob"]) <= 6e-5
    full = page_of(out, tmp_path / "f.html", docs=2, metric="full")
    assert all(abs(float(s["data-v"]) - s["entropy"]) <= 6e-5 for s in full.scored())


def test_hardest_and_random_picks(root, tmp_path):
    out = _structured(root, "bytelevel")
    means = (positions(out).group_by("doc_id").agg(m=pl.col("topk_entropy").mean())
             .sort(["m", "doc_id"], descending=[True, False]))
    page = page_of(out, tmp_path / "h.html", docs=3, pick="hardest")
    assert page.data["docs"] == means["doc_id"].head(3).to_list()
    hardest = max(page.scored(), key=lambda s: float(s["data-v"]))
    assert page.data["hardest"] == int(hardest["data-i"])
    a = page_of(out, tmp_path / "a.html", docs=3, pick="random", seed=1).data["docs"]
    assert a == page_of(out, tmp_path / "b.html", docs=3, pick="random", seed=1).data["docs"]
    assert len({tuple(page_of(out, tmp_path / f"s{s}.html", docs=3, pick="random", seed=s).data["docs"])
                for s in range(6)}) > 1


def test_a_long_stream_is_cut_to_a_run_of_windows_around_the_hardest(root, tmp_path):
    out = _continuous(root, 8)
    pos = positions(out)
    page = page_of(out, tmp_path / "c.html", doc_tokens=60)
    windows = sorted({s["window"] for s in page.scored()})
    assert windows == list(range(windows[0], windows[-1] + 1)) and len(page.scored()) <= 60
    by_window = pos.group_by("window_index").agg(m=pl.col("topk_entropy").mean())
    assert by_window.sort("m", descending=True)["window_index"][0] in windows
    assert doc_text(page, page.data["docs"][0]) in STREAM  # a contiguous piece of the stream's text
    spans = [s for s in page.spans if s["doc"]]
    if windows[0] > 0:  # the first shown window's context prefix is shown as context only, without a value
        assert all("ctx" in s["classes"] and "data-v" not in s for s in spans[:8])
    assert page.data["docs"] and len(page.scored()) == pos.filter(pl.col("window_index").is_in(windows)).height


def test_compare_two_prefixes_shows_the_difference_and_the_flips(root, tmp_path):
    base, other = _continuous(root, 8), _continuous(root, 0)
    page = page_of(base, tmp_path / "cmp.html", compare=str(other))
    a, b = positions(base), positions(other)
    joined = a.join(b, on=["doc_id", "j"], how="full", suffix="_o", coalesce=True)
    want = {r["j"]: r for r in joined.iter_rows(named=True)}
    spans = page.scored()
    assert len(spans) == joined.height  # every position scored in either output
    flips = 0
    for s in spans:
        r = want[s["j"]]
        if r["topk_entropy"] is not None and r["topk_entropy_o"] is not None:
            assert abs(float(s["data-v"]) - (r["topk_entropy_o"] - r["topk_entropy"])) <= 1.2e-4
        sel_a, sel_b = bool(r["selected"]), bool(r["selected_o"])
        flip = "fb" if sel_b and not sel_a else "fa" if sel_a and not sel_b else None
        assert ({"fa", "fb"} & s["classes"]) == ({flip} if flip else set())
        flips += flip is not None
    # prefix 0 cannot score the first token of a later window: those positions are flips or unscored in OTHER
    assert any(s["other"]["flags"] & 1 == 0 for s in spans)
    assert page.data["compare"] and flips > 0


def test_compare_refuses_another_tokenizer_or_no_common_document(root, tmp_path):
    with pytest.raises(UserError, match="tokenizer"):
        write_html(str(_structured(root, "bytelevel")), str(tmp_path / "x.html"),
                   compare=str(_structured(root, "metaspace")))
    shuffled = tag(_model(root, "bytelevel"), root / "shuffled", texts=TEXTS[::-1], window=24, context_prefix=6)
    with pytest.raises(UserError, match="must tokenize the same text"):  # same ids, other texts
        write_html(str(_structured(root, "bytelevel")), str(tmp_path / "z.html"), compare=str(shuffled))
    with pytest.raises(UserError, match="no document id in common"):
        write_html(str(_structured(root, "bytelevel")), str(tmp_path / "y.html"), compare=str(_continuous(root, 8)))


def test_page_is_self_contained_and_bounded(root, tmp_path):
    out = _structured(root, "bytelevel")
    small = tmp_path / "small.html"
    write_html(str(out), str(small), docs=2, doc_tokens=10)
    text = small.read_text()
    assert not re.search(r"https?://|\bsrc=|<link|@import|url\(", text)
    assert {m for m in re.findall(r'href="([^"]*)"', text)} <= {f"#doc-{i}" for i in range(2)}
    page = Page(text)
    assert len(page.data["docs"]) == 2 and len(page.scored()) <= 2 * 24  # at most one window of 24 each
    big = tmp_path / "big.html"
    write_html(str(out), str(big), docs=6)
    assert small.stat().st_size < big.stat().st_size


def test_colours_keep_text_readable():
    """WCAG AA (4.5:1) for the text colour chosen on every shade, and for unscored text on white."""
    for bg in SEQ + DIV + BUCKET_BG:
        assert contrast(text_on(bg), bg) >= 4.5, bg
    assert contrast(MUTED, "#ffffff") >= 4.5


def test_argmax_is_decoded_with_the_proxy_tokenizer_or_shown_as_an_id(root, tmp_path):
    from transformers import AutoTokenizer

    out = _structured(root, "bytelevel")
    page = page_of(out, tmp_path / "p.html", docs=2)
    tok = AutoTokenizer.from_pretrained(_model(root, "bytelevel"))
    assert page.data["vocab"] and all(tok.decode([int(i)]) == s for i, s in page.data["vocab"].items())
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    text = (moved / "manifest.json").read_text().replace(str(_model(root, "bytelevel")), str(tmp_path / "gone"))
    (moved / "manifest.json").write_text(text)
    page = page_of(moved, tmp_path / "q.html", docs=2)
    assert page.data["vocab"] == {} and "argmax shown as ids" in (tmp_path / "q.html").read_text()


def test_cli_writes_the_page_and_view_options_need_html(root, tmp_path):
    out = _structured(root, "bytelevel")
    html = tmp_path / "cli.html"
    r = CliRunner().invoke(main, ["inspect", str(out), "--top", "0", "--html", str(html), "--docs", "2",
                                  "--pick", "random", "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert "page written to" in r.output and len(Page(html.read_text()).data["docs"]) == 2
    r = CliRunner().invoke(main, ["inspect", str(out), "--docs", "2"])
    assert r.exit_code == 2 and "--docs needs --html" in r.output


def test_scale_levels_cover_the_range():
    from rpt_data.view_html import div_level, nice_ceil, seq_level

    assert seq_level(0.0, 2.0) == 0 and seq_level(2.0, 2.0) == len(SEQ) - 1 and seq_level(9.0, 2.0) == len(SEQ) - 1
    assert div_level(0.0, 1.0) == len(DIV) // 2 and div_level(-5, 1.0) == 0 and div_level(5, 1.0) == len(DIV) - 1
    assert [nice_ceil(x) for x in (0.3, 1.0, 1.7, 2.2, 3, 7.1)] == [0.5, 1.0, 2.0, 2.5, 5.0, 10.0]
    assert math.isclose(nice_ceil(0.031), 0.05)


def test_markup_in_the_text_is_shown_as_text(root, tmp_path):
    """Text that looks like HTML (a closing script tag, entities, quotes) is escaped, not interpreted."""
    texts = ['a </script><script>alert("x")</script> b &amp; <b>bold</b> \' " end', "x < y > z &lt; </ok>"]
    out = tag(_model(root, "bytelevel"), root / "markup", texts=texts, window=24, context_prefix=6)
    page = page_of(out, tmp_path / "m.html", docs=2)
    assert [doc_text(page, f"doc{i}") for i in range(2)] == texts
    assert (tmp_path / "m.html").read_text().count("<script") == 2  # the data block and the page's script


def test_a_comment_opener_in_the_text_cannot_bend_the_data_block(root, tmp_path):
    """'<!--<script' inside a script's data puts the HTML parser in a state where '</script>' no longer ends it (the
    page's own script would become data): every '<' of the data block is written as \\u003c."""
    texts = ["x <!--<script> y", "</script><!-- z"]
    out = tag(_model(root, "bytelevel"), root / "comment", texts=texts, window=24, context_prefix=6)
    page = page_of(out, tmp_path / "c.html", docs=2)
    raw = (tmp_path / "c.html").read_text()
    data = re.search(r'<script type="application/json"[^>]*>(.*?)</script>', raw, re.S)
    assert data is not None and "<" not in data.group(1)
    assert sorted(doc_text(page, d) for d in ("doc0", "doc1")) == sorted(texts)


def test_a_damaged_row_is_refused_naming_document_and_window(root, tmp_path):
    """A row whose entropy list is shorter than its tokens (a damaged shard) is one sentence, not a traceback."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "short"
    shutil.copytree(_structured(root, "bytelevel"), out)
    shard = sorted(out.glob("**/shard-*.parquet"))[0]
    rows = pq.read_table(shard).to_pylist()
    rows[0]["entropy"] = rows[0]["entropy"][:-2]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), shard)
    with pytest.raises(UserError, match=rf"document '{re.escape(rows[0]['doc_id'])}', window "
                                        rf"{rows[0]['window_index']}: a damaged row \(entropy of another length"):
        page_of(out, tmp_path / "s.html", docs=len(TEXTS))


def test_a_scored_position_with_null_stats_is_marked_not_dropped(root, tmp_path):
    """NaN logits are stored as null stats: the token stays on the page, dashed, with no value."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "nan"
    shutil.copytree(_structured(root, "bytelevel"), out)
    shard = sorted(out.glob("**/shard-*.parquet"))[0]
    rows = pq.read_table(shard).to_pylist()
    for c in ("entropy", "topk_entropy", "target_logprob", "proxy_argmax"):
        rows[0][c][3] = None
    rows[0]["selected"] = [p for p in rows[0]["selected"] if p != 3]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(shard)), shard)
    page = page_of(out, tmp_path / "n.html", docs=len(TEXTS))
    doc = rows[0]["doc_id"]
    nulls = [s for s in page.scored() if s["doc"] == doc and s["window"] == rows[0]["window_index"] and s["pos"] == 3]
    assert len(nulls) == 1 and "n" in nulls[0]["classes"] and "data-v" not in nulls[0]
    assert nulls[0]["topk_entropy"] is None
