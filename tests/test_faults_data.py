"""Faults as a user meets them on a days-long `rpt-data tag` job: bad records of every kind, kill -9 at
random moments, corrupt or foreign outputs, NaN/inf logits, a full disk. The promise under test:
nothing good is lost, nothing bad gets in silently, every failure says what to do."""
import gzip
import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rpt_data.readers as readers
from data_helpers import KILL_KINDS, SENTENCES, install_fault, read_rows, records, write_jsonl
from rpt_common.shards import META_SCHEMA_VERSION, read_manifest
from rpt_data.config import TagConfig
from rpt_data.inspect import validate_out
from rpt_data.pipeline import run_tag
from rpt_data.proxy import constant_stats
from rpt_data.readers import BadRecord, Record, RecordParser, reject_duplicate_ids
from test_data_cli import run, tag_args

TESTS = Path(__file__).parent
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ID_COLS = ["doc_id", "window_index", "token_start", "text", "token_ids", "token_bytes", "score_start"]


def strip_out(manifest: dict) -> dict:
    """A manifest without the fields that name the output directory (two runs into two dirs)."""
    return {**manifest, "config": {k: v for k, v in manifest["config"].items() if k != "out"}}


def same_output(a: Path, b: Path) -> None:
    """Two output directories hold the same shards (byte for byte: the manifest records sha256s),
    the same manifest and the same rejects."""
    assert read_rows(a).equals(read_rows(b))
    assert strip_out(json.loads((a / "manifest.json").read_text())) == strip_out(json.loads((b / "manifest.json").read_text()))
    assert (a / "rejects.jsonl").read_bytes() == (b / "rejects.jsonl").read_bytes()
    assert not list(a.glob("*.tmp"))


# --------------------------------------------------------------------------------------------
# Bad records: every kind a real corpus has, skipped with a reason or failing with file:line
# --------------------------------------------------------------------------------------------
BAD_JSONL = [  # (line as it is in the file, reason kind written to rejects.jsonl and counted in the manifest)
    (b'{"id": "b1", "text": "caf\xe9 au lait"}', "invalid UTF-8"),
    (b'{"id": "b2", "text": "the line was cut he', "malformed JSON"),
    (b'["a", "list"]', "not a JSON object"),
    (b'"a bare string"', "not a JSON object"),
    (b'{"id": "b5"}', "missing field 'text'"),
    (b'{"id": "b6", "text": null}', "null field 'text'"),
    (b'{"id": "b7", "text": ["not", "a", "string"]}', "field 'text' is list, not a string"),
    (b'{"id": null, "text": "an id that is null"}', "null id field 'id'"),
    (b'{"text": "no id at all"}', "missing id field 'id'"),
    (b'{"id": {"a": 1}, "text": "an id that is an object"}', "id field 'id' is dict, not a string or integer"),
    (b'{"id": "r3", "text": "a second record with the id r3"}', "duplicate id"),
    (b'{"id": "b12", "text": ""}', "empty text"),
    (b'{"id": "b13", "text": " \\n\\t \\u3000 "}', "empty text"),
    (b"\x00\x9f\x92\x96\xff\xfePK\x03\x04\x14\x00 binary junk", "invalid UTF-8"),
    (b"\x00\x01\x02\x03 binary junk that happens to be UTF-8", "malformed JSON"),
    (b'{"id": "b16", "text": "a lone surrogate \\ud800 here"}', "text contains an unpaired surrogate"),
    (b'{"id": "b17", "text": "x", "n": 1' + b"0" * 5000 + b"}", "malformed JSON"),  # > 4300 digits
    (b'{"id": "b18", "text": "x", "n": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "malformed JSON"),  # too deep
]
ODD_BUT_GOOD = [  # valid records that look unusual: every one must be kept
    {"id": 12345, "text": "An integer id is fine."},
    {"id": "nul", "text": "A NUL \u0000 escaped inside JSON is text."},
    {"id": "ws", "text": "  leading and trailing whitespace is kept  "},
]


def bad_jsonl(path: Path) -> tuple[Path, list[dict], dict[int, str]]:
    """Good records interleaved with every bad line, a BOM before line 1, a CRLF line and a blank line.
    Returns the path, the good records, and {line: reason kind} of the bad lines."""
    good = records(10) + ODD_BUT_GOOD
    lines, bad = [], {}
    for i in range(max(len(good), len(BAD_JSONL))):
        if i < len(good):
            lines.append(json.dumps(good[i], ensure_ascii=False).encode() + (b"\r" if i == 2 else b""))
        if i < len(BAD_JSONL):
            lines.append(BAD_JSONL[i][0])
            bad[len(lines)] = BAD_JSONL[i][1]
        if i == 4:
            lines.append(b"   ")  # blank lines are not records: neither kept nor rejected
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    return path, good, bad


def cut_gzip(path: Path, rows: list[dict]) -> Path:
    data = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in rows))
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def damaged_parquet(path: Path, rows: list[dict], bad_row: int) -> Path:
    """Plain-encoded, uncompressed parquet whose `bad_row` text has a byte that is not UTF-8 (no page CRC)."""
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf, compression="none", use_dictionary=False)
    data = bytearray(buf.getvalue())
    marker = rows[bad_row]["text"].encode()
    at = data.index(marker)
    data[at + 3] = 0xFF
    path.write_bytes(bytes(data))
    return path


