"""`rpt-train run` on 2 CPU ranks (gloo, FSDP2): the CLI under torchrun, a 2-rank update equal to the 1-process
update on the same global batch, a NaN on one rank skipping the step on all, rollouts in lockstep when ranks
finish at different lengths, and resume on the same and on another number of ranks."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from shard_fixtures import length_reward, train_shards, tiny_tok  # noqa: F401

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from rpt_train.checkpoint import list_checkpoints  # noqa: E402
from rpt_train.config import TrainConfig  # noqa: E402
from rpt_train.trainer import train  # noqa: E402

TESTS = Path(__file__).parent
REPO = TESTS.parent
TIMING = ("seconds", "rollout_seconds", "rollout_tokens_per_s")
CONTRACT = {"step", "loss", "lr", "reward", "reward_std", "frac_reward_zero_std", "answer_rate", "completion_length",
            "clip_ratio", "entropy", "kl", "seconds"}
LOSSES = ("dapo", "grpo", "dr_grpo")


def torchrun(*args, timeout: int = 300, one_core: bool = False) -> subprocess.CompletedProcess:
    """2 CPU ranks on this machine, one thread each; tests/ importable (reward functions, the driver). one_core:
    torchrun and both ranks pinned to one CPU (set in the launcher before it starts them: children inherit it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO)]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = ["-m", "torch.distributed.run"]
    if one_core:
        launcher = ["-c", "import os, runpy, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
                          "runpy.run_module('torch.distributed.run', run_name='__main__', alter_sys=True)"]
    cmd = [sys.executable, *launcher, "--standalone", "--nproc-per-node", "2", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def test_a_rank_that_stops_with_a_user_error_keeps_its_exit_code(tiny_llama, tmp_path):
    """Under torchrun a rank ends through distributed.end_process whatever the outcome (cli.ends_rank): a
    UserError after the ranks joined (shards without a manifest) is said and each rank exits 2, as outside
    torchrun, not 0 and not an abort."""
    (tmp_path / "empty").mkdir()
    proc = torchrun("-m", "rpt_train.cli", "run", "--shards", tmp_path / "empty", "--model", tiny_llama, "--out",
                    tmp_path / "run", "--steps", 1)
    assert proc.returncode != 0 and "has no manifest.json" in proc.stdout + proc.stderr
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert codes and set(codes) == {"2"}, proc.stderr[-3000:]


def metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(out / "metrics.jsonl")]


def weights(out: Path, step: int) -> dict:
    return load_file(dict(list_checkpoints(out))[step] / "model.safetensors")


BASE = dict(bucket="all", batch_prompts=5, group_size=3, max_new_tokens=4, lr=1e-2, save_every=1, keep_checkpoints=4,
            log_samples_every=1, micro_batch_size=2)
# odd batch (3 + 2 contexts), refills, several mini-batches, 2 PPO epochs, KL to a sharded reference, active clip
SCRIPTED = dict(steps=2, beta=0.05, ppo_epochs=2, mini_batch_size=6, grad_clip=0.5, max_sampling_rounds=3)
SAMPLED = dict(beta=0.05, rollout_gather=True, eval_every=3, eval_limit=2, heldout_fraction=0.3)


