"""Faults as a user meets them on a long `rpt-train run`: NaN loss and exploding gradients, kill -9 at any
moment (in a checkpoint save too), and shards that do not belong to their directory."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from shard_fixtures import length_reward, train_shards, tiny_tok  # noqa: F401

import rpt_train.trainer as trainer
import rpt_train.update as update
from rpt_common.errors import UserError
from rpt_common.shards import META_SCHEMA_VERSION, META_VOCAB_HASH
from rpt_train.checkpoint import list_checkpoints
from rpt_train.config import TrainConfig, to_dict, validate
from rpt_train.samples import ShardSet

TESTS = Path(__file__).parent
TIMING = ("seconds", "rollout_seconds", "rollout_tokens_per_s")


def _cfg(shards, model, out, **kw) -> TrainConfig:
    base = dict(shards=str(shards), model=str(model), out=str(out), steps=4, bucket="all", batch_prompts=2,
                group_size=3, max_new_tokens=6, lr=1e-2, micro_batch_size=6, save_every=1, keep_checkpoints=2,
                log_samples_every=0, dynamic_sampling=False)
    return TrainConfig(**(base | kw))


def _metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(out / "metrics.jsonl")]


def _weights(ckpt: Path) -> dict:
    return load_file(ckpt / "model.safetensors")


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def poison(monkeypatch):
    """poison(steps, what): make the loss NaN ('nan') or the gradient huge ('explode') at the given steps."""
    def install(steps: set[int], what: str = "nan"):
        state = {"step": 0}
        collect, aggregate = trainer.collect, update.aggregate

        def counting_collect(*a, **kw):
            state["step"] += 1
            return collect(*a, **kw)

        def poisoned_aggregate(*a, **kw):
            loss = aggregate(*a, **kw)
            if state["step"] in steps:
                return loss * float("nan") if what == "nan" else loss * 1e12
            return loss

        monkeypatch.setattr(trainer, "collect", counting_collect)
        monkeypatch.setattr(update, "aggregate", poisoned_aggregate)
    return install


def test_a_nan_loss_skips_the_step_and_leaves_the_weights_alone(tiny_llama, train_shards, tmp_path, poison, capsys):
    poison({2})
    out = trainer.train(_cfg(train_shards, tiny_llama, tmp_path / "run", keep_checkpoints=4),
                        reward_fns=[length_reward], quiet=True)
    m = _metrics(out)
    assert [x["step"] for x in m] == [1, 2, 3, 4]
    assert m[1]["bad_step"] == "non-finite loss" and m[1]["updates"] == 0 and m[1]["loss"] is None
    assert m[0]["bad_step"] is None and m[2]["bad_step"] is None and m[2]["updates"] == 1
    assert "step 2: non-finite loss; update skipped" in capsys.readouterr().err
    ckpts = dict(list_checkpoints(out))
    assert _same_weights(_weights(ckpts[1]), _weights(ckpts[2]))  # the skipped step changed nothing
    assert not _same_weights(_weights(ckpts[2]), _weights(ckpts[3]))  # and training went on afterwards
    assert all(torch.isfinite(t).all() for t in _weights(ckpts[4]).values())


def test_stop_mode_exits_with_the_last_good_checkpoint_intact_and_resumes(tiny_llama, train_shards, tmp_path, poison):
    poison({3})
    cfg = _cfg(train_shards, tiny_llama, tmp_path / "run", on_bad_step="stop")
    with pytest.raises(UserError, match=r"step 3: non-finite loss; stopped \(--on-bad-step stop\) and the last good "
                                        r"checkpoint is '.*step-000002'"):
        trainer.train(cfg, reward_fns=[length_reward], quiet=True)
    assert [s for s, _ in list_checkpoints(cfg.out)] == [1, 2]
    assert _metrics(Path(cfg.out))[-1]["bad_step"] == "non-finite loss"
    poison(set())  # the cause is gone (e.g. a lower --lr): --resume redoes step 3 and finishes
    cfg.resume = True
    trainer.train(cfg, reward_fns=[length_reward], quiet=True)
    m = _metrics(Path(cfg.out))
    assert [x["step"] for x in m] == [1, 2, 3, 4] and all(x["bad_step"] is None for x in m)


def test_a_stopped_run_resumes_with_a_lower_lr_as_its_stop_message_says(tiny_llama, train_shards, tmp_path, poison):
    """The bad-step stop names the command that works: --resume --allow-changed lr --lr X. Without --allow-changed
    the changed --lr is refused with that advice; with it the run goes on from the checkpoint (AdamW state and
    schedule continue, the new lr x the schedule's factor from the next step on) and run.json records the change."""
    import dataclasses

    poison({3})
    cfg = _cfg(train_shards, tiny_llama, tmp_path / "run", on_bad_step="stop", warmup_steps=4, keep_checkpoints=4,
               dynamic_sampling=True)  # informative groups: the poisoned step has a backward
    with pytest.raises(UserError, match=r"rerun the same command with --resume --allow-changed lr --lr X \(X below "
                                        r"0\.01\)"):
        trainer.train(cfg, reward_fns=[length_reward], quiet=True)
    poison(set())
    lower = dataclasses.replace(cfg, resume=True, lr=4e-3)
    with pytest.raises(UserError, match=r"lr differs: --lr 0\.01 there\); resume with the same options \(to change "
                                        r"--lr from the resumed step on, add --allow-changed lr\)"):
        trainer.train(lower, reward_fns=[length_reward], quiet=True)
    trainer.train(dataclasses.replace(lower, steps=3, allow_changed=["lr"]), reward_fns=[length_reward], quiet=True)
    ckpts = dict(list_checkpoints(cfg.out))
    states = {s: torch.load(ckpts[s] / "trainer_state.pt", weights_only=False) for s in (2, 3)}
    steps = [int(next(iter(states[s]["optimizer"]["state"].values()))["step"]) for s in (2, 3)]
    m = _metrics(Path(cfg.out))
    assert steps[1] == steps[0] + m[2]["updates"] > steps[0]  # AdamW went on from the checkpoint's state
    change = [{"step": 2, "option": "lr", "from": 1e-2, "to": 4e-3}]
    assert states[3]["changes"] == change and states[3]["optimizer"]["param_groups"][0]["lr"] == pytest.approx(4e-3)
    assert json.loads((Path(cfg.out) / "run.json").read_text())["changes"] == change
    # the checkpoint holds lr 4e-3 now: resuming with it needs no --allow-changed, and the record stays
    trainer.train(lower, reward_fns=[length_reward], quiet=True)
    m = _metrics(Path(cfg.out))
    assert [x["step"] for x in m] == [1, 2, 3, 4] and all(x["bad_step"] is None for x in m)
    factor = trainer.lr_factor(cfg)  # warmup over 4 steps: (i + 1) / 4 at step i + 1
    assert [x["lr"] for x in m] == pytest.approx([1e-2 * factor(0), 1e-2 * factor(1), 4e-3 * factor(2), 4e-3])
    assert json.loads((Path(cfg.out) / "run.json").read_text())["changes"] == change


def test_allow_changed_takes_only_options_that_a_resume_may_change():
    with pytest.raises(UserError, match=r"--allow-changed takes lr, grad-clip, not loss"):
        validate(TrainConfig(shards="x", resume=True, allow_changed=["lr,loss"]))
    with pytest.raises(UserError, match=r"--allow-changed applies to a --resume only"):
        validate(TrainConfig(shards="x", allow_changed=["lr"]))
    cfg = TrainConfig(shards="x", resume=True, allow_changed=["grad-clip", "lr"])
    validate(cfg)
    assert cfg.allow_changed == ["grad_clip", "lr"]
    saved = to_dict(TrainConfig(shards="x"))
    trainer.check_options(saved, to_dict(TrainConfig(shards="x", lr=5e-7, grad_clip=0.5)), Path("OUT"),
                          allowed=["lr", "grad_clip"])
    with pytest.raises(trainer.OptionsChanged, match=r"loss differs.*resume with the same options, or start"):
        trainer.check_options(saved, to_dict(TrainConfig(shards="x", loss="dapo")), Path("OUT"), allowed=["loss"])


@pytest.mark.parametrize("option, value", [("gradient_checkpointing", True), ("micro_batch_size", 1),
                                           ("logprob_chunk_tokens", 256)])
def test_memory_knobs_that_do_not_change_the_result_may_change_on_resume(option, value):
    """--gradient-checkpointing recomputes the same activations; micro-batches split a mini-batch whose loss is
    normalised over all of it (tests/test_train_loop.py: resumed with both changed, the next step is the same)."""
    trainer.check_options(to_dict(TrainConfig(shards="x")), to_dict(TrainConfig(shards="x", **{option: value})),
                          Path("OUT"))


def test_an_exploding_gradient_is_a_bad_step_and_too_many_in_a_row_stop_the_run(tiny_llama, train_shards, tmp_path,
                                                                                 poison):
    poison({2, 3}, "explode")
    # dynamic sampling: every step trains on groups with reward variance, so the poisoned loss has a gradient
    cfg = _cfg(train_shards, tiny_llama, tmp_path / "run", bad_grad_norm=1e6, max_bad_steps=2, dynamic_sampling=True)
    with pytest.raises(UserError, match=r"step 3: gradient norm .* > --bad-grad-norm 1e\+06; stopped \(2 bad steps "
                                        r"in a row \(--max-bad-steps\)\)"):
        trainer.train(cfg, reward_fns=[length_reward], quiet=True)
    m = _metrics(Path(cfg.out))
    assert [x["bad_step"] is not None for x in m] == [False, True, True]
    ckpts = dict(list_checkpoints(cfg.out))
    assert sorted(ckpts) == [1, 2] and _same_weights(_weights(ckpts[1]), _weights(ckpts[2]))


def test_bad_step_options_are_checked():
    with pytest.raises(UserError, match="--on-bad-step must be skip or stop"):
        validate(TrainConfig(shards="x", on_bad_step="ignore"))


# --------------------------------------------------------------------------------------------
# kill -9 at random moments, in checkpoint saves too: --resume completes and equals an uninterrupted run
# --------------------------------------------------------------------------------------------
def kill_runs(tmp_path: Path, model: Path, shards: Path, seed: int, chains: int, kills: int = 0,
              sequence=None) -> dict:
    cfg = dict(shards=str(shards), model=str(model), steps=4, bucket="all", batch_prompts=2, group_size=3,
               max_new_tokens=6, lr=1e-2, warmup_steps=1, ppo_epochs=2, micro_batch_size=4, save_every=1,
               keep_checkpoints=2, log_samples_every=1, dynamic_sampling=True, max_sampling_rounds=2)
    root = tmp_path / "runs"
    root.mkdir()
    plan = dict(cfg=cfg, root=str(root), seed=seed, chains=chains, kills=kills, sequence=sequence)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTS)!r}); import train_helpers as h; "
                               "h.kill_harness_main()", str(tmp_path / "plan.json"), str(tmp_path / "result.json")],
        capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    ref = root / "ref"
    for c in range(chains):
        steps = [s for s in result["steps"] if s["chain"] == c]
        out = root / f"chain{c}"
        log = (root / f"chain{c}.log").read_text() if (root / f"chain{c}.log").exists() else ""
        assert all(s["exit"] in (0, -9) for s in steps), (steps, log[-3000:])  # 3 = a kill left a torn checkpoint
        assert steps[-1]["exit"] == 0, (steps, log[-3000:])
        assert _metrics(out) == _metrics(ref)
        assert [s for s, _ in list_checkpoints(out)] == [s for s, _ in list_checkpoints(ref)] == [3, 4]
        assert _same_weights(_weights(out / "checkpoints" / "step-000004"), _weights(ref / "checkpoints" / "step-000004"))
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
        samples = [json.loads(line)["step"] for line in open(out / "samples.jsonl")]
        assert samples == [json.loads(line)["step"] for line in open(ref / "samples.jsonl")]
    return result


