"""Issue 32: no input stops a rank and no intact row is lost. A bad row, row group, block or unit becomes rejects
with file and position; Parquet is read one row group at a time; a damaged text file keeps its valid bytes."""
import errno
import io
import json

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