def run_driver(root: Path, base: dict, **plan) -> tuple[Path, dict]:
    """One torchrun launch of tests/dist_driver.py running the plan's 2-rank scenarios under `root`."""
    (root / "plan.json").write_text(json.dumps({"root": str(root), "base": base, "scripted": [], "sampled": []} | plan))
    proc = torchrun(TESTS / "dist_driver.py", root / "plan.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return root, base


@pytest.fixture(scope="module")
def scripted(tiny_llama, train_shards, tmp_path_factory):
    """Deterministic rollouts (one run per loss, one with a NaN on rank 1 at step 2) and the lockstep check."""
    base = BASE | {"shards": str(train_shards), "model": str(tiny_llama)}
    return run_driver(tmp_path_factory.mktemp("dist"), base, lockstep=True,
                      scripted=[[f"scripted-{loss}", SCRIPTED | {"loss": loss}] for loss in LOSSES]
                      + [["scripted-nan", {"steps": 3, "poison_rank": 1, "poison_step": 2}],
                         ["scripted-flat", {"steps": 1, "flat": True, "max_sampling_rounds": 2}]])


# every family whose forward changes the head's output (issue 21): tied, untied, soft-capped, scaled
FAMILIES = {"llama": {}, "qwen2": {"tie": False}, "gemma2": {}, "granite": {}, "cohere": {}}
FAMILY_RUN = dict(steps=1, beta=0.05, ppo_epochs=2, mini_batch_size=6, grad_clip=0.5, max_sampling_rounds=2)
LEARNABILITY = dict(sampler="learnability", sampler_pool=3, response_prefix="\\boxed{")


@pytest.fixture(scope="module")
def families(train_shards, tmp_path_factory):
    """One 2-rank step per family with the shared-prefix update (the default) and one unshared (Llama)."""
    from tiny import make_model_dir

    root = tmp_path_factory.mktemp("dist-families")
    models = {arch: str(make_model_dir(root / f"model-{arch}", arch=arch, **kw)) for arch, kw in FAMILIES.items()}
    base = BASE | {"shards": str(train_shards)}
    runs = [[f"family-{arch}", FAMILY_RUN | {"model": path}] for arch, path in models.items()]
    runs.append(["family-llama-unshared", FAMILY_RUN | {"model": models["llama"], "share_prefix": False}])
    runs.append(["family-llama-learnability", FAMILY_RUN | {"model": models["llama"], **LEARNABILITY}])
    return run_driver(root, base, scripted=runs) + (models,)


@pytest.fixture(scope="module")
def sampled(tiny_llama, train_shards, tmp_path_factory):
    """HFRollout through FSDP: 3 steps, and 2 steps then --resume to 3; a 1-process checkpoint resumed on 2 ranks."""
    root = tmp_path_factory.mktemp("dist")
    base = BASE | {"shards": str(train_shards), "model": str(tiny_llama)}
    # a 1-process checkpoint (index-keyed optimizer state, one RNG state) for the 2 ranks to resume
    train(TrainConfig(**base, out=str(root / "from-one"), steps=1), reward_fns=[length_reward], quiet=True)
    return run_driver(root, base, sampled=[["hf-full", SAMPLED | {"steps": 3}], ["hf-part", SAMPLED | {"steps": 2}],
                                           ["hf-part", SAMPLED | {"steps": 3, "resume": True}],
                                           ["from-one", {"steps": 2, "resume": True}]])


@pytest.fixture(scope="module")
def sharded_load(tmp_path_factory):
    """load_sharded_policy on 2 ranks of a tied (Llama) and an untied (Qwen2) tiny model."""
    from tiny import make_model_dir

    root = tmp_path_factory.mktemp("dist-load")
    models = {"llama": make_model_dir(root / "model-llama", seed=3),
              "qwen2": make_model_dir(root / "model-qwen2", arch="qwen2", tie=False, seed=4)}
    return run_driver(root, {}, sharded_load={k: str(v) for k, v in models.items()})[0], models


@pytest.mark.parametrize("loss", LOSSES)
def test_two_rank_update_equals_the_one_process_update(scripted, tmp_path, loss):
    from dist_driver import PromptEngine

    from rpt_common.models import load_tokenizer

    root, base = scripted
    cfg = TrainConfig(**base | SCRIPTED | {"loss": loss, "out": str(tmp_path / "one")})
    one = train(cfg, reward_fns=[length_reward], engine=PromptEngine(load_tokenizer(cfg.model)), quiet=True)
    two = root / f"scripted-{loss}"
    a, b = metrics(one), metrics(two)
    assert [m["step"] for m in b] == [1, 2]
    assert a[0]["sampling_rounds"] > 1 and a[0]["updates"] == 2 * 3  # refills; 2 epochs x 3 mini-batches
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            same = x[k] == y[k] if not isinstance(x[k], float) else x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6)
            assert same, (k, x[k], y[k])
    start = load_file(Path(base["model"]) / "model.safetensors")
    for step in (1, 2):
        wa, wb = weights(one, step), weights(two, step)
        assert wa.keys() == wb.keys() == start.keys()
        # AdamW moves every weight by up to lr = 1e-2 per update whatever the gradient's size, so summation-order
        # noise in near-zero gradients shows up at ~1e-5; the updates themselves are ~1e-2
        assert max(float((wa[k] - start[k]).abs().max()) for k in wa) > 1e-2
        for k in wa:
            torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=k)


