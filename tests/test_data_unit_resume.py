"""A resume after input files were fixed in place (same files, same order, other contents) redoes only from the first
shard that may hold windows of the first changed file: the shards before it stand (same files on disk), and the result
is a fresh run's on the fixed inputs, for 1 and 2 ranks; added files, or a record from before shard `units`, refuse."""
import json
import os

import pytest

from data_helpers import SENTENCES, records, write_jsonl
from rpt_common.errors import UserError
from rpt_data import pools
from rpt_data.config import TagConfig
from rpt_data.division import balance
from rpt_data.merge import merge_out
from rpt_data.pipeline import run_tag
from test_data_multirank import opts, same_content

BAD = b"{cut"


def corpus(root, fixed: bool = False):
    """4 files (input order a0..a3); a0 has a bad line that stays, a2 one that the fix (which rewrites a2 only)
    replaces by 3 more records (a2 grows from the smallest file to the largest: dealt by the new sizes, files
    would move between ranks). One sentence a record: a window or two each."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"r{i}", "text": SENTENCES[i % len(SENTENCES)]} for i in range(13)]
    write_jsonl(root / "a2.jsonl", rows[6:7] + (rows[10:13] if fixed else []), None if fixed else {0: BAD})
    if not fixed:
        write_jsonl(root / "a0.jsonl", rows[0:3], {1: BAD})
        write_jsonl(root / "a1.jsonl", rows[3:6])
        write_jsonl(root / "a3.jsonl", rows[7:10])
    return [str(root / "*.jsonl")]


def tag(inputs, model, out, **kw):
    return run_tag(TagConfig(inputs=inputs, out=str(out), **opts(model, **{"shard_rows": 2, "batch_tokens": 256, **kw})))


def on_disk(out, shards):
    return {s["file"]: (os.stat(out / s["file"]).st_ino, os.stat(out / s["file"]).st_mtime_ns) for s in shards}


def same_output(a, b):
    """Byte-identical shards, and the same manifest and rejects (but for the output directory)."""
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["shards"] == mb["shards"]
    for s in ma["shards"]:
        assert (a / s["file"]).read_bytes() == (b / s["file"]).read_bytes(), s["file"]
    for key in ("complete", "records", "bad_records", "bad_reasons", "totals", "inputs"):
        assert ma[key] == mb[key], key
    assert (a / "rejects.jsonl").read_text() == (b / "rejects.jsonl").read_text()


@pytest.mark.parametrize("mode,pool", [("structured", 1), ("continuous", 1), ("structured", 2)])
def test_fixing_one_file_redoes_from_its_first_shard(tmp_path, tiny_llama, monkeypatch, capsys, mode, pool):
    monkeypatch.setattr(pools, "LOOKAHEAD_TOKENS", pool * 2 * 16)  # `pool` shards of 2 windows of 16 tokens
    inputs = corpus(tmp_path / "in")
    out = tmp_path / "out"
    first = tag(inputs, tiny_llama, out, mode=mode)
    assert first["bad_records"] == 2 and all("units" in s for s in first["shards"])
    before = [s for s in first["shards"] if s["units"][1] < 2 and s["rows"] == 2]
    kept = before[: len(before) // pool * pool]  # the cut goes back to the start of its pool
    assert 0 < len(kept) < len(first["shards"])
    stand = on_disk(out, kept)

    corpus(tmp_path / "in", fixed=True)
    capsys.readouterr()
    resumed = tag(inputs, tiny_llama, out, mode=mode)
    err = capsys.readouterr().err
    assert f"1 input file(s) changed since '{out}' was started ('{tmp_path / 'in' / 'a2.jsonl'}'); keeping the " \
           f"first {len(kept)} shard(s) and redoing the other {len(first['shards']) - len(kept)}" in err
    assert on_disk(out, kept) == stand  # (a) not rewritten
    assert resumed["bad_records"] == 1 and len(resumed["shards"]) > len(first["shards"])

    tag(inputs, tiny_llama, tmp_path / "fresh", mode=mode)
    same_output(out, tmp_path / "fresh")  # (b) a fresh run on the fixed inputs, byte for byte


@pytest.mark.parametrize("limit", [None, 1000])  # --limit: every rank reads every file (a records division)
def test_two_ranks_keep_their_files_and_merge_like_one_rank(tmp_path, tiny_llama, monkeypatch, capsys, limit):
    monkeypatch.setattr(pools, "LOOKAHEAD_TOKENS", 2 * 16)
    inputs = corpus(tmp_path / "in")
    out = tmp_path / "two"
    kw = dict(limit=limit)
    ranks = [tag(inputs, tiny_llama, out, rank=r, world_size=2, **kw) for r in range(2)]
    merge_out(str(out))
    division = ranks[0]["division"]
    assert division["by"] == ("files" if limit is None else "records")

    corpus(tmp_path / "in", fixed=True)
    if limit is None:  # a2 (index 2) is now the largest file: dealt by the new sizes, files would move
        sizes = [os.path.getsize(tmp_path / "in" / f"a{i}.jsonl") for i in range(4)]
        assert balance(sizes, 2) != division["owner"]
    fixer = division["owner"][2] if limit is None else 1
    other = 1 - fixer
    stand = {r: on_disk(out, ranks[r]["shards"]) for r in range(2)}
    tag(inputs, tiny_llama, out, rank=fixer, world_size=2, **kw)
    with pytest.raises(UserError, match=r"saw other contents of '.*a2.jsonl' than rank 0 .*rerun every rank with "
                                        "the same options"):
        merge_out(str(out))  # the other rank has not seen the fix yet
    capsys.readouterr()
    again = tag(inputs, tiny_llama, out, rank=other, world_size=2, **kw)
    if limit is None:  # a rank that reads no changed file keeps every shard, and records the new fingerprints
        assert f"rank {other} reads none of them: its {len(ranks[other]['shards'])} shard(s) stand" in \
               capsys.readouterr().err
        assert on_disk(out, again["shards"]) == stand[other]
    records_now = [json.loads((out / f"rank-0000{r}.json").read_text()) for r in range(2)]
    assert all(rec["division"] == ranks[r]["division"] for r, rec in enumerate(records_now))  # pinned
    merge_out(str(out))

    tag(inputs, tiny_llama, tmp_path / "one", **kw)
    same_content(tmp_path / "one", out, 2)  # (c) the rows, counts and rejects of 1 rank on the fixed inputs


def test_a_rank_started_after_the_fix_takes_the_recorded_division(tmp_path, tiny_llama):
    inputs = corpus(tmp_path / "in")
    out = tmp_path / "two"
    tag(inputs, tiny_llama, out, rank=0, world_size=2)  # rank 1 has not run when a2 is fixed
    owner = json.loads((out / "rank-00000.json").read_text())["division"]["owner"]
    corpus(tmp_path / "in", fixed=True)
    tag(inputs, tiny_llama, out, rank=1, world_size=2)
    assert json.loads((out / "rank-00001.json").read_text())["division"]["owner"] == owner
    tag(inputs, tiny_llama, out, rank=0, world_size=2)
    merge_out(str(out))
    tag(inputs, tiny_llama, tmp_path / "one")
    same_content(tmp_path / "one", out, 2)


def test_an_added_file_or_an_old_record_still_refuses(tmp_path, tiny_llama):
    inputs = corpus(tmp_path / "in")
    out = tmp_path / "out"
    tag(inputs, tiny_llama, out)
    write_jsonl(tmp_path / "in" / "a4.jsonl", records(2))
    with pytest.raises(UserError, match=r"the input files changed since .*\('.*a4.jsonl'\); rerun with --overwrite"):
        tag(inputs, tiny_llama, out)  # (d)
    os.remove(tmp_path / "in" / "a4.jsonl")
    m = json.loads((out / "manifest.json").read_text())
    for s in m["shards"]:  # as written before shards recorded their units
        del s["units"]
    (out / "manifest.json").write_text(json.dumps(m))
    corpus(tmp_path / "in", fixed=True)
    with pytest.raises(UserError, match=r"the input files changed since .*\('.*a2.jsonl'\); rerun with --overwrite"):
        tag(inputs, tiny_llama, out)


def test_a_fixed_file_of_an_hf_glob_is_one_unit(tmp_path, tiny_llama, monkeypatch, capsys):
    """hf:// data files: one unit (dataset shard) per file, fingerprinted by its own file."""
    monkeypatch.setattr(pools, "LOOKAHEAD_TOKENS", 2 * 16)
    corpus(tmp_path / "in")
    inputs = [f"hf://{tmp_path / 'in'}/*.jsonl"]
    out = tmp_path / "out"
    first = tag(inputs, tiny_llama, out)
    assert [f["shard"] for f in first["inputs"]] == [0, 1, 2, 3] and first["bad_records"] == 2
    kept = [s for s in first["shards"] if s["units"][1] < 2 and s["rows"] == 2]
    stand = on_disk(out, kept)
    corpus(tmp_path / "in", fixed=True)
    capsys.readouterr()
    tag(inputs, tiny_llama, out)
    assert f"('{inputs[0]}#2'); keeping the first {len(kept)} shard(s)" in capsys.readouterr().err
    assert kept and on_disk(out, kept) == stand
    tag(inputs, tiny_llama, tmp_path / "fresh")
    same_output(out, tmp_path / "fresh")


