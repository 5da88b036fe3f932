"""`--input hf://...`: datasets streaming of local data files and directories, rank division by dataset
shard, bad records by policy, and one clear sentence when the hub cannot be reached."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from data_helpers import SENTENCES, read_rows, records, write_jsonl
from rpt_common.errors import UserError
from rpt_common.shards import read_manifest
from rpt_data.cli import main
from rpt_data.config import TagConfig
from rpt_data.pipeline import run_tag
from rpt_data.readers import RecordParser, expand_inputs, open_stream, parse_stream_spec, read_all
from test_data_multirank import opts, same_content, tag_ranks


@pytest.fixture(autouse=True)
def fresh_streams():
    open_stream.cache_clear()  # each test writes its own files under the same kind of names
    yield
    open_stream.cache_clear()


def parts(root, n=3, per=4):
    """n jsonl files of `per` records each: a dataset directory with n shards."""
    root.mkdir(parents=True, exist_ok=True)
    rows = records(n * per)
    for i in range(n):
        write_jsonl(root / f"part-{i}.jsonl", rows[i * per : (i + 1) * per])
    return rows


def test_spec_parsing():
    assert parse_stream_spec("hf://user/name") == ("user/name", None, "train")
    assert parse_stream_spec("hf://user/name:cfg@validation") == ("user/name", "cfg", "validation")
    assert parse_stream_spec("hf:///data/x.parquet@test") == ("/data/x.parquet", None, "test")
    with pytest.raises(UserError, match="is not hf://"):
        parse_stream_spec("hf://")


def test_directory_streams_one_unit_per_shard_with_the_same_records(tmp_path):
    rows = parts(tmp_path / "d")
    files = expand_inputs([f"hf://{tmp_path / 'd'}"], None)
    assert [f for _, f in files] == ["stream"] * 3 and files[1][0].endswith("#1")
    got = [(r.text, r.source, r.line) for r in read_all(files, RecordParser("text", None, None))]
    assert [t for t, _, _ in got] == [r["text"] for r in rows]
    assert got[5][1:] == (files[1][0], 2)  # row 6 of the dataset is row 2 of shard 1


@pytest.mark.parametrize("mode", ["structured", "continuous"])
def test_stream_tags_like_the_same_file_read_directly(tmp_path, tiny_llama, mode):
    write_jsonl(tmp_path / "in.jsonl", records(8))
    kw = dict(mode=mode, id_field="id" if mode == "structured" else None)
    run_tag(TagConfig(inputs=[str(tmp_path / "in.jsonl")], out=str(tmp_path / "file"), **opts(tiny_llama, **kw)))
    run_tag(TagConfig(inputs=[f"hf://{tmp_path / 'in.jsonl'}"], out=str(tmp_path / "hf"), **opts(tiny_llama, **kw)))
    a, b = read_rows(tmp_path / "file"), read_rows(tmp_path / "hf")
    assert a.drop("doc_id").equals(b.drop("doc_id"))
    manifest = json.loads((tmp_path / "hf" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["inputs"][0]["path"].startswith("hf://")


@pytest.mark.parametrize("case", ["structured-shards", "continuous-shards", "structured-one-file",
                                  "continuous-one-file"])
def test_two_ranks_equal_one_rank(tmp_path, tiny_llama, case):
    mode, layout = case.split("-", 1)
    if layout == "shards":  # 3 shards >= 2 ranks: shard i -> rank i % 2
        parts(tmp_path / "d")
        spec = f"hf://{tmp_path / 'd'}"
    else:  # 1 parquet file < 2 ranks: records (structured) or windows (continuous) are striped
        rows = records(10) + [{"id": "bad", "text": None}]
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "one.parquet")
        spec = f"hf://{tmp_path / 'one.parquet'}"
    kw = dict(mode=mode, id_field="id" if mode == "structured" else None)
    run_tag(TagConfig(inputs=[spec], out=str(tmp_path / "one"), **opts(tiny_llama, **kw)))
    manifest = tag_ranks([spec], tiny_llama, tmp_path / "two", 2, **kw)
    expect = "files" if layout == "shards" else "records" if mode == "structured" else "windows"
    assert manifest["division"] == expect
    same_content(tmp_path / "one", tmp_path / "two", 2)


def tag_cli(*args):
    return CliRunner().invoke(main, ["tag", *map(str, args), "--window", "16", "--context-prefix", "4",
                                     "--no-progress"], catch_exceptions=False)


def bad_parquet(path):
    rows = [{"text": SENTENCES[0]}, {"text": None}, {"text": SENTENCES[1]}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_bad_records_follow_the_policy(tmp_path, tiny_llama):
    path = bad_parquet(tmp_path / "b.parquet")
    result = tag_cli("--input", f"hf://{path}", "--model", tiny_llama, "--out", tmp_path / "fail",
                     "--on-bad-record", "fail")
    assert result.exit_code == 2
    assert f"hf://{path}:2" in result.output and "null field 'text'" in result.output
    result = tag_cli("--input", f"hf://{path}", "--model", tiny_llama, "--out", tmp_path / "skip")
    assert result.exit_code == 0, result.output
    rejects = [json.loads(x) for x in (tmp_path / "skip" / "rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in rejects] == [(f"hf://{path}", 2)]
    assert json.loads((tmp_path / "skip" / "manifest.json").read_text())["records"] == 2


def test_non_string_text_and_missing_field_in_jsonl_rows(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [{"text": "fine"}, {"text": "also"}, {"x": 2}])
    items = list(read_all(expand_inputs([f"hf://{tmp_path / 'm.jsonl'}"], None), RecordParser("text", None, None)))
    assert [type(i).__name__ for i in items] == ["Record", "Record", "BadRecord"]
    assert items[2].line == 3 and "field 'text'" in items[2].reason
    pq.write_table(pa.Table.from_pylist([{"text": 1}, {"text": 2}]), tmp_path / "n.parquet")
    items = list(read_all(expand_inputs([f"hf://{tmp_path / 'n.parquet'}"], None), RecordParser("text", None, None)))
    assert all("not a string" in i.reason for i in items) and [i.line for i in items] == [1, 2]


def test_missing_column_is_one_bad_record_for_the_shard(tmp_path):
    bad_parquet(tmp_path / "b.parquet")
    items = list(read_all(expand_inputs([f"hf://{tmp_path / 'b.parquet'}"], None), RecordParser("body", None, None)))
    assert len(items) == 1 and items[0].line == 0 and "no column 'body'" in items[0].reason


def test_text_files_are_one_record_as_a_plain_path(tmp_path):
    """datasets' text builder streams a .txt line by line; hf:// reads it as one record of the file's text (each
    newline kept), as the plain path is read (tests/test_data_scale.py compares the shards)."""
    (tmp_path / "t.txt").write_text("first line\n\nsecond line\n")
    items = list(read_all(expand_inputs([f"hf://{tmp_path / 't.txt'}"], None), RecordParser("text", None, None)))
    assert [(i.text, i.line, i.cont) for i in items] == [("first line\n\nsecond line\n", 1, False)]


def test_hub_name_offline_is_one_sentence(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set") as e:
        expand_inputs(["hf://someone/some-corpus:en@train"], None)
    assert "\n" not in str(e.value)


def test_hub_connection_error_is_one_sentence(monkeypatch):
    import datasets

    def unreachable(*a, **k):
        raise ConnectionError("Couldn't reach 'someone/some-corpus' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(UserError, match="the hub is not reachable for 'someone/some-corpus'"):
        expand_inputs(["hf://someone/some-corpus"], None)


@pytest.mark.parametrize("mode", ["structured", "continuous"])
def test_resume_after_kill_equals_uninterrupted(tmp_path, tiny_llama, mode):
    """A streamed run killed mid-shard resumes after its last complete shard; the result equals a run
    that was never stopped (the finished part is re-read and re-tokenized, not re-scored)."""
    import subprocess
    import sys

    from test_data_pipeline import KILL_SCRIPT

    parts(tmp_path / "d", n=2, per=8)
    base = dict(inputs=[f"hf://{tmp_path / 'd'}"], mode=mode, **opts(tiny_llama, shard_rows=4))
    ref = run_tag(TagConfig(out=str(tmp_path / "ref"), **base))
    killed = dict(base, out=str(tmp_path / "killed"))
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, json.dumps(killed), "write_shard", "3"],
                          capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = read_manifest(tmp_path / "killed")  # the record and its shard log
    assert not partial["complete"] and len(partial["shards"]) == 2 < len(ref["shards"])
    manifest = run_tag(TagConfig(**killed))
    assert read_rows(tmp_path / "killed").equals(read_rows(tmp_path / "ref"))
    assert manifest["totals"] == ref["totals"] and manifest["inputs"] == ref["inputs"]
