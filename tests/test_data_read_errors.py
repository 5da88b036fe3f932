"""Read errors (EIO, ESTALE on shared storage, a file replaced mid-run) under every division. read_unit reads a unit
again after an error and passes over the items it already gave, so a transient error on one rank is healed with the
same numbering: in a `records` or `windows` division (every rank numbers every record) N ranks still tag exactly
what 1 rank tags. An error at the same item on every try is damage: one bad record, reported by one rank. An error
that moves between tries stops a striped run in one sentence (the ranks' numbering would diverge)."""
import errno
import json

import pytest

import rpt_data.readers as readers
from data_helpers import SENTENCES, read_rows, records, write_jsonl
from rpt_common.errors import UserError
from rpt_data.config import TagConfig
from rpt_data.pipeline import run_tag
from rpt_data.readers import BadRecord, ReadError, Record, RecordParser, read_unit
from test_data_multirank import opts, same_content, tag_ranks

PARSE = RecordParser("text", None, None)


def faulty(monkeypatch, fmt: str, name: str, plan) -> dict:
    """READERS[fmt] reading the file `name` raises EIO before its item plan(rank, read) (None: no error), where
    `read` counts the reads of that file by this rank (0 the first, then read_unit's retries) and `rank` is
    state["rank"] (set it before each rank's run; reads are counted afresh then)."""
    real = readers.READERS[fmt]
    state = {"rank": 0, "reads": 0}

    def reader(path, parse, *args, **kw):
        at = None
        if path.endswith(name):
            at = plan(state["rank"], state["reads"])
            state["reads"] += 1
        for n, item in enumerate(real(path, parse, *args, **kw)):
            if n == at:
                raise OSError(errno.EIO, "Input/output error")
            yield item

    monkeypatch.setitem(readers.READERS, fmt, reader)
    return state


def run_ranks(inputs, model, out, world, state, **kw) -> dict:
    """tag_ranks with state["rank"] set for each rank."""
    for r in range(world):
        state.update(rank=r, reads=0)
        run_tag(TagConfig(inputs=inputs, out=str(out), rank=r, world_size=world, **opts(model, **kw)))
    from rpt_data.merge import merge_out

    return merge_out(str(out))


def structured(root):
    """Two jsonl files (fewer than 3 ranks: a `records` division), one malformed line so rejects are compared too."""
    root.mkdir()
    rows = records(24)
    write_jsonl(root / "a.jsonl", rows[:12], {2: b"{cut"})
    write_jsonl(root / "b.jsonl", rows[12:])
    return [str(root / "a.jsonl"), str(root / "b.jsonl")], dict(id_field="id")


def continuous(root, monkeypatch):
    """One text file (fewer files than ranks: a `windows` division) read in 100-byte blocks."""
    root.mkdir()
    monkeypatch.setattr(readers, "TEXT_BLOCK_BYTES", 100)
    (root / "a.txt").write_text("\n".join(SENTENCES * 6) + "\n")
    return [str(root / "a.txt")], dict(mode="continuous")


CASES = {"records": ("jsonl", "a.jsonl", 6), "windows": ("text", "a.txt", 4)}  # fmt, failing file, failing item


def case_inputs(tmp_path, monkeypatch, case):
    return structured(tmp_path / "in") if case == "records" else continuous(tmp_path / "in", monkeypatch)


@pytest.mark.parametrize("case", CASES)
def test_a_transient_error_on_one_rank_is_healed_with_the_same_numbering(tmp_path, tiny_llama, monkeypatch, case):
    """Rank 1 of 3 fails once mid-file; the 3 ranks together tag exactly what 1 rank tags (each doc once)."""
    inputs, kw = case_inputs(tmp_path, monkeypatch, case)
    fmt, name, at = CASES[case]
    run_tag(TagConfig(inputs=inputs, out=str(tmp_path / "one"), **opts(tiny_llama, **kw)))
    state = faulty(monkeypatch, fmt, name, lambda rank, read: at if (rank, read) == (1, 0) else None)
    manifest = run_ranks(inputs, tiny_llama, tmp_path / "three", 3, state, **kw)
    assert manifest["division"] == case
    same_content(tmp_path / "one", tmp_path / "three", 3)
    rows = read_rows(tmp_path / "three").filter(read_rows(tmp_path / "three")["window_index"] == 0)
    assert rows["doc_id"].is_unique().all()


