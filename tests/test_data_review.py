"""Fixes from the scale review of the tag pipeline (issue 32): concurrent atomic writes, temp files out of
data/, vocabularies with id gaps, one glob per hf:// spec, a prompt stop of the read-ahead thread."""
import json
import multiprocessing as mp
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import rpt_data.writer as writer
from data_helpers import read_rows, records, write_jsonl


def _write_same_file(path: str, barrier, text: str) -> None:
    barrier.wait()
    for _ in range(20):
        writer.write_text_atomic(Path(path), text)


def test_processes_writing_the_same_file_at_once_never_collide(tmp_path):
    """Every rank writes the dataset card at start: one's rename must not take another's temp file."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(6)
    target = tmp_path / "README.md"
    procs = [ctx.Process(target=_write_same_file, args=(str(target), barrier, "card\n" * 2000)) for _ in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert [p.exitcode for p in procs] == [0] * 6
    assert target.read_text() == "card\n" * 2000
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_temp_names_are_recognized_as_the_files_they_stand_for(tmp_path):
    tmp = writer.temp_path(tmp_path / "data" / "shard-00001-00002.parquet", tmp_path)
    assert tmp.parent == tmp_path and tmp.name.startswith(".")
    assert writer.is_temp(tmp.name) and writer.is_ours(tmp.name) and writer.file_rank(tmp.name) == 1
    assert writer.is_temp("shard-00001-00002.parquet.tmp") and writer.file_rank("shard-00001-00002.parquet.tmp") == 1
    assert not writer.is_temp("shard-00001-00002.parquet") and not writer.is_ours(".hidden.tmp")


def test_temp_files_left_by_a_kill_are_not_read_as_shards(tmp_path, tiny_llama, monkeypatch):
    """A kill -9 between writing a shard's temp file and its rename leaves the temp file: reading data/ with
    pyarrow, polars or datasets must still give exactly the recorded rows (no duplicate, no torn file)."""
    import datasets
    import polars as pl

    from rpt_data.config import TagConfig
    from rpt_data.pipeline import run_tag
    from test_data_multirank import opts

    left = []  # (temp path, a copy of the complete temp file) as a kill before the rename would leave them
    real_replace = writer.os.replace

    def replace(src, dst):
        if str(dst).endswith(".parquet"):
            left.append((Path(src), Path(shutil.copy(src, Path(src).parent.parent / f"copy-{len(left)}"))))
        return real_replace(src, dst)

    monkeypatch.setattr(writer.os, "replace", replace)
    src = write_jsonl(tmp_path / "in.jsonl", records(9))
    out = tmp_path / "o"
    run_tag(TagConfig(inputs=[str(src)], out=str(out), **opts(tiny_llama)))
    monkeypatch.setattr(writer.os, "replace", real_replace)
    assert len(left) >= 2
    (tmp, whole), (torn, copy) = left[0], left[1]
    shutil.move(whole, tmp)  # complete, killed before its rename
    torn.write_bytes(copy.read_bytes()[:300])  # killed mid-write
    copy.unlink()
    want = read_rows(out).drop("entropy", "topk_entropy", "target_logprob").sort("doc_id", "window_index")
    got = {"pyarrow": pl.from_arrow(pq.read_table(out / "data")), "polars": pl.scan_parquet(out / "data").collect(),
           "datasets": pl.from_arrow(datasets.load_dataset(str(out), split="train",
                                                            cache_dir=str(tmp_path / "hf-cache")).data.table)}
    for how, df in got.items():
        assert df.sort("doc_id", "window_index").select(want.columns).equals(want), (how, df.height, want.height)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(s["rows"] for s in manifest["shards"]) == want.height


def gap_model(root: Path, vocab: dict) -> Path:
    """The tiny Llama (a 320-row head) with a WordLevel tokenizer whose ids skip some numbers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tiny import make_model_dir

    path = make_model_dir(root, arch="llama")
    for f in path.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            f.unlink()
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(path)
    return path


def test_a_vocabulary_with_id_gaps_scores_its_highest_ids(tmp_path):
    """len(tokenizer) is 4 but 'c' is id 7: the head is cut at the highest id + 1, so 'c' gets a stat."""
    import numpy as np

    from rpt_data.config import TagConfig
    from rpt_data.pipeline import run_tag
    from test_data_multirank import opts

    model = gap_model(tmp_path / "m", {"[UNK]": 0, "a": 1, "b": 2, "c": 7})
    src = write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "text": "a b c c a b c a"} for i in range(3)])
    run_tag(TagConfig(inputs=[str(src)], out=str(tmp_path / "o"), id_field="id", **opts(model)))
    rows = read_rows(tmp_path / "o")
    ids = np.concatenate(rows["token_ids"].to_list())
    lp = np.concatenate([[np.nan if v is None else v for v in x] for x in rows["target_logprob"].to_list()])
    assert 7 in ids and np.isfinite(lp[1:][ids[1:] == 7]).all()


