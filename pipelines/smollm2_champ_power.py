"""Does RPT learn on SmolLM2-135M-Instruct (CHAMP)? Four arms with power, a warm start and a learnability sampler
(issues 16 and 23): one command per stage.

`warm` (when the recipe has a `warm:` section): SFT on context -> `\\boxed{next token}` over documents disjoint from
training and held-out ones (a second seeded hash of doc_id); every arm starts from its model and never trains on
its documents (`--exclude-docs`), so `before` is the warm-started model. Arms (same recipe, positions, seeds):
`before` (no training), `rpt` and `rpt-seed1` (rpt-train on the prefix-match reward at two seeds), `shuffled` (the
same, rewards shuffled across each round's rollouts: isolates the reward signal from format learning), `sft`
(supervised cross-entropy on the true next token in the same answer format, on exactly the contexts the `rpt` arm
rolled out, read from its contexts.jsonl). `levers` measures, on held-out positions, the policy's probability of a
correct first answer token under each prompt variant and model (what the sampler and the warm start act on).
Each arm writes OUT/ARM/eval.json (held-out problems only) and a copy under results/smollm2-champ-power.arms/ (kept
in git: `out/` does not survive a new machine). Arms resume: a trained arm continues from its last checkpoint, an
arm with an eval.json is done (`--restart` starts it over). `report` assembles
results/smollm2-champ-power.{json,md,png} with Wilson intervals, the detectable effect and a verdict.

  python pipelines/smollm2_champ_power.py STAGE [--recipe pipelines/smollm2-champ-power.yaml] [--smoke] [--threads N]
  STAGE: warm | levers | before | rpt | rpt-seed1 | shuffled | sft | report | all   (--smoke: tiny, under out/ only)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # learn_check: the shuffled-reward control
from learn_check import shuffled_reward  # noqa: E402

from rpt_common.errors import UserError  # noqa: E402
from rpt_train.config import EvalConfig, TrainConfig, coerce, field_types, load_config, to_dict  # noqa: E402
from rpt_train.evaluate import EVAL_BUCKETS, evaluate, write_json  # noqa: E402
from rpt_train.stats import wilson  # noqa: E402

ARMS = ("before", "rpt", "rpt-seed1", "shuffled", "sft")
RPT_SEEDS = {"rpt": 0, "rpt-seed1": 1}  # the RPT arms: --seed offset
WARM = {"fraction": 0.2, "steps": 40, "batch": 16, "lr": 1e-5}  # the recipe's `warm:` section overrides these
FIELDS = ("n", "ntr_accuracy", "ntr_greedy_accuracy", "ntr_pass_at_k", "answer_rate", "ntp_accuracy")
ACCURACIES = ("ntr_accuracy", "ntr_greedy_accuracy", "ntr_pass_at_k", "ntp_accuracy")
# a few steps, a few positions: every arm end to end in minutes on CPU
SMOKE = {"steps": 2, "batch_prompts": 2, "group_size": 4, "max_sampling_rounds": 1, "save_every": 2,
         "limit": 4, "samples": 2, "max_new_tokens": 6, "sampler_pool": 2}
SMOKE_WARM = {"steps": 2, "batch": 2}


# ---- power ------------------------------------------------------------------------------------------------------

def normal_quantile(q: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)


def detectable_effect(n: int, p0: float, alpha: float = 0.05, power: float = 0.8, deff: float = 1.0) -> float:
    """Smallest p1 - p0 that a two-sided two-proportion z-test (level alpha, pooled null variance) detects with
    the given power, each arm n positions deflated to n / deff effective ones (positions of one problem correlate)."""
    n_eff = n / deff
    za, zb = normal_quantile(1 - alpha / 2), normal_quantile(power)

    def needed(p1: float) -> float:  # positions per arm this p1 needs (Fleiss, without continuity correction)
        pbar = (p0 + p1) / 2
        num = za * math.sqrt(2 * pbar * (1 - pbar)) + zb * math.sqrt(p0 * (1 - p0) + p1 * (1 - p1))
        return (num / (p1 - p0)) ** 2

    lo, hi = p0, 1.0
    if needed(hi) > n_eff:
        return float("nan")  # not even p1 = 1 is detectable
    for _ in range(60):  # needed() falls as p1 moves away from p0: bisect on it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if needed(mid) > n_eff else (lo, mid)
    return hi - p0


def icc_anova(groups: list[list[float]]) -> float:
    """One-way ANOVA intraclass correlation of outcomes grouped by problem, clipped to [0, 1] (0 if undefined)."""
    groups = [g for g in groups if g]
    N, k = sum(map(len, groups)), len(groups)
    if k < 2 or N <= k:
        return 0.0
    mean = sum(map(sum, groups)) / N
    msb = sum(len(g) * (sum(g) / len(g) - mean) ** 2 for g in groups) / (k - 1)
    msw = sum((x - sum(g) / len(g)) ** 2 for g in groups for x in g) / (N - k)
    m0 = (N - sum(len(g) ** 2 for g in groups) / N) / (k - 1)
    denom = msb + (m0 - 1) * msw
    return min(1.0, max(0.0, (msb - msw) / denom)) if denom > 0 else 0.0


def design_effect(sizes: list[int], icc: float) -> float:
    """1 + (m - 1) ICC with m the size-weighted mean number of positions per problem (unequal clusters)."""
    if not sizes:
        return 1.0
    m = sum(s * s for s in sizes) / sum(sizes)
    return 1 + (m - 1) * icc


def two_proportion_p(p1: float, p2: float, n1: int, n2: int, deff: float = 1.0) -> float:
    """Two-sided p-value of the pooled two-proportion z-test on effective sample sizes n / deff."""
    n1, n2 = n1 / deff, n2 / deff
    pool = (p1 * n1 + p2 * n2) / (n1 + n2)
    se = math.sqrt(pool * (1 - pool) * (1 / n1 + 1 / n2))
    if se == 0:
        return 1.0
    from statistics import NormalDist

    return 2 * (1 - NormalDist().cdf(abs(p1 - p2) / se))


def power_table(before: dict, alpha: float = 0.05, power: float = 0.8) -> dict:
    """Per bucket: n, baseline p0 (before NTR accuracy), ICC (greedy-NTP outcomes of the before positions grouped
    by problem: NTR outcomes are almost all 0), design effect and the detectable effect."""
    pos = {p["key"]: p for p in before["positions"]}
    by_doc: dict[str, list[float]] = {}
    for p in pos.values():
        by_doc.setdefault(p["doc_id"], []).append(float(p["ntp_correct"]))
    icc = icc_anova(list(by_doc.values()))
    table = {}
    for b in EVAL_BUCKETS:
        keys = before["chosen"][b]
        sizes: dict[str, int] = {}
        for k in keys:
            sizes[pos[k]["doc_id"]] = sizes.get(pos[k]["doc_id"], 0) + 1
        n, p0 = len(keys), before[b]["ntr_accuracy"] or 0.0
        deff = design_effect(list(sizes.values()), icc)
        table[b] = {"n": n, "problems": len(sizes), "p0": p0, "icc": round(icc, 4), "design_effect": round(deff, 3),
                    "n_effective": round(n / deff, 1),
                    "detectable_effect": round(detectable_effect(n, p0, alpha, power, deff), 4) if n else None,
                    "detectable_effect_iid": round(detectable_effect(n, p0, alpha, power), 4) if n else None}
    return {"alpha": alpha, "power": power, "test": "two-sided two-proportion z-test (pooled), n / design effect",
            "buckets": table}


# ---- arms -------------------------------------------------------------------------------------------------------

def parse_sets(pairs: list[str]) -> dict:
    """`--set key=value` training overrides of a variant (values read as YAML), keys checked against TrainConfig."""
    import yaml

    out = {}
    for pair in pairs or ():
        key, eq, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in field_types(TrainConfig):
            raise UserError(f"--set '{pair}': expected KEY=VALUE with KEY a training option (see `rpt-train run --help`)")
        out[key] = coerce(key, field_types(TrainConfig)[key], yaml.safe_load(value))
    return out


def configs(args) -> tuple[TrainConfig, EvalConfig, Path, dict | None]:
    """The recipe's training and eval configs, the output root, and its `warm:` section (None: no warm start)."""
    import tempfile

    import yaml

    from rpt_common.recipe import read_yaml

    raw = read_yaml(args.recipe) or {}
    warm = raw.pop("warm", None)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:  # the recipe without `warm:`
        yaml.safe_dump(raw, f)
    try:
        extra = SMOKE if args.smoke else {}
        tcfg = load_config(TrainConfig, f.name,
                           {k: v for k, v in extra.items() if k in field_types(TrainConfig)} | args.overrides)
        ecfg = load_config(EvalConfig, f.name, {"split": "heldout", **{k: v for k, v in extra.items()
                                                                       if k in field_types(EvalConfig)}})
    finally:
        os.unlink(f.name)
    root = Path(tcfg.out + ("-smoke" if args.smoke else ""))
    if warm is not None:
        unknown = set(warm) - set(WARM)
        if unknown:
            raise UserError(f"recipe '{args.recipe}': unknown warm: key(s) {sorted(unknown)}; known: {sorted(WARM)}")
        warm = {**WARM, **warm, **(SMOKE_WARM if args.smoke else {}), "base_model": tcfg.model}
        # every arm starts from the warm-started model and never trains on its documents
        tcfg = TrainConfig(**{**to_dict(tcfg), "model": str(root / "warm" / "train" / "model"),
                              "exclude_docs": str(root / "warm" / "docs.txt")})
        ecfg = EvalConfig(**{**to_dict(ecfg), "model": tcfg.model})
    return tcfg, ecfg, root, warm