@pytest.mark.parametrize("case", CASES)
def test_damage_at_the_same_item_on_every_read_is_one_bad_record_listed_once(tmp_path, tiny_llama, monkeypatch, case):
    """Every read of the file fails at the same item, on every rank: one bad record (line after the last read),
    in the rejects once across ranks; what comes before it is tagged, as by 1 rank."""
    inputs, kw = case_inputs(tmp_path, monkeypatch, case)
    fmt, name, at = CASES[case]
    state = faulty(monkeypatch, fmt, name, lambda rank, read: at)
    state["rank"] = 0
    run_tag(TagConfig(inputs=inputs, out=str(tmp_path / "one"), **opts(tiny_llama, **kw)))
    manifest = run_ranks(inputs, tiny_llama, tmp_path / "three", 3, state, **kw)
    same_content(tmp_path / "one", tmp_path / "three", 3)
    rejects = [json.loads(x) for x in (tmp_path / "three" / "rejects.jsonl").read_text().splitlines()]
    errors = [r for r in rejects if r["reason"].startswith("read error")]
    assert len(errors) == 1 and errors[0]["file"].endswith(name) and errors[0]["line"] > 1
    assert "Input/output error" in errors[0]["reason"] and manifest["bad_reasons"]["read error"] == 1
    if case == "records":  # a.jsonl's first 6 items (one malformed) and all of b.jsonl are tagged
        docs = set(read_rows(tmp_path / "three")["doc_id"])
        assert docs == {f"r{i}" for i in [*range(5), *range(12, 24)]}


@pytest.mark.parametrize("case", CASES)
def test_an_error_that_moves_stops_a_striped_run_naming_file_and_line(tmp_path, tiny_llama, monkeypatch, case):
    inputs, kw = case_inputs(tmp_path, monkeypatch, case)
    fmt, name, at = CASES[case]
    state = faulty(monkeypatch, fmt, name, lambda rank, read: (at if read == 0 else 2) if rank == 1 else None)
    with pytest.raises(ReadError, match=rf"read errors in '.*{name}' that move between 4 tries .*: at line \d+ "
                                        r"\(OSError: \[Errno 5\] Input/output error\), last at line \d+"):
        run_ranks(inputs, tiny_llama, tmp_path / "three", 3, state, **kw)


@pytest.mark.parametrize("case", CASES)
def test_an_error_that_persists_on_one_rank_only_is_refused_by_the_merge(tmp_path, tiny_llama, monkeypatch, case):
    """Every read of rank 1 fails at the same item (a node whose mount stays broken), the other ranks read on: rank 1
    cannot tell this from damage, so the merge compares the ranks' read errors and refuses, naming file, line, rank."""
    inputs, kw = case_inputs(tmp_path, monkeypatch, case)
    fmt, name, at = CASES[case]
    state = faulty(monkeypatch, fmt, name, lambda rank, read: at if rank == 1 else None)
    with pytest.raises(UserError, match=rf"rank 1 could not read '.*{name}' from line \d+ on \(a read error.* where "
                                        rf"ranks 0 and 2 read on: every rank of a {case} stripe .* rerun rank 1 "
                                        r"with --overwrite"):
        run_ranks(inputs, tiny_llama, tmp_path / "three", 3, state, **kw)


def long_lines(path):
    """Text whose lines are longer than a 50-byte block, so several blocks start on the same line."""
    path.write_text("".join(f"line {i} " + "abcdefghij " * 12 + "\n" for i in range(6)))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