def other_inputs(tmp_path: Path) -> tuple[dict[str, Path], list[dict], list[tuple[str, str]]]:
    """Files with file-level faults: ({name: path}, good records they hold, (file, reason kind) expected)."""
    gz_rows = [{"id": f"g{i}", "text": SENTENCES[i % 5]} for i in range(40)]
    pq_rows = [{"id": f"p{i}", "text": f"row {i}: " + SENTENCES[i % 5]} for i in range(8)]
    wrong = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"id": ["w0", "w1"], "text": [1, 2]}), wrong)
    trunc = tmp_path / "trunc.parquet"
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(pq_rows), buf)
    trunc.write_bytes(buf.getvalue()[:200])
    junk, fine = tmp_path / "junk.txt", tmp_path / "fine.txt"
    junk.write_bytes(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;" + b"looks like text afterwards\n")
    fine.write_text("A plain text file is one record.\n")
    gz = cut_gzip(tmp_path / "cut.jsonl.gz", gz_rows)
    damaged = damaged_parquet(tmp_path / "damaged.parquet", pq_rows, bad_row=5)
    paths = {p.name: p for p in (gz, wrong, trunc, damaged, junk, fine)}
    expected = [(str(gz), "compressed file is truncated or corrupt"), (str(wrong), "column 'text' is int64"),
                (str(trunc), "not a readable parquet file"), (str(damaged), "invalid UTF-8 in a string column"),
                (str(junk), "binary data")]
    return paths, gz_rows + [r for i, r in enumerate(pq_rows) if i != 5], expected


def test_every_kind_of_bad_record_is_skipped_with_its_reason_and_every_good_one_kept(tmp_path, tiny_llama):
    src, good, bad = bad_jsonl(tmp_path / "in.jsonl")
    others, other_good, other_bad = other_inputs(tmp_path)
    args = tag_args(src, tmp_path / "o", tiny_llama, "--id-field", "id")
    for p in others.values():
        args += ["--input", p]
    code, text = run(*args)
    assert code == 0, text
    out = tmp_path / "o"
    manifest = json.loads((out / "manifest.json").read_text())
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]

    # every bad jsonl line is listed once, at its 1-based line, with its reason
    in_jsonl = {r["line"]: r["reason"] for r in rejects if r["file"] == str(src)}
    assert sorted(in_jsonl) == sorted(bad)
    for line, kind in bad.items():
        assert in_jsonl[line].startswith(kind), (line, in_jsonl[line])
    # the file-level faults: one line each, naming the file
    for file, kind in other_bad:
        assert [r for r in rejects if r["file"] == file and r["reason"].startswith(kind)], (file, kind)
    assert manifest["bad_records"] == len(rejects) == len(bad) + len(other_bad)
    assert sum(manifest["bad_reasons"].values()) == len(rejects)
    assert {"duplicate id", "malformed JSON", "invalid UTF-8", "empty text"} <= set(manifest["bad_reasons"])

    # good records all kept: the gz keeps the records before its cut, the damaged parquet all rows but one
    df = read_rows(out)
    kept_gz = {d for d in df["doc_id"] if d.startswith("g")}
    assert kept_gz and kept_gz == {f"g{i}" for i in range(len(kept_gz))}
    expect_good = good + [r for r in other_good if not r["id"].startswith("g") or r["id"] in kept_gz]
    assert set(df["doc_id"]) == {str(r["id"]) for r in expect_good} | {str(tmp_path / "fine.txt")}
    assert manifest["records"] == len(expect_good) + 1

    # ... and they are tagged exactly as in a run over a clean file holding only them
    code, text = run(*tag_args(write_jsonl(tmp_path / "clean.jsonl", expect_good), tmp_path / "clean", tiny_llama,
                               "--id-field", "id"))
    assert code == 0, text
    clean = read_rows(tmp_path / "clean")
    assert df.filter(pl.col("doc_id").is_in(clean["doc_id"].unique().to_list())).select(ID_COLS).equals(clean.select(ID_COLS))


