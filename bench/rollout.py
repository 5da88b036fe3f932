"""Rollout throughput: `rpt_train.rollout.HFRollout` vs HF `model.generate` with sampling, same prompts, batch and
lengths, in one process, alternated (ours, generate, ours, generate, ...).

Scenarios (each is one batch; tokens/s = completion tokens / wall seconds of the call, prefill included):

* `distinct`: B distinct RPT prompts, one completion each (`generate(do_sample=True)` on the left-padded batch);
* `group`: B/G prompts x G completions, the GRPO shape (`generate(num_return_sequences=G)`, which prefills every
  copy; HFRollout prefills each prompt once and repeats its KV cache).

By default no EOS stops a row (both sides make exactly max_new_tokens per row: same lengths, nothing to luck);
`--eos` keeps the model's EOS (rows stop early; HFRollout then drops finished rows from the batch).
Prompts: the paper's v0 template (+ chat template) around the first 96-224 tokens of CHAMP problems.
CPU (default): the demo model, fp32, B=8, 32 new tokens. GPU (`--preset gpu`): a Qwen2-0.5B-shaped model with
random weights (vocabulary of the demo tokenizer, 49152), bf16, B=64, 512 new tokens; HFRollout uses its static
cache + torch.compile (CUDA graphs) path, compiled during the warm-up (its seconds are reported separately).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (apply_preset, alternate, champ_records, champ_text, environment, median,  # noqa: E402
                    pick_device, results_path, setup_threads, synthetic_model, write_json)

import torch  # noqa: E402

PRESETS = {
    "cpu": dict(model="demo", dtype="float32", batch=8, group=4, max_new_tokens=32, reps=3,
                scenarios="distinct,group", hf_static=False),
    "gpu": dict(model="qwen2-0.5b", dtype="bfloat16", batch=64, group=8, max_new_tokens=512, reps=3,
                scenarios="distinct,group", hf_static=True, static_cache=True),  # the path to measure on a GPU
}


def load(spec: str, device: torch.device, dtype: str):
    """(model, tokenizer): the demo/HF policy, or a synthetic shape sized to the demo tokenizer."""
    from rpt_common.models import load_tokenizer, pick_dtype
    from rpt_train.policy import load_policy

    if spec == "demo" or Path(spec).exists():
        policy = load_policy(spec, str(device), dtype)
        return policy.model, policy.tokenizer
    tok = load_tokenizer("demo")
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return synthetic_model(spec, device, pick_dtype(dtype, device), vocab_size=len(tok)), tok


def rpt_prompts(tok, count: int) -> list[list[int]]:
    """RPT prompts around CHAMP text cut at 96..224 tokens (varied lengths: left padding is exercised)."""
    from rpt_train.templates import PromptBuilder

    builder = PromptBuilder(tok, "v0", "auto")
    records = champ_records()
    out = []
    for i in range(count):
        ids = tok(champ_text(records[i % len(records)]), add_special_tokens=False)["input_ids"]
        out.append(builder.ids(tok.decode(ids[:96 + 32 * (i % 5)])))
    return out


def eos_of(model, tok) -> list[int]:
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    extra = getattr(model.generation_config, "eos_token_id", None)
    ids.update([extra] if isinstance(extra, int) else (extra or []))
    return sorted(ids)


def left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def hf_generate(model, tok, prompts, n: int, max_new: int, temperature: float, eos: list[int] | None,
                static: bool = False) -> int:
    """HF generate as a user calls it; returns the completion tokens made (up to and including EOS)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, tok.pad_token_id, device)
    cfg = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new,
                           num_return_sequences=n, pad_token_id=tok.pad_token_id, eos_token_id=eos or None,
                           **({"cache_implementation": "static"} if static else {}))
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    completion = out[:, ids.shape[1]:]
    if not eos:
        return completion.numel()
    from rpt_train.rollout import completion_mask

    return int(completion_mask(completion, eos).sum())


def ours(engine, prompts, n: int, max_new: int, temperature: float) -> int:
    from rpt_train.rollout import SamplingParams

    batch = engine.generate(prompts, SamplingParams(n=n, max_new_tokens=max_new, temperature=temperature))
    return int(batch.completion_mask.sum())


