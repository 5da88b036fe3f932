"""End-to-end tagging with tiny random models: stats, coverage, resume, output-dir rules, loaders."""
import json
import math
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from data_helpers import SENTENCES, read_rows, records, write_jsonl
from rpt_common.errors import UserError
from rpt_common.shards import read_manifest
from rpt_data.config import TagConfig
from rpt_data.pipeline import run_tag
from test_data_entropy import ref64


def tag(tmp_path, model, name="out", **kw):
    src = kw.pop("src", None) or tmp_path / "in.jsonl"
    if not src.exists():
        write_jsonl(src, records(12))
    opts = dict(window=16, context_prefix=4, shard_rows=5, batch_tokens=40, progress=False) | kw
    cfg = TagConfig(inputs=[str(src)], model=str(model), out=str(tmp_path / name), **opts)
    return run_tag(cfg), tmp_path / name


def model_logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].double()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_stats_equal_float64_recomputation_at_t(tmp_path, fixture, request):
    model = request.getfixturevalue(fixture)
    manifest, out = tag(tmp_path, model, id_field="id")
    df = read_rows(out)
    assert manifest["complete"] and df.height == sum(s["rows"] for s in manifest["shards"])
    for row in df.iter_rows(named=True):
        ids, s = row["token_ids"], row["score_start"]
        logits = model_logits(model, ids)
        # stats at index t describe p(. | x<t), i.e. the logits at t - 1
        ref = ref64(logits[s - 1 : len(ids) - 1], torch.tensor(ids[s:]), 16)
        for t in range(len(ids)):
            if t < s:
                assert row["entropy"][t] is None and row["proxy_argmax"][t] is None
                continue
            e, te, lp, a = ref[t - s]
            assert row["entropy"][t] == pytest.approx(e, abs=1e-4)
            assert row["topk_entropy"][t] == pytest.approx(te, abs=1e-4)
            assert row["target_logprob"][t] == pytest.approx(lp, abs=1e-4)
            assert row["proxy_argmax"][t] == a
        sel = [t for t in range(s, len(ids)) if row["topk_entropy"][t] > 0.5]
        assert row["selected"] == sel


def test_context_prefix_matches_full_context_and_plain_windows_do_not(tmp_path, tiny_sliding):
    """A model that sees 7 tokens back: with a prefix >= 8 each window scores exactly like one
    forward pass over the whole stream; plain windows (prefix 0) are biased at window starts."""
    text = " ".join(SENTENCES * 3)
    src = tmp_path / "doc.txt"
    src.write_text(text)

    def windowed(prefix, name):
        _, out = tag(tmp_path, tiny_sliding, name=name, src=src, mode="continuous", context_prefix=prefix)
        stream, tokens = {}, {}
        for row in read_rows(out).iter_rows(named=True):
            for t in range(len(row["token_ids"])):
                tokens[row["token_start"] + t] = row["token_ids"][t]
                if t >= row["score_start"]:
                    stream[row["token_start"] + t] = (row["token_ids"][t], row["entropy"][t])
        return stream, [tokens[p] for p in range(len(tokens))]

    (with_prefix, ids), (plain, _) = windowed(8, "prefix"), windowed(0, "plain")
    full = ref64(model_logits(tiny_sliding, ids)[:-1], None, 16)  # position p <- logits[p - 1]
    n = len(ids)
    assert sorted(with_prefix) == list(range(1, n))  # exactly once, every position
    err_prefix = max(abs(with_prefix[p][1] - full[p - 1][0]) for p in with_prefix)
    err_plain = max(abs(plain[p][1] - full[p - 1][0]) for p in plain)
    assert err_prefix < 1e-4
    assert err_plain > 1e-2
    assert len(plain) < n - 1  # plain windowing cannot score the first token of each window


