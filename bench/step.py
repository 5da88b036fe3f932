"""One RPT step with and without --share-prefix, and TRL's GRPOTrainer at the main shape: update seconds, step
seconds and the update's peak memory at contexts of 256 and 1024 policy tokens, 12 and 64 new tokens, G = 8 and 16.

Per shape: one context (CHAMP text, exactly C policy tokens), G completions of exactly R tokens each (EOS
suppressed, so both sides see the same lengths) sampled by HFRollout, a random reward per row (every row trained),
then `update_policy` on those same rollouts once with --share-prefix and once without (AdamW, grpo loss, micro-batch
4: rows unshared, groups shared). step = rollout + reward + update. TRL (`--trl-shape`, default 1024:12:16):
GRPOTrainer on the same context text, G, length (min_new_tokens = max_new_tokens), temperature, lr, loss and
4-row micro-batches (gradient accumulation over the group); its step timed by a callback, the first one a warm-up.
peak_mib: resident memory above the start during the update (CPU, malloc returning freed memory to the OS) or
torch.cuda.max_memory_allocated. Writes bench/results/step-<device>.json (DESIGN.md's schema plus details).

    .venv/bin/python bench/step.py                      # the full grid + TRL (the lead's run: long on a CPU)
    .venv/bin/python bench/step.py --quick              # a tiny smoke run (C=64, R=4, G=4; no TRL)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, champ_text, champ_records, device_name, environment, median, pick_device, sync, write_json  # noqa: E402

MIB = 2 ** 20
GRID = "256:12:8,256:12:16,256:64:8,256:64:16,1024:12:8,1024:12:16,1024:64:8,1024:64:16"
MAIN = "1024:12:16"


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    return [tuple(int(x) for x in s.split(":")) for s in text.split(",") if s.strip()]


def context_ids(tok, tokens: int, seed: int = 0) -> list[int]:
    """Exactly `tokens` policy tokens of CHAMP text (problems joined until long enough)."""
    records = champ_records()
    text, i = "", seed
    ids: list[int] = []
    while len(ids) < tokens:
        text += champ_text(records[i % len(records)]) + "\n\n"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        i += 1
    return ids[:tokens]


def peak_of(fn, device):
    """(fn(), peak bytes above the start while it ran)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - start
    from rpt_train.plan import measured_peak

    return measured_peak(fn)


def train_config(C: int, R: int, G: int, share: bool, device):
    from rpt_train.config import TrainConfig

    return TrainConfig(shards="bench", model="bench", out="", batch_prompts=1, group_size=G, max_new_tokens=R,
                       temperature=0.8, lr=1e-6, loss="grpo", beta=0.0, dynamic_sampling=False, ppo_epochs=1,
                       mini_batch_size=0, micro_batch_size=4, grad_clip=1.0, share_prefix=share, device=str(device))


def ours(model, tok, optimizer, shape, device, seed: int = 0) -> dict:
    """One rollout, then the update on it with and without sharing: seconds and peaks."""
    import torch

    from rpt_train.collect import Groups
    from rpt_train.rollout import HFRollout, SamplingParams
    from rpt_train.update import update_policy

    C, R, G = shape
    prompt = context_ids(tok, C, seed)
    engine = HFRollout(model, tok, eos_token_ids=[])  # no EOS: every completion has exactly R tokens
    torch.manual_seed(seed)
    sync(device)
    t0 = time.perf_counter()
    rollouts = engine.generate([prompt], SamplingParams(n=G, max_new_tokens=R, temperature=0.8))
    sync(device)
    rollout_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rewards = torch.rand(G, generator=torch.Generator().manual_seed(seed))  # the reward stage, trivially
    reward_s = time.perf_counter() - t0
    batch = Groups(samples=[None], rollouts=rollouts, rewards=rewards, answers=[None] * G)
    out = {"rollout_seconds": rollout_s}
    for arm, share in (("shared", True), ("unshared", False)):
        cfg = train_config(C, R, G, share, device)
        sync(device)
        t0 = time.perf_counter()
        stats, peak = peak_of(lambda: update_policy(cfg, model, None, optimizer, batch), device)
        sync(device)
        seconds = time.perf_counter() - t0
        out[arm] = {"update_seconds": seconds, "step_seconds": rollout_s + reward_s + seconds, "peak_mib": peak / MIB,
                    "shared_prefix": stats["shared_prefix"]}  # False where packing.pays says it would not pay
    return out


