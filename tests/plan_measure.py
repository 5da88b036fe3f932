"""Measured peaks of the memory plan's phases, for both devices: one policy update (the trainer's
`update.logprobs` + backward, optionally shared-prefix packed), one HFRollout generate call, one learnability
scorer forward; each returns {"kind", "measured", "planned"} with the plan's term for that phase. The peak comes
from `cpu_peak` (VmHWM above the start; run in a subprocess with MALLOC_MMAP_THRESHOLD_ fixed:
tests/test_train_plan.py, tests/test_train_plan_rollout.py) or `cuda_peak` (torch.cuda.max_memory_allocated above
the memory allocated before: tests/test_train_plan_gpu.py). Under a low-precision compute dtype the planned terms
include autocast's cached weight copies (`autocast_weights`), which the plan holds beside every phase."""
from __future__ import annotations

import gc

import torch

# The plan may not be below what was measured by more than 10%, nor above it by more than 60% (it is meant to
# be a safe upper bound; the dynamic KV cache and autograd keep a little less than what is counted).
LOW, HIGH = 0.9, 1.6


def cpu_peak(fn):
    """(fn(), peak resident bytes above the start): rpt_train.plan.measured_peak (Linux VmHWM)."""
    from rpt_train.plan import measured_peak

    return measured_peak(fn)


def cuda_peak(fn):
    """(fn(), peak bytes the caching allocator handed out above what was allocated before)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - before


def llama(vocab: int, hidden: int, intermediate: int, layers: int = 2, heads: int = 4, kv_heads: int = 2,
          **kw):
    """A Llama config (no download): the CPU tests' 2-layer shapes, or any other."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       **{"max_position_embeddings": 2048, "tie_word_embeddings": False, **kw})


def smollm2_135m(layers: int = 30):
    """SmolLM2-135M's shapes (HuggingFaceTB/SmolLM2-135M config.json), random weights."""
    return llama(49152, 576, 1536, layers=layers, heads=9, kv_heads=3, max_position_embeddings=8192,
                 rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)


def model_on(config, device, train: bool):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device)
    return model.train() if train else model.eval()


def _plan(cfg, config, prompt: int):
    from rpt_train.plan import Shapes, plan_memory

    device_type = torch.device(cfg.device).type
    return plan_memory(cfg, Shapes.from_config(config), device_type=device_type, prompt_tokens=prompt, gather=False)


def _held(plan) -> int:
    return plan.extra.get("autocast_weights", 0)


def measure_update(model, config, cfg, prompt: int, peak, shared: bool = False, with_entropy: bool = True) -> dict:
    """One micro-batch through the trainer's update.logprobs and backward (after a warm-up): --micro-batch-size
    rows of prompt + --max-new-tokens, or with `shared` --micro-batch-size groups of --group-size completions of
    one prompt each, packed (--share-prefix). Planned: gradients + activations + log-prob chunk."""
    from rpt_train.update import logprobs

    B, C, V = cfg.micro_batch_size, cfg.max_new_tokens, config.vocab_size
    rows = B * cfg.group_size if shared else B
    device = next(model.parameters()).device
    ids = torch.randint(0, V, (B, prompt), device=device)
    ids = ids.repeat_interleave(cfg.group_size, 0) if shared else ids  # a group shares its prompt
    cids = torch.randint(0, V, (rows, C), device=device)
    ones = torch.ones(rows, prompt + C, dtype=torch.long, device=device)
    inputs = (ids, ones[:, :prompt], cids, ones[:, prompt:])

    def update():
        logprobs(cfg, model, inputs, with_entropy, shared)[0].sum().backward()

    update()
    model.zero_grad(set_to_none=True)  # warm-up: one-off allocations are no part of the plan
    _, measured = peak(update)
    model.zero_grad(set_to_none=True)
    plan = _plan(cfg, config, prompt)
    t = plan.terms
    return {"kind": "update", "measured": measured, "planned": t["gradients"] + t["activations"] + t["logprobs"]
            + _held(plan), "shared": "shared prefix" in plan.notes[0]}


def measure_rollout(model, tok, config, cfg, prompt_rows: list[list[int]], peak, packed_prefill=None) -> dict:
    """One HFRollout generate call of --group-size completions of --max-new-tokens for each prompt (no EOS: every
    row runs to the end), after a warm-up, bf16 as the trainer's engine on CUDA. Planned: the rollout phase, the
    larger of the KV cache and the prefill; both terms are given too."""
    from rpt_train.precision import compute_dtype
    from rpt_train.rollout import HFRollout, SamplingParams

    engine = HFRollout(model, tok, [], packed_prefill=packed_prefill, static_cache=cfg.static_cache,
                       bf16=compute_dtype(cfg, next(model.parameters()).device) is not None)
    engine.generate(prompt_rows, SamplingParams(n=cfg.group_size, max_new_tokens=2))  # warm-up
    _, measured = peak(lambda: engine.generate(prompt_rows, SamplingParams(n=cfg.group_size,
                                                                           max_new_tokens=cfg.max_new_tokens)))
    plan = _plan(cfg, config, max(map(len, prompt_rows)))
    kv, prefill = plan.terms["kv_cache"], plan.extra["prefill"]
    return {"kind": "rollout", "measured": measured, "planned": max(kv, prefill) + _held(plan), "kv_cache": kv,
            "prefill": prefill}


def measure_scorer(model, tok, config, cfg, prompt_rows: list[list[int]], peak) -> dict:
    """One forward of --sampler learnability's scorer over the prompts (--rollout-batch-size of them), after a
    warm-up that also builds its token table. Planned: the scorer phase."""
    from rpt_train.precision import compute_dtype
    from rpt_train.sampler import LearnabilityScorer

    scorer = LearnabilityScorer(model, tok, batch_size=len(prompt_rows),
                                bf16=compute_dtype(cfg, next(model.parameters()).device) is not None)
    labels = ["x"] * len(prompt_rows)
    scorer.probabilities(prompt_rows, labels)  # warm-up (and the token table)
    _, measured = peak(lambda: scorer.probabilities(prompt_rows, labels))
    plan = _plan(cfg, config, max(map(len, prompt_rows)))
    return {"kind": "scorer", "measured": measured, "planned": plan.extra["scorer"] + _held(plan)}


def ratio(r: dict) -> float:
    return r["planned"] / r["measured"]


def within(results: list[dict]) -> bool:
    return all(LOW <= ratio(r) <= HIGH for r in results)


def describe(results: list[dict]) -> str:
    """One line a phase: planned / measured and the bytes, for an assertion message."""
    return "; ".join(f"{r['kind']}: planned/measured {ratio(r):.3f} ({r['planned']:,} / {r['measured']:,} B)"
                     for r in results) + f" (band {LOW}-{HIGH})"