FAIL_CASES = [  # (name, reason kind); the jsonl ones put that bad line after 4 good records (line 5)
    *[(f"jsonl-{i}", kind) for i, (_, kind) in enumerate(BAD_JSONL) if i in (5, 7, 8, 9, 10, 13, 15, 16, 17)],
    ("cut.jsonl.gz", "compressed file is truncated"), ("wrong.parquet", "column 'text' is int64"),
    ("trunc.parquet", "not a readable parquet file"), ("damaged.parquet", "invalid UTF-8 in a string column"),
    ("junk.txt", "binary data"),
]


@pytest.mark.parametrize("case,kind", FAIL_CASES, ids=[c for c, _ in FAIL_CASES])
def test_fail_mode_names_file_line_and_what_to_do(tmp_path, tiny_llama, case, kind):
    if case.startswith("jsonl-"):
        i = int(case.split("-")[1])
        src = write_jsonl(tmp_path / "in.jsonl", records(5), {4: BAD_JSONL[i][0]})
        where = f"{src}:5"
    else:
        src = other_inputs(tmp_path)[0][case]
        where = f"{src}:6" if case == "damaged.parquet" else str(src)
    code, text = run(*tag_args(src, tmp_path / "o", tiny_llama, "--id-field", "id", "--on-bad-record", "fail"))
    assert code == 2, text
    assert where in text and kind in text and "--on-bad-record skip" in text
    assert "Traceback" not in text


def test_a_failed_run_resumes_with_skip_and_equals_a_skip_run(tmp_path, tiny_llama):
    # records are tokenized 256 at a time: the bad line comes late enough for shards to be written first
    rows = [{"id": f"s{i}", "text": f"Short record number {i}."} for i in range(262)]
    src = write_jsonl(tmp_path / "in.jsonl", rows, {258: b"{broken"})
    opts = ("--id-field", "id", "--shard-rows", 64)
    code, text = run(*tag_args(src, tmp_path / "o", tiny_llama, *opts, "--on-bad-record", "fail"))
    assert code == 2 and f"{src}:259" in text
    assert read_manifest(tmp_path / "o")["shards"]  # some work was done (the record and its shard log)
    code, text = run(*tag_args(src, tmp_path / "o", tiny_llama, *opts))  # same command, skip: resumes
    assert code == 0, text
    assert run(*tag_args(src, tmp_path / "ref", tiny_llama, *opts))[0] == 0
    same_output(tmp_path / "o", tmp_path / "ref")


def test_an_input_given_twice_is_read_once(tmp_path, tiny_llama):
    src = write_jsonl(tmp_path / "in.jsonl", records(3))
    code, text = run(*tag_args(src, tmp_path / "o", tiny_llama, "--id-field", "id", "--input", tmp_path / "*.jsonl"))
    assert code == 0, text
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["records"] == 3 and manifest["bad_records"] == 0


# --------------------------------------------------------------------------------------------
# Reader fuzzing (hypothesis): no input makes a reader raise, and every good record comes out intact
# --------------------------------------------------------------------------------------------
GOOD_TEXT = st.text(min_size=1, max_size=40).filter(str.strip)
LINE = st.one_of(
    st.tuples(st.just("good"), st.fixed_dictionaries({"id": st.sampled_from(["a", "b", "c", 1, 2]), "text": GOOD_TEXT}),
              st.booleans()),
    st.tuples(st.just("junk"), st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")), st.just(False)),
    st.tuples(st.just("json"), st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                                            lambda c: st.lists(c, max_size=3) | st.dictionaries(
                                                st.sampled_from(["id", "text", "x"]), c, max_size=3)),
              st.just(False)),
)


def valid_json(line: bytes) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