def device_name() -> str:
    if torch.cuda.is_available():
        return f"GPU ({torch.cuda.get_device_name(0)})"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"


def run_eval(ecfg: EvalConfig, model: str) -> dict:
    from rpt_train.policy import eos_ids, load_policy
    from rpt_train.rollout import HFRollout
    from rpt_train.trainer import seed_everything

    cfg = EvalConfig(**{**to_dict(ecfg), "model": model})
    seed_everything(cfg.seed)
    policy = load_policy(cfg.model, cfg.device, cfg.dtype)
    engine = HFRollout(policy.model, policy.tokenizer, eos_ids(policy), cfg.rollout_batch_size)
    return evaluate(policy.model, policy.tokenizer, engine, cfg, details=True)


def answer_target(label: str, response_prefix: str) -> str:
    """What the policy should generate after the prompt for `label`: the boxed answer minus the response prefix
    that the prompt already ends with."""
    answer = "\\boxed{" + label + "}"
    return answer[len(response_prefix):] if response_prefix and answer.startswith(response_prefix) else answer


def sft_train(cfg: TrainConfig, batches, label_tokens: int = 1) -> dict:
    """Supervised cross-entropy (token mean) on the true first `label_tokens` label tokens in the answer format, then
    EOS, of the contexts `batches(data, step)` gives at each step (data: the run's TrainSamples); same optimizer, lr
    schedule and gradient clipping as rpt-train. Writes OUT/metrics.jsonl and OUT/model."""
    from rpt_train.metrics import MetricsLogger
    from rpt_train.policy import load_policy
    from rpt_train.precision import autocast
    from rpt_train.samples import TrainSamples
    from rpt_train.templates import PromptBuilder
    from rpt_train.trainer import disable_dropout, lr_factor, seed_everything

    if cfg.answer_format != "boxed":
        raise UserError("the sft arm writes \\boxed{} answers; use --answer-format boxed")
    out = Path(cfg.out)
    shutil.rmtree(out, ignore_errors=True)  # short: a rerun starts over
    out.mkdir(parents=True)
    seed_everything(cfg.seed)
    policy = load_policy(cfg.model, cfg.device, "float32")  # float32 masters; --dtype is the compute dtype only
    model, tok = policy.model, policy.tokenizer
    disable_dropout(model)
    device = next(model.parameters()).device
    data = TrainSamples(cfg, tok)
    prompts = PromptBuilder(tok, cfg.template, cfg.chat_template, cfg.response_prefix)
    eos = tok.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg))
    logger = MetricsLogger(str(out), start_step=0, total_steps=cfg.steps)
    tokens_seen = contexts = 0
    model.train()
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        rows = []
        for s in batches(data, step):
            target = tok(answer_target("".join(s.label_tokens[:label_tokens]), cfg.response_prefix),
                         add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
            rows.append((prompts.ids(s.context), target))
        if not rows:
            continue
        contexts += len(rows)
        n_target = sum(len(t) for _, t in rows)
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for i in range(0, len(rows), cfg.micro_batch_size):
            micro = rows[i:i + cfg.micro_batch_size]
            width = max(len(p) + len(t) for p, t in micro)
            ids = torch.full((len(micro), width), tok.pad_token_id, dtype=torch.long)
            attn = torch.zeros(len(micro), width, dtype=torch.long)
            labels = torch.full((len(micro), width), -100, dtype=torch.long)
            for r, (p, t) in enumerate(micro):  # right padding: positions stay 0..len-1 without position_ids
                ids[r, :len(p) + len(t)] = torch.tensor(p + t)
                attn[r, :len(p) + len(t)] = 1
                labels[r, len(p):len(p) + len(t)] = torch.tensor(t)
            with autocast(cfg, device):
                logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:].to(device),
                                                    ignore_index=-100, reduction="sum")
            (nll / n_target).backward()  # token mean over the whole step's targets
            loss_sum += float(nll.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")))
        opt.step()
        lr = sched.get_last_lr()[0]
        sched.step()
        tokens_seen += sum(len(p) + len(t) for p, t in rows)
        logger.log({"step": step, "loss": loss_sum / n_target, "lr": lr, "grad_norm": grad_norm,
                    "target_tokens": n_target, "tokens": tokens_seen, "seconds": time.perf_counter() - t0})
    logger.close()
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    return {"trained_tokens": tokens_seen, "label_tokens": label_tokens, "contexts": contexts}


def same_contexts(path: Path):
    """`batches` for sft_train: step by step, the contexts an RPT run rolled out (its contexts.jsonl at `path`)."""
    steps = {r["step"]: r["contexts"] for r in read_jsonl(path)}

    def batches(data, step: int) -> list:
        return [s for s in data.build.many(steps.get(step, [])) if s is not None]
    return batches


def doc_ids(shards: str) -> list[str]:
    """Every document id of the shards, sorted."""
    import pyarrow.parquet as pq

    from rpt_train.samples import ShardSet

    return sorted({d for path in ShardSet(shards).paths for d in pq.read_table(path, columns=["doc_id"])
                   .column("doc_id").to_pylist()})


def warm_start(tcfg: TrainConfig, root: Path, warm: dict, keep: Path | None) -> Path:
    """SFT on the warm documents (not held out; a hash of doc_id with split-seed + 1 below `fraction`) into
    ROOT/warm/train/model; ROOT/warm/docs.txt lists them (no arm trains on them), ROOT/warm/warm.json the cost."""
    from rpt_train.samples import is_heldout

    done = root / "warm" / "warm.json"
    if done.exists():
        print(f"warm: done ({done})")
        return done
    docs = doc_ids(tcfg.shards)
    held = {d for d in docs if is_heldout(d, tcfg.heldout_fraction, tcfg.split_seed)}
    chosen = [d for d in docs if d not in held and is_heldout(d, warm["fraction"], tcfg.split_seed + 1)]
    if not chosen:
        raise UserError(f"warm: no document falls in the warm fraction {warm['fraction']}; raise warm: fraction")
    (root / "warm").mkdir(parents=True, exist_ok=True)
    (root / "warm" / "docs.txt").write_text("".join(d + "\n" for d in chosen))
    (root / "warm" / "rest.txt").write_text("".join(d + "\n" for d in docs if d not in set(chosen)))
    cfg = TrainConfig(**{**to_dict(tcfg), "model": warm["base_model"], "exclude_docs": str(root / "warm" / "rest.txt"),
                         "out": str(root / "warm" / "train"), "steps": warm["steps"],
                         "batch_prompts": warm["batch"], "lr": warm["lr"], "warmup_steps": 0,
                         "lr_schedule": "constant"})
    t0 = time.perf_counter()
    stats = sft_train(cfg, lambda data, step: data.next_batch(warm["batch"]))
    metrics = read_jsonl(root / "warm" / "train" / "metrics.jsonl")
    write_json({"documents": len(chosen), "heldout_documents": len(held), "all_documents": len(docs), **warm,
                "seconds": time.perf_counter() - t0, "device": device_name(), "compute": stats,
                "loss_first": metrics[0]["loss"], "loss_last": metrics[-1]["loss"]}, done)
    keep_copy(done, keep)
    print(f"warm: {len(chosen)} documents, loss {metrics[0]['loss']:.3f} -> {metrics[-1]['loss']:.3f}")
    return done


def train_arm(arm: str, tcfg: TrainConfig, root: Path, name: str | None = None,
              smoke: bool = True) -> tuple[str, dict]:
    """Train one arm into ROOT/NAME/train (NAME: the arm, or a variant's name), resuming a stopped run; returns the
    model to evaluate and compute stats."""
    from rpt_train.trainer import train

    out = root / (name or arm) / "train"
    cfg = TrainConfig(**{**to_dict(tcfg), "out": str(out), "seed": tcfg.seed + RPT_SEEDS.get(arm, 0),
                         "resume": True})
    if arm == "sft":
        rpt = root / "rpt" / "train" / "contexts.jsonl"
        kept = committed(root, "rpt-contexts", smoke)
        rpt = rpt if rpt.exists() or kept is None else kept.with_suffix(".jsonl")
        if len(read_jsonl(rpt)) < cfg.steps:
            raise UserError(f"the sft arm trains on the contexts the rpt arm rolled out: '{rpt}' is missing or "
                            "incomplete; run the rpt arm first")
        stats = sft_train(cfg, same_contexts(rpt))
        return str(out / "model"), stats
    # shuffled: the RPT reward is switched off and a permuted copy of it is added (learn_check's control)
    fns = [shuffled_reward(cfg.seed)] if arm == "shuffled" else []
    if fns:
        cfg = TrainConfig(**{**to_dict(cfg), "reward_correct": 0.0})
    train(cfg, reward_fns=fns)
    if (name or arm) == "rpt":  # what the sft arm trains on, kept in git beside the evals (not a variant's)
        kept = committed(root, "rpt-contexts", smoke)
        keep_copy(out / "contexts.jsonl", kept.with_suffix(".jsonl") if kept else None)
    metrics = read_jsonl(out / "metrics.jsonl")
    mean = lambda k: (sum(m[k] for m in metrics if m.get(k) is not None) /  # noqa: E731
                      max(1, sum(m.get(k) is not None for m in metrics)))
    return str(out), {"rollout_tokens": sum(m.get("rollout_tokens", 0) for m in metrics),
                      "groups_trained": sum(m.get("groups_kept", 0) for m in metrics),
                      "contexts": sum(m.get("contexts_drawn", 0) for m in metrics),
                      "contexts_scored": sum(m.get("contexts_scored", 0) for m in metrics),
                      "frac_reward_zero_std": round(mean("frac_reward_zero_std"), 4),
                      "sampler_p_pool": round(mean("sampler_p_pool"), 4) if cfg.sampler != "uniform" else None,
                      "sampler_p_chosen": round(mean("sampler_p_chosen"), 4) if cfg.sampler != "uniform" else None,
                      "train_seconds": round(sum(m.get("seconds", 0) for m in metrics), 1)}


def committed(root: Path, name: str, smoke: bool) -> Path | None:
    """Where a stage's result is kept in git (results/<out name>.arms/NAME.json); none for --smoke."""
    return None if smoke else Path("results") / f"{root.name}.arms" / f"{name}.json"


def keep_copy(path: Path, keep: Path | None) -> None:
    if keep is not None and path.exists():
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, keep)