def run(args, log=print) -> dict:
    from rpt_train.rollout import HFRollout

    device = pick_device(args.device)
    threads = setup_threads(args.threads)
    env = environment(device, threads)
    model, tok = load(args.model, device, args.dtype)
    eos = eos_of(model, tok) if args.eos else []
    engine = HFRollout(model, tok, eos, static_cache=args.static_cache, compile=args.compile)
    prompts = rpt_prompts(tok, args.batch)
    result = {**env, "benchmark": "rollout",
              "config": {k: getattr(args, k) for k in ("model", "dtype", "batch", "group", "max_new_tokens", "reps",
                                                       "eos", "temperature", "static_cache", "compile")},
              "prompt_tokens": [len(p) for p in prompts], "scenarios": {}}
    result["config"]["engine"] = {"static_cache": engine._use_static(device),
                                  "compile": bool(engine._use_static(device) and engine._decode_fn(device) is not None)}
    for scenario in [s.strip() for s in args.scenarios.split(",") if s.strip()]:
        n = 1 if scenario == "distinct" else args.group
        ps = prompts if n == 1 else prompts[:max(1, args.batch // n)]
        made: dict[str, list[int]] = {"ours": [], "hf_generate": [], "hf_generate_static": []}
        sides = {"ours": lambda: made["ours"].append(ours(engine, ps, n, args.max_new_tokens, args.temperature)),
                 "hf_generate": lambda: made["hf_generate"].append(
                     hf_generate(model, tok, ps, n, args.max_new_tokens, args.temperature, eos))}
        if args.hf_static:
            sides["hf_generate_static"] = lambda: made["hf_generate_static"].append(
                hf_generate(model, tok, ps, n, args.max_new_tokens, args.temperature, eos, static=True))
        warm = {}
        for name, fn in list(sides.items()):  # warm-up (compiles where a side compiles)
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as e:  # an optional baseline that fails is reported, not fatal
                if name != "hf_generate_static":
                    raise
                log(f"  {name} failed: {type(e).__name__}: {e}")
                result.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
                del sides[name]
                continue
            warm[name] = time.perf_counter() - t0
            made[name].clear()
        log(f"rollout [{scenario}]: {len(ps)} prompts x {n}, {args.max_new_tokens} new tokens; warm-up "
            + ", ".join(f"{k} {v:.1f} s" for k, v in warm.items()))
        times = alternate(sides, args.reps, device, log)
        res = {"prompts": len(ps), "n": n, "sequences": len(ps) * n, "seconds": times, "warmup_seconds": warm,
               "completion_tokens": {k: v for k, v in made.items() if v}}
        for name in times:
            tps = [t / s for t, s in zip(made[name], times[name])]
            res[f"{name}_tokens_per_s"] = median(tps)
        res["speedup_vs_hf_generate"] = res["ours_tokens_per_s"] / res["hf_generate_tokens_per_s"]
        result["scenarios"][scenario] = res
    main = result["scenarios"].get("distinct") or next(iter(result["scenarios"].values()))
    result["tokens_per_s"] = main["ours_tokens_per_s"]
    result["hf_generate_tokens_per_s"] = main["hf_generate_tokens_per_s"]
    result["speedup_vs_hf_generate"] = main["speedup_vs_hf_generate"]
    if device.type == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    result["loadavg_end"] = environment(device, threads)["loadavg_start"]
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="defaults for cpu or gpu (default: by device)")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", help="demo, an HF directory, or a synthetic shape: qwen2-0.5b, qwen2-1.5b")
    p.add_argument("--dtype")
    p.add_argument("--batch", type=int, help="sequences per batch")
    p.add_argument("--group", type=int, help="completions per prompt in the `group` scenario")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--reps", type=int)
    p.add_argument("--scenarios", help="comma list of distinct, group")
    p.add_argument("--eos", action="store_true", help="stop rows at EOS (default: every row makes max_new_tokens)")
    p.add_argument("--hf-static", action=argparse.BooleanOptionalAction, default=None,
                   help="also time generate(cache_implementation='static') (HF's own compiled decode)")
    p.add_argument("--static-cache", action=argparse.BooleanOptionalAction, default=None,
                   help="HFRollout static-cache path (default: the preset's; off in HFRollout itself)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="HFRollout compiled decode (default: with the static cache on CUDA)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out")
    return p


def resolve(args) -> argparse.Namespace:
    return apply_preset(args, PRESETS)


def main(argv=None) -> None:
    args = resolve(parser().parse_args(argv))
    result = run(args)
    path = results_path("rollout", pick_device(args.device), args.out)
    write_json(path, result)
    keys = ("tokens_per_s", "hf_generate_tokens_per_s", "speedup_vs_hf_generate")
    print(json.dumps({k: result[k] for k in keys} | {"written": str(path)}))


if __name__ == "__main__":
    main()
