"""A new user's first hour (issue 26): no traceback when no record yields text, shell escapes in --template, eval
and tagging progress that shows in a log, a resume that says so, a Ctrl-C hint, the real JSON column, -h."""
import json

import pytest
from click.testing import CliRunner
from shard_fixtures import train_shards  # noqa: F401

from data_helpers import read_rows, records, write_jsonl
from rpt_data.cli import main as data_main
from rpt_train.cli import main as train_main


def invoke(main, *args):
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output  # click >= 8.2: stdout and stderr as they interleaved


def tag(src, out, model, *extra):
    return invoke(data_main, "tag", "--input", src, "--model", model, "--out", out, "--window", 16,
                  "--context-prefix", 4, *extra)


def titled(n: int) -> list[dict]:
    return [{"title": f"Title {i}", "body": r["text"]} for i, r in enumerate(records(n))]


def _parquet_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "pq"
    d.mkdir()
    pq.write_table(pa.table({"content": [r["text"] for r in records(3)], "uid": ["a", "b", "c"]}), d / "p.parquet")
    return d


# (input maker, options of the failing command, what its sentence says, options of the corrected command)
NO_TEXT = {
    "no text field": (lambda p: write_jsonl(p / "in.jsonl", titled(3)), [],
                      ["missing field 'text' (fields: title, body)", "--text-field NAME or --template"],
                      ["--text-field", "body"]),
    "wrong --text-field": (lambda p: write_jsonl(p / "in.jsonl", records(3)), ["--text-field", "content"],
                           ["missing field 'content' (fields: id, text)"], ["--text-field", "text"]),
    "template field missing": (lambda p: write_jsonl(p / "in.jsonl", titled(3)), ["--template", "{title}: {abstract}"],
                               ["missing field 'abstract' used by --template (fields: title, body)"],
                               ["--template", "{title}: {body}"]),
    "empty jsonl": (lambda p: write_jsonl(p / "in.jsonl", []), [], ["holds no record"], None),
    "parquet dir without text": (_parquet_dir, [], ["no column 'text' (columns: content, uid)"],
                                 ["--text-field", "content"]),
    "hf:// parquet without --text-field": (lambda p: f"hf://{_parquet_dir(p) / 'p.parquet'}", [],
                                           ["no column 'text' (columns: content, uid)"], ["--text-field", "content"]),
}


@pytest.mark.parametrize("case", list(NO_TEXT))
def test_no_record_with_text_is_one_sentence_and_the_corrected_command_starts_over_in_the_same_out(
        tmp_path, tiny_llama, case):
    make, bad, says, fixed = NO_TEXT[case]
    src, out = make(tmp_path), tmp_path / "o"
    code, text = tag(src, out, tiny_llama, *bad)
    assert code == 2 and "Traceback" not in text, text
    assert f"no record of '{src}' yields text" in text and all(s in text for s in says), text
    assert not (out / "manifest.json").exists()  # nothing to resume: a corrected command is not refused
    if fixed:
        code, text = tag(src, out, tiny_llama, *fixed)
        assert code == 0 and "differ" not in text, text
        assert json.loads((out / "manifest.json").read_text())["records"] == 3


def test_limit_0_is_no_error(tmp_path, tiny_llama):
    code, text = tag(write_jsonl(tmp_path / "in.jsonl", records(3)), tmp_path / "o", tiny_llama, "--limit", 0,
                     "--no-progress")
    assert code == 0, text
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["totals"]["rows"] == 0


def test_escapes_typed_in_template_and_separator_are_newlines_and_tabs(tmp_path, tiny_llama):
    """What bash passes for --template "{title}\\n\\n{body}": a backslash and an n, read as a newline."""
    src = write_jsonl(tmp_path / "in.jsonl", titled(2))
    code, text = tag(src, tmp_path / "o", tiny_llama, "--template", r"{title}\n\t{body}", "--mode", "continuous",
                     "--separator", r"\n--\\n", "--window", 512, "--no-progress")
    assert code == 0, text
    rows = titled(2)
    want = "\n--\\n".join(f"{r['title']}\n\t{r['body']}" for r in rows)
    assert read_rows(tmp_path / "o")["text"].to_list() == [want]
    code, text = invoke(data_main, "tag", "-h")
    assert r"(\n, \t and \\ are read as newline, tab and backslash)" in " ".join(text.split())


def test_json_error_column_is_the_column_on_the_line(tmp_path):
    from rpt_data.readers import RecordParser, read_jsonl

    cut = '{"id": "a", "text": "the line was cut'
    mid = '{"id": "b", "text": "a comma is missing here --" "n": 1}'
    p = tmp_path / "bad.jsonl"
    p.write_text(f"{cut}\n{mid}\r\n")
    reasons = [r.reason for r in read_jsonl(str(p), RecordParser("text", None, None))]
    at = mid.index('"n"') + 1  # 1-based column of the missing comma's successor
    assert at == 50 and reasons == ["malformed JSON: Unterminated string starting at column 21",
                                    f"malformed JSON: Expecting ',' delimiter at column {at}"]


