"""A resume after input files were fixed in place (same files, same order, other contents) redoes only from the first
shard that may hold windows of the first changed file: the shards before it stand (same files on disk), and the result
is a fresh run's on the fixed inputs, for 1 and 2 ranks; added files, or a record from before shard `units`, refuse."""
import itertools
import json
import os

import pytest

from data_helpers import SENTENCES, records, write_jsonl
from rpt_common.errors import UserError
from rpt_data import pools
from rpt_data.config import TagConfig
from rpt_data.division import balance
from rpt_data.inspect import validate_out
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
    for s in m["shards"]:  # as an intermediate version wrote shards of segment windows: their unit unknown
        s["units"] = [-1, -1]
    (out / "manifest.json").write_text(json.dumps(m))
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
    """A file recut to another segment count is dealt afresh: a rank whose record names other segments refuses."""
    import rpt_data.segments as seg
    from rpt_data.pipeline import fingerprint, record_name, same_division

    monkeypatch.setattr(seg, "SEGMENT_BYTES", 300)
    files = [(str(tmp_path / "a.jsonl"), "jsonl")]
    cfg = TagConfig(inputs=[files[0][0]], out=str(tmp_path / "out"), **opts("demo", mode="continuous", rank=0,
                                                                              world_size=2))
    (tmp_path / "out").mkdir()
    (tmp_path / "a.jsonl").write_bytes(b"x" * 1200)
    was = [fingerprint(files[0][0])]
    old = seg.divide_segments(files, [1200], "continuous", None, 0, 2)
    (tmp_path / "out" / record_name(cfg)).write_text(json.dumps({"division": old.describe(), "inputs": was}))
    same_division(cfg, seg.divide_segments(files, [1200], "continuous", None, 0, 2), files, was)  # same deal
    (tmp_path / "a.jsonl").write_bytes(b"x" * 1500)
    with pytest.raises(UserError, match=r"rank 0 of 2 cannot resume: '.*a.jsonl' changed size since .* \(1,200 -> "
                                        r"1,500 bytes, now cut into 5 segments\), so rank 0 of 2 would now tokenize "
                                        r"other segments .* --overwrite"):
        same_division(cfg, seg.divide_segments(files, [1500], "continuous", None, 0, 2), files,
                      [fingerprint(files[0][0])])


def test_a_record_dealt_round_robin_refuses_naming_the_rule(tmp_path):
    """A 2-rank record from before `owner` (files dealt round-robin): when today's deal by size of the very same
    inputs gives the rank other files, the refusal says the dealing rule changed (not that the inputs did); when it
    gives the same files (equal sizes deal round-robin still), the rank resumes."""
    from rpt_data.division import divide
    from rpt_data.pipeline import fingerprint, record_name, same_division

    root = tmp_path / "in"
    root.mkdir()
    files = [(str(root / f"f{i}.jsonl"), "jsonl") for i in range(4)]
    cfg = TagConfig(inputs=[str(root / "*.jsonl")], out=str(tmp_path / "out"),
                    **opts("demo", mode="continuous", rank=0, world_size=2))
    (tmp_path / "out").mkdir()
    for sizes, refuses in (([100] * 4, False), ([100, 900, 500, 300], True)):
        for (p, _), b in zip(files, sizes):
            open(p, "wb").write(b"x" * b)
        inputs = [fingerprint(p) for p, _ in files]
        rec = {"inputs": inputs, "division": {"by": "files", "files": [files[0][0], files[2][0]]}}  # i % 2, no owner
        (tmp_path / "out" / record_name(cfg)).write_text(json.dumps(rec))
        now = divide(files, "continuous", None, 0, 2, sizes)
        if not refuses:
            same_division(cfg, now, files, inputs)
            continue
        with pytest.raises(UserError, match=r"rank 0 of 2 cannot resume: the rule that deals the input to the ranks "
                                            r"changed since '.*out' was started \(an older version dealt files "
                                            r"round-robin .*\), so rank 0 of 2 would now read other files, .* "
                                            r"--overwrite"):
            same_division(cfg, now, files, inputs)


SEG = dict(mode="continuous", shard_rows=2, batch_tokens=64)


