"""SmolLM2-135M-Instruct on CHAMP: evaluate, train with RPT, evaluate again; write results/NAME.{json,md} and
results/NAME-curves.png, NAME being the recipe's file name (pipelines/smollm2-champ.yaml -> smollm2-champ).

Runs the same code as `rpt-train eval` / `rpt-train run` on the shards of `make demo` (out/demo), with the
held-out problems of the recipe's split. Accuracies get Wilson 95% intervals; the markdown holds the table in
the paper's layout (rows: NTP greedy, NTR before, NTR after; columns: easy, medium, hard, all), the reward and
answer-rate curves, and a few sample completions.
"""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path

from rpt_train.config import EvalConfig, TrainConfig, load_config, to_dict
from rpt_train.evaluate import EVAL_BUCKETS, evaluate
from rpt_train.policy import eos_ids, load_policy
from rpt_train.rollout import HFRollout
from rpt_train.trainer import seed_everything, train


def wilson(p: float | None, n: int, z: float = 1.96) -> list[float] | None:
    if p is None or n == 0:
        return None
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, c - h), 4), round(min(1.0, c + h), 4)]


def run_eval(cfg: EvalConfig) -> dict:
    seed_everything(cfg.seed)
    policy = load_policy(cfg.model, cfg.device, cfg.dtype)
    engine = HFRollout(policy.model, policy.tokenizer, eos_ids(policy), cfg.rollout_batch_size)
    result = evaluate(policy.model, policy.tokenizer, engine, cfg)
    for b in EVAL_BUCKETS:
        r = result[b]
        for key in ("ntr_accuracy", "ntr_pass_at_k", "ntp_accuracy"):
            r[f"{key}_ci95"] = wilson(r[key], r["n"])
    return result


def separated(before: dict, after: dict) -> list[str]:
    """Buckets where the after-interval lies entirely above the before-interval."""
    out = []
    for b in EVAL_BUCKETS:
        lo, hi = after[b].get("ntr_accuracy_ci95"), before[b].get("ntr_accuracy_ci95")
        if lo and hi and lo[0] > hi[1]:
            out.append(b)
    return out


