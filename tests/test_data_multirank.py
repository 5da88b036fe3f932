"""Multi-rank `rpt-data tag`: N ranks (independent processes, torchrun, a rank killed and rerun) plus the
merge give the content of one rank; merge refuses what is not finished; ranks come from the environment."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from data_helpers import SENTENCES, read_rows, records, write_jsonl
from rpt_common.errors import UserError
from rpt_common.shards import with_logged_shards
from rpt_data.cli import main
from rpt_data.config import TagConfig
from rpt_data.division import divide
from rpt_data.inspect import inspect_out, validate_out
from rpt_data.merge import merge_out
from rpt_data.pipeline import run_tag
from rpt_data.ranks import RankInfo, rank_device, resolve_ranks

STATS = ["entropy", "topk_entropy", "target_logprob"]
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def opts(model, **kw) -> dict:
    return dict(model=str(model), window=16, context_prefix=4, shard_rows=3, batch_tokens=40, progress=False) | kw


def corpus(root: Path, case: str) -> tuple[list[str], dict]:
    """Inputs and options of each division case; bad lines and a duplicate id so rejects are merged too."""
    root.mkdir(parents=True, exist_ok=True)
    rows = records(10)
    if case == "structured-files":  # 3 files >= 2 ranks: whole files, file i -> rank i % 2
        for i in range(3):
            write_jsonl(root / f"{i}.jsonl", rows[i::3], {1: b"{cut"} if i == 1 else None)
        return [str(root / "*.jsonl")], dict(id_field="id")
    if case == "structured-sizes":  # files of unequal size: dealt longest first, not i % 2
        for i, n in enumerate([5, 1, 1, 3]):
            write_jsonl(root / f"{i}.jsonl", rows[sum([5, 1, 1, 3][:i]):][:n], {1: b"{cut"} if i == 3 else None)
        return [str(root / "*.jsonl")], dict(id_field="id")
    if case == "structured-stripes":  # one file < 2 ranks: record k -> rank k % 2
        dup = {"id": "r2", "text": "a second record with the id r2"}
        write_jsonl(root / "in.jsonl", rows[:6] + [dup] + rows[6:], {3: b"{cut", 4: b"[1]"})
        return [str(root / "in.jsonl")], dict(id_field="id")
    if case == "continuous-windows":  # one stream < 2 ranks: window g -> rank g % 2
        write_jsonl(root / "in.jsonl", rows, {5: b"{cut"})
        return [str(root / "in.jsonl")], dict(mode="continuous")
    if case == "continuous-files":
        write_jsonl(root / "a.jsonl", rows[:6], {2: b"{cut"})
        (root / "b.txt").write_text("\n".join(SENTENCES * 2))
        return [str(root / "a.jsonl"), str(root / "b.txt")], dict(mode="continuous")
    raise ValueError(case)


def tag_ranks(inputs, model, out: Path, world: int, **kw) -> dict:
    """World ranks as independent processes would run them (here one after the other), then the merge."""
    for r in range(world):
        run_tag(TagConfig(inputs=inputs, out=str(out), rank=r, world_size=world, **opts(model, **kw)))
    return merge_out(str(out))


def same_content(one: Path, many: Path, world: int) -> None:
    """The N-rank output holds the 1-rank output's windows (same tokens, same stats up to batching
    round-off), counts and rejects, and validates."""
    a, b = read_rows(one), read_rows(many)
    assert a.drop(STATS).equals(b.drop(STATS))
    for col in STATS:
        x, y = a[col].explode(), b[col].explode()
        assert x.is_null().equals(y.is_null())
        assert np.allclose(x.drop_nulls().to_numpy(), y.drop_nulls().to_numpy(), atol=1e-5), col
    m1, mn = (json.loads((d / "manifest.json").read_text()) for d in (one, many))
    assert mn["complete"] and mn["world_size"] == world
    for key in ("records", "bad_records", "bad_reasons", "totals", "inputs", "tokenizer", "proxy"):
        assert mn[key] == m1[key], key
    assert {k: v for k, v in mn["config"].items() if k not in ("out", "world_size")} == \
           {k: v for k, v in m1["config"].items() if k not in ("out", "world_size", "rank")}
    assert (many / "rejects.jsonl").read_text() == (one / "rejects.jsonl").read_text()
    assert validate_out(str(many)) == []


@pytest.mark.parametrize("case", ["structured-files", "structured-sizes", "structured-stripes", "continuous-windows",
                                  "continuous-files"])
def test_two_independent_ranks_and_merge_equal_one_rank(tmp_path, tiny_llama, case):
    inputs, kw = corpus(tmp_path / "in", case)
    run_tag(TagConfig(inputs=inputs, out=str(tmp_path / "one"), **opts(tiny_llama, **kw)))
    manifest = tag_ranks(inputs, tiny_llama, tmp_path / "two", 2, **kw)
    assert manifest["division"] == case.split("-")[1].replace("stripes", "records").replace("sizes", "files")
    if case == "structured-sizes":  # the largest file alone on rank 0; the three others, as many bytes, on rank 1
        names = [[Path(p).name for p in json.loads((tmp_path / "two" / f"rank-0000{r}.json").read_text())["division"]
                  ["files"]] for r in range(2)]
        assert names == [["0.jsonl"], ["1.jsonl", "2.jsonl", "3.jsonl"]]
    same_content(tmp_path / "one", tmp_path / "two", 2)
    assert all(json.loads((tmp_path / "two" / f"rank-0000{r}.json").read_text())["records"] > 0 for r in range(2))
    if case == "structured-stripes":
        assert json.loads((tmp_path / "one" / "manifest.json").read_text())["bad_reasons"]["duplicate id"] == 1


def test_limit_counts_records_of_the_whole_run(tmp_path, tiny_llama):
    inputs, kw = corpus(tmp_path / "in", "structured-files")
    run_tag(TagConfig(inputs=inputs, out=str(tmp_path / "one"), limit=5, **opts(tiny_llama, **kw)))
    assert tag_ranks(inputs, tiny_llama, tmp_path / "three", 3, limit=5, **kw)["division"] == "records"
    same_content(tmp_path / "one", tmp_path / "three", 3)


def clean_env() -> dict:
    """This process's environment without any launcher's rank variables (the test may run under one)."""
    return {k: v for k, v in os.environ.items()
            if k not in LAUNCHER_ENV and not k.startswith(("SLURM_", "TORCHELASTIC"))}


def test_torchrun_two_processes_rank_0_writes_the_manifest(tmp_path, tiny_llama):
    inputs, kw = corpus(tmp_path / "in", "continuous-windows")
    run_tag(TagConfig(inputs=inputs, out=str(tmp_path / "one"), device="cpu", **opts(tiny_llama, **kw)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "rpt_data.cli", "tag", "--input", inputs[0], "--model", tiny_llama, "--out", tmp_path / "tr",
           "--mode", "continuous", "--window", "16", "--context-prefix", "4", "--shard-rows", "3",
           "--batch-tokens", "40", "--device", "cpu", "--no-progress"]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300,
                          env=clean_env() | {"OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "all 2 ranks are done" in proc.stderr
    assert {p.name for p in (tmp_path / "tr").glob("rank-*.json")} == {"rank-00000.json", "rank-00001.json"}
    same_content(tmp_path / "one", tmp_path / "tr", 2)


def test_a_rank_started_without_torchrun_stops_before_its_work(tmp_path, tiny_llama):
    """One process started with torchrun's variables (RANK=0, WORLD_SIZE=2, MASTER_ADDR) but without torchrun: it
    stops within the join timeout, before tagging, naming the address and what to do (before, it tagged its half
    and then waited at the end barrier up to 7 days, saying nothing)."""
    import socket

    inputs, kw = corpus(tmp_path / "in", "continuous-windows")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "rpt_data.cli", "tag", "--input", inputs[0], "--model", tiny_llama, "--out",
           tmp_path / "tr", "--mode", "continuous", "--window", "16", "--context-prefix", "4", "--device", "cpu",
           "--no-progress"]
    env = clean_env() | {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                         "MASTER_PORT": str(port), "RPT_JOIN_RANKS_S": "3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, env=env,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode != 0
    assert f"rank 0 of 2: the other ranks did not join torch.distributed at 127.0.0.1:{port} within 3 s" in proc.stderr
    assert "Start every rank with torchrun" in proc.stderr
    assert not list((tmp_path / "tr").glob("**/*.parquet"))


LATE_RANK_0 = """
import os, sys, time
from pathlib import Path
from rpt_data.ranks import process_group, resolve_ranks, wait_for_ranks
with process_group(resolve_ranks()) as dist:
    if dist.get_rank() == 0:
        time.sleep(8)  # rank 0's stripe takes longer than the join timeout
    wait_for_ranks(dist)
    Path(sys.argv[1], f"passed-{dist.get_rank()}").touch()