def cut_small(monkeypatch):
    """Segments of 300 bytes (lead-in 64, text blocks of 50), pools of 2 shards of 16-token windows."""
    import rpt_data.readers as readers
    import rpt_data.segments as seg

    monkeypatch.setattr(seg, "SEGMENT_BYTES", 300)
    monkeypatch.setattr(seg, "LEAD_BYTES", 64)
    monkeypatch.setattr(readers, "TEXT_BLOCK_BYTES", 50)
    monkeypatch.setattr(pools, "LOOKAHEAD_TOKENS", 2 * 16)


def text_file(path, start: int, n: int):
    path.write_text("\n".join(SENTENCES[(start + j) % len(SENTENCES)] for j in range(n)) + "\n")


def two_files_on_two_ranks(tmp_path, model, monkeypatch, a0: tuple[int, int], a1: tuple[int, int]):
    """cut_small; text files a0 and a1 of (first sentence, lines) under tmp_path/in, read by one glob; a 2-rank
    run into tmp_path/out, divided by segments, merged. Returns (root, inputs, files, out, each rank's manifest)."""
    cut_small(monkeypatch)
    root = tmp_path / "in"
    root.mkdir()
    text_file(root / "a0.txt", *a0)
    text_file(root / "a1.txt", *a1)
    inputs = [str(root / "*.txt")]
    files = [(str(root / f"a{i}.txt"), "text") for i in range(2)]
    out = tmp_path / "out"
    first = [tag(inputs, model, out, rank=r, world_size=2, **SEG) for r in range(2)]
    assert first[0]["division"]["by"] == "segments"
    merge_out(str(out))
    return root, inputs, files, out, first


def rows_by_key(out):
    import collections

    from data_helpers import read_rows

    df = read_rows(out)
    return collections.Counter(zip(df["doc_id"].to_list(), df["token_start"].to_list()))


def refuse_then_overwrite(inputs, model, out, world, match):
    """Every rank refuses the resume (one sentence matching `match`, shards left alone), then reruns with
    --overwrite; merge."""
    for r in range(world):
        before = sorted(p.name for p in out.rglob("*"))
        with pytest.raises(UserError, match=match.format(r=r)):
            tag(inputs, model, out, rank=r, world_size=world, **SEG)
        assert sorted(p.name for p in out.rglob("*")) == before
    for r in range(world):
        tag(inputs, model, out, rank=r, world_size=world, overwrite=True, **SEG)
    return merge_out(str(out))


def test_a_file_fixed_past_the_segment_size_refuses_a_files_division(tmp_path, tiny_llama, monkeypatch):
    """Review of issue 32: 3 text files dealt to 2 ranks by files; a2 is fixed in place and grows past SEGMENT_BYTES,
    so the fixed inputs are divided by segments. No rank keeps shards written under the files division (the reviewer
    saw a rank that read none of the changed files keep them: rows written twice and rows lost, merged); each refuses
    naming a2 and --overwrite, and the result then holds a fresh run's rows, each once."""
    cut_small(monkeypatch)
    root = tmp_path / "in"
    root.mkdir()
    for i in range(3):
        text_file(root / f"a{i}.txt", i, 2 if i < 2 else 1)
    inputs = [str(root / "*.txt")]
    out = tmp_path / "out"
    for r in range(2):
        assert tag(inputs, tiny_llama, out, rank=r, world_size=2, **SEG)["division"]["by"] == "files"
    merge_out(str(out))
    text_file(root / "a2.txt", 2, 6)  # > 300 bytes: cut into segments
    manifest = refuse_then_overwrite(
        inputs, tiny_llama, out, 2, r"rank {r} of 2 cannot resume: '.*a2.txt' changed size since '.*out' was started "
        r"\(\d+ -> \d+ bytes, now cut into \d segments\), so the input is now divided between the ranks by segments, "
        r"not by files, and the shards it recorded belong to the old division; rerun it with --overwrite")
    assert manifest["division"] == "segments"
    tag(inputs, tiny_llama, tmp_path / "one", **SEG)
    assert set(rows_by_key(out).values()) == {1} and rows_by_key(out) == rows_by_key(tmp_path / "one")
    same_content(tmp_path / "one", out, 2)
    check_merge_refuses_other_divisions(out)


