"""`rpt-data` through its command line: bad input policies, clear errors, inspect and validate."""
import gzip
import json

import pytest
from click.testing import CliRunner

from data_helpers import records, write_jsonl
from rpt_data.cli import main

BAD_LINES = {
    1: b"{not json",
    2: b'{"id": "x", "text": "caf\xe9 latin-1"}',
    3: b"[1, 2, 3]",
    4: b'{"id": "y"}',
    5: b'{"id": "z", "text": "   "}',
    6: b'{"id": "w", "text": 42}',
}
REASONS = ["malformed JSON", "invalid UTF-8", "not a JSON object", "missing field 'text'", "empty text",
           "is int, not a string"]


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def tag_args(src, out, model, *extra):
    return ["tag", "--input", src, "--model", model, "--out", out, "--window", 16, "--context-prefix", 4,
            "--no-progress", *extra]


def test_skip_keeps_every_good_record_and_lists_rejects(tmp_path, tiny_llama):
    src = write_jsonl(tmp_path / "in.jsonl", records(8), BAD_LINES)
    code, out = run(*tag_args(src, tmp_path / "o", tiny_llama, "--id-field", "id"))
    assert code == 0, out
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["records"] == 8 and manifest["bad_records"] == len(BAD_LINES)
    rejects = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    # bad line i was written before good row i: good rows 0..i-1 and bad lines 1..i-1 precede it
    assert [r["line"] for r in rejects] == [2 * i for i in BAD_LINES]
    for r, reason in zip(rejects, REASONS):
        assert reason in r["reason"] and r["file"] == str(src)


@pytest.mark.parametrize("bad_index", list(BAD_LINES))
def test_fail_names_file_and_line(tmp_path, tiny_llama, bad_index):
    src = write_jsonl(tmp_path / "in.jsonl", records(8), {bad_index: BAD_LINES[bad_index]})
    code, out = run(*tag_args(src, tmp_path / "o", tiny_llama, "--on-bad-record", "fail"))
    assert code == 2
    assert f"{src}:{bad_index + 1}" in out and REASONS[bad_index - 1] in out
    assert "Traceback" not in out


def test_truncated_gzip_keeps_records_before_the_cut(tmp_path, tiny_llama):
    data = gzip.compress(write_jsonl(tmp_path / "a.jsonl", records(50)).read_bytes())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) * 2 // 3])
    code, out = run(*tag_args(tmp_path / "cut.jsonl.gz", tmp_path / "o", tiny_llama))
    assert code == 0, out
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert 0 < manifest["records"] < 50 and manifest["bad_records"] == 1
    assert "truncated" in (tmp_path / "o" / "rejects.jsonl").read_text()


def test_parquet_without_the_text_column_is_rejected_by_policy(tmp_path, tiny_llama):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "wrong.parquet")
    write_jsonl(tmp_path / "good.jsonl", records(2))
    code, out = run(*tag_args(tmp_path / "good.jsonl", tmp_path / "o", tiny_llama, "--input", tmp_path / "wrong.parquet"))
    assert code == 0, out
    assert "no column 'text'" in (tmp_path / "o" / "rejects.jsonl").read_text()
    code, out = run(*tag_args(tmp_path / "wrong.parquet", tmp_path / "o2", tiny_llama, "--on-bad-record", "fail"))
    assert code == 2 and "wrong.parquet" in out and "no column 'text'" in out


@pytest.mark.parametrize("case,expect", [
    ("missing_input", "does not exist"),
    ("missing_model", "does not exist"),
    ("not_a_model", "not a Hugging Face model directory"),
    ("foreign_out", "did not write"),
    ("bad_option", "--context-prefix must be"),
])
def test_one_sentence_errors_exit_2(tmp_path, tiny_llama, case, expect):
    src = write_jsonl(tmp_path / "in.jsonl", records(2))
    model, out, extra = tiny_llama, tmp_path / "o", []
    if case == "missing_input":
        src = tmp_path / "nope.jsonl"
    elif case == "missing_model":
        model = tmp_path / "no-model"
    elif case == "not_a_model":
        (tmp_path / "empty").mkdir()
        model = tmp_path / "empty"
    elif case == "foreign_out":
        out.mkdir()
        (out / "thesis.tex").write_text("x")
    elif case == "bad_option":
        extra = ["--context-prefix", "16"]
    code, text = run(*tag_args(src, out, model, *extra))
    assert code == 2 and expect in text and "Traceback" not in text


def test_recipe_with_cli_override(tmp_path, tiny_llama):
    src = write_jsonl(tmp_path / "in.jsonl", records(3))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"tag:\n  input: [{src}]\n  model: {tiny_llama}\n  window: 16\n  context-prefix: 4\n"
                      f"  out: {tmp_path / 'o'}\n  select-above: 9.0\n")
    code, out = run("tag", recipe, "--select-above", "0.1", "--no-progress")
    assert code == 0, out
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["config"]["select_above"] == 0.1
    recipe.write_text("tag:\n  windw: 3\n")
    code, out = run("tag", recipe)
    assert code == 2 and "unknown option" in out and "windw" in out


def test_inspect_and_validate(tmp_path, tiny_llama):
    src = write_jsonl(tmp_path / "in.jsonl", records(10))
    assert run(*tag_args(src, tmp_path / "o", tiny_llama, "--shard-rows", 4))[0] == 0
    code, out = run("inspect", tmp_path / "o", "--plot", tmp_path / "h.png", "--top", 3)
    assert code == 0, out
    assert "by position in window" in out and "hardest positions" in out and "easy" in out
    assert (tmp_path / "h.png").stat().st_size > 1000
    assert run("validate", tmp_path / "o")[0] == 0

    shards = sorted((tmp_path / "o").glob("**/shard-*.parquet"))
    shards[1].write_bytes(shards[1].read_bytes()[:100])  # truncate one shard
    code, out = run("validate", tmp_path / "o")
    assert code == 1 and shards[1].name in out and "unreadable" in out
    for args in (("inspect", tmp_path / "o"), ("inspect", tmp_path / "o", "--html", tmp_path / "v.html")):
        code, out = run(*args)  # inspect and view name the damaged shard too
        assert code == 2 and shards[1].name in " ".join(out.split()), (args, out)
    from rpt_common.errors import UserError
    from rpt_data.view import write_html

    with pytest.raises(UserError, match=shards[1].name):  # the page's own read names it too
        write_html(str(tmp_path / "o"), str(tmp_path / "v.html"))
    shards[1].unlink()
    code, out = run("validate", tmp_path / "o")
    assert code == 1 and "missing" in out


def test_validate_catches_a_foreign_schema_version(tmp_path, tiny_llama):
    src = write_jsonl(tmp_path / "in.jsonl", records(2))
    assert run(*tag_args(src, tmp_path / "o", tiny_llama))[0] == 0
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    m["schema_version"] = 99
    (tmp_path / "o" / "manifest.json").write_text(json.dumps(m))
    code, out = run("validate", tmp_path / "o")
    assert code == 2 and "schema version 99" in out


def test_help_documents_every_option():
    code, out = run("tag", "--help")
    assert code == 0
    for opt in ("--input", "--format", "--text-field", "--template", "--id-field", "--mode", "--model", "--window",
                "--context-prefix", "--top-k", "--metric", "--select-above", "--buckets", "--batch-tokens",
                "--device", "--dtype", "--out", "--shard-rows", "--overwrite", "--on-bad-record", "--limit",
                "--rank", "--world-size"):
        assert opt in out
