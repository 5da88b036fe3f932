"""Fixture shards for rpt_train tests: the project's own writer (`rpt_data.pipeline.run_tag`) when it exists,
else a small stand-in that writes rows per rpt_common.shards.SHARD_SCHEMA with seeded stats."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rpt_common.shards import MANIFEST, SCHEMA_VERSION, SHARD_SCHEMA, shard_name

TEXTS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps all day long, and the fox runs away.",
    "Let x_n be the number of strings of length n; then x_(n+1) = 2 x_n + 1. Thus x_3 = 7 and x_4 = 15.",
    "Thus, in total, there are 239 such strings. Hello wörld, naïve café 日本語 🙂. Einstein wrote four papers.",
    "def f(n):\n    return n * (n + 1) // 2\n\nprint(f(10))  # prints 55, the tenth triangular number\n",
    "In 1905 Einstein wrote four papers; the third introduced special relativity. The fourth gave E = mc^2.",
    "A ring is a set with two operations. Every field is a ring, but the integers form a ring that is no field.",
]


def write_jsonl(path: Path, texts=TEXTS) -> Path:
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": f"doc{i}", "text": t}, ensure_ascii=False) + "\n")
    return path


def write_shards(out: Path, model_dir: Path, texts=TEXTS, window: int = 64, context_prefix: int = 16) -> Path:
    """Tag `texts` with the tiny model into `out` (manifest.json + shard-00000-00000.parquet)."""
    try:
        from rpt_data.config import TagConfig
        from rpt_data.pipeline import run_tag
    except ImportError:
        return write_shards_standin(out, model_dir, texts, window, context_prefix)
    out.mkdir(parents=True, exist_ok=True)
    inputs = write_jsonl(out.parent / f"{out.name}-input.jsonl", texts)
    run_tag(TagConfig(inputs=[str(inputs)], text_field="text", id_field="id", model=str(model_dir), out=str(out),
                      window=window, context_prefix=context_prefix, mode="structured", progress=False))
    return out


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE token characters -> bytes (the tagger's own table)."""
    from rpt_data.windows import _gpt2_byte_alphabet

    return _gpt2_byte_alphabet()


def write_shards_standin(out: Path, model_dir: Path, texts=TEXTS, window: int = 64, context_prefix: int = 16,
                         seed: int = 0, schema_version: int = SCHEMA_VERSION) -> Path:
    """Structured-mode windows of the tiny byte-level tokenizer, stats drawn from a seeded RNG (0-3 nats)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    dec = _byte_decoder()
    rng = np.random.default_rng(seed)
    rows = []
    for d, text in enumerate(texts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        pieces = [bytes(dec[c] for c in tok.convert_ids_to_tokens(i)) for i in ids]
        assert b"".join(pieces) == text.encode()
        ends = np.cumsum([len(p) for p in pieces])
        start, w = 0, 0
        while True:
            stop = min(start + window, len(ids))
            data = text.encode()
            b0 = 0 if start == 0 else int(ends[start - 1])
            b1 = int(ends[stop - 1])
            while b0 > 0 and data[b0] & 0xC0 == 0x80:  # a row's text starts and ends on whole characters
                b0 -= 1
            while b1 < len(data) and data[b1] & 0xC0 == 0x80:
                b1 += 1
            score_start = 0 if w == 0 else context_prefix
            n = stop - start
            topk = rng.uniform(0.0, 3.0, n).astype(np.float32)
            first = 1 if w == 0 else score_start  # index 0 of a record has no context
            nulls = [None] * first
            row_bytes = data[b0:b1]
            rows.append({
                "doc_id": f"doc{d}", "window_index": w, "token_start": start, "text": row_bytes.decode(),
                "token_ids": ids[start:stop], "token_bytes": [int(e) - b0 for e in ends[start:stop]],
                "score_start": score_start,
                "entropy": nulls + [float(x) + 0.5 for x in topk[first:]],
                "topk_entropy": nulls + [float(x) for x in topk[first:]],
                "target_logprob": nulls + [float(-x) for x in topk[first:]],
                "proxy_argmax": nulls + [int(x) for x in rng.integers(0, len(tok), n - first)],
                "selected": [int(t) for t in range(first, n) if topk[t] > 1.0],
            })
            if stop == len(ids):
                break
            start, w = stop - context_prefix, w + 1
    out.mkdir(parents=True, exist_ok=True)
    name = shard_name(0, 0)
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), out / name, row_group_size=4)
    manifest = {"schema_version": schema_version, "config": {"model": str(model_dir), "window": window,
                "context_prefix": context_prefix, "mode": "structured"},
                "shards": [{"file": name, "rows": len(rows)}], "complete": True}
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return out


# Fixtures shared by the rpt_train tests (import them into a test module to use them).
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def train_shards(tiny_llama, tmp_path_factory) -> Path:
    """Shards of TEXTS tagged with tiny_llama (the project's writer when available)."""
    return write_shards(tmp_path_factory.mktemp("rpt-shards") / "tagged", tiny_llama)


@pytest.fixture(scope="session")
def tiny_tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def length_reward(items) -> list[float]:
    """Shaping reward for tests: random tiny models never answer, so give groups reward variance."""
    return [float(len(it.completion) % 3) for it in items]