@FUZZ
@given(lines=st.lists(LINE, max_size=25), gz=st.booleans())
def test_fuzz_jsonl_reader(tmp_path, lines, gz):
    raw = []
    for kind, value, ascii_only in lines:
        raw.append(value if kind == "junk" else json.dumps(value, ensure_ascii=ascii_only).encode())
    data = b"".join(r + b"\n" for r in raw)
    path = tmp_path / ("f.jsonl.gz" if gz else "f.jsonl")
    path.write_bytes(gzip.compress(data) if gz else data)
    items = list(readers.read_jsonl(str(path), RecordParser("text", None, "id")))

    # one item per non-blank line, in order, at its line; a file whose first two non-blank lines are '[' and a line
    # that is no JSON value by itself is one JSON array (pretty-printed): one reject of the whole file
    first = [x.strip() for x in data.removeprefix(b"\xef\xbb\xbf").split(b"\n")[:-1] if x.strip()][:2]
    if len(first) == 2 and first[0] == b"[" and not valid_json(first[1]):
        assert [(it.line, it.kind) for it in items] == [(0, "JSON array")]
        return
    assert [it.line for it in items] == [i + 1 for i, r in enumerate(raw) if r.strip()]
    for (kind, value, _), i in zip(lines, range(len(raw))):
        if kind == "good":
            rec = next(it for it in items if it.line == i + 1)
            assert isinstance(rec, Record) and rec.text == value["text"] and rec.doc_id == str(value["id"])
    # duplicates: the first record with an id is kept, each later one becomes a reject in its place
    first: dict[str, int] = {}
    for it in items:
        if isinstance(it, Record):
            first.setdefault(it.doc_id, it.line)
    deduped = list(reject_duplicate_ids(items))
    assert [it.line for it in deduped] == [it.line for it in items]
    assert [(it.doc_id, it.line) for it in deduped if isinstance(it, Record)] == sorted(first.items(), key=lambda kv: kv[1])
    assert all(it.kind == "duplicate id" for it, orig in zip(deduped, items) if type(it) is not type(orig))


GZ_ROWS = [{"id": i, "text": SENTENCES[i % 5] * (1 + i % 3)} for i in range(60)]
GZ_DATA = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in GZ_ROWS))


@FUZZ
@given(cut=st.integers(0, len(GZ_DATA)), flips=st.lists(st.tuples(st.integers(0, len(GZ_DATA) - 1), st.integers(0, 255)),
                                                         max_size=2))
def test_fuzz_gzip_cut_or_damaged(tmp_path, cut, flips):
    data = bytearray(GZ_DATA[:cut])
    for at, byte in flips:
        if at < len(data):
            data[at] = byte
    (tmp_path / "f.jsonl.gz").write_bytes(bytes(data))
    items = list(readers.read_jsonl(str(tmp_path / "f.jsonl.gz"), RecordParser("text", None, "id")))
    if not flips:  # a cut file: the records before the cut, intact, then one reason
        good = [it for it in items if isinstance(it, Record)]
        assert [r.text for r in good] == [r["text"] for r in GZ_ROWS[: len(good)]]
        bad = [it for it in items if isinstance(it, BadRecord)]
        assert (not bad) == (cut in (0, len(GZ_DATA)))  # an empty file is an empty input, not a damaged one
        assert len(bad) <= 1 and (not bad or items[-1] is bad[0])


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=120).map(str.encode)), bom=st.booleans())
def test_fuzz_text_reader(tmp_path, data, bom):
    data = (b"\xef\xbb\xbf" if bom else b"") + data
    (tmp_path / "f.txt").write_bytes(data)
    with mock.patch.object(readers, "TEXT_BLOCK_BYTES", 16):
        items = list(readers.read_text(str(tmp_path / "f.txt"), RecordParser("text", None, None)))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = None
    if text is None or not text.strip() or "\0" in text:  # checked while streaming: the valid bytes before the damage stay
        assert isinstance(items[-1], BadRecord) and all(isinstance(it, Record) for it in items[:-1])
        try:
            data.decode("utf-8")
            damage = len(data)
        except UnicodeDecodeError as e:
            damage = e.start
        damage = min(damage, data.find(b"\0") % (len(data) + 1))
        valid = data[:damage].decode("utf-8").removeprefix("\ufeff")
        # damage in the first line of the first block rejects the file whole (not text); so does only blank text
        assert "".join(it.text for it in items[:-1]) == (valid if ("\n" in valid or damage >= 16) and valid.strip() else "")
    else:  # a good file is one record streamed in blocks: nothing lost, nothing added
        assert all(isinstance(it, Record) for it in items)
        assert "".join(it.text for it in items) == text
        assert [it.cont for it in items] == [False] + [True] * (len(items) - 1)


