"""The memory plan: its terms against peaks measured on this CPU (a subprocess reads /proc's VmHWM around one
micro-batch update and one rollout call), FSDP division, the refusal sentence, and `rpt-train plan` (--json, exit
codes, a directory with only config.json)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from shard_fixtures import train_shards  # noqa: F401

from rpt_train.cli import main
from rpt_train.config import TrainConfig
from rpt_train.plan import Shapes, plan_memory, refusal
from plan_measure import HIGH, LOW, describe, llama, model_on  # the band, shared with test_train_plan_gpu.py

TESTS = Path(__file__).parent
REPO = TESTS.parent
CONFIGS = REPO / "bench" / "configs"

MEASURE = r'''
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from plan_measure import cpu_peak, llama, measure_rollout, measure_update, model_on
from rpt_train.config import TrainConfig
from tiny import make_tokenizer
torch.set_num_threads(1)
out = []
for H, I, V, B, P, C, chunk, ckpt in json.loads(sys.argv[2]):
    config = llama(V, H, I)
    model = model_on(config, "cpu", train=True)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = TrainConfig(shards="x", micro_batch_size=B, max_new_tokens=C, logprob_chunk_tokens=chunk,
                      gradient_checkpointing=ckpt, batch_prompts=B, group_size=2, device="cpu")
    out.append(measure_update(model, config, cfg, P, cpu_peak))
tok = make_tokenizer()
for H, prompts, P, C in json.loads(sys.argv[3]):
    config = llama(len(tok), H, 2 * H)
    cfg = TrainConfig(shards="x", batch_prompts=prompts, group_size=2, max_new_tokens=C, device="cpu")
    out.append(measure_rollout(model_on(config, "cpu", train=False), tok, config, cfg, [[5] * P] * prompts, cpu_peak))
print(json.dumps(out))
'''


def test_plan_is_within_tolerance_of_measured_cpu_peaks():
    shapes = [[128, 256, 32000, 2, 32, 256, 256, False],  # the log-prob chunk dominates
              [512, 1024, 512, 4, 64, 448, 1024, False],  # activations dominate
              [512, 1024, 512, 4, 64, 448, 1024, True]]  # gradient checkpointing
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO))  # freed tensors leave RSS
    rollouts = [[512, 16, 16, 256], [256, 32, 64, 192]]  # hidden, prompts (x 2 rollouts), prompt, new tokens
    run = subprocess.run([sys.executable, "-c", MEASURE, str(TESTS), json.dumps(shapes), json.dumps(rollouts)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.splitlines()[-1])
    for r in results:
        assert r["measured"] > 4 * 2 ** 20, r  # large enough to be measured at all
        assert LOW <= r["planned"] / r["measured"] <= HIGH, r


MEASURE_BF16 = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from plan_measure import cpu_peak, llama, measure_update, model_on
from rpt_train.config import TrainConfig
torch.set_num_threads(1)
out = []
for (H, I, heads, kv_heads, layers), B, G, P, C, shared, ckpt in json.loads(sys.argv[2]):
    config = llama(512, H, I, layers=layers, heads=heads, kv_heads=kv_heads)
    model = model_on(config, "cpu", train=True)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = TrainConfig(shards="x", micro_batch_size=B, batch_prompts=B, group_size=G, max_new_tokens=C,
                      gradient_checkpointing=ckpt, share_prefix=shared, device="cpu", dtype="bfloat16")
    out.append(measure_update(model, config, cfg, P, cpu_peak, shared=shared))
print(json.dumps(out))
"""


def test_bf16_autocast_update_is_within_tolerance_of_measured_cpu_peaks():
    """--dtype bfloat16 on one device: autocast over the float32 weights, as the trainer runs on CUDA. The residual
    stream and the norms stay float32 and every linear keeps its own bf16 copy of its input; a plan that counted
    every saved tensor at 2 bytes was 0.80-0.86x the measured peak (below the band)."""
    smol = [576, 1536, 9, 3, 2]  # SmolLM2-135M's block, 2 layers
    cases = [[[512, 1024, 4, 2, 2], 4, 2, 64, 448, False, False],  # activations dominate
             [smol, 4, 2, 64, 448, False, False],
             [[512, 1024, 4, 2, 2], 4, 2, 64, 448, False, True],  # gradient checkpointing
             [[576, 1536, 9, 3, 4], 2, 8, 512, 64, True, False]]  # shared prefix, 2 groups of 8
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(REPO))
    run = subprocess.run([sys.executable, "-c", MEASURE_BF16, str(TESTS), json.dumps(cases)], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.splitlines()[-1])
    assert [r["shared"] for r in results] == [c[5] for c in cases]
    for r in results:
        assert r["measured"] > 4 * 2 ** 20, r
    assert all(LOW <= r["planned"] / r["measured"] <= HIGH for r in results), describe(results)