@pytest.mark.parametrize("run", [*FAMILIES, "llama-unshared"])
def test_every_family_under_fsdp2_equals_one_process(families, tmp_path, run):
    """FSDP2 over Llama (tied), Qwen2 (untied), Gemma-2 (soft-capped head), Granite and Cohere (scaled heads):
    the step's metrics and weights equal one process's; the shared-prefix path ran where it was asked for."""
    from dist_driver import PromptEngine

    from rpt_common.models import load_tokenizer

    root, base, models = families
    arch = run.split("-")[0]
    kw = FAMILY_RUN | {"model": models[arch], "share_prefix": run == arch}
    cfg = TrainConfig(**base | kw | {"out": str(tmp_path / "one")})
    one = train(cfg, reward_fns=[length_reward], engine=PromptEngine(load_tokenizer(cfg.model)), quiet=True)
    (a,), (b,) = metrics(one), metrics(root / f"family-{run}")
    assert a["updates"] == b["updates"] > 0 and b["shared_prefix"] is (run == arch)
    for k in a:
        same = a[k] == b[k] if not isinstance(a[k], float) else a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6)
        assert same, (k, a[k], b[k])
    start = load_file(Path(models[arch]) / "model.safetensors")
    wa, wb = weights(one, 1), weights(root / f"family-{run}", 1)
    assert max(float((wa[k] - start[k]).abs().max()) for k in wa) > 1e-2
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=k)


def test_the_learnability_sampler_under_fsdp2_equals_one_process(families, tmp_path):
    """Both ranks score the same pool through the sharded policy and roll out the contexts one process would."""
    from dist_driver import PromptEngine

    from rpt_common.models import load_tokenizer

    root, base, models = families
    cfg = TrainConfig(**base | FAMILY_RUN | LEARNABILITY | {"model": models["llama"], "out": str(tmp_path / "one")})
    one = train(cfg, reward_fns=[length_reward], engine=PromptEngine(load_tokenizer(cfg.model)), quiet=True)
    (a,), (b,) = metrics(one), metrics(root / "family-llama-learnability")
    assert b["contexts_scored"] == 3 * b["contexts_drawn"] > 0 and a["updates"] == b["updates"] > 0
    for k in a:
        same = a[k] == b[k] if not isinstance(a[k], float) else a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6)
        assert same, (k, a[k], b[k])
    rolled = [(one / "contexts.jsonl").read_text(), (root / "family-llama-learnability" / "contexts.jsonl").read_text()]
    assert rolled[0] == rolled[1] and rolled[0].strip()
    wa, wb = weights(one, 1), weights(root / "family-llama-learnability", 1)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-4, msg=k)


def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(scripted):
    root, _ = scripted
    m = metrics(root / "scripted-nan")
    assert [x["step"] for x in m] == [1, 2, 3]
    assert [x["bad_step"] for x in m] == [None, "non-finite loss", None] and m[1]["updates"] == 0
    assert m[2]["updates"] == 1
    w1, w2, w3 = (weights(root / "scripted-nan", s) for s in (1, 2, 3))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the skipped step changed nothing, on either rank's shard
    assert not all(torch.equal(w2[k], w3[k]) for k in w2)


def test_a_step_without_informative_groups_updates_nothing(scripted, tmp_path):
    from dist_driver import PromptEngine

    from rpt_common.models import load_tokenizer

    root, base = scripted
    cfg = TrainConfig(**base | {"steps": 1, "max_sampling_rounds": 2, "out": str(tmp_path / "one")})
    one = train(cfg, engine=PromptEngine(load_tokenizer(cfg.model)), quiet=True)
    (a,), (b,) = metrics(one), metrics(root / "scripted-flat")
    assert b["updates"] == 0 and b["groups_kept"] == 0 and b["sampling_rounds"] == 2 and b["entropy"] > 0
    assert b["entropy"] == pytest.approx(a["entropy"], rel=1e-5)
    assert all(torch.equal(v, weights(root / "scripted-flat", 1)[k]) for k, v in weights(one, 1).items())