PQ_ROWS = [{"id": f"p{i}", "text": f"row {i} " + SENTENCES[i % 5]} for i in range(300)]
_buf = io.BytesIO()
pq.write_table(pa.Table.from_pylist(PQ_ROWS), _buf, row_group_size=60)
PQ_DATA = _buf.getvalue()


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, len(PQ_DATA) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, len(PQ_DATA))))
def test_fuzz_damaged_parquet(tmp_path, flips, cut):
    data = bytearray(PQ_DATA)
    for at, byte in flips:
        data[at] = byte
    (tmp_path / "f.parquet").write_bytes(bytes(data[:cut]))
    items = list(readers.read_parquet(str(tmp_path / "f.parquet"), RecordParser("text", None, "id")))
    lines = [it.line for it in items]  # no exception, each row at most once, in order
    assert lines == sorted(set(lines))
    assert all(isinstance(it, (Record, BadRecord)) for it in items)


# --------------------------------------------------------------------------------------------
# One record of several MB is a record like any other: kept, windowed, every byte accounted for
# --------------------------------------------------------------------------------------------
class ConstantProxy:
    """Stands in for the model where the test is about data handling: every scored position gets 1 nat."""

    def __init__(self, model, top_k=16, chunk_rows=None):
        pass

    def score_batch(self, windows):
        return constant_stats(windows)


def stream_text(rows: pl.DataFrame) -> str:
    """A stream's text rebuilt from its windows: later windows repeat their context-prefix bytes."""
    text = rows["text"][0]
    for t, ends, s in zip(rows["text"][1:], rows["token_bytes"][1:], rows["score_start"][1:]):
        text += t.encode()[ends[s - 1]:].decode()
    return text


def test_an_8_mb_line_is_read_whole(tmp_path):
    big = ("x" * 1000 + "\n") * 8000  # newlines inside the JSON string are escaped: still one line
    write_jsonl(tmp_path / "big.jsonl", [{"id": "big", "text": big}])
    (item,) = readers.read_jsonl(str(tmp_path / "big.jsonl"), RecordParser("text", None, "id"))
    assert isinstance(item, Record) and item.text == big


@pytest.mark.parametrize("megabytes", [pytest.param(1.2, id="1.2MB"), pytest.param(6, id="6MB", marks=pytest.mark.slow)])
def test_a_record_of_several_mb_is_kept_whole(tmp_path, tiny_llama, monkeypatch, megabytes):
    import rpt_data.pipeline as pipeline

    monkeypatch.setattr(pipeline, "Proxy", ConstantProxy)
    unit = " ".join(SENTENCES) + "\n"
    big = unit * int(megabytes * 2**20 / len(unit.encode()))
    rows = [{"id": "before", "text": SENTENCES[0]}, {"id": "big", "text": big}, {"id": "after", "text": SENTENCES[1]}]
    manifest = run_tag(TagConfig(inputs=[str(write_jsonl(tmp_path / "in.jsonl", rows))], model=str(tiny_llama),
                                 out=str(tmp_path / "o"), window=512, context_prefix=64, shard_rows=512,
                                 id_field="id", progress=False))
    assert manifest["records"] == 3 and manifest["bad_records"] == 0
    df = read_rows(tmp_path / "o")
    assert stream_text(df.filter(pl.col("doc_id") == "big").sort("window_index")) == big
    assert set(df["doc_id"]) == {"before", "big", "after"}


