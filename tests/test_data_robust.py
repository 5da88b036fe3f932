"""Issue 32: no input stops a rank and no intact row is lost. A bad row, row group, block or unit becomes rejects
with file and position; Parquet is read one row group at a time; a damaged text file keeps its valid bytes."""
import errno
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rpt_data.readers as readers
from data_helpers import write_jsonl
from rpt_data.readers import BadRecord, Record, RecordParser, expand_inputs, open_stream, read_all

PARSE = RecordParser("text", None, None)


@pytest.fixture(autouse=True)
def fresh_streams():
    open_stream.cache_clear()
    yield
    open_stream.cache_clear()


def split(items):
    items = list(items)
    return [i for i in items if isinstance(i, Record)], [i for i in items if isinstance(i, BadRecord)]


def three_files(root, bad_file=1):
    """Three jsonl files of 5 rows; file `bad_file` has one malformed line after its third row."""
    root.mkdir(parents=True, exist_ok=True)
    for k in range(3):
        rows = [{"text": f"file {k} row {i}"} for i in range(5)]
        write_jsonl(root / f"f{k}.jsonl", rows, {3: b'{"text": "cut'} if k == bad_file else None)
    return root


def test_a_malformed_row_in_an_hf_input_is_a_reject_not_a_crash(tmp_path):
    root = three_files(tmp_path / "j")
    plain_good, plain_bad = split(read_all(expand_inputs([str(root / "*.jsonl")], None), PARSE))
    assert (len(plain_good), len(plain_bad)) == (15, 1)
    good, bad = split(read_all(expand_inputs([f"hf://{root}/*.jsonl"], None), PARSE))
    # datasets fails the whole json file on one bad line; that unit's file is then read row by row as a plain path
    assert [(x.source.rsplit("#", 1)[1], x.line, x.kind) for x in bad] == [("1", 4, "malformed JSON")]
    assert [r.text for r in good] == [r.text for r in plain_good]
    assert [r.line for r in good if r.source.endswith("#1")] == [1, 2, 3, 5, 6]


def test_an_os_error_mid_file_ends_that_file_only(tmp_path, monkeypatch):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(4)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(3)])
    real = readers.READERS["jsonl"]

    def eio_after_two(path, parse):
        for n, item in enumerate(real(path, parse)):
            if path == str(a) and n == 2:
                raise OSError(errno.EIO, "Input/output error")
            yield item

    monkeypatch.setitem(readers.READERS, "jsonl", eio_after_two)
    good, bad = split(read_all([(str(a), "jsonl"), (str(b), "jsonl")], PARSE))
    assert [r.text for r in good] == ["a0", "a1", "b0", "b1", "b2"]
    assert [(x.source, x.line) for x in bad] == [(str(a), 3)] and "Input/output error" in bad[0].reason