def committed_metrics(root: Path, name: str, smoke: bool) -> Path | None:
    """Where an arm's per-step training metrics are kept in git, beside its result (NAME.metrics.jsonl)."""
    keep = committed(root, name, smoke)
    return None if keep is None else keep.with_suffix(".metrics.jsonl")


def arm_metrics(root: Path, name: str, smoke: bool) -> list[dict]:
    """An arm's training metrics: this machine's run directory, else the copy kept in git, else none."""
    for p in (root / name / "train" / "metrics.jsonl", committed_metrics(root, name, smoke)):
        if p is not None and p.exists():
            return read_jsonl(p)
    return []


def run_arm(arm: str, args) -> Path:
    """Train (unless `before`) and evaluate one arm; ROOT/ARM/eval.json (ROOT/NAME/ for a --name'd variant with
    --set overrides: a lever tried, reported beside the arms). An arm with an eval.json is done (--restart: over)."""
    tcfg, ecfg, root, warm = configs(args)
    name = args.name or arm
    path = root / name / "eval.json"
    if args.restart:
        shutil.rmtree(root / name, ignore_errors=True)
    elif path.exists():
        print(f"{name}: done ({path})")
        return path
    if warm is not None:
        warm_start(tcfg, root, warm, committed(root, "warm", args.smoke))
    (root / name).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, stats = (tcfg.model, {}) if arm == "before" else train_arm(arm, tcfg, root, name, args.smoke)
    train_seconds = time.perf_counter() - t0
    result = run_eval(ecfg, model)
    record = {"arm": arm, "name": name, "overrides": args.overrides, "eval": result,
              "steps": 0 if arm == "before" else tcfg.steps, "train_seconds": train_seconds,
              "seconds": time.perf_counter() - t0, "device": device_name(), "compute": stats,
              "train_config": to_dict(tcfg), "eval_config": to_dict(ecfg)}
    if arm in RPT_SEEDS:
        record["train_config"]["seed"] = tcfg.seed + RPT_SEEDS[arm]
    write_json(record, path)
    keep_copy(root / name / "train" / "metrics.jsonl", committed_metrics(root, name, args.smoke))
    keep_copy(path, committed(root, name, args.smoke))
    print(f"{name}: " + ", ".join(f"{b} {result[b]['ntr_accuracy']:.3f}" for b in EVAL_BUCKETS) + f" -> {path}")
    return path