def test_structured_records_never_see_each_other(tmp_path, tiny_llama):
    rows = records(6)
    _, out = tag(tmp_path, tiny_llama, id_field="id")
    _, alone = tag(tmp_path, tiny_llama, name="alone", src=write_jsonl(tmp_path / "one.jsonl", rows[3:4]), id_field="id")
    a = read_rows(out).filter(pl.col("doc_id") == "r3").drop("selected")
    b = read_rows(alone).drop("selected")
    for col in ("token_ids", "text", "score_start", "proxy_argmax"):
        assert a[col].to_list() == b[col].to_list()
    assert np.allclose(np.array(a["entropy"].explode().fill_null(0)), np.array(b["entropy"].explode().fill_null(0)), atol=1e-5)


KILL_SCRIPT = """
import json, os, signal, sys
from pathlib import Path
import rpt_data.pipeline as P
from rpt_data.config import TagConfig
target, n = sys.argv[2], int(sys.argv[3])
calls = {"n": 0}
orig = getattr(P, target)
def dying(path, obj, *rest):
    calls["n"] += 1
    if calls["n"] == n:
        if target == "write_shard":  # die mid-write: a temp file exists, the rename never happens
            from rpt_data.writer import temp_path
            temp_path(path, *rest[1:2]).write_bytes(b"PAR1 partial")
            Path(str(path) + ".tmp").write_bytes(b"PAR1 partial")  # as versions before hidden temp files left it
        else:  # die after the shard's rename, before the manifest records it
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(path, obj, *rest)
setattr(P, target, dying)
P.run_tag(TagConfig(**json.loads(sys.argv[1])))
"""


@pytest.mark.parametrize("target,n", [("write_shard", 2), ("append_json_line", 2)])
def test_resume_after_kill_equals_uninterrupted(tmp_path, tiny_llama, target, n):
    src = write_jsonl(tmp_path / "in.jsonl", records(14))
    base = dict(inputs=[str(src)], model=str(tiny_llama), window=16, context_prefix=4, shard_rows=4,
                batch_tokens=40, progress=False, id_field="id")
    ref_manifest, ref = tag(tmp_path, tiny_llama, name="ref", src=src, id_field="id", shard_rows=4)
    killed = dict(base, out=str(tmp_path / "killed"))
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(killed), target, str(n)],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    partial = read_manifest(tmp_path / "killed")  # the record and its shard log
    assert not partial["complete"] and 0 < len(partial["shards"]) < len(ref_manifest["shards"])
    manifest = run_tag(TagConfig(**killed))
    assert not list((tmp_path / "killed").rglob("*.tmp"))
    assert read_rows(tmp_path / "killed").equals(read_rows(ref))
    strip = lambda m: {**m, "config": {k: v for k, v in m["config"].items() if k != "out"}}  # noqa: E731
    assert strip(manifest) == strip(ref_manifest)


def test_rerun_with_other_config_refuses_and_overwrite_restarts(tmp_path, tiny_llama):
    manifest, out = tag(tmp_path, tiny_llama)
    assert tag(tmp_path, tiny_llama)[0] == manifest  # complete: nothing to do
    with pytest.raises(UserError, match="different config.*window"):
        tag(tmp_path, tiny_llama, window=32)
    m2, _ = tag(tmp_path, tiny_llama, window=32, overwrite=True)
    assert m2["config"]["window"] == 32


def test_foreign_output_dir_refused(tmp_path, tiny_llama):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="did not write"):
        tag(tmp_path, tiny_llama, overwrite=True)
    assert (tmp_path / "out" / "notes.txt").exists()


def test_formats_give_the_same_windows(tmp_path, tiny_llama):
    import gzip

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = records(5)
    jl = write_jsonl(tmp_path / "a.jsonl", rows)
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress(jl.read_bytes()))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hfds"))
    outs = {}
    for name, src in [("jsonl", jl), ("gz", gz), ("parquet", tmp_path / "a.parquet"), ("hf", tmp_path / "hfds")]:
        _, out = tag(tmp_path, tiny_llama, name=name, src=src, id_field="id")
        outs[name] = read_rows(out).drop("entropy", "topk_entropy", "target_logprob")
    for name in ("gz", "parquet", "hf"):
        assert outs[name].equals(outs["jsonl"]), name


