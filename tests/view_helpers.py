"""Shared by tests/test_view.py and tests/test_view_browser.py: tiny tagged outputs, the page parsed back, and the
expected per-token values read from the shards with polars (independently of rpt_data.view)."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import polars as pl

from rpt_data.config import TagConfig
from rpt_data.pipeline import run_tag


def model_of_kind(kind: str, path: Path) -> Path:
    """A tiny random Llama with a tokenizer of `kind` (bytelevel, metaspace, wordpiece; bytelevel-bos: one that
    adds a BOS, so position 0 is scored)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from data_helpers import make_tokenizer_of
    from tiny import make_model_dir

    if kind.startswith("bytelevel"):
        return make_model_dir(path, arch="llama", bos=kind == "bytelevel-bos")
    tok = make_tokenizer_of(kind)
    torch.manual_seed(0)
    ids = {k: getattr(tok, f"{k}_token_id") or 0 for k in ("eos", "pad", "bos")}
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, vocab_size=len(tok),
                         **{f"{k}_token_id": v for k, v in ids.items()})
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # entropies spread over the buckets
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tag(model: Path, out: Path, texts: list[str] | None = None, text_file: Path | None = None, **cfg) -> Path:
    """Tag `texts` (structured, ids doc0..) or one text file (continuous) with the project's writer."""
    if texts is not None:
        src = out.parent / f"{out.name}.jsonl"
        src.write_text("".join(json.dumps({"id": f"doc{i}", "text": t}, ensure_ascii=False) + "\n"
                               for i, t in enumerate(texts)))
        cfg = {"text_field": "text", "id_field": "id", "mode": "structured", **cfg}
    else:
        src, cfg = text_file, {"mode": "continuous", **cfg}
    run_tag(TagConfig(inputs=[str(src)], model=str(model), out=str(out), progress=False, **cfg))
    return out


def positions(out: Path, col: str = "topk_entropy") -> pl.DataFrame:
    """Every position of the output: doc_id, window_index, pos, stream index j, scored, the stats, selected."""
    df = pl.read_parquet(sorted(out.glob("**/shard-*.parquet")))
    return (df.with_columns(pos=pl.int_ranges(0, pl.col("token_ids").list.len()),
                            sel=pl.col("selected"))
            .explode("pos", "entropy", "topk_entropy", "target_logprob", "proxy_argmax", "token_ids")
            .with_columns(j=pl.col("token_start") + pl.col("pos"), scored=pl.col("pos") >= pl.col("score_start"),
                          selected=pl.col("sel").list.contains(pl.col("pos").cast(pl.Int32)))
            .filter(pl.col("scored"))
            .select("doc_id", "window_index", "pos", "j", "entropy", "topk_entropy", "target_logprob", "proxy_argmax",
                    "token_ids", "selected"))


class Page(HTMLParser):
    """The token spans of a page in order (attributes + text, the document they sit in) and its JSON data."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.spans: list[dict] = []
        self.doc: str | None = None
        self._span: dict | None = None
        self.feed(text)
        self.data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
                               .group(1).replace("<\\/", "</"))

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "article":
            self.doc = a["data-doc"]
        if tag == "span" and "t" in (a.get("class") or "").split():
            self._span = {**a, "classes": set(a["class"].split()), "text": "", "doc": self.doc}

    def handle_data(self, data):
        if self._span is not None:
            self._span["text"] += data

    def handle_endtag(self, tag):
        if tag == "span" and self._span is not None:
            self.spans.append(self._span)
            self._span = None

    def scored(self) -> list[dict]:
        """Spans of scored tokens, each with its row of D.tok as a dict by field name (`other`: OTHER's row; `doc`
        stays the document id of the span's article)."""
        f = self.data["fields"]
        out = []
        for s in self.spans:
            if "data-i" in s:
                row = self.data["tok"][int(s["data-i"])]
                out.append({**dict(zip(f, row)), **s, "other": dict(zip(f, row[len(f):])) or None})
        return out