def check_merge_refuses_other_divisions(out):
    """`rpt-data merge` (and `validate`, from the rank records) checks that the ranks' divisions give every unit to
    exactly one rank and that each shard's units are its rank's: a rank record that claims another rank's segment,
    or a shard of another rank's file, is refused in one sentence."""
    names = [out / f"rank-0000{r}.json" for r in range(2)]
    good = [p.read_text() for p in names]
    recs = [json.loads(t) for t in good]
    division = recs[1]["division"]
    theirs = recs[0]["division"]["segments"][0]
    division["segments"] = sorted(division["segments"] + [theirs])  # rank 1 also tagged a segment of rank 0's
    del division["owner"]
    del recs[0]["division"]["owner"]
    for p, rec in zip(names, recs):
        p.write_text(json.dumps(rec))
    with pytest.raises(UserError, match=r"ranks 0 and 1 both tagged '.*' \(segment \d\), so the ranks' divisions of "
                                        r"the input disagree; rerun every rank with --overwrite"):
        merge_out(str(out))
    assert any("ranks 0 and 1 both tagged" in p for p in validate_out(str(out)))  # beside the merged manifest
    recs = [json.loads(t) for t in good]
    flipped = 1 - recs[0]["division"]["owner"][0][0]
    for rec in recs:  # both records give segment 0 of the first file to the rank that did not tag it
        rec["division"]["owner"][0][0] = flipped
    for p, rec in zip(names, recs):
        p.write_text(json.dumps(rec))
    with pytest.raises(UserError, match=r"rank \d tagged another part of the input than the division its record names"):
        merge_out(str(out))
    recs = [json.loads(t) for t in good]
    other = next(i for i, o in enumerate(recs[0]["division"]["owner"]) if 0 not in o)
    recs[0]["shards"][0]["units"] = [0, other]  # a shard of rank 0 with windows of a file only rank 1 reads
    names[0].write_text(json.dumps(recs[0]))
    names[1].write_text(good[1])
    with pytest.raises(UserError, match=r"shard .* of rank 0 holds windows of input file \d+ \('.*'\), which the "
                                        r"division gives to another rank"):
        merge_out(str(out))
    for r, rec in enumerate(json.loads(t) for t in good):  # shards an intermediate version wrote: units unknown (-1)
        for entry in rec["shards"]:
            entry["units"] = [-1, -1]
        names[r].write_text(json.dumps(rec))
    merge_out(str(out))
    assert validate_out(str(out)) == []
    for p, t in zip(names, good):
        p.write_text(t)
    merge_out(str(out))


def test_a_file_fixed_past_the_segment_size_refuses_a_windows_division(tmp_path, tiny_llama, monkeypatch):
    """One small file, 2 ranks: a `windows` stripe; fixed in place past SEGMENT_BYTES it is cut into segments, which
    are dealt: each rank refuses (naming the file) rather than keep its stripe's shards, then --overwrite."""
    cut_small(monkeypatch)
    root = tmp_path / "in"
    root.mkdir()
    text_file(root / "a0.txt", 0, 3)  # < 300 bytes
    inputs = [str(root / "a0.txt")]
    out = tmp_path / "out"
    for r in range(2):
        assert tag(inputs, tiny_llama, out, rank=r, world_size=2, **SEG)["division"]["by"] == "windows"
    merge_out(str(out))
    text_file(root / "a0.txt", 0, 14)
    manifest = refuse_then_overwrite(
        inputs, tiny_llama, out, 2, r"rank {r} of 2 cannot resume: '.*a0.txt' changed size .* now cut into \d "
        r"segments\), so the input is now divided between the ranks by segments, not by windows, .* --overwrite")
    assert manifest["division"] == "segments"
    tag(inputs, tiny_llama, tmp_path / "one", **SEG)
    same_content(tmp_path / "one", out, 2)