def test_a_tokenizer_with_ids_past_the_head_is_refused(tmp_path):
    from rpt_common.errors import UserError
    from rpt_common.models import load_causal_lm
    from rpt_data.proxy import build_proxy

    model = gap_model(tmp_path / "m", {"[UNK]": 0, "a": 1, "b": 2, "c": 400})
    with pytest.raises(UserError, match="highest token id is 400 but the model's output head has only 320 rows"):
        build_proxy(load_causal_lm(str(model), "cpu", "float32"))


def test_an_hf_glob_is_globbed_once_for_all_its_units(tmp_path, monkeypatch):
    """Every rank fingerprints every unit at start: one glob per spec, not one per unit (units x files)."""
    import glob

    import rpt_data.readers as readers

    for i in range(12):
        write_jsonl(tmp_path / f"f{i:02d}.jsonl", [{"text": "x" * (i + 1)}])
    units = readers.expand_inputs([f"hf://{tmp_path}/*.jsonl"], None)
    assert len(units) == 12
    calls, real_glob = [], glob.glob

    def counting_glob(*a, **k):
        calls.append(a)
        return real_glob(*a, **k)

    monkeypatch.setattr(readers.glob, "glob", counting_glob)
    fps = [readers.stream_fingerprint(p) for p, _ in units]
    assert len(calls) == 1
    assert [fp["bytes"] for fp in fps] == sorted(fp["bytes"] for fp in fps)  # each unit's own file
    assert len({fp["bytes"] for fp in fps}) == 12


def test_ctrl_c_does_not_wait_for_the_read_ahead_item_in_progress():
    """The consumer is interrupted while the producer is inside a slow item (a pool being read): the interrupt
    reaches the caller while that item is still blocked, not after it finished."""
    import threading

    from rpt_data.overlap import read_ahead

    inside, release, finished = threading.Event(), threading.Event(), threading.Event()

    def items():
        yield 1
        inside.set()
        release.wait(20)  # a slow item that this test controls
        finished.set()
        yield 2

    with pytest.raises(KeyboardInterrupt):
        for _ in read_ahead(items(), depth=1):
            assert inside.wait(20)
            raise KeyboardInterrupt
    assert not finished.is_set()  # the caller got the interrupt while the producer was still blocked
    release.set()


def test_a_finished_read_ahead_keeps_every_item():
    from rpt_data.overlap import read_ahead

    assert list(read_ahead(iter(range(50)), depth=2)) == list(range(50))


def test_a_changed_input_is_named_when_a_resume_redoes_it(tmp_path, tiny_llama, capsys):
    """A file changed in place since the run started is named (and only it) when the resume redoes its unit
    (tests/test_data_unit_resume.py checks what is kept and redone)."""
    from rpt_data.config import TagConfig
    from rpt_data.pipeline import run_tag
    from test_data_multirank import opts

    for i in range(3):
        write_jsonl(tmp_path / f"{i}.jsonl", records(6)[i::3])
    cfg = TagConfig(inputs=[str(tmp_path / "*.jsonl")], out=str(tmp_path / "o"), **opts(tiny_llama))
    run_tag(cfg)
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    m["complete"] = False
    (tmp_path / "o" / "manifest.json").write_text(json.dumps(m))
    with open(tmp_path / "1.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more line"}) + "\n")
    capsys.readouterr()
    run_tag(cfg)
    err = capsys.readouterr().err
    assert f"('{tmp_path / '1.jsonl'}')" in err and "0.jsonl" not in err


def test_a_parquet_footer_with_a_negative_row_count_numbers_each_row_once(tmp_path):
    """Found by test_faults_data's fuzzer: one flipped footer byte gives a group -1 rows, and the rows after it
    were numbered from the wrong line (line 180 twice)."""
    import io

    import pyarrow as pa

    from data_helpers import SENTENCES
    from rpt_data.readers import BadRecord, RecordParser, read_parquet

    rows = [{"id": f"p{i}", "text": f"row {i} " + SENTENCES[i % 5]} for i in range(300)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=60)
    data = bytearray(buf.getvalue())
    data[7859] = 1
    (tmp_path / "f.parquet").write_bytes(bytes(data))
    pf = pq.ParquetFile(tmp_path / "f.parquet")
    if min(pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)) >= 0:
        pytest.skip("this pyarrow writes the footer at other offsets")
    items = list(read_parquet(str(tmp_path / "f.parquet"), RecordParser("text", None, "id")))
    assert [it.line for it in items] == list(range(1, 301))
    assert [it.line for it in items if isinstance(it, BadRecord)] == list(range(181, 241))