"""


def test_ranks_done_early_wait_past_the_join_timeout(tmp_path):
    """Under torchrun, the join timeout bounds only the join: a rank done long before rank 0 (uneven stripes, a
    resume whose other ranks were done) waits at the end barrier (before, a group made with the join timeout gave
    it to every wait: rank 1 failed after it and torchrun stopped the job, no manifest)."""
    script = tmp_path / "late.py"
    script.write_text(LATE_RANK_0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
                          env=clean_env() | {"RPT_JOIN_RANKS_S": "3", "OMP_NUM_THREADS": "1",
                                             "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in tmp_path.glob("passed-*")} == {"passed-0", "passed-1"}


KILL_RANK = """
import json, os, signal, sys
import rpt_data.pipeline as P
from rpt_data.config import TagConfig
orig, calls = P.append_json_line, []
def dying(path, obj):  # the 2nd entry of the shard log: shard 1 is renamed into place but never recorded
    calls.append(path)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(path, obj)
P.append_json_line = dying
P.run_tag(TagConfig(**json.loads(sys.argv[1])))
"""


def test_a_killed_rank_reruns_alone_and_the_merge_equals_one_rank(tmp_path, tiny_llama):
    inputs, kw = corpus(tmp_path / "in", "structured-stripes")
    one, out = tmp_path / "one", tmp_path / "two"
    run_tag(TagConfig(inputs=inputs, out=str(one), **opts(tiny_llama, **kw)))
    rank1 = dict(inputs=inputs, out=str(out), rank=1, world_size=2, **opts(tiny_llama, **kw))
    run_tag(TagConfig(**dict(rank1, rank=0)))
    proc = subprocess.run([sys.executable, "-c", KILL_RANK, json.dumps(rank1)], capture_output=True, text=True,
                          env=clean_env(), timeout=300)
    assert proc.returncode == -9, proc.stderr[-3000:]
    partial = with_logged_shards(json.loads((out / "rank-00001.json").read_text()), out / "shards-00001.jsonl")
    assert not partial["complete"] and len(partial["shards"]) == 1 and (out / "data" / "shard-00001-00001.parquet").exists()

    with pytest.raises(UserError, match="rank 1 of 2 has not finished .*rerun it with the same options"):
        merge_out(str(out))
    for check in (validate_out, inspect_out):
        with pytest.raises(UserError, match=r"rank 1 of 2 has not finished; run `rpt-data merge"):
            check(str(out))

    rank0 = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if "00000" in p.name}
    run_tag(TagConfig(**rank1))
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if "00000" in p.name} == rank0
    with pytest.raises(UserError, match="all 2 ranks are complete but not merged yet"):
        validate_out(str(out))
    merge_out(str(out))
    same_content(one, out, 2)


def test_merge_refuses_a_missing_or_incomplete_rank_a_missing_shard_and_other_options(tmp_path, tiny_llama):
    inputs, kw = corpus(tmp_path / "in", "structured-stripes")
    out = tmp_path / "two"
    base = dict(inputs=inputs, out=str(out), world_size=2, **opts(tiny_llama, **kw))
    with pytest.raises(UserError, match="not a directory"):
        merge_out(str(out))
    run_tag(TagConfig(rank=0, **base))
    with pytest.raises(UserError, match=r"rank 1 of 2 has not started \(no rank-00001.json"):
        merge_out(str(out))
    run_tag(TagConfig(rank=1, **base))
    assert merge_out(str(out))["world_size"] == 2

    record = out / "rank-00001.json"
    saved = record.read_text()
    record.write_text(json.dumps(dict(json.loads(saved), complete=False)))
    with pytest.raises(UserError, match="rank 1 of 2 has not finished"):
        merge_out(str(out))
    record.write_text(saved)

    (out / "data" / "shard-00001-00002.parquet").unlink()
    with pytest.raises(UserError, match="shard data/shard-00001-00002.parquet of rank 1 is missing; rerun that rank"):
        merge_out(str(out))
    run_tag(TagConfig(rank=1, **base))  # the rerun redoes the missing shard and the ones after it
    merge_out(str(out))
    assert validate_out(str(out)) == []

    run_tag(TagConfig(rank=1, **dict(base, select_above=0.9, overwrite=True)))
    assert not (out / "manifest.json").exists()  # a rank that starts over withdraws the merged manifest
    with pytest.raises(UserError, match=r"rank 1 was tagged with other options than rank 0 \(select_above differs\)"):
        merge_out(str(out))
    run_tag(TagConfig(rank=1, **dict(base, overwrite=True)))
    merge_out(str(out))

    record.write_text(json.dumps(dict(json.loads(record.read_text()),
                                      precision={"device": "cuda", "dtype": "bfloat16", "tf32": True})))
    with pytest.raises(UserError, match="rank 1 ran the proxy in another precision than rank 0"):
        merge_out(str(out))

    run_tag(TagConfig(inputs=inputs, out=str(tmp_path / "one"), **opts(tiny_llama, **kw)))
    with pytest.raises(UserError, match="holds no rank records"):
        merge_out(str(tmp_path / "one"))


def test_runs_with_another_world_size_never_mix(tmp_path, tiny_llama):
    inputs, kw = corpus(tmp_path / "in", "structured-files")
    one = tmp_path / "one"
    run_tag(TagConfig(inputs=inputs, out=str(one), **opts(tiny_llama, **kw)))
    with pytest.raises(UserError, match="world_size differ"):
        run_tag(TagConfig(inputs=inputs, out=str(one), rank=1, world_size=2, **opts(tiny_llama, **kw)))
    assert validate_out(str(one)) == []  # the 1-rank output is untouched
    tag_ranks(inputs, tiny_llama, tmp_path / "three", 3, **kw)
    with pytest.raises(UserError, match="world_size differ"):  # rank 2 of the 3-rank run is not part of a 2-rank run
        run_tag(TagConfig(inputs=inputs, out=str(tmp_path / "three"), rank=0, world_size=2, **opts(tiny_llama, **kw)))
    with pytest.raises(UserError, match="world_size differ"):
        run_tag(TagConfig(inputs=inputs, out=str(tmp_path / "three"), **opts(tiny_llama, **kw)))


def cli(args, env=None):
    result = CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_cli_slurm_array_tasks_then_merge_command(tmp_path, tiny_llama, monkeypatch):
    for k in set(os.environ) - set(clean_env()):
        monkeypatch.delenv(k)
    inputs, kw = corpus(tmp_path / "in", "structured-stripes")
    run_tag(TagConfig(inputs=inputs, out=str(tmp_path / "one"), **opts(tiny_llama, **kw)))
    args = ["tag", "--input", inputs[0], "--model", tiny_llama, "--out", tmp_path / "arr", "--id-field", "id",
            "--window", 16, "--context-prefix", 4, "--shard-rows", 3, "--batch-tokens", 40, "--no-progress"]
    array = {"SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_MAX": "5", "SLURM_ARRAY_TASK_COUNT": "2",
             "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_ID": "78"}
    code, text = cli(args, env=array | {"SLURM_ARRAY_TASK_ID": "5"})
    assert code == 0 and "rank 1 of 2 is done; run `rpt-data merge" in text, text
    code, text = cli(["merge", tmp_path / "arr"])
    assert code == 2 and "rank 0 of 2 has not started" in text and "Traceback" not in text
    code, text = cli(args, env=array | {"SLURM_ARRAY_TASK_ID": "4"})
    assert code == 0, text
    code, text = cli(["merge", tmp_path / "arr"])
    assert code == 0 and "merged 2 ranks" in text, text
    same_content(tmp_path / "one", tmp_path / "arr", 2)
    code, text = cli(args + ["--rank", 1], env=array | {"SLURM_ARRAY_TASK_ID": "4"})
    assert code == 2 and "--rank and --world-size go together" in text


def test_help_explains_rank_defaults_and_merge():
    code, text = cli(["tag", "--help"])
    text = " ".join(text.split())  # click wraps the help
    assert code == 0 and "$RANK" in text and "SLURM_ARRAY_TASK_ID" in text and "merge OUT" in text
    code, text = cli(["merge", "--help"])
    assert code == 0 and "manifest.json" in text and "rank" in text


# --------------------------------------------------------------------------------------------
# Rank resolution and division: unit tests
# --------------------------------------------------------------------------------------------
TORCHRUN = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
ARRAY = {"SLURM_ARRAY_TASK_ID": "13", "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_MAX": "17",
         "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
SRUN = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"}


@pytest.mark.parametrize("flags,env,want", [
    ((None, None), {}, RankInfo(0, 1, None, "single")),
    ((None, None), TORCHRUN, RankInfo(3, 4, 1, "torchrun")),
    ((None, None), ARRAY, RankInfo(3, 8, 0, "slurm-array")),
    ((None, None), {k: v for k, v in ARRAY.items() if k != "SLURM_ARRAY_TASK_MIN"} | {"SLURM_ARRAY_TASK_ID": "3",
                                                                                      "SLURM_ARRAY_TASK_MAX": "7"},
     RankInfo(3, 8, 0, "slurm-array")),
    ((None, None), SRUN, RankInfo(5, 8, 1, "slurm")),
    ((None, None), TORCHRUN | SRUN, RankInfo(3, 4, 1, "torchrun")),  # torchrun inside a Slurm allocation
    ((2, 3), TORCHRUN, RankInfo(2, 3, 1, "flags")),  # explicit flags win
    ((1, 2), ARRAY, RankInfo(1, 2, 0, "flags")),
])
def test_rank_resolution(flags, env, want):
    assert resolve_ranks(*flags, env=env) == want


def test_only_torchrun_with_a_master_uses_torch_distributed(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert resolve_ranks(env=TORCHRUN).torch_distributed
    assert not resolve_ranks(3, 4, env=TORCHRUN).torch_distributed  # flags: independent ranks, merge after
    assert not resolve_ranks(env=ARRAY).torch_distributed
    monkeypatch.delenv("MASTER_ADDR")
    assert not resolve_ranks(env=TORCHRUN).torch_distributed


@pytest.mark.parametrize("flags,env,phrase", [
    ((1, None), {}, "--rank and --world-size go together"),
    ((2, 2), {}, "rank 2 of world size 2"),
    ((None, None), {"RANK": "1"}, "RANK and WORLD_SIZE must both be set"),
    ((None, None), {"RANK": "4", "WORLD_SIZE": "4"}, "RANK/WORLD_SIZE gives rank 4 of world size 4"),
    ((None, None), {"RANK": "one", "WORLD_SIZE": "4"}, "RANK='one' is not an integer"),
    ((None, None), ARRAY | {"SLURM_ARRAY_TASK_STEP": "2"}, "one contiguous range such as --array=0-7"),
    ((None, None), ARRAY | {"SLURM_ARRAY_TASK_MAX": "20"}, "one contiguous range"),
    ((None, None), ARRAY | {"SLURM_NTASKS": "2"}, "must run one task"),
    ((None, None), {"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_COUNT is not"),
])
def test_inconsistent_rank_settings_are_one_sentence(flags, env, phrase):
    with pytest.raises(UserError, match=phrase.replace("(", r"\(").replace("[", r"\[")):
        resolve_ranks(*flags, env=env)


def test_one_gpu_per_local_rank(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device("auto", 1) == "auto"  # no GPU: the CPU, whatever the local rank
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert rank_device("auto", 1) == "cuda:1" and rank_device("cuda", 0) == "cuda:0" and chosen == [1, 0]
    assert rank_device("cpu", 1) == "cpu" and rank_device("cuda:0", 1) == "cuda:0"
    assert rank_device("auto", None) == "auto"
    with pytest.raises(UserError, match="local rank 2 needs GPU 2 but only 2 CUDA device"):
        rank_device("auto", 2)


def test_division_rule():
    files = [(f"f{i}", "jsonl") for i in range(5)]
    assert [p for p, _ in divide(files, "structured", None, 1, 2).files] == ["f1", "f3"]
    assert divide(files, "continuous", None, 4, 5).by == "files"
    assert divide(files, "structured", None, 0, 6).by == "records"
    assert divide(files, "continuous", None, 0, 6).by == "windows"
    assert divide(files, "structured", 10, 0, 2).by == "records"  # --limit counts over the whole run
    d = divide(files[:1], "structured", None, 2, 3)
    assert [i for i in range(9) if d.owns(i)] == [2, 5, 8] and d.files == files[:1]
    assert divide(files, "structured", None, 0, 1).by == "all"
    sizes = [1, 9, 1, 1, 8]  # longest first to the least loaded rank; each rank reads its files in input order
    assert [[p for p, _ in divide(files, "structured", None, r, 2, sizes).files] for r in range(2)] == \
           [["f1", "f2"], ["f0", "f3", "f4"]]
    assert [p for p, _ in divide(files, "structured", None, 1, 2, [7] * 5).files] == ["f1", "f3"]  # equal: i % W


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("seed", range(4))
def test_size_balance_is_deterministic_and_near_the_bound(world, seed):
    """Every file on exactly one rank; the slowest rank has at most the mean plus the largest file (the bound of
    whole-file division: longest-first gets within 4/3 of the optimum); far below round-robin on a lognormal mix."""
    from rpt_data.division import balance

    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(13, 1.5, size=100).astype(int).tolist()
    owner = balance(sizes, world)
    assert owner == balance(list(sizes), world) and set(owner) == set(range(world))
    load = np.bincount(owner, weights=sizes, minlength=world)
    assert load.sum() == sum(sizes) and load.max() <= load.mean() + max(sizes)
    rr = np.bincount(np.arange(100) % world, weights=sizes, minlength=world)
    assert load.max() <= rr.max() and load.max() / load.mean() <= max(1.0, max(sizes) / load.mean()) + 0.15


def test_merged_output_reads_like_a_one_rank_output(tmp_path, tiny_llama):
    """inspect and polars read a merged directory as they read a 1-rank one."""
    inputs, kw = corpus(tmp_path / "in", "structured-files")
    manifest = tag_ranks(inputs, tiny_llama, tmp_path / "two", 2, **kw)
    inspect_out(str(tmp_path / "two"), top=2)
    assert pl.scan_parquet(str(tmp_path / "two" / "data")).select(pl.len()).collect().item() == \
           manifest["totals"]["rows"]


def test_an_id_in_files_of_two_ranks_is_named_by_the_merge(tmp_path, tiny_llama, capsys):
    """--id-field duplicates are rejected within a rank; across ranks (whole files) the merge warns."""
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": "x", "text": SENTENCES[0]}, {"id": "a", "text": SENTENCES[1]}])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"id": "x", "text": SENTENCES[2]}])
    tag_ranks([str(tmp_path / "in")], tiny_llama, tmp_path / "two", 2, id_field="id")
    assert "1 id(s) (e.g. 'x') belong to records of files on different ranks" in capsys.readouterr().err
