"""Resume fingerprints name input files by resolved path: how a path was spelled, or the working directory it was
spelled from, does not make another input, and the same spelling from another directory is not the same input."""
import json
import os
import shutil

import pytest

from data_helpers import records, write_jsonl
from rpt_common.errors import UserError
from rpt_data.config import TagConfig
from rpt_data.merge import same_inputs
from rpt_data.pipeline import fingerprint, run_tag


def test_a_relative_path_from_another_directory_is_the_same_input(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    write_jsonl(tmp_path / "a" / "in.jsonl", records(2))
    monkeypatch.chdir(tmp_path / "a")
    here = fingerprint("in.jsonl")
    monkeypatch.chdir(tmp_path / "b")
    there = fingerprint("../a/in.jsonl")
    assert here["path"] != there["path"] and os.path.isabs(here["resolved"])
    assert same_inputs([here], [there])
    # an old record (no `resolved`, the path as given) is resolved against the directory it is resumed from
    old = {k: v for k, v in here.items() if k != "resolved"}
    monkeypatch.chdir(tmp_path / "a")
    assert same_inputs([old], [there])
    monkeypatch.chdir(tmp_path / "b")
    assert not same_inputs([old], [there])  # b/in.jsonl is not the file that was tagged


def _interrupt(out, old_format: bool):
    """The manifest of a run stopped after its first shard; `old_format`: as written before `resolved` existed."""
    m = json.loads((out / "manifest.json").read_text())
    for f in m["inputs"] if old_format else []:
        f.pop("resolved")
    m["complete"], m["shards"] = False, m["shards"][:1]
    (out / "manifest.json").write_text(json.dumps(m))


def test_resume_follows_the_file_not_the_spelling(tmp_path, monkeypatch, tiny_llama):
    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "a" / "in.jsonl", records(6))
    out = tmp_path / "out"
    cfg = dict(inputs=["in.jsonl"], model=str(tiny_llama), out=str(out), window=16, context_prefix=4, shard_rows=4,
               progress=False, device="cpu")
    monkeypatch.chdir(tmp_path / "a")
    first = run_tag(TagConfig(**cfg))
    assert first["inputs"][0]["resolved"] == str(tmp_path / "a" / "in.jsonl")
    _interrupt(out, old_format=True)
    assert run_tag(TagConfig(**cfg))["complete"]  # an old relative record resumes from where it was written
    # the same spelling in another directory names another file (same bytes, same mtime): not the same input
    (tmp_path / "b").mkdir()
    shutil.copy2(tmp_path / "a" / "in.jsonl", tmp_path / "b" / "in.jsonl")
    _interrupt(out, old_format=False)
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(UserError, match="input files changed"):
        run_tag(TagConfig(**cfg))