def curves_png(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    ax[0].plot(steps, [m["reward"] for m in metrics], marker="o")
    ax[0].set_title("mean reward per step")
    ax[1].plot(steps, [m["answer_rate"] for m in metrics], marker="o", color="#cc6677")
    ax[1].set_title("answer rate per step")
    for a in ax:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fmt(r: dict, key: str) -> str:
    if r[key] is None:
        return "-"
    ci = r.get(f"{key}_ci95")
    return f"{r[key]:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{r[key]:.3f}"


def write_md(res: dict, metrics: list[dict], samples: list[dict], path: Path) -> None:
    b, a = res["before"], res["after"]
    lines = [
        "# SmolLM2-135M-Instruct on CHAMP: RPT at toy scale (CPU)", "",
        f"Device: {res['device']}. Steps: {res['steps']} ({res['train_seconds']:.0f} s of training). "
        f"Held-out problems only; {b['meta']['positions']} distinct positions, {res['eval']['samples']} samples each. "
        "95% Wilson intervals in brackets.", "",
        "| | " + " | ".join(EVAL_BUCKETS) + " |", "|---|" + "---|" * len(EVAL_BUCKETS),
        "| n | " + " | ".join(str(b[x]["n"]) for x in EVAL_BUCKETS) + " |",
        "| NTP accuracy (greedy, before) | " + " | ".join(fmt(b[x], "ntp_accuracy") for x in EVAL_BUCKETS) + " |",
        "| NTP accuracy (greedy, after) | " + " | ".join(fmt(a[x], "ntp_accuracy") for x in EVAL_BUCKETS) + " |",
        "| NTR accuracy, before RPT | " + " | ".join(fmt(b[x], "ntr_accuracy") for x in EVAL_BUCKETS) + " |",
        "| NTR accuracy, after RPT | " + " | ".join(fmt(a[x], "ntr_accuracy") for x in EVAL_BUCKETS) + " |",
        f"| NTR pass@{res['eval']['samples']}, before | " + " | ".join(fmt(b[x], "ntr_pass_at_k") for x in EVAL_BUCKETS) + " |",
        f"| NTR pass@{res['eval']['samples']}, after | " + " | ".join(fmt(a[x], "ntr_pass_at_k") for x in EVAL_BUCKETS) + " |",
        "| answer rate, before | " + " | ".join(f"{b[x]['answer_rate']:.3f}" if b[x]["n"] else "-" for x in EVAL_BUCKETS) + " |",
        "| answer rate, after | " + " | ".join(f"{a[x]['answer_rate']:.3f}" if a[x]["n"] else "-" for x in EVAL_BUCKETS) + " |",
        "", f"![reward and answer rate]({path.stem}-curves.png)", "",
        "Per step: " + ", ".join(f"{m['step']}: reward {m['reward']:.2f}, answered {m['answer_rate']:.2f}, "
                                 f"zero-std groups {m['frac_reward_zero_std']:.2f}" for m in metrics), "",
        "## Sample completions (training rollouts, first and last step)", "",
    ]
    first, last = (min(s["step"] for s in samples), max(s["step"] for s in samples)) if samples else (0, 0)
    for title, step in (("first step", first), ("last step", last)):
        lines += [f"### {title} ({step})", ""]
        for s in [s for s in samples if s["step"] == step][:6]:
            lines += [f"- reward {s.get('reward')}: label {s.get('label')!r}, answer {s.get('answer')!r}, "
                      f"completion {str(s.get('completion', ''))[:200]!r}"]
        lines.append("")
    lines += ["", "## What this shows", "", res["verdict"], ""]
    if res.get("notes"):  # written after looking at the run (results/NAME.json: notes)
        lines += ["## What worked and what did not", ""] + [p + "\n" for p in res["notes"]]
    path.write_text("\n".join(lines))


def main(recipe: str) -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    tcfg = load_config(TrainConfig, recipe)
    ecfg = load_config(EvalConfig, recipe, {"split": "heldout"})
    t0 = time.perf_counter()
    before = run_eval(ecfg)
    out = Path(tcfg.out)
    t1 = time.perf_counter()
    train(tcfg)
    train_seconds = time.perf_counter() - t1
    after = run_eval(load_config(EvalConfig, recipe, {"split": "heldout", "model": str(out)}))
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()] if (out / "samples.jsonl").exists() else []
    gained = [x for x in EVAL_BUCKETS if after[x]["n"] and after[x]["ntr_accuracy"] > before[x]["ntr_accuracy"]]
    verdict = (f"NTR accuracy rose on {len(gained)} of {len(EVAL_BUCKETS)} buckets ({', '.join(gained) or 'none'}). "
               f"Mean answer rate during training {sum(m['answer_rate'] for m in metrics) / len(metrics):.2f}; "
               f"fraction of groups with zero reward variance {sum(m['frac_reward_zero_std'] for m in metrics) / len(metrics):.2f}. "
               + ("The 95% intervals of before and after overlap on every bucket: this run cannot tell whether "
                  "RPT helped." if not separated(before, after) else
                  f"The 95% intervals separate on: {', '.join(separated(before, after))}."))
    res = {"before": before, "after": after, "train_config": to_dict(tcfg), "eval": to_dict(ecfg), "steps": tcfg.steps,
           "train_seconds": train_seconds, "total_seconds": time.perf_counter() - t0,
           "device": f"CPU ({platform.processor() or platform.machine()}, 2 cores, shared)", "verdict": verdict}
    json_path, png_path, md_path = result_paths(recipe)
    json_path.parent.mkdir(exist_ok=True)
    json_path.write_text(json.dumps(res, indent=1))
    curves_png(metrics, png_path)
    write_md(res, metrics, samples, md_path)
    print(verdict)


def report(recipe: str) -> None:
    """Rewrite results/NAME.md and the plot from results/NAME.json and the run's logs."""
    json_path, png_path, md_path = result_paths(recipe)
    res = json.loads(json_path.read_text())
    out = Path(load_config(TrainConfig, recipe).out)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    curves_png(metrics, png_path)
    write_md(res, metrics, samples, md_path)


def result_paths(recipe: str) -> tuple[Path, Path, Path]:
    name = Path(recipe).stem
    return Path("results") / f"{name}.json", Path("results") / f"{name}-curves.png", Path("results") / f"{name}.md"


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--report"]
    (report if "--report" in sys.argv else main)(args[0] if args else "pipelines/smollm2-champ.yaml")