@pytest.mark.parametrize("grow", [False, True])
def test_a_segmented_file_fixed_in_place_resumes_as_a_fresh_run_or_refuses(tmp_path, tiny_llama, monkeypatch, grow):
    """2 ranks, a0 whole, a1 cut into segments. a1 fixed in place: (grow=False) to the same size (one sentence
    rewritten): the deal stands, the rank of a0 keeps its shards before a1's, the resume redoes from each rank's
    first shard of a1 and equals a fresh 2-rank run byte for byte; (grow=True) to another segment count, which deals
    the segments otherwise: a rank whose segments changed refuses in one sentence naming a1 (one whose segments did
    not would resume); after --overwrite, again a fresh run's bytes."""
    import rpt_data.segments as seg

    root, inputs, files, out, first = two_files_on_two_ranks(tmp_path, tiny_llama, monkeypatch, (3, 3), (0, 10))
    text = (root / "a1.txt").read_text()
    if grow:
        text_file(root / "a1.txt", 0, 16)  # 3 -> 4 segments
    else:
        (root / "a1.txt").write_text(text.replace("quick brown", "brown quick", 1))
        assert len((root / "a1.txt").read_text()) == len(text)
    sizes = [os.path.getsize(p) for p, _ in files]
    now = [seg.divide_segments(files, sizes, "continuous", None, r, 2).describe() for r in range(2)]
    moved = [now[r]["segments"] != first[r]["division"]["segments"] for r in range(2)]
    assert moved == ([True, True] if grow else [False, False]) or (grow and sum(moved) == 1)
    kept = [list(itertools.takewhile(lambda s: s["units"][1] < 1 and s["rows"] == 2, first[r]["shards"]))
            for r in range(2)]
    assert grow or any(kept)
    stand = [on_disk(out, k) for k in kept]
    for r in range(2):
        if moved[r]:
            with pytest.raises(UserError, match=rf"rank {r} of 2 cannot resume: '.*a1.txt' changed size .*now cut into "
                                                r"\d segments\), so .* --overwrite"):
                tag(inputs, tiny_llama, out, rank=r, world_size=2, **SEG)
        tag(inputs, tiny_llama, out, rank=r, world_size=2, overwrite=moved[r], **SEG)
        assert json.loads((out / f"rank-0000{r}.json").read_text())["division"] == now[r]
        if not moved[r]:
            assert on_disk(out, kept[r]) == stand[r]
    merge_out(str(out))
    for r in range(2):
        tag(inputs, tiny_llama, tmp_path / "fresh", rank=r, world_size=2, **SEG)
    merge_out(str(tmp_path / "fresh"))
    same_output(out, tmp_path / "fresh")


def test_a_resume_keeps_the_recorded_segment_owners(tmp_path, tiny_llama, monkeypatch, capsys):
    """Review of issue 32: segments are pinned as files are. a0 (small, not cut) and a1 (3 segments) on 2 ranks; a0
    fixed in place to another size that, dealt afresh, would move segments between both ranks (each would refuse).
    With the recorded owners kept no rank refuses: the rank of a0 redoes from a0's first shard, the other keeps its
    shards, every rank records the old division, and the merged run holds a 1-rank run's windows, each once. A file
    whose segment count changed is dealt afresh (test_a_segmented_file_fixed_in_place_resumes_as_a_fresh_run...)."""
    import rpt_data.segments as seg

    root, inputs, files, out, first = two_files_on_two_ranks(tmp_path, tiny_llama, monkeypatch, (0, 2), (0, 11))
    owner = first[0]["division"]["owner"]
    text_file(root / "a0.txt", 0, 1)  # a line removed: smaller, still one segment
    sizes = [os.path.getsize(p) for p, _ in files]
    dealt = [seg.divide_segments(files, sizes, "continuous", None, r, 2).describe() for r in range(2)]
    assert all(dealt[r]["segments"] != first[r]["division"]["segments"] for r in range(2))  # dealt afresh: both move
    pinned = [seg.divide_segments(files, sizes, "continuous", None, r, 2, owner).describe() for r in range(2)]
    assert pinned == [f["division"] for f in first]
    assert seg.divide_segments(files, [sizes[0], 3000], "continuous", None, 0, 2, owner).owner != owner  # recut
    a0 = owner[0][0]
    kept = first[1 - a0]["shards"]
    stand = on_disk(out, kept)
    for r in range(2):
        rec = tag(inputs, tiny_llama, out, rank=r, world_size=2, **SEG)
        assert rec["division"] == first[r]["division"]
    assert on_disk(out, kept) == stand
    merge_out(str(out))
    tag(inputs, tiny_llama, tmp_path / "one", **SEG)
    assert set(rows_by_key(out).values()) == {1} and rows_by_key(out) == rows_by_key(tmp_path / "one")
    same_content(tmp_path / "one", out, 2)