# ---- levers: what the prompt and the warm start do to the policy's odds of a right first answer token -----------

PROMPTS = {"answer-only, chat template": ("answer-only", "on"), "answer-only, no chat template": ("answer-only", "off")}
LEVER_POSITIONS = 100  # held-out positions (the eval's `all` bucket, first of its seeded order)


def lever_summary(p, group_size: int) -> dict:
    from rpt_train.sampler import informative

    p = np.asarray(p, dtype=np.float64)
    return {"mean_p": round(float(p.mean()), 4), "share_p_above_0.01": round(float((p > 0.01).mean()), 4),
            "informative_groups": round(float(informative(p, group_size).mean()), 4)}


def measure_levers(args) -> Path:
    """ROOT/levers.json: per model (the base; the warm-started one when the recipe has `warm:`) and prompt, on held-out
    positions: the policy's mean P(correct first answer token) after the prompt (`--response-prefix` included),
    the share of positions where it exceeds 0.01, and the expected share of informative groups of G uniform draws;
    `raw context`: P(the label's first token) right after the bare context (what next-token prediction knows)."""
    from rpt_train.evaluate import select_positions
    from rpt_train.policy import load_policy
    from rpt_train.sampler import LearnabilityScorer
    from rpt_train.samples import ShardSet
    from rpt_train.templates import PromptBuilder

    tcfg, ecfg, root, warm = configs(args)
    models = {"base": warm["base_model"] if warm else tcfg.model}
    if warm is not None:
        warm_start(tcfg, root, warm, committed(root, "warm", args.smoke))
        models["warm-started"] = tcfg.model
    limit = min(ecfg.limit, LEVER_POSITIONS)
    result = {"positions": limit, "group_size": tcfg.group_size, "response_prefix": tcfg.response_prefix,
              "device": device_name(), "models": {}}
    t0 = time.perf_counter()
    for label, spec in models.items():
        policy = load_policy(spec, ecfg.device, ecfg.dtype)
        tok = policy.tokenizer
        cfg = EvalConfig(**{**to_dict(ecfg), "model": spec, "limit": limit})
        chosen = select_positions(ShardSet(cfg.shards), tok, cfg)["all"]
        scorer = LearnabilityScorer(policy.model, tok)
        labels = ["".join(s.label_tokens) for s in chosen]
        row = {"raw context": lever_summary(scorer.probabilities([tok(s.context)["input_ids"] for s in chosen], labels),
                                            tcfg.group_size)}
        for name, (template, chat) in PROMPTS.items():
            if chat == "on" and not getattr(tok, "chat_template", None):
                continue  # a tokenizer without one (the tests' tiny model)
            prompts = PromptBuilder(tok, template, chat, tcfg.response_prefix)
            row[name] = lever_summary(scorer.probabilities([prompts.ids(s.context) for s in chosen], labels),
                                      tcfg.group_size)
        result["models"][label] = row
        print(f"levers, {label}: " + "; ".join(f"{k} {v['mean_p']:.3f}" for k, v in row.items()))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    path = root / "levers.json"
    write_json(result, path)
    keep_copy(path, committed(root, "levers", args.smoke))
    return path


