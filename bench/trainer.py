"""Trainer step: `rpt_train.trainer.train` vs TRL's `GRPOTrainer`, identical settings, one process, alternated.

Same policy, same contexts in the same order (drawn from the shards by rpt_train's own seeded sampler and handed
to TRL as a dataset, shuffling off), same prompts (v0 template + the tokenizer's chat template: TRL applies it to
the conversational prompt; equality of the prompt ids is checked and reported), same G, completion budget,
temperature, learning rate, loss (`grpo`: sequence mean, group z-score), clip 0.2, no KL, grad clip 1.0, constant
LR, AdamW, one optimizer update per step with the whole batch in one micro-batch (CPU) or the same micro-batches
(GPU). TRL's default gradient checkpointing is turned off to match (it would slow TRL down further).

Rewards (`--reward`):
* `shaped` (default, the like-for-like case): the RPT prefix-match reward + 0.001 x completion characters, so
  the rewards of a group differ and every row is trained by both trainers (forward + backward + AdamW);
* `rpt`: the RPT reward alone. A small policy never answers right, so every group has zero reward variance:
  rpt_train then skips the backward pass (the gradient is exactly zero) while TRL still runs it.

Per step: `seconds` and the split rollout (generation) / reward / logprobs (no-grad log-prob passes: old policy,
reference; none for logging: the entropy is the sampler's) / update (the rest: training forward + backward +
optimizer + bookkeeping).
The first step of each run is a warm-up (TRL's lazy set-up; our compiled decode on CUDA) and is not counted.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (apply_preset, CHAMP_TEMPLATE, champ_records, environment, median, pick_device, results_path,  # noqa: E402
                    setup_threads, synthetic_model, write_json)

import torch  # noqa: E402

PHASES = ("rollout", "reward", "logprobs", "update")
PRESETS = {
    "cpu": dict(model="demo", batch_prompts=2, group=4, max_new_tokens=32, micro_batch=8, max_context_tokens=128,
                steps=3, rounds=1, shard_records=12, reward="shaped"),
    "gpu": dict(model="qwen2-0.5b", batch_prompts=8, group=8, max_new_tokens=512, micro_batch=8,
                max_context_tokens=256, steps=4, rounds=1, shard_records=64, reward="shaped,rpt"),
}


def shaped_bonus(text: str) -> float:
    return 0.001 * len(text)


def make_shards(lm, records: int, out: Path) -> str:
    """A small `rpt-data tag` output to train from (CHAMP, window 512)."""
    from tag import run_ours_e2e, write_input

    src = out.parent / "train-input.jsonl"
    write_input(src, champ_records(records), 1)
    run_ours_e2e(lm, dict(inputs=[str(src)], template=CHAMP_TEMPLATE, id_field="id", mode="structured", model="demo",
                          window=512, context_prefix=128, batch_tokens=8192, device="cpu", dtype="float32",
                          out=str(out), overwrite=True, progress=False, shard_rows=128))
    return str(out)


def policy_dir(spec: str, work: Path, device: torch.device) -> str:
    """An HF directory both trainers load: the demo model, a given directory, or a saved random synthetic shape."""
    if spec == "demo":
        from rpt_common.assets import demo_model_dir

        return str(demo_model_dir())
    if Path(spec).exists():
        return spec
    from rpt_common.models import load_tokenizer

    tok = load_tokenizer("demo")
    model = synthetic_model(spec, torch.device("cpu"), torch.float32, vocab_size=len(tok))
    path = work / f"policy-{spec}"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def train_config(args, shards: str, model: str, out: str, steps: int, device: torch.device):
    from rpt_train.config import TrainConfig

    return TrainConfig(shards=shards, model=model, out=out, steps=steps, batch_prompts=args.batch_prompts,
                       group_size=args.group, max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=1.0,
                       top_k=0, lr=1e-6, beta=0.0, loss="grpo", clip_low=0.2, dynamic_sampling=False,
                       micro_batch_size=args.micro_batch, mini_batch_size=0, ppo_epochs=1, grad_clip=1.0,
                       max_context_tokens=args.max_context_tokens, bucket="all", labels_length=8, template="v0",
                       seed=0, save_every=10**9, log_samples_every=0, eval_every=0, device=str(device),
                       dtype="float32", bf16=True)


class Clock:
    """Seconds per phase of the current step, reset at each step boundary."""

    def __init__(self):
        self.now = dict.fromkeys(PHASES, 0.0)
        self.steps: list[dict] = []

    def wrap(self, phase: str, fn, only_without_grad: bool = False):
        def timed(*a, **k):
            if only_without_grad and torch.is_grad_enabled():
                return fn(*a, **k)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.now[phase] += time.perf_counter() - t0
        return timed

    def close_step(self, seconds: float) -> None:
        known = sum(self.now[p] for p in PHASES if p != "update")
        self.steps.append({"seconds": seconds, **{p: self.now[p] for p in PHASES if p != "update"},
                           "update": seconds - known})
        self.now = dict.fromkeys(PHASES, 0.0)


@contextlib.contextmanager
def profiled(args, name: str):
    """cProfile of the whole run (warm-up step included) into args.profile/<name>-cprofile.txt, when asked."""
    if not getattr(args, "profile", None):
        yield
        return
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        out = Path(args.profile)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / f"{name}-cprofile.txt", "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("cumulative").print_stats(45)


def run_ours(args, shards: str, model: str, steps: int, device: torch.device, work: Path) -> list[dict]:
    """rpt_train.trainer.train for `steps` steps with timers around its phases (checkpointing switched off)."""
    import rpt_train.trainer as T
    import rpt_train.update as U
    from rpt_train.reward import RewardInput

    clock = Clock()
    saved = {k: getattr(T, k) for k in ("HFRollout", "combine", "save_checkpoint", "MetricsLogger")}
    frozen_logprobs = U.frozen_logprobs

    class TimedRollout(saved["HFRollout"]):
        def generate(self, prompts, params):
            return clock.wrap("rollout", super().generate)(prompts, params)

    class StepLogger(saved["MetricsLogger"]):
        def log(self, metrics):
            clock.close_step(metrics["seconds"])
            super().log(metrics)

    def bonus(items: list[RewardInput]) -> list[float]:
        return [shaped_bonus(it.completion) for it in items]

    T.HFRollout, T.MetricsLogger = TimedRollout, StepLogger
    T.combine = lambda fns: clock.wrap("reward", saved["combine"](fns))
    U.frozen_logprobs = clock.wrap("logprobs", frozen_logprobs)
    T.save_checkpoint = lambda *a, **k: None
    try:
        cfg = train_config(args, shards, model, str(work / f"ours-{time.time_ns()}"), steps, device)
        with profiled(args, f"trainer-ours-{args.current_reward}"):
            T.train(cfg, reward_fns=[bonus] if args.current_reward == "shaped" else [], quiet=True)
    finally:
        for k, v in saved.items():
            setattr(T, k, v)
        U.frozen_logprobs = frozen_logprobs
    return clock.steps


def trl_dataset(args, shards: str, model: str, steps: int, device: torch.device):
    """The contexts rpt_train draws (same seeded sampler), as TRL conversational prompts + label tokens."""
    from datasets import Dataset

    from rpt_common.models import load_tokenizer
    from rpt_train.samples import TrainSamples
    from rpt_train.templates import PromptBuilder

    cfg = train_config(args, shards, model, "", steps, device)
    tok = load_tokenizer(model)
    data = TrainSamples(cfg, tok)
    builder = PromptBuilder(tok, cfg.template, cfg.chat_template)
    rows, same = [], True
    for _ in range(steps):
        for s in data.next_batch(cfg.batch_prompts):
            body = builder.template.replace("{context}", s.context)
            rows.append({"prompt": [{"role": "user", "content": body}], "label_tokens": s.label_tokens})
            theirs = tok.apply_chat_template(rows[-1]["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
            same &= list(theirs) == builder.ids(s.context)
    return Dataset.from_list(rows), same


def run_trl(args, shards: str, model: str, steps: int, device: torch.device, work: Path) -> tuple[list[dict], bool]:
    """TRL GRPOTrainer for `steps` optimizer steps, the same settings, timers around its phases."""
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rpt_train.reward import extract_answer, prefix_match

    dataset, same_prompts = trl_dataset(args, shards, model, steps, device)
    clock = Clock()
    shaped = args.current_reward == "shaped"

    def rpt_reward(completions, label_tokens, **kwargs) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(prefix_match(extract_answer(t), lab)) + (shaped_bonus(t) if shaped else 0.0)
                for t, lab in zip(texts, label_tokens)]

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if device.type == "cuda":
                torch.cuda.synchronize()
            clock.close_step(time.perf_counter() - self.t0)

    cuda = device.type == "cuda"
    per_device = args.micro_batch
    accumulation = max(1, args.batch_prompts * args.group // per_device)
    config = GRPOConfig(
        output_dir=str(work / f"trl-{time.time_ns()}"), per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation, num_generations=args.group,
        max_completion_length=args.max_new_tokens, temperature=0.8, top_p=1.0, top_k=0, learning_rate=1e-6,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, beta=0.0, loss_type="grpo", epsilon=0.2,
        scale_rewards="group", num_iterations=1, max_grad_norm=1.0, gradient_checkpointing=False,
        max_steps=steps, logging_steps=1, report_to="none", save_strategy="no", seed=0, disable_tqdm=True,
        shuffle_dataset=False, use_cpu=not cuda, bf16=cuda, log_completions=False,
    )
    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    trainer = GRPOTrainer(model=model, reward_funcs=rpt_reward, args=config, train_dataset=dataset,
                          processing_class=tok, callbacks=[StepTimer()])
    trainer._generate = clock.wrap("rollout", trainer._generate)
    trainer._calculate_rewards = clock.wrap("reward", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = clock.wrap("logprobs", trainer._get_per_token_logps_and_entropies,
                                                             only_without_grad=True)
    with contextlib.redirect_stdout(io.StringIO()), profiled(args, f"trainer-trl-{args.current_reward}"):
        trainer.train()  # (TRL prints a dict of metrics per step: silenced)
    del trainer
    return clock.steps, same_prompts


def summarise(steps: list[dict]) -> dict:
    """Medians over the timed steps (warm-up steps already dropped)."""
    return {"step_seconds": median([s["seconds"] for s in steps]),
            **{f"{p}_seconds": median([s[p] for s in steps]) for p in PHASES}}


def run(args, log=print, shards: str | None = None) -> dict:
    device = pick_device(args.device)
    threads = setup_threads(args.threads)
    env = environment(device, threads)
    work = Path(tempfile.mkdtemp(prefix="rpt-bench-trainer-"))
    try:
        import trl
    except ImportError:
        sys.exit("error: TRL is not installed; `.venv/bin/python -m pip install trl` (or `make bench-cpu`, which "
                 "installs it) and rerun")
    if shards is None:
        from tag import loaded_model

        shards = make_shards(loaded_model("demo", torch.device("cpu"), "float32"), args.shard_records,
                             work / "shards")
    model = policy_dir(args.model, work, device)
    result = {**env, "benchmark": "trainer", "trl": trl.__version__,
              "config": {k: getattr(args, k) for k in ("model", "batch_prompts", "group", "max_new_tokens",
                                                       "micro_batch", "max_context_tokens", "steps", "rounds")},
              "rewards": {}}
    for reward in [r.strip() for r in args.reward.split(",") if r.strip()]:
        args.current_reward = reward
        runs = {"ours": [], "trl": []}
        same = None
        for r in range(args.rounds):  # ours, TRL, ours, TRL, ...
            t0 = time.perf_counter()
            runs["ours"] += run_ours(args, shards, model, args.steps, device, work)[1:]
            log(f"  trainer [{reward}] round {r + 1}/{args.rounds} ours: {time.perf_counter() - t0:.1f} s "
                f"({args.steps} steps, the first not counted)")
            t0 = time.perf_counter()
            trl_steps, same = run_trl(args, shards, model, args.steps, device, work)
            runs["trl"] += trl_steps[1:]
            log(f"  trainer [{reward}] round {r + 1}/{args.rounds} trl: {time.perf_counter() - t0:.1f} s")
        ours, theirs = summarise(runs["ours"]), summarise(runs["trl"])
        result["rewards"][reward] = {"ours": ours, "trl": theirs, "ours_steps": runs["ours"], "trl_steps": runs["trl"],
                                     "speedup_vs_trl": theirs["step_seconds"] / ours["step_seconds"],
                                     "prompts_identical": same}
    main = result["rewards"].get("shaped") or next(iter(result["rewards"].values()))
    result["step_seconds"] = main["ours"]["step_seconds"]
    result["trl_step_seconds"] = main["trl"]["step_seconds"]
    result["speedup_vs_trl"] = main["speedup_vs_trl"]
    result["loadavg_end"] = environment(device, threads)["loadavg_start"]
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None, help="defaults for cpu or gpu (default: by device)")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", help="demo, an HF directory, or a synthetic shape: qwen2-0.5b, qwen2-1.5b")
    p.add_argument("--shards", help="an `rpt-data tag` output to train from (default: tag a few CHAMP records)")
    p.add_argument("--shard-records", type=int)
    p.add_argument("--batch-prompts", type=int)
    p.add_argument("--group", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--micro-batch", type=int, help="rows per forward/backward (TRL: per_device_train_batch_size)")
    p.add_argument("--max-context-tokens", type=int)
    p.add_argument("--steps", type=int, help="steps per run (the first is a warm-up)")
    p.add_argument("--rounds", type=int, help="alternated runs of each trainer")
    p.add_argument("--reward", help="comma list of shaped, rpt")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", help="write a cProfile table of each run to this directory")
    p.add_argument("--out")
    return p


def resolve(args) -> argparse.Namespace:
    return apply_preset(args, PRESETS)


def main(argv=None) -> None:
    args = resolve(parser().parse_args(argv))
    result = run(args, shards=args.shards)
    path = results_path("trainer", pick_device(args.device), args.out)
    write_json(path, result)
    keys = ("step_seconds", "trl_step_seconds", "speedup_vs_trl")
    print(json.dumps({k: result[k] for k in keys} | {"written": str(path)}))


if __name__ == "__main__":
    main()