@pytest.mark.parametrize("float32_weights", [True, False])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_activation_bytes_per_block_are_what_autograd_saves_in_bf16(float32_weights, checkpointed):
    """One decoder block's share of the activation term against the bytes autograd saves for it (saved-tensor
    hooks, distinct storages that are no parameter or autocast weight copy; a 2-layer minus a 1-layer model): bf16
    autocast over float32 weights (one device) and over bf16 weights (FSDP2's param_dtype), with and without
    gradient checkpointing (the kept block input; recomputed blocks are planned once, not per block)."""
    import torch

    from rpt_train.plan import activation_bytes

    rows, tokens = 2, 256
    saved = {}
    for layers in (1, 2):
        config = llama(512, 256, 768, layers=layers)
        model = model_on(config, "cpu", train=True)
        if not float32_weights:
            model.to(torch.bfloat16)
        if checkpointed:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            st = t.untyped_storage()
            # activations (first dim rows, not autocast's weight copies) of a hidden-state width (not the norms'
            # [rows, tokens, 1] rsqrt or attention's log-sum-exp, a few bytes a token the plan leaves out)
            if st.data_ptr() not in weights and t.shape[:1] in ((rows,), (rows * tokens,)) \
                    and t.numel() >= rows * tokens * 32:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
            model.model(input_ids=torch.randint(0, 512, (rows, tokens)))
        saved[layers] = sum(seen.values())
    shapes = Shapes.from_config(llama(512, 256, 768, layers=1))
    plan = [activation_bytes(dataclasses.replace(shapes, layers=n), rows, tokens, 2, checkpointed, float32_weights)
            for n in (1, 2)]
    assert plan[1] - plan[0] == saved[2] - saved[1], (plan, saved)


def test_fsdp_divides_the_model_terms_and_refusal_names_the_largest_term():
    shapes = Shapes(params=10 ** 9, layer_params=10 ** 7, layers=24, hidden=2048, intermediate=8192, kv_dim=256,
                    vocab=150000)
    cfg = TrainConfig(shards="x", max_new_tokens=1024, batch_prompts=8, group_size=8, micro_batch_size=1)
    one = plan_memory(cfg, shapes, world_size=1, device_bytes=10 * 2 ** 30)
    four = plan_memory(cfg, shapes, world_size=4, device_bytes=10 * 2 ** 30)
    for term in ("weights", "optimizer", "gradients"):
        assert four.terms[term] == one.terms[term] // 4
    assert one.terms["weights"] == 4 * 10 ** 9 and one.terms["optimizer"] == 8 * 10 ** 9
    assert one.terms["kv_cache"] == 4 * four.terms["kv_cache"]  # 8 contexts over 4 ranks: 2 each, G rows apiece
    assert not one.fits and one.largest() == "optimizer"
    assert "the largest term is optimizer" in refusal(one) and "--world-size" in refusal(one)
    chunked = plan_memory(TrainConfig(shards="x", logprob_chunk_tokens=64), shapes)
    assert chunked.terms["logprobs"] == 4 * 64 * 150000 * 4


@pytest.mark.parametrize("memory,code", [("80", 0), ("4", 2)])
def test_plan_cli_from_config_json_alone(tmp_path, memory, code):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text((CONFIGS / "qwen2-1.5b" / "config.json").read_text())  # no weights
    result = CliRunner().invoke(main, ["plan", "--model", str(model), "--device-memory", memory, "--json",
                                       "--max-new-tokens", "8192", "--batch-prompts", "256", "--group-size", "8",
                                       "--rollout-batch-size", "64", "--micro-batch-size", "1", "--dtype", "bfloat16"])
    assert result.exit_code == code, result.output
    plan = json.loads(result.output.strip().splitlines()[-1])
    assert plan["fits"] is (code == 0) and plan["device_bytes"] == int(float(memory) * 2 ** 30)
    assert {"total_bytes", "weights", "optimizer", "gradients", "kv_cache", "activations", "logprobs"} <= plan.keys()
    # Qwen2-1.5B: 1.54B parameters, float32 masters whatever --dtype says; bf16 is the compute dtype: autocast's
    # bf16 copy of the weights beside them, and no remedy proposes bf16 weights
    assert plan["weights"] == 4 * 1_543_714_304 and plan["autocast_weights"] == 2 * 1_543_714_304
    assert "compute in bfloat16" in result.output
    assert not [line for line in result.output.splitlines() if line.startswith("error:") and "--dtype" in line]
    if code:
        assert "the largest term is" in result.output