def trl_step(model_dir: str, tok, shape, device, steps: int, work: Path) -> float:
    """Median seconds of GRPOTrainer's timed steps (after one warm-up) on one context of C tokens."""
    import contextlib
    import io

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    C, R, G = shape
    text = tok.decode(context_ids(tok, C))
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync(device)
            times.append(time.perf_counter() - self.t0)

    def reward(completions, **kw):
        return torch.rand(len(completions)).tolist()

    cuda = device.type == "cuda"
    config = GRPOConfig(
        output_dir=str(work / f"trl-{time.time_ns()}"), per_device_train_batch_size=4,
        gradient_accumulation_steps=max(1, G // 4), num_generations=G, max_completion_length=R,
        generation_kwargs={"min_new_tokens": R}, temperature=0.8, top_p=1.0, top_k=0, learning_rate=1e-6,
        lr_scheduler_type="constant", beta=0.0, loss_type="grpo", epsilon=0.2, num_iterations=1, max_grad_norm=1.0,
        gradient_checkpointing=False, max_steps=steps + 1, logging_steps=1, report_to="none", save_strategy="no",
        seed=0, disable_tqdm=True, shuffle_dataset=False, use_cpu=not cuda, bf16=cuda, log_completions=False)
    trl_tok = AutoTokenizer.from_pretrained(model_dir)
    trl_tok.padding_side = "left"
    if trl_tok.pad_token is None:
        trl_tok.pad_token = trl_tok.eos_token
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=config, processing_class=trl_tok,
                          train_dataset=Dataset.from_list([{"prompt": text}] * (steps + 1)), callbacks=[StepTimer()])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    return median(times[1:])


def run(args, log=print) -> dict:
    import torch

    from rpt_common.models import load_causal_lm

    device = pick_device(args.device)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    loaded = load_causal_lm(args.model, device=str(device), dtype="float32")
    model, tok = loaded.model, loaded.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    ours(model, tok, optimizer, (64, 4, 4), device)  # warm-up (first-call costs of both paths)
    shapes, details = [], []
    for shape in parse_shapes(args.shapes):
        runs = [ours(model, tok, optimizer, shape, device, seed=r) for r in range(args.reps)]
        med = {arm: {k: median([r[arm][k] for r in runs]) for k in ("update_seconds", "step_seconds", "peak_mib")}
               for arm in ("shared", "unshared")}
        C, R, G = shape
        row = {"context_tokens": C, "new_tokens": R, "group_size": G,
               "update_seconds": {a: med[a]["update_seconds"] for a in med},
               "step_seconds": {a: med[a]["step_seconds"] for a in med},
               "peak_mib": {a: med[a]["peak_mib"] for a in med}}
        row["update_speedup"] = row["update_seconds"]["unshared"] / row["update_seconds"]["shared"]
        shapes.append(row)
        details.append({"shape": list(shape), "runs": runs})
        log(f"C={C} R={R} G={G}: update shared {row['update_seconds']['shared']:.2f} s, unshared "
            f"{row['update_seconds']['unshared']:.2f} s ({row['update_speedup']:.1f}x); rollout "
            f"{median([r['rollout_seconds'] for r in runs]):.2f} s; peak {row['peak_mib']['shared']:.0f} / "
            f"{row['peak_mib']['unshared']:.0f} MiB")
    shape = parse_shapes(args.trl_shape)[0] if args.trl_shape else None
    row = next((r for r in shapes if (r["context_tokens"], r["new_tokens"], r["group_size"]) == shape), None)
    if row is not None:
        with tempfile.TemporaryDirectory(prefix="rpt-bench-step-") as work:
            trl_s = trl_step(str(loaded.path), tok, shape, device, args.trl_steps, Path(work))
        row["step_seconds"]["trl"] = trl_s
        row["step_speedup_vs_trl"] = trl_s / row["step_seconds"]["shared"]
        log(f"TRL GRPOTrainer at C={shape[0]} R={shape[1]} G={shape[2]}: {trl_s:.2f} s/step, "
            f"ours (shared) {row['step_seconds']['shared']:.2f} s ({row['step_speedup_vs_trl']:.1f}x)")
    env = environment(device, torch.get_num_threads())
    return {"device": device_name(device), "shapes": shapes, "model": args.model, "reps": args.reps,
            "environment": env, "details": details}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="demo", help="policy (default: the demo SmolLM2-135M)")
    p.add_argument("--shapes", default=GRID, help=f"comma list of C:R:G (default: {GRID})")
    p.add_argument("--trl-shape", default=MAIN, help="C:R:G where TRL runs too ('' = no TRL; must be in --shapes)")
    p.add_argument("--trl-steps", type=int, default=2, help="TRL steps timed after its warm-up step")
    p.add_argument("--reps", type=int, default=1, help="rollouts (and update pairs) per shape; medians reported")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="a smoke run: --shapes 64:4:4, no TRL, written to --out "
                   "or bench/results/step-quick.json")
    p.add_argument("--out", default=None)
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if pick_device(args.device).type == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # a fixed mmap threshold: freed tensors return to the OS, so each peak is seen from a clean start
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env)
    if args.quick:
        args.shapes, args.trl_shape = "64:4:4", ""
    result = run(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    kind = "quick" if args.quick else pick_device(args.device).type
    out = Path(args.out or REPO / "bench" / "results" / f"step-{kind}.json")
    write_json(out, result)
    print(json.dumps({"written": str(out), "shapes": [{k: r[k] for k in r if k != "peak_mib"} for r in result["shapes"]]}))


if __name__ == "__main__":
    main()
