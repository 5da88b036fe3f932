"""The memory plan's terms against peaks measured on a CUDA device (torch.cuda.max_memory_allocated above what was
allocated before), bf16 compute over float32 weights as the trainer runs there (rpt_train.precision), on a
SmolLM2-135M-shaped random model (30 layers, no download): one shared-prefix update micro-batch, one HFRollout
generate call and one learnability scorer forward, each within the band tests/test_train_plan.py holds the CPU
peaks to (tests/plan_measure.py: the same measuring code, the same LOW/HIGH). --think-overflow close's second
call has no measured CPU harness (tests/test_train_plan_rollout.py checks its shapes only) and none here. Skipped
without CUDA (tests/conftest.py); bench/gpu.sh runs it with the other `gpu`-marked tests."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

# (micro-batch groups, group size, prompt, new tokens) of the update: --share-prefix pays at these lengths;
# (prompts, group size, prompt, new tokens) of the rollout call; (prompts, prompt) of the scorer forward
UPDATE, ROLLOUT, SCORER = (2, 8, 1024, 128), (8, 8, 768, 256), (64, 1024)


def phases(device: str, peak, layers: int = 30, update=UPDATE, rollout=ROLLOUT, scorer=SCORER) -> list[dict]:
    """The three measured phases of a SmolLM2-135M-shaped model (`layers` of them) on `device`."""
    from plan_measure import measure_rollout, measure_scorer, measure_update, model_on, smollm2_135m
    from tiny import make_tokenizer

    from rpt_train.config import TrainConfig

    config, tok = smollm2_135m(layers), make_tokenizer()  # the model's vocab is wider: ids past it decode to ""
    B, G, P, C = update
    cfg = TrainConfig(shards="x", micro_batch_size=B, batch_prompts=B, group_size=G, max_new_tokens=C,
                      share_prefix=True, device=device)
    model = model_on(config, device, train=True)
    out = [measure_update(model, config, cfg, P, peak, shared=True)]
    assert out[0].pop("shared"), "the plan does not pack these lengths: pick ones where --share-prefix pays"
    model.eval()
    prompts, G, P, C = rollout
    cfg = TrainConfig(shards="x", batch_prompts=prompts, group_size=G, max_new_tokens=C, device=device)
    out.append(measure_rollout(model, tok, config, cfg, [[5] * (P - 1)] + [[5] * P] * (prompts - 1), peak, False))
    prompts, P = scorer
    cfg = TrainConfig(shards="x", batch_prompts=prompts, group_size=2, rollout_batch_size=prompts, max_new_tokens=2,
                      sampler="learnability", sampler_pool=1, device=device)
    out.append(measure_scorer(model, tok, config, cfg, [[5] * (P - 1)] + [[5] * P] * (prompts - 1), peak))
    return out


def test_plan_is_within_tolerance_of_measured_cuda_peaks_in_bf16():
    import torch
    from plan_measure import cuda_peak, describe, within

    from rpt_train.config import TrainConfig
    from rpt_train.precision import compute_dtype

    assert compute_dtype(TrainConfig(shards="x", device="cuda"), "cuda") == torch.bfloat16  # as the trainer runs
    results = phases("cuda", cuda_peak)
    print(describe(results))  # -rA / -s shows the ratios of a passing run too
    for r in results:
        assert r["measured"] > 64 * 2 ** 20, describe(results)  # large enough to be measured at all
    assert within(results), describe(results)