def test_run_prints_the_plan_and_refuses_before_loading_when_it_does_not_fit(tiny_llama, train_shards, tmp_path,
                                                                              capsys, monkeypatch):
    from rpt_common.errors import UserError
    from rpt_train import distributed
    from rpt_train.trainer import train

    monkeypatch.setattr(distributed, "load_sharded_policy", lambda *a, **k: pytest.fail("loaded a model"))
    cfg = TrainConfig(shards=str(train_shards), model=str(tiny_llama), out=str(tmp_path / "run"), device="cpu",
                      device_memory=0.0001, max_new_tokens=64)
    with pytest.raises(UserError, match=r"exceeds the device's 0.0 GiB; the largest term is \w+ .*: lower it with --"):
        train(cfg)
    assert "memory plan per device" in capsys.readouterr().out
    # the inputs are checked first: missing shards are said before any plan is printed
    with pytest.raises(UserError, match="nope"):
        train(dataclasses.replace(cfg, shards=str(tmp_path / "nope")))
    assert "memory plan" not in capsys.readouterr().out


def test_plan_never_says_fits_without_a_device_size(tmp_path, monkeypatch):
    """A GPU plan on a machine without that GPU says "unknown" (JSON fits: null, exit 0); --device cpu is judged
    against this machine's memory (exit 2 beyond it), and a CPU run beyond it only warns."""
    from rpt_train import plan

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text((CONFIGS / "qwen2-1.5b" / "config.json").read_text())
    monkeypatch.setattr(plan.torch.cuda, "is_available", lambda: False)
    args = ["plan", "--model", str(model), "--json", "--max-new-tokens", "8192", "--batch-prompts", "256"]
    unknown = CliRunner().invoke(main, args)
    assert unknown.exit_code == 0 and "fits" not in unknown.output.replace('"fits"', "")
    assert "fit unknown" in unknown.output and json.loads(unknown.output.splitlines()[-1])["fits"] is None
    monkeypatch.setattr(plan, "machine_memory", lambda: 24 * 2 ** 30)
    cpu = CliRunner().invoke(main, args + ["--device", "cpu"])
    assert cpu.exit_code == 2 and "of 24.00 GiB (this machine's memory): DOES NOT FIT" in cpu.output
    memory = plan.plan_memory(TrainConfig(shards="x"), plan.load_shapes(str(model)), device_type="cpu",
                              device_bytes=2 ** 30, device_source="machine")
    plan.check(memory)  # a warning, not a refusal


SHAPES_14B = Shapes(params=14_770_000_000, layer_params=290_000_000, layers=48, hidden=5120, intermediate=13824,
                    kv_dim=1024, vocab=152064)


def test_rollout_gather_auto_gathers_when_the_copy_fits_and_says_why_not_otherwise():
    """Issue 31: lockstep decoding all-gathers every layer at every token (~26 GB per rank per token for 14B over
    8 ranks); auto gathers the weights once per call whenever the plan with that copy fits."""
    cfg = TrainConfig(shards="x", max_new_tokens=8192, batch_prompts=256, group_size=8, micro_batch_size=1,
                      rollout_batch_size=16, gradient_checkpointing=True)
    assert cfg.rollout_gather == "auto"
    roomy = plan_memory(cfg, SHAPES_14B, world_size=8, device_bytes=80 * 2 ** 30)
    assert roomy.rollout_gather and roomy.extra["rollout_gather"] > 0 and "fits" in roomy.rollout_reason
    tight = plan_memory(cfg, SHAPES_14B, world_size=8, device_bytes=40 * 2 ** 30)
    assert not tight.rollout_gather and "rollout_gather" not in tight.extra
    assert "over the device's 40.00 GiB" in tight.rollout_reason and "per rank per token" in tight.rollout_reason
    assert tight.total == plan_memory(cfg, SHAPES_14B, world_size=8, device_bytes=40 * 2 ** 30, gather=False).total
    unknown = plan_memory(cfg, SHAPES_14B, world_size=8)  # no device size: never a silent gather
    assert not unknown.rollout_gather and "--device-memory" in unknown.rollout_reason
    for mode, want in (("on", True), ("off", False)):
        cfg.rollout_gather = mode
        assert plan_memory(cfg, SHAPES_14B, world_size=8, device_bytes=40 * 2 ** 30).rollout_gather is want
    cfg.rollout_gather = "on"
    assert not plan_memory(cfg, SHAPES_14B, world_size=1, device_bytes=80 * 2 ** 30).rollout_gather  # no FSDP