def test_tagging_progress_in_a_log_and_a_resume_that_says_so(tmp_path, tiny_llama):
    """stderr is not a terminal under CliRunner: a line per shard written; a resumed run first says so."""
    src = write_jsonl(tmp_path / "in.jsonl", records(12))
    code, text = tag(src, tmp_path / "o", tiny_llama, "--shard-rows", 4)
    assert code == 0, text
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    n = len(manifest["shards"])
    assert n >= 3 and all(f"tagging: {s['file']} written ({i} shard{'s' if i > 1 else ''} done)" in text
                          for i, s in enumerate(manifest["shards"], 1))
    # the state a kill after shard n-1 leaves: n-1 shards recorded, the run not complete
    (tmp_path / "o" / manifest["shards"][-1]["file"]).unlink()
    manifest.update(complete=False, shards=manifest["shards"][:-1])
    (tmp_path / "o" / "manifest.json").write_text(json.dumps(manifest))
    code, text = tag(src, tmp_path / "o", tiny_llama, "--shard-rows", 4)
    assert code == 0, text
    assert text.lstrip().startswith(f"resuming after {n - 1} shards already in '{tmp_path / 'o'}'"), text
    assert f"({n} shards done)" in text and "(1 shard done)" not in text


def test_tagging_progress_lines_come_every_few_seconds_while_a_shard_is_scored(capsys):
    from rpt_data.progress import TagProgress

    with TagProgress(line_seconds=0.0) as progress:
        progress.records(3)
        progress.tokens(100)
    assert "tagging: scoring: 3 records, 100 tokens" in capsys.readouterr().err


def test_ctrl_c_while_tagging_says_a_rerun_resumes(tmp_path, tiny_llama, monkeypatch):
    import rpt_data.pipeline as pipeline

    src = write_jsonl(tmp_path / "in.jsonl", records(12))
    write_shard, calls = pipeline.write_shard, []

    def interrupted_at_the_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write_shard(*a, **kw)

    monkeypatch.setattr(pipeline, "write_shard", interrupted_at_the_second)
    code, text = tag(src, tmp_path / "o", tiny_llama, "--shard-rows", 4, "--no-progress")
    assert code == 130 and "Aborted" not in text
    assert "interrupted" in text and "rerun the same command to resume" in text
    monkeypatch.setattr(pipeline, "write_shard", write_shard)
    code, text = tag(src, tmp_path / "o", tiny_llama, "--shard-rows", 4, "--no-progress")
    assert code == 0 and "resuming after 1 shard already in" in text, text


def test_refusal_grammar_one_option_differs(tmp_path, tiny_llama):
    src, out = write_jsonl(tmp_path / "in.jsonl", records(3)), tmp_path / "o"
    assert tag(src, out, tiny_llama, "--no-progress")[0] == 0
    code, text = tag(src, out, tiny_llama, "--window", 32, "--no-progress")
    assert code == 2 and "(window differs)" in text, text
    code, text = tag(src, out, tiny_llama, "--window", 32, "--top-k", 4, "--no-progress")
    assert code == 2 and "differ)" in text and "differs)" not in text, text


@pytest.mark.parametrize("args", [["-h"], ["run", "-h"], ["eval", "-h"], ["plan", "-h"], ["export", "-h"]])
def test_rpt_train_h_is_help(args):
    code, text = invoke(train_main, *args)
    assert code == 0 and "Usage:" in text and "Options:" in text, text


def test_eval_shows_progress_and_states_its_cost(tiny_llama, train_shards):  # noqa: F811
    code, text = invoke(train_main, "eval", "--shards", train_shards, "--model", tiny_llama, "--limit", 2,
                        "--samples", 1, "--max-new-tokens", 2)
    assert code == 0, text
    head = f"eval {tiny_llama} (1+1 completions of <= 2 tokens each): "  # the model is named (--baseline has two)
    lines = [x[len(head) - 2:] for x in text.splitlines() if x.startswith(head)]
    assert lines, text
    assert lines[0].split(": ")[1].startswith("0/") and lines[-1].split(": ")[1].split(" ")[0] in \
        {f"{n}/{n}" for n in range(1, 9)}, text
    code, text = invoke(train_main, "eval", "-h")
    assert "--limit 8 --samples 1 --max-new-tokens 256" in " ".join(text.split())


@pytest.mark.parametrize("mistake", ["missing shards", "no position above --min-entropy"])
def test_a_run_refused_before_its_first_step_leaves_no_config_behind(tmp_path, tiny_llama, train_shards,  # noqa: F811
                                                                     mistake):
    out = tmp_path / "run"
    shards, extra = (tmp_path / "nope", []) if mistake == "missing shards" else (train_shards, ["--min-entropy", 99])
    code, text = invoke(train_main, "run", "--shards", shards, "--model", tiny_llama, "--out", out, "--steps", 1,
                        *extra)
    assert code == 2 and "Traceback" not in text, text
    assert not (out / "config.yaml").exists()


def test_ctrl_c_during_a_training_run_says_how_to_resume(tmp_path, tiny_llama, train_shards, monkeypatch):  # noqa: F811
    import rpt_train.trainer as trainer

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "collect", interrupted)
    code, text = invoke(train_main, "run", "--shards", train_shards, "--model", tiny_llama, "--out", tmp_path / "run",
                        "--steps", 2, "--batch-prompts", 2, "--group-size", 2, "--max-new-tokens", 2, "--bucket", "all")
    assert code == 130 and "Aborted" not in text, text
    assert "rerun the same command with --resume" in text and "no checkpoint yet" in text, text