def test_read_unit_heals_a_transient_error_with_the_same_items(tmp_path, monkeypatch, fmt):
    """The retry passes over the items already given by count: text blocks that share a line are neither lost nor
    given twice."""
    monkeypatch.setattr(readers, "TEXT_BLOCK_BYTES", 50)
    path = long_lines(tmp_path / "a.txt") if fmt == "text" else write_jsonl(tmp_path / "a.jsonl", records(9), {4: b"{"})
    key = lambda items: [(type(i).__name__, i.line, i.text if isinstance(i, Record) else i.reason) for i in items]
    clean = key(read_unit(str(path), fmt, PARSE, striped=True))
    if fmt == "text":
        lines = [line for _, line, _ in clean]
        assert len(set(lines)) < len(lines)  # blocks sharing a line
    faulty(monkeypatch, fmt, path.name, lambda rank, read: {0: 5, 1: 2}.get(read))  # fails twice, then reads on
    assert key(read_unit(str(path), fmt, PARSE, striped=True)) == clean


def test_a_moving_error_outside_a_stripe_is_one_bad_record_after_the_last_item_read(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", records(9))
    state = faulty(monkeypatch, "jsonl", "a.jsonl", lambda rank, read: [5, 2, 6, 7][read])
    items = list(read_unit(str(path), "jsonl", PARSE))
    assert [i.line for i in items if isinstance(i, Record)] == [1, 2, 3, 4, 5, 6, 7]
    assert [(b.line, b.kind) for b in items if isinstance(b, BadRecord)] == [(8, "read error")]
    state["reads"] = 0
    with pytest.raises(ReadError, match=r"at line 6 .* last at line 8"):
        list(read_unit(str(path), "jsonl", PARSE, striped=True))


def test_a_unit_that_shrank_between_reads_stops_a_striped_run(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", records(9))
    real = readers.READERS["jsonl"]
    reads = []

    def shrinking(p, parse):
        reads.append(p)
        for n, item in enumerate(real(p, parse)):
            if len(reads) == 1 and n == 5:
                write_jsonl(path, records(3))  # replaced by a shorter file, then the old handle fails
                raise OSError(errno.ESTALE, "Stale file handle")
            yield item

    monkeypatch.setitem(readers.READERS, "jsonl", shrinking)
    with pytest.raises(ReadError, match=r"a\.jsonl' changed while it was read: a read error at line 6 .*Stale.*ended "
                                        r"at line 4"):
        list(read_unit(str(path), "jsonl", PARSE, striped=True))


@pytest.mark.parametrize("fmt", ["jsonl", "text"])
def test_a_transient_error_in_a_segmented_file_is_healed(tmp_path, monkeypatch, fmt):
    """A `segments` rank reads its segments from their byte ranges (several reader calls, seeks): a read error there
    is retried too and gives the items of an error-free read."""
    import rpt_data.segments as seg

    monkeypatch.setattr(seg, "SEGMENT_BYTES", 2000)
    monkeypatch.setattr(seg, "LEAD_BYTES", 64)
    monkeypatch.setattr(readers, "TEXT_BLOCK_BYTES", 50)
    path = tmp_path / f"a.{'jsonl' if fmt == 'jsonl' else 'txt'}"
    if fmt == "jsonl":
        write_jsonl(path, records(240))
    else:
        path.write_text("\n".join(SENTENCES * 120) + "\n")
    count = seg.cut_counts([(str(path), fmt)])[str(path)]
    owned = lambda k: k in (1, 2, count - 1)  # two runs: a seek and a lead-in between them
    key = lambda items: [(type(i).__name__, i.line, i.text if isinstance(i, Record) else i.reason) for i in items]
    clean = key(seg.read_segments(str(path), fmt, PARSE, count, owned, 4))
    name = "read_jsonl" if fmt == "jsonl" else "read_text"
    real, calls, fired = getattr(readers, name), [], []

    def failing(*args, **kw):  # the 3rd reader call (the second run's) fails after 4 items, on the first read only
        calls.append(1)
        for i, item in enumerate(real(*args, **kw)):
            if len(calls) == 3 and i == 4:
                fired.append(1)
                raise OSError(errno.EIO, "Input/output error")
            yield item

    monkeypatch.setattr(readers, name, failing)
    assert key(seg.read_segments(str(path), fmt, PARSE, count, owned, 4)) == clean
    assert fired