def test_the_fsdp_plan_says_rank_0s_host_memory_for_the_full_weights():
    """Under FSDP rank 0 reads the full float32 weights into RAM (not its device) and shards from there: the plan
    says so (14.77B parameters: 55.02 GiB), its device terms keep only the shards; one process has no such line."""
    from rpt_train.plan import render

    cfg = TrainConfig(shards="x", max_new_tokens=8192, batch_prompts=256, group_size=8, micro_batch_size=1,
                      gradient_checkpointing=True)
    eight = plan_memory(cfg, SHAPES_14B, world_size=8, device_bytes=80 * 2 ** 30)
    assert eight.host_bytes == SHAPES_14B.params * 4 and eight.to_json()["host_bytes"] == eight.host_bytes
    assert eight.terms["weights"] == SHAPES_14B.params * 4 // 8  # the devices: their shards only
    assert "host: rank 0 reads the full float32 weights: 55.02 GiB of RAM" in render(eight)
    # its peak: a save gathers weights + AdamW (+ rlp's EMA), a --resume holds the loaded state while reading the
    # weights; the loaded state is not kept between the two (test_train_loop.py: released once loaded)
    assert eight.host_peak_bytes == 3 * eight.host_bytes and "and a --resume holds the loaded ones while it reads " \
        "the weights: 165.07 GiB)" in render(eight)
    rlp = plan_memory(dataclasses.replace(cfg, objective="rlp"), SHAPES_14B, world_size=8, device_bytes=80 * 2 ** 30)
    assert rlp.host_peak_bytes == 4 * rlp.host_bytes and "and the EMA copy, and a --resume" in render(rlp)
    one = plan_memory(cfg, SHAPES_14B, world_size=1, device_bytes=80 * 2 ** 30)
    assert one.host_bytes == one.host_peak_bytes == 0 and "host:" not in render(one)


def test_plan_shows_the_rollout_choices(tiny_llama):
    from click.testing import CliRunner

    import rpt_train.cli

    result = CliRunner().invoke(rpt_train.cli.main, ["plan", "--model", str(tiny_llama), "--world-size", "2",
                                                     "--device-memory", "8", "--json"])
    assert result.exit_code == 0, result.output
    assert "rollouts: gathered weights (auto: the gathered copy" in result.output
    assert "KV cache: dynamic" in result.output and "--static-cache" in result.output
    assert json.loads(result.output.strip().splitlines()[-1])["rollout_gather"] is True
    result = CliRunner().invoke(rpt_train.cli.main, ["plan", "--model", str(tiny_llama), "--world-size", "2",
                                                     "--device-memory", "8", "--rollout-gather", "off"])
    assert "rollouts: no gathered copy (--rollout-gather off; lockstep decoding all-gathers" in result.output


def test_the_trainer_follows_the_plans_rollout_choice(tiny_llama):
    from rpt_train.plan import gathers_rollouts

    cfg = TrainConfig(shards="x", model=str(tiny_llama), device_memory=8.0)
    assert gathers_rollouts(cfg, "cpu", 2) and not gathers_rollouts(cfg, "cpu", 1)
    cfg.device_memory = 1e-6  # nothing fits: no gathered copy (the plan itself then refuses the run)
    assert not gathers_rollouts(cfg, "cpu", 2)
    cfg.rollout_gather = True  # a config built in code with the old bool
    assert gathers_rollouts(cfg, "cpu", 2)