def test_rollouts_through_fsdp_step_in_lockstep_when_ranks_finish_at_different_lengths(scripted):
    root, _ = scripted
    for rank in (0, 1):
        r = json.loads((root / f"lockstep-rank{rank}.json").read_text())
        assert r["sharded"] == r["plain"]
    early = json.loads((root / "lockstep-rank0.json").read_text())["sharded"]["mask"]
    late = json.loads((root / "lockstep-rank1.json").read_text())["sharded"]["mask"]
    assert max(map(sum, early)) < 7 and len(late) == 4 and all(sum(m) == 7 for m in late)


def test_every_rank_reads_rank_0s_generation_config_and_stops_where_it_does(tmp_path):
    """Ranks > 0 build the model from config.json (one EOS); generation_config.json lists more: every rank must
    use rank 0's EOS set, pad id and chat template, so equal sampled tokens stop at equal positions."""
    from tiny import make_model_dir
    from transformers import AutoTokenizer, GenerationConfig

    model = make_model_dir(tmp_path / "model")
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(model)
    extra = list(range(1, len(tok), 3))  # a third of the vocabulary ends a turn: completions stop early
    GenerationConfig(eos_token_id=[tok.eos_token_id, *extra], pad_token_id=tok.pad_token_id).save_pretrained(model)
    assert json.loads((model / "config.json").read_text())["eos_token_id"] == tok.eos_token_id
    (tmp_path / "run").mkdir()
    root, _ = run_driver(tmp_path / "run", {}, agree=str(model))
    r0, r1 = (json.loads((root / f"agree-rank{r}.json").read_text()) for r in (0, 1))
    assert r0["eos_ids"] == sorted({tok.eos_token_id, *extra})
    assert r0 == r1
    assert min(r0["lengths"]) < 8  # the extra EOS ids stopped some completions


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_rank_shards_the_meta_skeleton_and_gets_the_one_process_weights(sharded_load, arch):
    """Rank 0 reads the weights into host memory (load_policy on "cpu") and, like every rank, shards the skeleton
    built on the meta device: no rank's device ever holds the whole model. Gathered back, the weights and buffers
    (rotary tables) equal one process's load_policy, tied embeddings (Llama) stay tied and untied ones (Qwen2)
    untied, and the forward matches. Before, rank 0 loaded the whole model on `device` ("cpu:0" here) and sharded
    it (its meta_at_shard was [False])."""
    root, models = sharded_load
    for rank in (0, 1):
        r = json.loads((root / f"sharded-load-{arch}-rank{rank}.json").read_text())
        assert r["meta_at_shard"] == [True]
        # device "cpu:0" for the sharded model: only rank 0 reads weights, and into host memory ("cpu")
        weight_loads = [c for c in r["calls"] if c[2]]
        assert weight_loads == ([["cpu", "float32", True]] if rank == 0 else []), r["calls"]
        assert ["cpu:0", "float32", False] in r["calls"]  # the skeleton, on every rank
        assert r["keys"] and r["weights_equal"] and r["buffers"] and r["buffers_equal"]
        assert r["logits_diff"] < 1e-5
        assert r["tied"] is r["ref_tied"] is (arch == "llama")
        assert r["gradient_checkpointing"]  # the prepare of the trainer reached the sharded model
        assert r["generation_eos"] == r["ref_generation_eos"]
        if rank == 0:  # what rank 0 returns besides the model is its load's, as before
            assert r["identity"] == r["ref_identity"] and r["path"] == r["ref_path"]