# --------------------------------------------------------------------------------------------
# kill -9 at random moments, again and again: the rerun completes and equals an uninterrupted run
# --------------------------------------------------------------------------------------------
def kill_runs(tmp_path: Path, model: Path, mode: str, seed: int, chains: int, kills: int = 0, sequence=None) -> dict:
    """Run data_helpers.kill_harness in one subprocess (it forks a child per tag run) and check that
    every chain of killed runs ends equal to the uninterrupted reference run."""
    if mode == "structured":
        inputs = [str(write_jsonl(tmp_path / "in.jsonl", records(14), {2: b"{cut", 7: b"[1]", 11: b"\xff\xfe"}))]
    else:
        (tmp_path / "docs").mkdir()
        write_jsonl(tmp_path / "docs" / "a.jsonl", records(6), {3: b"{cut"})
        write_jsonl(tmp_path / "docs" / "b.jsonl", records(9)[3:])
        (tmp_path / "docs" / "c.txt").write_text("\n".join(SENTENCES * 3))
        inputs = [str(tmp_path / "docs")]
    cfg = dict(inputs=inputs, model=str(model), window=16, context_prefix=4, shard_rows=4, batch_tokens=40,
               progress=False, mode=mode, id_field="id" if mode == "structured" else None)
    root = tmp_path / "runs"
    root.mkdir()
    plan = dict(cfg=cfg, root=str(root), seed=seed, chains=chains, kills=kills, sequence=sequence, kinds=KILL_KINDS)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r}); import data_helpers as h; h.kill_harness_main()",
         str(tmp_path / "plan.json"), str(tmp_path / "result.json")],
        capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    for c in range(chains):
        steps = [s for s in result["steps"] if s["chain"] == c]
        log = (root / f"chain{c}.log").read_text() if (root / f"chain{c}.log").exists() else ""
        assert all(s["exit"] in (0, -9) for s in steps), (steps, log[-3000:])  # 3 = a kill left a bad state
        assert steps[-1]["kind"] == "final" and steps[-1]["exit"] == 0, (steps, log[-3000:])
        same_output(root / f"chain{c}", root / "ref")
        assert validate_out(str(root / f"chain{c}")) == []
    return result


def test_kill_9_during_shard_write_manifest_write_rename_and_at_a_random_moment(tmp_path, tiny_llama):
    # count-based kinds first (deterministic for the seed), the timer last
    seq = ["shard", "manifest", "rename", "manifest", "shard", "timer"]
    result = kill_runs(tmp_path, tiny_llama, "structured", seed=7, chains=1, sequence=seq)
    killed = [s["kind"] for s in result["steps"] if s["killed"]]
    assert killed[:5] == seq[:5], result["steps"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["structured", "continuous"])
def test_kill_9_at_random_moments_again_and_again(tmp_path, tiny_llama, mode):
    result = kill_runs(tmp_path, tiny_llama, mode, seed=2024, chains=5, kills=8)
    killed = [s for s in result["steps"] if s["killed"]]  # a chain ends early when a rerun outran its kill point
    assert len(killed) >= 20 and {s["kind"] for s in killed} >= {"shard", "manifest", "rename", "timer"}


# --------------------------------------------------------------------------------------------
# NaN / inf logits: null stats, counted, never a tag
# --------------------------------------------------------------------------------------------
POISON = {1: "one NaN logit", 2: "one +inf logit", 3: "every logit -inf", 4: "+inf and -inf (fp16 overflow)"}


def test_nan_and_inf_logits_give_null_stats_that_are_counted_and_never_tagged(tmp_path, tiny_llama, monkeypatch):
    import rpt_data.entropy as entropy
    import rpt_data.proxy as proxy

    src = write_jsonl(tmp_path / "in.jsonl", records(10))
    cfg = dict(inputs=[str(src)], model=str(tiny_llama), window=16, context_prefix=4, shard_rows=8, progress=False,
               id_field="id", select_above=0.0)
    clean_manifest = run_tag(TagConfig(out=str(tmp_path / "clean"), **cfg))
    real = entropy.token_stats

    def faulty(logits, targets=None, top_k=16):
        x, t = logits.clone(), targets.long() % 7  # which fault a row gets depends on its target token
        x[t == 1, 5] = math.nan
        x[t == 2, 9] = math.inf
        x[t == 3] = -math.inf
        x[t == 4, 0], x[t == 4, 1] = math.inf, -math.inf
        return real(x, targets, top_k)

    monkeypatch.setattr(entropy, "token_stats", faulty)
    monkeypatch.setattr(proxy.Proxy, "verify", lambda self, ids: 0.0)  # the start-up check would refuse the poison
    manifest = run_tag(TagConfig(out=str(tmp_path / "o"), **cfg))
    monkeypatch.undo()

    df, clean = read_rows(tmp_path / "o"), read_rows(tmp_path / "clean")
    poisoned = 0
    for row, ref in zip(df.iter_rows(named=True), clean.iter_rows(named=True)):
        for t in range(row["score_start"], len(row["token_ids"])):
            if row["token_ids"][t] % 7 in POISON:
                poisoned += 1
                assert all(row[c][t] is None for c in ("entropy", "topk_entropy", "target_logprob", "proxy_argmax"))
                assert t not in row["selected"]
            else:
                assert row["topk_entropy"][t] == pytest.approx(ref["topk_entropy"][t], abs=1e-5)
                assert row["proxy_argmax"][t] == ref["proxy_argmax"][t]
    assert poisoned > 0 and clean_manifest["totals"]["nan"] == 0
    assert manifest["totals"]["nan"] == poisoned
    assert manifest["totals"]["selected"] == clean_manifest["totals"]["selected"] - poisoned  # threshold 0: all else
    assert validate_out(str(tmp_path / "o")) == []
    code, text = run("inspect", tmp_path / "o")
    assert code == 0, text