# ---- report -----------------------------------------------------------------------------------------------------

def read_json_if(*paths: Path | None) -> dict | None:
    """The first of `paths` that exists, read; None when none does."""
    return next((json.loads(p.read_text()) for p in paths if p is not None and p.exists()), None)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def compare(a: dict, b: dict, power: dict, key: str = "ntr_accuracy") -> dict:
    """Per bucket: a - b on `key`, its p-value (design-effect adjusted) and whether the Wilson intervals separate."""
    out = {}
    for x in EVAL_BUCKETS:
        if not a[x]["n"] or not b[x]["n"]:
            continue
        deff = power["buckets"][x]["design_effect"]
        ca, cb = a[x][f"{key}_ci"], b[x][f"{key}_ci"]
        out[x] = {"diff": round(a[x][key] - b[x][key], 4),
                  "p_value": round(two_proportion_p(a[x][key], b[x][key], a[x]["n"], b[x]["n"], deff), 4),
                  "intervals_separate": bool(ca[0] > cb[1] or cb[0] > ca[1])}
    return out


def verdict_text(comparisons: dict, power: dict) -> str:
    """A plain sentence per comparison on the `all` bucket, then the decision (every RPT seed must agree)."""
    mde = power["buckets"]["all"]["detectable_effect"]
    parts, wins, losses = [], {}, {}
    for name, c in comparisons.items():
        r = c.get("all")
        if r is None:
            continue
        wins[name] = r["diff"] > 0 and r["p_value"] < power["alpha"]
        losses[name] = r["diff"] < 0 and r["p_value"] < power["alpha"]
        parts.append(f"{name}: {r['diff']:+.3f} (p = {r['p_value']:.3f}{', significant' if wins[name] or losses[name] else ''})")
    seeds = [a for a in RPT_SEEDS if f"{a} - before" in wins]
    every = lambda other: bool(seeds) and all(wins.get(f"{a} - {other}") for a in seeds)  # noqa: E731
    ran = lambda other: any(f"{a} - {other}" in wins for a in seeds)  # noqa: E731
    if every("before") and (every("shuffled") or not ran("shuffled")):
        head = f"RPT improved held-out NTR accuracy significantly at {len(seeds)} seed(s)"
        head += ", beyond the shuffled-reward control" if ran("shuffled") else " (the shuffled-reward control is not run yet)"
        head += ("; SFT is not run yet." if not ran("sft") else " and beyond SFT." if every("sft") else
                 "; it is significantly below SFT on the same contexts." if any(losses.get(f"{a} - sft") for a in seeds)
                 else "; not significantly different from SFT on the same contexts.")
    elif every("before"):
        head = ("RPT improved held-out NTR accuracy over the untrained model, but not significantly over the control "
                "with shuffled rewards: the gain cannot be credited to the reward signal.")
    elif any(wins.get(f"{a} - before") for a in seeds):
        head = "RPT improved held-out NTR accuracy significantly at one seed only: not a reproducible effect."
    else:
        head = (f"No significant RPT effect: the design detects a change of {mde:.3f} on `all` (95%/80%) and "
                "none of that size was seen.")
    return head + " On `all`: " + "; ".join(parts) + "."


