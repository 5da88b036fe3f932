"""Precision: float32 master weights and AdamW state whatever --dtype says, bf16 only as the compute dtype (issue 21):
at the paper's lr (1e-6) an AdamW step on bf16 weights rounds away, so a bf16-weights run would never move."""
import pytest
import torch
from safetensors.torch import load_file
from shard_fixtures import length_reward, train_shards  # noqa: F401

from rpt_train.checkpoint import latest_checkpoint
from rpt_train.config import TrainConfig
from rpt_train.precision import compute_dtype
from rpt_train.trainer import build_models, train


def _moved(tiny_llama, out) -> float:
    """Fraction of the base model's weights that the run's last checkpoint changed (compared in its dtype)."""
    before = load_file(tiny_llama / "model.safetensors")
    after = load_file(latest_checkpoint(out) / "model.safetensors")
    common = sorted(set(before) & set(after))
    moved = sum(int((after[k] != before[k].to(after[k].dtype)).sum()) for k in common)
    return moved / sum(before[k].numel() for k in common)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_compute_moves_the_weights_as_float32_does(tiny_llama, train_shards, tmp_path, dtype):
    moved = {}
    for dt in ("float32", dtype):
        cfg = TrainConfig(shards=str(train_shards), model=str(tiny_llama), out=str(tmp_path / dt), steps=3,
                          bucket="all", batch_prompts=2, group_size=3, max_new_tokens=6, lr=1e-6, device="cpu",
                          dtype=dt, save_every=3, log_samples_every=0, dynamic_sampling=False)
        train(cfg, reward_fns=[length_reward], quiet=True)
        moved[dt] = _moved(tiny_llama, tmp_path / dt)
        weights = load_file(latest_checkpoint(tmp_path / dt) / "model.safetensors").values()
        assert all(v.dtype == torch.float32 for v in weights)  # the checkpoint holds the float32 masters
        state = torch.load(latest_checkpoint(tmp_path / dt) / "trainer_state.pt", weights_only=False)
        moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k != "step"]
        assert moments and all(t.dtype == torch.float32 for t in moments)
    assert moved["float32"] > 0.9
    assert moved[dtype] > 0.9 * moved["float32"], moved  # bf16 weights: ~1% moved (issue 21)


def test_a_bf16_checkpoint_is_upcast_for_training(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    half = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16).save_pretrained(half)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(half)
    assert next(iter(load_file(half / "model.safetensors").values())).dtype == torch.bfloat16
    cfg = TrainConfig(shards="x", model=str(half), dtype="bfloat16", device="cpu")
    model, _, _ = build_models(cfg, "cpu", None, str(half))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert compute_dtype(cfg, "cpu") == torch.bfloat16
    assert compute_dtype(TrainConfig(shards="x"), "cpu") is None  # float32 compute: no autocast
    assert compute_dtype(TrainConfig(shards="x"), "cuda") == torch.bfloat16  # --bf16 (default) on CUDA