def test_kill_9_during_checkpoint_saves_metrics_and_at_a_random_moment(tmp_path, tiny_llama, train_shards):
    seq = ["weights", "state", "rename", "discard", "metrics", "rename", "timer"]
    result = kill_runs(tmp_path, tiny_llama, train_shards, seed=3, chains=1, sequence=seq)
    killed = [s["kind"] for s in result["steps"] if s["killed"]]
    assert killed[:6] == seq[:6], result["steps"]


@pytest.mark.slow
def test_kill_9_in_training_at_random_moments_again_and_again(tmp_path, tiny_llama, train_shards):
    result = kill_runs(tmp_path, tiny_llama, train_shards, seed=2025, chains=4, kills=8)
    killed = [s for s in result["steps"] if s["killed"]]
    assert len(killed) >= 16 and {s["kind"] for s in killed} >= {"weights", "state", "rename", "timer"}


# --------------------------------------------------------------------------------------------
# shards that do not belong: rpt-train refuses with one sentence naming the file
# --------------------------------------------------------------------------------------------
def _restamp(path: Path, **meta) -> None:
    table = pq.read_table(path)
    old = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    pq.write_table(table.replace_schema_metadata(old | meta), path)


@pytest.mark.parametrize("case, phrase", [
    ("tokenizer", "was written with another tokenizer"),
    ("schema", "was written with shard schema version 0"),
    ("bytes", "bytes but the manifest recorded"),
    ("rows", "rows but the manifest says"),
    ("truncated", "is truncated or corrupt"),
    ("manifest_version", "has schema version 99"),
    ("missing", "is listed in the manifest but missing"),
])
def test_rpt_train_refuses_shards_that_do_not_belong(tmp_path, train_shards, case, phrase):
    d = tmp_path / "shards"
    shutil.copytree(train_shards, d)
    shard = sorted(d.glob("**/shard-*.parquet"))[0]
    manifest = json.loads((d / "manifest.json").read_text())
    if case == "tokenizer":
        _restamp(shard, **{META_VOCAB_HASH: "0123abcd"})
    elif case == "schema":
        _restamp(shard, **{META_SCHEMA_VERSION: "0"})
    elif case == "bytes":
        shard.write_bytes(shard.read_bytes())  # same content, then padded by a rewrite of another size
        _restamp(shard, extra="x" * 100)
    elif case == "rows":
        manifest["shards"][0]["rows"] += 1
        manifest["shards"][0].pop("bytes", None)
    elif case == "truncated":
        data = shard.read_bytes()
        shard.write_bytes(data[: len(data) // 2])
    elif case == "manifest_version":
        manifest["schema_version"] = 99
    elif case == "missing":
        shard.unlink()
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=phrase) as e:
        ShardSet(str(d))
    assert "\n" not in str(e.value)
    if case not in ("manifest_version",):
        assert shard.name in str(e.value)


def test_a_full_disk_during_a_checkpoint_save_is_one_sentence_and_resume_completes(tiny_llama, train_shards, tmp_path,
                                                                                   monkeypatch):
    import errno

    import rpt_train.checkpoint as checkpoint

    calls = {"n": 0}
    save = torch.save

    def full_disk(obj, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the trainer state of step 2, after its weights were written
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return save(obj, path, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    cfg = _cfg(train_shards, tiny_llama, tmp_path / "run")
    with pytest.raises(UserError, match=r"no space left on the device while saving checkpoint 'step-000002' .*the last "
                                        r"complete checkpoint is '.*step-000001': free some space and rerun with "
                                        r"--resume"):
        trainer.train(cfg, reward_fns=[length_reward], quiet=True)
    assert sorted(p.name for p in (Path(cfg.out) / "checkpoints").iterdir()) == ["step-000001"]
    monkeypatch.setattr(checkpoint.torch, "save", save)
    cfg.resume = True
    trainer.train(cfg, reward_fns=[length_reward], quiet=True)
    assert [x["step"] for x in _metrics(Path(cfg.out))] == [1, 2, 3, 4]
    assert [s for s, _ in list_checkpoints(cfg.out)] == [3, 4]


@pytest.mark.slow
def test_a_finished_two_rank_run_exits_0_every_time_when_its_ranks_share_one_core(tmp_path, tiny_llama,
                                                                                  train_shards):
    """A finished rank died with SIGABRT ('terminate called without an active exception') at interpreter exit: a
    gloo worker thread freeing a collective's tensors reached for the GIL during finalization. torchrun then
    reported the finished run failed (1 run in 5 with both ranks on one core, 1 in 15-25 on two; CI hit it).
    The CLI now ends a rank with os._exit(0) once its work is written: eight runs on one core all exit 0 and print
    `done:` once."""
    from test_train_distributed import torchrun

    for i in range(8):
        out = tmp_path / f"run{i}"
        proc = torchrun("-m", "rpt_train.cli", "run", "--shards", train_shards, "--model", tiny_llama, "--out", out,
                        "--steps", 2, "--batch-prompts", 3, "--group-size", 2, "--max-new-tokens", 5, "--bucket",
                        "all", "--save-every", 1, "--micro-batch-size", 2, "--reward", "shard_fixtures:length_reward",
                        "--eval-every", 2, "--eval-limit", 3, "--heldout-fraction", 0.3, one_core=True)
        assert proc.returncode == 0, f"run {i}: " + proc.stderr[-3000:]
        assert proc.stdout.count("done:") == 1 and list_checkpoints(out)


@pytest.mark.slow
def test_a_users_own_script_calling_train_under_torchrun_exits_0_every_time_on_one_core(tmp_path, tiny_llama,
                                                                                     train_shards):
    """train() called from a user's script (tests/exit_driver.py) ends with interpreter finalization, not the CLI's
    os._exit: the atexit wait registered by init_from_env lets gloo's threads free their tensors first (without it,
    4 of 20 such runs on one core died with SIGABRT; with it 0 of 30)."""
    from test_train_distributed import torchrun

    for i in range(8):
        proc = torchrun(TESTS / "exit_driver.py", train_shards, tiny_llama, tmp_path / f"run{i}", one_core=True)
        assert proc.returncode == 0, f"run {i}: " + proc.stderr[-3000:]
        assert list_checkpoints(tmp_path / f"run{i}")