def curves_png(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward", "mean reward per step"), ("answer_rate", "answer rate per step"),
              ("frac_reward_zero_std", "groups with zero reward variance"), ("loss", "loss per step")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for arm, metrics in runs.items():
            pts = [(m["step"], m[key]) for m in metrics if m.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=arm)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def cell(r: dict, key: str) -> str:
    if r.get(key) is None:
        return "-"
    ci = r.get(f"{key}_ci")
    return f"{r[key]:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{r[key]:.3f}"


def comparison_rows(comparisons: dict) -> list[str]:
    """One markdown row per comparison: the difference and its p-value in each bucket."""
    return [f"| {name} | " + " | ".join(f"{c[b]['diff']:+.3f} (p {c[b]['p_value']:.3f})" if b in c else "-"
                                        for b in EVAL_BUCKETS) + " |" for name, c in comparisons.items()]


def setup_lines(res: dict) -> list[str]:
    """Markdown: the warm start, the prompt levers measured, and each arm's compute and training signal."""
    out = []
    w = res.get("warm_start")
    if w:
        out += ["## Warm start (the common start of every arm: `before` is this model)", "",
                f"SFT on context -> `\\boxed{{next token}}` over {w['documents']} documents disjoint from training and "
                f"held-out ones ({w['all_documents']} in all, {w['heldout_documents']} held out): {w['steps']} steps of "
                f"{w['batch']} contexts, lr {w['lr']:g}; loss {w['loss_first']:.3f} -> {w['loss_last']:.3f}; "
                f"{w['seconds']:.0f} s on {w['device']}.", ""]
    lv = res.get("prompt_levers")
    if lv:
        names = list(next(iter(lv["models"].values())))
        out += ["## What the policy knows before training: P(a right first answer token)", "",
                f"{lv['positions']} held-out positions; after the prompt ending in "
                f"`{lv['response_prefix']}`. Cells: mean P / share of positions with P > 0.01 / expected share of "
                f"groups of G = {lv['group_size']} uniform draws whose rewards differ (a gradient). `raw context`: "
                "the label's first token right after the bare text.", "",
                "| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for model, row in lv["models"].items():
            out.append(f"| {model} | " + " | ".join(f"{row[n]['mean_p']:.3f} / {row[n]['share_p_above_0.01']:.2f} / "
                                                    f"{row[n]['informative_groups']:.2f}" if n in row else "-"
                                                    for n in names) + " |")
        out.append("")
    out += ["## Compute and training signal per arm", "",
            "| arm | seconds | groups trained | contexts rolled out | contexts scored (sampler) | zero-variance groups "
            "| P right, pool | P right, chosen |", "|---|---|---|---|---|---|---|---|"]
    for arm, c in res["compute"].items():
        f = lambda k, fmt="{}": "-" if c.get(k) is None else fmt.format(c[k])  # noqa: E731
        out.append(f"| {arm} | {res['seconds'][arm]:.0f} | {f('groups_trained')} | {f('contexts')} | "
                   f"{f('contexts_scored')} | {f('frac_reward_zero_std', '{:.3f}')} | {f('sampler_p_pool', '{:.3f}')} | "
                   f"{f('sampler_p_chosen', '{:.3f}')} |")
    return out + [""]


def write_md(res: dict, runs: dict[str, list[dict]], evals: dict, path: Path, png: Path) -> None:
    k = res["config"]["eval"]["samples"]
    head = "| | " + " | ".join(EVAL_BUCKETS) + " |"
    lines = [
        "# Does RPT learn on SmolLM2-135M-Instruct (CHAMP)? Two RPT seeds against shuffled-reward and SFT controls, "
        "with power", "",
        f"Device: {res['device']}. Steps per trained arm: {res['steps']}. Held-out problems only "
        f"({res['arms']['before']['all']['n']} positions in `all`), {k} samples per position; "
        "95% Wilson intervals in brackets. Seconds per arm: "
        + ", ".join(f"{a} {s:.0f}" for a, s in res["seconds"].items()) + ".", "",
        "## Next-token prediction and reasoning accuracy (paper Table 1 layout)", "", head,
        "|---|" + "---|" * len(EVAL_BUCKETS),
        "| n | " + " | ".join(str(res["arms"]["before"][b]["n"]) for b in EVAL_BUCKETS) + " |"]
    lines[-5:-5] = setup_lines(res)  # before the accuracy table
    rows = [("NTP accuracy (greedy next token)", "ntp_accuracy"), ("NTR accuracy (sampled)", "ntr_accuracy"),
            ("NTR accuracy (greedy)", "ntr_greedy_accuracy"), (f"NTR pass@{k}", "ntr_pass_at_k")]
    for title, key in rows:
        for arm in res["arms"]:
            lines.append(f"| {title}, {arm} | " + " | ".join(cell(res["arms"][arm][b], key) for b in EVAL_BUCKETS) + " |")
    for arm in res["arms"]:
        lines.append(f"| answer rate, {arm} | " + " | ".join(
            "-" if res["arms"][arm][b]["answer_rate"] is None else f"{res['arms'][arm][b]['answer_rate']:.3f}"
            for b in EVAL_BUCKETS) + " |")
    pw = res["power"]
    lines += ["", "## Power: the smallest effect this design detects", "",
              f"Two-sided two-proportion z-test at {pw['alpha']:.2f}, power {pw['power']:.2f}, against the `before` "
              "NTR accuracy p0. Positions of one problem are correlated: the design effect 1 + (m - 1) ICC (m = "
              "size-weighted positions per problem, ICC of the before arm's greedy-NTP outcomes by problem) shrinks "
              "n to n_effective.", "",
              "| bucket | n | problems | p0 | ICC | design effect | n effective | detectable effect | (if independent) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for b in EVAL_BUCKETS:
        t = pw["buckets"][b]
        lines.append(f"| {b} | {t['n']} | {t['problems']} | {t['p0']:.3f} | {t['icc']:.3f} | {t['design_effect']:.2f} "
                     f"| {t['n_effective']} | {t['detectable_effect']} | {t['detectable_effect_iid']} |")
    lines += ["", "## Comparisons (NTR accuracy, sampled)", "", "| comparison | " + " | ".join(EVAL_BUCKETS) + " |",
              "|---|" + "---|" * len(EVAL_BUCKETS)]
    lines += comparison_rows(res["comparisons"])
    for key, comps in res.get("comparisons_by_metric", {}).items():
        lines += ["", f"{key}:", "", "| comparison | " + " | ".join(EVAL_BUCKETS) + " |",
                  "|---|" + "---|" * len(EVAL_BUCKETS)] + comparison_rows(comps)
    if res.get("levers"):
        lines += ["", "## Levers tried (variants of an arm, same held-out evaluation, bucket `all`)", "",
                  "| variant | arm | overrides | NTR sampled | NTR greedy | pass@k | answer rate | NTP | NTR - before "
                  "| NTP - before |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, v in res["levers"].items():
            r = v["buckets"]["all"]
            d, dn = v["vs_before"].get("all"), v["vs_before_ntp"].get("all")
            lines.append(f"| {name} | {v['arm']} | {json.dumps(v['overrides'])} | {cell(r, 'ntr_accuracy')} | "
                         f"{cell(r, 'ntr_greedy_accuracy')} | {cell(r, 'ntr_pass_at_k')} | "
                         f"{'-' if r['answer_rate'] is None else format(r['answer_rate'], '.3f')} | "
                         f"{cell(r, 'ntp_accuracy')} | "
                         + (f"{d['diff']:+.3f} (p {d['p_value']:.3f})" if d else "-") + " | "
                         + (f"{dn['diff']:+.3f} (p {dn['p_value']:.3f})" if dn else "-") + " |")
    lines += ["", f"![reward, answer rate, zero-variance groups, loss]({png.name})", ""]
    if not any(runs.values()):
        lines += ["The arms' per-step training metrics are not on the machine that wrote this report (`out/` does not "
                  "survive a new machine): the plot is the one an earlier report drew from them.", ""]
    for arm, metrics in runs.items():
        if metrics and "reward" in metrics[0]:
            n = max(1, len(metrics) // 10)
            lines.append(f"{arm}, every {n} steps: " + ", ".join(
                f"{m['step']}: reward {m['reward']:.3f}, answered {m['answer_rate']:.2f}, zero-std "
                f"{m['frac_reward_zero_std']:.2f}" for m in metrics[::n]))
            lines.append("")
    lines += ["## Sample completions (held-out, greedy, after training)", ""]
    for arm in list(res["arms"])[1:]:
        pos = evals[arm]["eval"]["positions"]
        picks = [p for p in pos if p["greedy_correct"]][:3] + [p for p in pos if not p["greedy_correct"]][:3]
        lines += [f"### {arm}", ""] + [f"- label {p['label']!r}: greedy {p['greedy_completion'][:120]!r}, sampled "
                                       f"{[c[:40] for c in p['completions'][:2]]!r}" for p in picks] + [""]
    lines += ["## Verdict", "", res["verdict"], ""]
    if res.get("notes"):  # the lever log, written after looking at the runs (results JSON: notes)
        lines += ["## What was tried and what each lever did", ""] + [p + "\n" for p in res["notes"]]
    path.write_text("\n".join(lines))


def report(args) -> Path:
    """Assemble the arms' eval.json files into NAME.{json,md,png} (results/ normally, ROOT/ with --smoke)."""
    tcfg, ecfg, root, warm = configs(args)
    evals, missing = {}, []
    for arm in ARMS:
        p = root / arm / "eval.json"
        p = p if p.exists() or args.smoke else committed(root, arm, args.smoke)
        if p.exists():
            evals[arm] = json.loads(p.read_text())
        elif arm in ("before", "rpt"):
            raise UserError(f"arm '{arm}' has no '{p}' yet; run `python pipelines/smollm2_champ_power.py {arm}"
                            f"{' --smoke' if args.smoke else ''}` first")
        else:
            missing.append(arm)  # an interim report: said in the verdict
    name = Path(args.recipe).stem
    dest = root if args.smoke else Path("results")
    dest.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = dest / f"{name}.json", dest / f"{name}.md", dest / f"{name}.png"
    def buckets(e: dict) -> dict:
        return {b: {f: e["eval"][b][f] for f in FIELDS} | {f"{f}_ci": e["eval"][b][f"{f}_ci"] for f in ACCURACIES}
                for b in EVAL_BUCKETS}

    arms = {a: buckets(e) for a, e in evals.items()}
    power = power_table(evals["before"]["eval"])
    pairs = [(r, "before") for r in RPT_SEEDS] + [("shuffled", "before"), ("sft", "before")]
    pairs += [(r, other) for other in ("shuffled", "sft") for r in RPT_SEEDS]
    pairs = [(a, b) for a, b in pairs if a in arms and b in arms]
    comparisons = {f"{a} - {b}": compare(arms[a], arms[b], power) for a, b in pairs}
    by_metric = {key: {f"{a} - {b}": compare(arms[a], arms[b], power, key) for a, b in pairs}
                 for key in ("ntr_greedy_accuracy", "ntp_accuracy")}
    levers = {}  # variants run with --name/--set: the levers tried, on the same held-out evaluation
    for p in sorted(root.glob("*/eval.json")):
        if p.parent.name in ARMS or p.parent.name == "warm":
            continue
        e = json.loads(p.read_text())
        b = buckets(e)
        levers[p.parent.name] = {"arm": e["arm"], "overrides": e.get("overrides", {}), "steps": e["steps"],
                                 "seconds": round(e["seconds"], 1), "compute": e["compute"], "buckets": b,
                                 "vs_before": compare(b, arms["before"], power),
                                 "vs_before_ntp": compare(b, arms["before"], power, "ntp_accuracy")}
    old = json.loads(json_path.read_text()) if json_path.exists() else {}
    res = {"arms": arms, "config": {"train": evals["rpt"]["train_config"], "eval": evals["before"]["eval_config"]},
           "steps": evals["rpt"]["steps"], "seconds": {a: round(e["seconds"], 1) for a, e in evals.items()},
           "device": evals["rpt"]["device"], "compute": {a: e["compute"] for a, e in evals.items()},
           "power": power, "detectable_effect": {b: power["buckets"][b]["detectable_effect"] for b in EVAL_BUCKETS},
           "comparisons": comparisons, "comparisons_by_metric": by_metric, "levers": levers,
           "warm_start": read_json_if(root / "warm" / "warm.json", committed(root, "warm", args.smoke)),
           "prompt_levers": read_json_if(root / "levers.json", committed(root, "levers", args.smoke)),
           "missing_arms": missing,
           "verdict": verdict_text(comparisons, power) + (
               f" Interim: the arm(s) {', '.join(missing)} are not run yet, so this is not the design's verdict."
               if missing else "")}
    if old.get("notes"):
        res["notes"] = old["notes"]  # the hand-written lever log survives a re-report
    res.update({"arms": {a: res["arms"][a] for a in ARMS if a in res["arms"]}})
    json_path.write_text(json.dumps(res, indent=1))
    runs = {a: arm_metrics(root, a, args.smoke) for a in (*ARMS[1:], *levers) if a in evals or a in levers}
    if any(runs.values()) or not png_path.exists():
        curves_png(runs, png_path)
    else:  # out/ did not survive a new machine and no metrics were kept: the plot drawn from them stays
        print(f"no arm's training metrics are on this machine; kept the curves in {png_path}")
    write_md(res, runs, evals, md_path, png_path)
    print(res["verdict"])
    print(f"wrote {json_path}, {md_path}, {png_path}")
    return json_path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=("warm", "levers") + ARMS + ("report", "all"))
    ap.add_argument("--recipe", default="pipelines/smollm2-champ-power.yaml")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, outputs under out/ only")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default: all cores)")
    ap.add_argument("--restart", action="store_true", help="start the arm over (default: resume it; done if evaluated)")
    ap.add_argument("--name", help="run ARM as a variant (a lever tried) into OUT/NAME; the report lists it apart")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a variant's training override, e.g. --set bucket=all (repeatable; needs --name)")
    args = ap.parse_args(argv)
    if (args.name or args.set) and (args.stage not in ARMS or not args.name or args.name in ARMS + ("warm",)):
        ap.error("--name/--set run one arm as a variant: give ARM, a --name that is not an arm's, and the --set "
                 "overrides")
    args.overrides = parse_sets(args.set)  # checked before any model loads
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "warm":
        tcfg, _, root, warm = configs(args)
        if warm is None:
            raise UserError(f"recipe '{args.recipe}' has no warm: section")
        warm_start(tcfg, root, warm, committed(root, "warm", args.smoke))
    if args.stage in ("levers", "all"):
        measure_levers(args)
    for arm in (ARMS if args.stage == "all" else (args.stage,) if args.stage in ARMS else ()):
        run_arm(arm, args)
    if args.stage in ("report", "all"):
        report(args)


if __name__ == "__main__":
    from rpt_common.errors import user_errors

    user_errors(main)()