def test_a_fixed_file_cut_into_segments_is_one_unit(tmp_path, tiny_llama, monkeypatch, capsys):
    """Continuous mode, a file cut into segments (rpt_data.segments): its windows carry the file as their unit, so
    fixing a bad line in it redoes from the first shard that holds any of its windows; earlier shards stand."""
    import rpt_data.readers as readers
    import rpt_data.segments as seg

    monkeypatch.setattr(seg, "SEGMENT_BYTES", 300)
    monkeypatch.setattr(seg, "LEAD_BYTES", 64)
    monkeypatch.setattr(readers, "TEXT_BLOCK_BYTES", 50)
    monkeypatch.setattr(pools, "LOOKAHEAD_TOKENS", 2 * 16)
    root = tmp_path / "in"
    root.mkdir()
    rows = records(14)
    write_jsonl(root / "a0.jsonl", rows[:3])
    write_jsonl(root / "a1.jsonl", rows[3:], {6: BAD})
    inputs = [str(root / "*.jsonl")]
    out = tmp_path / "out"
    first = tag(inputs, tiny_llama, out, mode="continuous")
    assert seg.cut_counts([(str(root / "a1.jsonl"), "jsonl")]) and first["bad_records"] == 1
    assert all("units" in s for s in first["shards"])
    kept = [s for s in first["shards"] if s["units"][1] < 1 and s["rows"] == 2]
    assert 0 < len(kept) < len(first["shards"])
    stand = on_disk(out, kept)
    write_jsonl(root / "a1.jsonl", rows[3:9] + [{"id": "fix", "text": SENTENCES[2]}] + rows[9:])
    capsys.readouterr()
    resumed = tag(inputs, tiny_llama, out, mode="continuous")
    assert f"('{root / 'a1.jsonl'}'); keeping the first {len(kept)} shard(s)" in capsys.readouterr().err
    assert on_disk(out, kept) == stand and resumed["bad_records"] == 0
    tag(inputs, tiny_llama, tmp_path / "fresh", mode="continuous")
    same_output(out, tmp_path / "fresh")


def test_a_multirank_resume_refuses_other_segments(tmp_path, monkeypatch):
    """Segments are not pinned: a rank whose record names other segments than the fixed inputs deal it refuses."""
    import rpt_data.segments as seg
    from rpt_data.pipeline import record_name, same_segments

    monkeypatch.setattr(seg, "SEGMENT_BYTES", 300)
    files = [(str(tmp_path / "a.jsonl"), "jsonl")]
    cfg = TagConfig(inputs=[files[0][0]], out=str(tmp_path / "out"), **opts("demo", mode="continuous", rank=0,
                                                                              world_size=2))
    (tmp_path / "out").mkdir()
    old = seg.divide_segments(files, [1200], "continuous", None, 0, 2)
    (tmp_path / "out" / record_name(cfg)).write_text(json.dumps({"division": old.describe()}))
    same_segments(cfg, seg.divide_segments(files, [1200], "continuous", None, 0, 2))  # same deal: resumes
    with pytest.raises(UserError, match="would read other segments .* --overwrite"):
        same_segments(cfg, seg.divide_segments(files, [1500], "continuous", None, 0, 2))