def test_a_file_removed_mid_run_is_one_reject(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    files = expand_inputs([str(tmp_path / "*.jsonl")], None)
    a.unlink()
    for fmt in ("jsonl", "text", "parquet"):
        good, bad = split(read_all([(str(a), fmt), (str(b), "jsonl")], PARSE))
        assert [r.text for r in good] == ["b"] and [(x.source, x.line) for x in bad] == [(str(a), 0)], fmt
    assert len(files) == 2


def damaged_parquet(path, groups, n_groups=5, rows_per_group=1000):
    """`n_groups` snappy row groups; the compressed pages of `groups` (0-based) are overwritten with junk."""
    rows = [{"text": f"row {i:05d} " + "abcdefghij" * 3} for i in range(n_groups * rows_per_group)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, row_group_size=rows_per_group)
    data = bytearray(buf.getvalue())
    meta = pq.ParquetFile(io.BytesIO(bytes(data))).metadata
    for g in groups:
        col = meta.row_group(g).column(0)
        start = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
        at = start + col.total_compressed_size // 3
        data[at : at + 40] = b"\xab" * 40
    path.write_bytes(bytes(data))
    return rows


@pytest.mark.parametrize("groups", [[2], [0, 1], [4], [0, 2, 4]])
def test_a_bad_row_group_costs_exactly_its_rows(tmp_path, groups):
    rows = damaged_parquet(tmp_path / "d.parquet", groups)
    good, bad = split(readers.read_parquet(str(tmp_path / "d.parquet"), RecordParser("text", None, None)))
    lost = {g * 1000 + i + 1 for g in groups for i in range(1000)}  # 1-based rows of the damaged groups
    assert [r.line for r in good] == [i for i in range(1, 5001) if i not in lost]
    assert [r.text for r in good] == [rows[i - 1]["text"] for i in range(1, 5001) if i not in lost]
    assert sorted(x.line for x in bad) == sorted(lost)  # counted: one reject per lost row, each named
    assert all(f"row group {(x.line - 1) // 1000 + 1} of the parquet file is unreadable" in x.reason for x in bad)


TEXT_LINE = "A valid line of text here.\n"


@pytest.mark.parametrize("block", [16, 310, 1 << 20])
@pytest.mark.parametrize("damage", [b"\xff\xfe", b"\x00"])
def test_a_damaged_text_file_keeps_its_valid_bytes(tmp_path, monkeypatch, block, damage):
    valid = (TEXT_LINE * 23)[:620].encode()  # 22 lines and part of the 23rd
    (tmp_path / "a.txt").write_bytes(valid + damage + b" more\nand more text\n")
    monkeypatch.setattr(readers, "TEXT_BLOCK_BYTES", block)
    good, bad = split(readers.read_text(str(tmp_path / "a.txt"), PARSE))
    assert "".join(r.text for r in good).encode() == valid
    assert [r.cont for r in good] == [False] + [True] * (len(good) - 1)
    assert len(bad) == 1 and bad[0].line == 23 and "byte 620 of the file" in bad[0].reason


def test_a_file_damaged_in_its_first_line_is_rejected_whole(tmp_path):
    (tmp_path / "img.txt").write_bytes(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;" + b"looks like text afterwards\n")
    good, bad = split(readers.read_text(str(tmp_path / "img.txt"), PARSE))
    assert good == [] and len(bad) == 1 and bad[0].kind == "binary data"


def test_hf_run_with_a_malformed_row_completes_and_counts_it(tmp_path, tiny_llama):
    from test_data_cli import run, tag_args

    root = three_files(tmp_path / "j")
    code, output = run(*tag_args(f"hf://{root}/*.jsonl", tmp_path / "o", tiny_llama))
    assert code == 0, output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert (manifest["records"], manifest["bad_records"]) == (15, 1)  # as the plain path reads the files
    code, output = run(*tag_args(f"hf://{root}/*.jsonl", tmp_path / "o", tiny_llama))  # a resume reads it again
    assert code == 0 and "already complete" in output, output


@pytest.mark.parametrize("world", [1, 2])
def test_rank_record_work_per_shard_does_not_grow_with_the_inputs(tmp_path, tiny_llama, monkeypatch, world):
    """Item 5: the record (with every input's fingerprint) is written at the start and the end only; each shard
    appends one short line to the shard log, whatever the number of input files."""
    import rpt_data.pipeline as pipeline
    from rpt_common.shards import read_manifest
    from rpt_data.config import TagConfig
    from test_data_multirank import opts

    (tmp_path / "in").mkdir()
    for i in range(40):
        write_jsonl(tmp_path / "in" / f"{i:03d}.jsonl", [{"text": f"record {i} " + "word " * (i % 7)}])
    records, appended = [], []
    real_write, real_append = pipeline.write_json_atomic, pipeline.append_json_line
    monkeypatch.setattr(pipeline, "write_json_atomic", lambda p, obj: (records.append(p.name), real_write(p, obj)))
    monkeypatch.setattr(pipeline, "append_json_line", lambda p, obj: (appended.append(json.dumps(obj)),
                                                                       real_append(p, obj)))
    out = tmp_path / "o"
    for r in range(world):
        pipeline.run_tag(TagConfig(inputs=[str(tmp_path / "in" / "*.jsonl")], out=str(out), rank=r, world_size=world,
                                   **opts(tiny_llama, shard_rows=2)))
    assert len(appended) >= 4 * world and all(len(line) < 1000 and "inputs" not in line for line in appended)
    assert len(records) == 2 * world  # start and end of each rank, never per shard
    if world == 1:
        assert not (out / "shards.jsonl").exists() and len(read_manifest(out)["shards"]) == len(appended)


def test_the_shard_log_survives_a_torn_line_and_lists_each_shard_once(tmp_path):
    from rpt_common.shards import read_shard_log, with_logged_shards

    log = tmp_path / "shards.jsonl"
    log.write_text('{"file": "a"}\n{"file": "b"}\n{"file": "c", "ro')  # killed mid-append
    assert read_shard_log(log) == [{"file": "a"}, {"file": "b"}]
    rec = with_logged_shards({"shards": [{"file": "a"}]}, log)  # killed after the record took "a", before unlink
    assert [s["file"] for s in rec["shards"]] == ["a", "b"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_llama):
    """A 1-rank and a merged 2-rank output of the same corpus, and the 1-rank one in the layout written before data/
    (shards in the directory itself, the manifest naming them so)."""
    import shutil

    from data_helpers import records
    from rpt_data.config import TagConfig
    from rpt_data.pipeline import run_tag
    from test_data_multirank import opts, tag_ranks

    root = tmp_path_factory.mktemp("layout")
    for i in range(3):
        write_jsonl(root / f"{i}.jsonl", records(9)[i::3])
    inputs = [str(root / "*.jsonl")]
    run_tag(TagConfig(inputs=inputs, out=str(root / "one"), **opts(tiny_llama)))
    tag_ranks(inputs, tiny_llama, root / "two", 2)
    old = root / "old"
    shutil.copytree(root / "one", old)
    manifest = json.loads((old / "manifest.json").read_text())
    for s in manifest["shards"]:
        (old / s["file"]).rename(old / s["file"].split("/")[-1])
        s["file"] = s["file"].split("/")[-1]
    (old / "data").rmdir()
    (old / "README.md").unlink()
    (old / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.mark.parametrize("name", ["one", "two"])
def test_the_output_reads_as_a_dataset_with_the_usual_one_liners(outputs, name):
    import datasets
    import polars as pl

    from data_helpers import read_rows

    out = outputs / name
    want = read_rows(outputs / "one").drop("entropy", "topk_entropy", "target_logprob")
    got = {"polars": pl.scan_parquet(f"{out}/data").collect(), "pyarrow": pl.from_arrow(pq.read_table(f"{out}/data")),
           "datasets": pl.from_arrow(datasets.load_dataset(str(out), split="train",  # a cache of this test only
                                                            cache_dir=str(outputs / f"hf-cache-{name}")).data.table)}
    for how, df in got.items():
        df = df.sort("doc_id", "window_index").select(want.columns)
        assert df.equals(want), (how, df.height, want.height, [c for c in want.columns if not df[c].equals(want[c])])


def test_directories_written_before_data_keep_reading(outputs, tiny_llama):
    from rpt_common.shards import shard_paths
    from rpt_data.inspect import inspect_out, validate_out
    from rpt_train.samples import ShardSet

    from data_helpers import read_rows

    old, one = outputs / "old", outputs / "one"
    assert [p.split("/")[-1] for p in shard_paths(old)] == [p.split("/")[-1] for p in shard_paths(one)]
    assert validate_out(str(old)) == [] and validate_out(str(one)) == []
    inspect_out(str(old))
    assert ShardSet(str(old)).paths == [str(old / p.split("/")[-1]) for p in shard_paths(one)]
    assert read_rows(old).equals(read_rows(one))


def test_a_hub_dataset_updated_between_runs_is_refused_in_one_sentence(tmp_path, tiny_llama, monkeypatch):
    """Item 7: a hub input records the commit it was read at; a resume finding the hub moved on refuses."""
    import types

    import datasets
    import huggingface_hub

    from rpt_common.errors import UserError
    from rpt_data.config import TagConfig
    from rpt_data.pipeline import run_tag
    from test_data_multirank import opts

    src = write_jsonl(tmp_path / "hub.jsonl", [{"text": f"hub record {i}"} for i in range(5)])
    real_load, sha, asked = datasets.load_dataset, {"now": "a" * 40}, []

    def load(name, config=None, split=None, streaming=False, revision=None, **kw):
        asked.append(revision)
        return real_load("json", data_files=[str(src)], split=split, streaming=streaming, **kw)

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", load)
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, name, **kw: types.SimpleNamespace(sha=sha["now"]))
    cfg = TagConfig(inputs=["hf://someone/corpus"], out=str(tmp_path / "o"), **opts(tiny_llama))
    manifest = run_tag(cfg)
    assert [f.get("revision") for f in manifest["inputs"]] == ["a" * 40] and set(asked) == {"a" * 40}  # pinned
    open_stream.cache_clear()
    sha["now"] = "b" * 40
    with pytest.raises(UserError, match="moved from revision aaaaaaaaaaaa to bbbbbbbbbbbb") as e:
        run_tag(cfg)
    assert "\n" not in str(e.value) and "--overwrite" in str(e.value)


def test_a_dataset_card_beside_data_files_is_named(tmp_path, capsys):
    """`huggingface-cli download --local-dir fw/` puts README.md (the dataset card) beside the data: it is read like
    every text file of the walk (which files a directory means depends on no neighbour and no version), and named
    in a warning with the glob that leaves it out; a text corpus with a stray .json gets no warning."""
    from rpt_data.readers import expand_inputs

    data = tmp_path / "fw"
    (data / "sub").mkdir(parents=True)
    (data / "README.md").write_text("---\nlicense: odc-by\n---\n# FineWeb\n")
    (data / "sub" / "000.jsonl").write_text('{"text": "a"}\n')
    assert sorted(f for _, f in expand_inputs([str(data)], None)) == ["jsonl", "text"]
    err = capsys.readouterr().err
    assert "README.md" in err and f"{data}/**/*.parquet" in err
    prose = tmp_path / "prose"
    prose.mkdir()
    for name in ("a.md", "b.txt", "readme.txt"):
        (prose / name).write_text(name)
    (prose / "stats.json").write_text('{"text": "x"}\n')
    assert sorted(f for _, f in expand_inputs([str(prose)], None)) == ["jsonl", "text", "text", "text"]
    assert "readme.txt" in capsys.readouterr().err
    expand_inputs([str(data)], "text")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("gz", [False, True])
def test_a_jsonl_file_with_cr_line_endings_is_one_named_reject_not_one_giant_line(tmp_path, monkeypatch, gz):
    """Lines ending in CR alone (classic Mac OS): read by LF the file was one line, held whole in memory and then one
    'malformed JSON' reject at line 1. Now it is one reject naming CR line endings and a command that converts it,
    read no further than its first MiB; the files beside it are read as before, and a CRLF file is unaffected."""
    import gzip as gzip_

    rows = b"".join(json.dumps({"text": f"row {i}"}).encode() + b"\r" for i in range(4))
    mac = tmp_path / ("mac.jsonl.gz" if gz else "mac.jsonl")
    mac.write_bytes(gzip_.compress(rows) if gz else rows)
    dos = tmp_path / "dos.jsonl"
    dos.write_bytes(rows.replace(b"\r", b"\r\n"))
    monkeypatch.setattr(readers, "PROBE_BYTES", 64)  # the probe reads this much, not the whole file
    good, bad = split(read_all([(str(mac), "jsonl"), (str(dos), "jsonl")], PARSE))
    assert [r.text for r in good] == [f"row {i}" for i in range(4)] and all(r.source == str(dos) for r in good)
    (b,) = bad
    assert (b.source, b.line, b.kind) == (str(mac), 0, "CR line endings") and "tr '\\r' '\\n'" in b.reason


def test_a_json_array_file_is_one_named_reject_and_a_stray_bracket_is_not(tmp_path):
    """A pretty-printed .json export ('[' alone, then '{' or '{...},': a BOM or not) is not JSON Lines: one reject
    naming it and a jq command (was: a reject per line, the objects without a trailing comma read). A minified one
    is one line: its reject says it is a list and how to convert such a file. A JSON Lines file whose first line is
    a stray '[' loses that line only."""
    rows = [{"text": f"row {i}"} for i in range(3)]
    (tmp_path / "min.json").write_text(json.dumps(rows))
    (tmp_path / "pretty.json").write_text("\ufeff" + json.dumps(rows, indent=2))
    (tmp_path / "commas.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    (tmp_path / "stray.jsonl").write_text("[\n" + "".join(json.dumps(r) + "\n" for r in rows))
    names = ("min.json", "pretty.json", "commas.json", "stray.jsonl")
    good, bad = split(read_all([(str(tmp_path / n), "jsonl") for n in names], PARSE))
    assert [(b.source.rsplit("/", 1)[1], b.line, b.kind) for b in bad] == [
        ("min.json", 1, "not a JSON object"), ("pretty.json", 0, "JSON array"), ("commas.json", 0, "JSON array"),
        ("stray.jsonl", 1, "malformed JSON")]
    assert all("jq -c '.[]'" in b.reason for b in bad[:3])
    assert [(r.source.rsplit("/", 1)[1], r.text) for r in good] == [("stray.jsonl", f"row {i}") for i in range(3)]


def test_a_line_longer_than_the_limit_is_one_reject_and_the_next_lines_read(tmp_path, monkeypatch):
    """A line over MAX_LINE_BYTES (a minified dump with no newline) is read in pieces, never whole, and rejected
    at its line; the lines after it are read with their own numbers."""
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 100)
    long = json.dumps({"text": "x" * 5000})
    path = tmp_path / "f.jsonl"
    path.write_text("\n".join([json.dumps({"text": "a"}), long, json.dumps({"text": "b"}), long]) + "\n")
    items = list(readers.read_jsonl(str(path), PARSE))
    assert [(type(i).__name__, i.line) for i in items] == [("Record", 1), ("BadRecord", 2), ("Record", 3),
                                                          ("BadRecord", 4)]
    assert items[1].kind == "line too long" and f"{len(long) + 1:,} bytes" in items[1].reason
    assert [i.text for i in items if isinstance(i, Record)] == ["a", "b"]
    assert items[2].offset == len(json.dumps({"text": "a"})) + 1 + len(long) + 1  # byte offsets stay right


def test_a_read_error_in_the_first_mib_is_raised_for_the_retry_not_swallowed(tmp_path, monkeypatch):
    """The probe reads the handle the lines are read from: an EIO there reaches the caller (whose retry reopens the
    unit), where a probe that swallowed it let a file that is not JSON Lines be read line by line on one rank only
    (its record count, hence the striping of every later record, drifting)."""
    path = tmp_path / "a.json"
    path.write_text("[\n  {\n    \"text\": \"a\"\n  }\n]\n")
    real_open = open

    class Flaky(io.BufferedReader):
        def read(self, *a):
            raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(readers, "open", lambda p, mode="r", *a, **k: Flaky(real_open(p, "rb", buffering=0)),
                        raising=False)
    with pytest.raises(OSError, match="Input/output error"):
        list(readers.read_jsonl(str(path), PARSE))
    monkeypatch.undo()
    assert [(b.line, b.kind) for b in readers.read_jsonl(str(path), PARSE)] == [(0, "JSON array")]


def test_the_hf_fallback_keeps_a_whole_file_reject_after_the_rows_read(tmp_path):
    """hf:// reads a jsonl through datasets and, when datasets fails after `done` rows, reads the rest here; a whole-
    file reject (line 0) was counted as row 1 and skipped, so the rest of the file vanished without a reject."""
    path = tmp_path / "mac.jsonl"
    path.write_bytes(b"".join(json.dumps({"text": f"r{i}"}).encode() + b"\r" for i in range(5)))
    (bad,) = readers._jsonl_rows_after(str(path), PARSE, "hf://x#0", 2)
    assert (bad.source, bad.line, bad.kind) == ("hf://x#0", 3, "CR line endings") and "rows 1-2 were read" in bad.reason