def test_a_load_that_fails_on_one_rank_stops_every_rank_with_its_error(tmp_path):
    """A UserError while loading the policy on one rank (rank 0's host load of a checkpoint without its weights
    file, or patched to fail; rank 1's skeleton) is raised on every rank with the failing rank's sentence, instead
    of leaving the others waiting in the next collective (before: rank 1 died with gloo's "Connection closed" once
    rank 0 had left, or waited for the process-group timeout). Another exception (a corrupt safetensors file) is
    is one too, raised on every rank. A load after them still works on both ranks."""
    from tiny import make_model_dir

    from rpt_common.errors import UserError
    from rpt_train.policy import load_policy

    model = make_model_dir(tmp_path / "model")
    missing, corrupt = make_model_dir(tmp_path / "missing"), make_model_dir(tmp_path / "corrupt")
    (missing / "model.safetensors").unlink()
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError) as one:  # what one process says
        load_policy(str(missing), "cpu")
    with pytest.raises(UserError) as bad:
        load_policy(str(corrupt), "cpu")
    host = "rank 0 cannot read the checkpoint (a corrupt shard)"
    skeleton = "cannot read the config (on this rank only)"
    cases = [["missing", {"model": str(missing)}], ["corrupt", {"model": str(corrupt)}],
             ["host", {"model": str(model), "fail_rank": 0, "fail_weights": True, "message": host}],
             ["skeleton", {"model": str(model), "fail_rank": 1, "fail_weights": False, "message": skeleton}],
             ["ok", {"model": str(model)}]]
    (tmp_path / "run").mkdir()
    root, _ = run_driver(tmp_path / "run", {}, load_fails=cases, timeout_s=60)
    r0, r1 = (json.loads((root / f"load-fails-rank{r}.json").read_text()) for r in (0, 1))
    common = {"missing": ["UserError", str(one.value)], "corrupt": ["UserError", str(bad.value)],
              "host": ["UserError", host],
              "skeleton": ["UserError", f"rank 1: {skeleton}"], "ok": None}
    assert r1 == common
    assert r0 == common


def test_two_rank_resume_equals_the_uninterrupted_run(sampled):
    root, _ = sampled
    full, part = metrics(root / "hf-full"), metrics(root / "hf-part")
    assert [m["step"] for m in full] == [1, 2, 3]
    assert full == part  # rollouts sampled by each rank from its restored RNG state
    assert "eval/all/ntr_accuracy" in full[2] and (root / "hf-full" / "eval" / "step-000003.json").exists()
    w = weights(root / "hf-full", 3)
    assert all(torch.equal(w[k], weights(root / "hf-part", 3)[k]) for k in w)


def test_resume_across_rank_counts(sampled, tmp_path, capsys):
    root, base = sampled
    # 1 process -> 2 ranks (the driver): index-keyed AdamW state loaded into the sharded optimizer
    assert [m["step"] for m in metrics(root / "from-one")] == [1, 2]
    state = torch.load(dict(list_checkpoints(root / "from-one"))[2] / "trainer_state.pt", weights_only=False)
    assert len(state["rng"]["per_rank"]) == 2 and "model.embed_tokens.weight" in state["optimizer"]["state"]
    assert state["optimizer"]["state"]["model.embed_tokens.weight"]["step"] == 2  # AdamW went on from step 1
    # 2 ranks -> 1 process: name-keyed optimizer state, RNG reseeded with a warning
    out = tmp_path / "two-then-one"
    shutil.copytree(root / "hf-part", out)
    train(TrainConfig(**base | SAMPLED | {"steps": 4, "resume": True, "out": str(out)}), reward_fns=[length_reward],
          quiet=True)
    assert "RNG states of another number of ranks" in capsys.readouterr().err
    m = metrics(out)
    assert [x["step"] for x in m] == [1, 2, 3, 4] and m[:3] == metrics(root / "hf-part")
    state = torch.load(dict(list_checkpoints(out))[4] / "trainer_state.pt", weights_only=False)
    assert all(s["step"] == 4 for s in state["optimizer"]["state"].values())


def test_torchrun_cli_writes_logs_once_and_a_loadable_checkpoint(tiny_llama, train_shards, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    proc = torchrun("-m", "rpt_train.cli", "run", "--shards", train_shards, "--model", tiny_llama, "--out", out,
                    "--steps", 2, "--batch-prompts", 3, "--group-size", 2, "--max-new-tokens", 5, "--bucket", "all",
                    "--save-every", 1, "--beta", 0.05, "--lr", 1e-2, "--micro-batch-size", 2,
                    "--reward", "shard_fixtures:length_reward", "--log-samples-every", 1, "--eval-every", 2,
                    "--eval-limit", 3, "--heldout-fraction", 0.3)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("step 2/2") == 1 and proc.stdout.count("done:") == 1
    lines = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [m["step"] for m in lines] == [1, 2] and CONTRACT <= set(lines[0])
    assert {json.loads(x)["step"] for x in open(out / "samples.jsonl")} == {1, 2}
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]
    assert json.loads((out / "eval" / "step-000002.json").read_text())["all"]["n"] == 3
    assert lines[1]["eval/all/n"] == 3
    model = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-000002")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    before = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert not torch.equal(model.model.norm.weight, before.model.norm.weight)
