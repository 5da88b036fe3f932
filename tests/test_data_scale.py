"""What a user tagging at scale meets: round record counts, hf:// text files, the proxy's context length, the
precision a resume runs in, directories with files of unknown format, defaults that fit the window."""
import json

import polars as pl
import pytest
import torch

from data_helpers import read_rows, write_jsonl
from rpt_common.errors import UserError
from rpt_data.config import TagConfig
from rpt_data.pipeline import run_tag


def tag(tmp_path, model, src, name="out", **kw):
    opts = dict(window=16, context_prefix=4, shard_rows=64, batch_tokens=256, progress=False, device="cpu") | kw
    cfg = TagConfig(inputs=[str(src)], model=str(model), out=str(tmp_path / name), **opts)
    return run_tag(cfg), tmp_path / name


def reopen(out):
    """Mark a finished run as stopped, so that the next run resumes it (and checks it) instead of skipping it."""
    m = json.loads((out / "manifest.json").read_text())
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))


def test_a_round_number_of_records_ends_and_resumes(tmp_path, tiny_llama):
    """256 records (the old tokenizer batch) crashed at the end with an IndexError, and again on resume."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"Record {i} says hello."} for i in range(300)])
    manifest, out = tag(tmp_path, tiny_llama, src, limit=256)
    assert manifest["complete"] and manifest["records"] == 256
    reopen(out)
    assert tag(tmp_path, tiny_llama, src, limit=256)[0]["complete"]


def test_hf_text_files_read_like_the_plain_path(tmp_path, tiny_llama):
    """datasets' text builder gives one row per line without its newline; hf:// must still give the file's text:
    blank lines kept, the final newline kept, one record (structured) or stream (continuous) per file."""
    from rpt_data.readers import RecordParser, expand_inputs, read_all

    (tmp_path / "txt").mkdir()
    body = "Chapter one.\n\nIt was a dark night.\n\n\nThe end.\n"
    (tmp_path / "txt" / "book.txt").write_text(body)
    parse = RecordParser("text", None, None)
    book = tmp_path / "txt" / "book.txt"
    for spec in (str(book), f"hf://{book}", f"hf://{tmp_path / 'txt'}"):
        recs = list(read_all(expand_inputs([spec], None), parse))
        assert "".join(r.text for r in recs) == body and [r.cont for r in recs] == [False], spec
    plain = tag(tmp_path, tiny_llama, tmp_path / "txt" / "book.txt", "plain", mode="continuous")[1]
    hf = tag(tmp_path, tiny_llama, f"hf://{tmp_path / 'txt'}", "hf", mode="continuous")[1]
    cols = ["window_index", "text", "token_ids", "token_bytes", "entropy"]
    assert read_rows(hf).select(cols).equals(read_rows(plain).select(cols))


def test_window_longer_than_the_proxys_context_is_refused(tmp_path, tiny_llama):
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    with pytest.raises(UserError, match=r"--window 600 is longer than the proxy's context of 512 tokens.*512 or less"):
        tag(tmp_path, tiny_llama, src, window=600)


def test_resume_compares_the_resolved_precision(tmp_path, tiny_llama):
    """`auto` is recorded as what it resolved to: the same precision spelled otherwise resumes, another is refused."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": f"Record {i} says hello."} for i in range(4)])
    manifest, out = tag(tmp_path, tiny_llama, src, dtype="auto")
    assert manifest["precision"] == {"device": "cpu", "dtype": "float32", "tf32": False}
    reopen(out)
    assert tag(tmp_path, tiny_llama, src, dtype="float32")[0]["complete"]  # what auto meant on this machine
    reopen(out)
    with pytest.raises(UserError, match="started with the proxy in float32 on cpu and this run would use bfloat16"):
        tag(tmp_path, tiny_llama, src, dtype="bfloat16")


def test_float32_means_float32_on_cuda():
    """TF32 only with a bf16/fp16 compute dtype: --dtype float32 must not run the trunk in TF32."""
    from rpt_common.models import enable_tf32

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        assert enable_tf32("cuda", torch.float32) is False and not torch.backends.cuda.matmul.allow_tf32
        assert not torch.backends.cudnn.allow_tf32
        assert enable_tf32("cuda", torch.bfloat16) is True and torch.backends.cuda.matmul.allow_tf32
        assert enable_tf32("cpu", torch.bfloat16) is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_directory_inputs_name_the_files_they_skip(tmp_path, capsys):
    from rpt_data.readers import expand_inputs

    d = tmp_path / "corpus"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"text": "x"}])
    for name in ("b.jsonl.zst", "c.txt.gz", "part-00000"):
        (d / name).write_bytes(b"?")
    assert [p for p, _ in expand_inputs([str(d)], None)] == [str(d / "a.jsonl")]
    err = capsys.readouterr().err
    assert "3 file(s)" in err and all(n in err for n in ("b.jsonl.zst", "c.txt.gz", "part-00000")) and "--format" in err


@pytest.mark.parametrize("window,prefix", [(1024, 256), (4096, 256), (256, 64), (16, 4), (2, 0)])
def test_the_default_context_prefix_follows_the_window(window, prefix):
    assert TagConfig(inputs=["x.jsonl"], out="o", window=window).context_prefix == prefix


def test_an_invalid_context_prefix_names_the_default():
    with pytest.raises(UserError, match=r"smaller than --window \(256\).*default, 64 for this window"):
        TagConfig(inputs=["x.jsonl"], out="o", window=256, context_prefix=256)


def test_help_states_the_default_context_prefix():
    from click.testing import CliRunner

    from rpt_data.cli import main

    text = " ".join(CliRunner().invoke(main, ["tag", "--help"]).output.split())
    assert "a quarter of --window, at most 256" in text


def test_shards_equal_the_whole_text_across_text_blocks(tmp_path, tiny_llama, monkeypatch):
    """A file read in tiny blocks and tokenized in tiny spans gives the shards of one whole-text tokenization."""
    import rpt_data.readers as readers
    import rpt_data.windows as windows

    body = ("A long line without a newline that crosses many blocks, naïve café 日本語 🙂 " * 8 + "\n\n") * 3
    (tmp_path / "a.txt").write_text(body)
    whole = read_rows(tag(tmp_path, tiny_llama, tmp_path / "a.txt", "whole", mode="continuous")[1])
    monkeypatch.setattr(readers, "TEXT_BLOCK_BYTES", 40)
    monkeypatch.setattr(windows, "SPAN_BYTES", 64)
    small = read_rows(tag(tmp_path, tiny_llama, tmp_path / "a.txt", "small", mode="continuous")[1])
    assert small.drop("doc_id").equals(whole.drop("doc_id")) and small.height > 3
    assert pl.Series(small["text"]).str.len_bytes().sum() > len(body.encode())  # windows overlap by the prefix