def test_text_files_are_streams(tmp_path, tiny_llama, monkeypatch):
    import rpt_data.readers as readers

    monkeypatch.setattr(readers, "TEXT_BLOCK_BYTES", 64)  # force many blocks per file
    (tmp_path / "docs").mkdir()
    body = "\n".join(SENTENCES * 4)
    (tmp_path / "docs" / "a.txt").write_text(body)
    (tmp_path / "docs" / "b.txt").write_text("Short file.\n")
    manifest, out = tag(tmp_path, tiny_llama, src=tmp_path / "docs", mode="continuous")
    df = read_rows(out)
    assert manifest["records"] == 2 and set(df["doc_id"]) == {str(tmp_path / "docs" / "a.txt"), str(tmp_path / "docs" / "b.txt")}
    a = df.filter(pl.col("doc_id").str.ends_with("a.txt"))
    text = a["text"][0] + "".join(t.encode()[b[p - 1]:].decode() for t, b, p in zip(a["text"][1:], a["token_bytes"][1:], [4] * (a.height - 1)))
    assert text == body


def test_template_and_limit(tmp_path, tiny_llama):
    rows = [{"q": f"question {i}", "a": f"answer {i}", "id": i} for i in range(10)]
    manifest, out = tag(tmp_path, tiny_llama, src=write_jsonl(tmp_path / "t.jsonl", rows),
                        template="Q: {q}\nA: {a}", id_field="id", limit=4, window=64)
    df = read_rows(out)
    assert manifest["records"] == 4 and sorted(df["doc_id"].unique()) == ["0", "1", "2", "3"]
    assert df.filter(pl.col("doc_id") == "2")["text"][0] == "Q: question 2\nA: answer 2"


def test_shards_load_with_polars_and_datasets(tmp_path, tiny_llama):
    import datasets

    manifest, out = tag(tmp_path, tiny_llama)
    lf = pl.scan_parquet(str(out / "data"))
    assert lf.select(pl.len()).collect().item() == manifest["totals"]["rows"]
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))  # the dataset card
    assert len(ds) == manifest["totals"]["rows"]
    assert sum(len(x) for x in ds["token_ids"]) == manifest["totals"]["positions"]
    assert set(ds.column_names) >= {"doc_id", "window_index", "token_start", "text", "token_ids", "token_bytes",
                                    "score_start", "entropy", "topk_entropy", "target_logprob", "proxy_argmax", "selected"}


def test_nan_stats_are_null_and_counted(tmp_path, tiny_llama, monkeypatch):
    import rpt_data.proxy as proxy

    real = proxy.head_token_stats

    def poisoned(hidden, weight, targets, **kw):
        st = real(hidden, weight, targets, **kw)
        st.entropy[::3] = math.nan
        st.topk_entropy[::3] = math.nan
        return st

    monkeypatch.setattr(proxy, "head_token_stats", poisoned)
    monkeypatch.setattr(proxy.Proxy, "verify", lambda self, ids: 0.0)  # the start-up check would refuse the poison
    manifest, out = tag(tmp_path, tiny_llama)
    assert manifest["totals"]["nan"] > 0
    df = read_rows(out)
    nulls = df.select(pl.col("topk_entropy").explode()).null_count().item()
    unscored = int(df.select(pl.col("score_start").sum()).item())
    assert nulls == unscored + manifest["totals"]["nan"]


def test_older_manifest_with_runtime_knobs_still_resumes(tmp_path, tiny_llama):
    """A manifest that recorded a knob which is runtime-only now (e.g. on_bad_record) is not 'another config'."""
    manifest, out = tag(tmp_path, tiny_llama)
    m = json.loads((out / "manifest.json").read_text())
    m["config"]["on_bad_record"] = "fail"
    (out / "manifest.json").write_text(json.dumps(m))
    assert tag(tmp_path, tiny_llama)[0]["complete"]