# --------------------------------------------------------------------------------------------
# Corrupt or foreign data: `rpt-data validate` names the file
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tagged(tmp_path_factory, tiny_llama):
    """A good output (4 shards) and a shard of the same corpus tagged with another tokenizer."""
    from tiny import make_model_dir

    root = tmp_path_factory.mktemp("validate")
    src = write_jsonl(root / "in.jsonl", records(12))
    base = dict(inputs=[str(src)], window=16, context_prefix=4, shard_rows=8, progress=False, id_field="id")
    run_tag(TagConfig(model=str(tiny_llama), out=str(root / "good"), **base))
    other = make_model_dir(root / "other-model", vocab_size=400)
    run_tag(TagConfig(model=str(other), out=str(root / "other"), **base))
    return root


def rewrite(path: Path, fn) -> None:
    table = pq.read_table(path)
    pq.write_table(fn(table), path)


def _corrupt(out: Path, case: str, other: Path) -> str:
    """Damage `out` as `case` says; returns the file name validate must name."""
    s0, s1 = out / "data" / "shard-00000-00000.parquet", out / "data" / "shard-00000-00001.parquet"
    mpath = out / "manifest.json"
    m = json.loads(mpath.read_text())
    if case == "truncated":
        s1.write_bytes(s1.read_bytes()[: s1.stat().st_size // 2])
        return s1.name
    if case == "bit_flip":
        data = bytearray(s0.read_bytes())
        data[len(data) // 2] ^= 0x01
        s0.write_bytes(bytes(data))
        return s0.name
    if case == "swapped":
        tmp = out / "x"
        s0.rename(tmp)
        s1.rename(s0)
        tmp.rename(s1)
        return s0.name
    if case == "schema":
        rewrite(s0, lambda t: t.set_column(1, "window_index", t["window_index"].cast(pa.int64())))
        return s0.name
    if case == "old_schema_version":
        rewrite(s0, lambda t: t.replace_schema_metadata({**t.schema.metadata, META_SCHEMA_VERSION.encode(): b"0"}))
        return s0.name
    if case == "other_tokenizer":
        shutil.copy(other / "data" / s0.name, s0)
        return s0.name
    if case == "other_tokenizer_unstamped":  # e.g. written by an older version or another tool
        shutil.copy(other / "data" / s0.name, s0)
        rewrite(s0, lambda t: t.replace_schema_metadata(None))
        return s0.name
    if case == "stray":
        shutil.copy(s1, out / "data" / "shard-00000-00099.parquet")
        return "shard-00000-00099.parquet"
    if case == "missing":
        s1.unlink()
        return s1.name
    if case == "counts":
        m["shards"][1]["rows"] += 1
        m["shards"][1]["selected"] -= 2
    elif case == "totals":
        m["totals"]["positions"] += 5
    elif case == "no_config":
        del m["config"]
    mpath.write_text(json.dumps(m))
    return s1.name if case == "counts" else "manifest.json"


VALIDATE_CASES = {  # case: (exit code, what the message says)
    "truncated": (1, "unreadable parquet"),
    "bit_flip": (1, "bytes differ from the ones the manifest recorded"),
    "swapped": (1, "bytes differ from the ones the manifest recorded"),
    "schema": (1, "column 'window_index' is int64, expected int32"),
    "old_schema_version": (1, "written with shard schema version 0"),
    "other_tokenizer": (1, "written with another tokenizer"),
    "other_tokenizer_unstamped": (1, "token ids outside the manifest tokenizer's vocabulary"),
    "stray": (1, "not listed in the manifest"),
    "missing": (1, "listed in the manifest but missing"),
    "counts": (1, "rows, manifest says"),
    "totals": (1, "totals say"),
    "no_config": (1, "malformed manifest"),
}


@pytest.mark.parametrize("case", list(VALIDATE_CASES))
def test_validate_names_the_corrupt_or_foreign_file(tmp_path, tagged, case):
    out = tmp_path / "o"
    shutil.copytree(tagged / "good", out)
    assert run("validate", out)[0] == 0
    name = _corrupt(out, case, tagged / "other")
    code, text = run("validate", out)
    want_code, phrase = VALIDATE_CASES[case]
    assert code == want_code and "Traceback" not in text, text
    assert any(name in line and phrase in line for line in text.splitlines()), text


@pytest.mark.parametrize("content,phrase", [("{\"schema_version\": 1, \"sha", "not valid JSON"),
                                            ("[]", "not an rpt-data manifest")])
def test_a_broken_manifest_is_named_in_one_sentence(tmp_path, tagged, content, phrase):
    out = tmp_path / "o"
    shutil.copytree(tagged / "good", out)
    (out / "manifest.json").write_text(content)
    for cmd in ("validate", "inspect"):
        code, text = run(cmd, out)
        assert code == 2 and "manifest.json" in text and phrase in text and "Traceback" not in text, text


def test_inspect_of_a_damaged_shard_points_to_validate(tmp_path, tagged):
    out = tmp_path / "o"
    shutil.copytree(tagged / "good", out)
    _corrupt(out, "truncated", tagged / "other")
    code, text = run("inspect", out)
    assert code == 2 and "rpt-data validate" in text and "Traceback" not in text, text


def test_resume_redoes_a_recorded_shard_that_was_damaged_later(tmp_path, tagged, tiny_llama):
    out = tmp_path / "o"
    shutil.copytree(tagged / "good", out)
    m = json.loads((out / "manifest.json").read_text())
    m["complete"] = False  # as if the job had stopped after its last shard
    (out / "manifest.json").write_text(json.dumps(m))
    _corrupt(out, "truncated", tagged / "other")
    run_tag(TagConfig(inputs=m["config"]["inputs"], model=str(tiny_llama), out=str(out), window=16, context_prefix=4,
                      shard_rows=8, progress=False, id_field="id"))
    same_output(out, tagged / "good")
    assert validate_out(str(out)) == []


# --------------------------------------------------------------------------------------------
# Disk full: one clear sentence, exit 2, and a rerun (with space back) equals an uninterrupted run
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_disk_ref(tmp_path_factory, tiny_llama):
    root = tmp_path_factory.mktemp("full-disk")
    src = write_jsonl(root / "in.jsonl", records(12), {4: b"{cut", 9: b"[]"})
    counts = dict.fromkeys(KILL_KINDS, 0)
    with pytest.MonkeyPatch.context() as mp:
        install_fault(None, 0, counts, patch=lambda o, n, v: mp.setattr(o, n, v, raising=False))
        assert run(*tag_args(src, root / "ref", tiny_llama, "--id-field", "id", "--shard-rows", 8))[0] == 0
    return src, root / "ref", counts


@pytest.mark.parametrize("kind,where", [("shard", "first"), ("shard", "middle"), ("manifest", "first"),
                                        ("manifest", "middle"), ("manifest", "last"), ("rejects", "first")])
def test_disk_full_is_one_sentence_and_the_rerun_completes(tmp_path, tiny_llama, monkeypatch, full_disk_ref, kind, where):
    src, ref, counts = full_disk_ref
    point = {"first": 1, "middle": counts[kind] // 2, "last": counts[kind]}[where]
    args = tag_args(src, tmp_path / "o", tiny_llama, "--id-field", "id", "--shard-rows", 8)
    install_fault(kind, point, dict.fromkeys(KILL_KINDS, 0), action="enospc",
                  patch=lambda o, n, v: monkeypatch.setattr(o, n, v, raising=False))
    code, text = run(*args)
    monkeypatch.undo()
    assert code == 2, text
    assert "no space left on the device" in text and "rerun the same command" in text and "Traceback" not in text
    assert not list((tmp_path / "o").glob("*.tmp"))  # the partial file is gone: the space is free again
    code, text = run(*args)
    assert code == 0, text
    same_output(tmp_path / "o", ref)
