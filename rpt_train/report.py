"""The report of an experiment (rpt_train/experiment.py): RESULTS/NAME.{json,md,png} from the finished arms' records.

JSON (the layout of DESIGN.md, "Experiment reports"): `arms` (arm -> bucket -> eval fields with Wilson intervals
and the multi-token fields), `compute` (arm -> tokens, FLOPs by `flops_formula`, seconds, machine), `comparisons`
(each declared pair: per metric and bucket the paired difference over the same positions, its interval, p-value,
design effect and detectable effect, and a verdict), `verdict` (the comparisons' verdicts in one text)."""
from __future__ import annotations

import json
from pathlib import Path

from rpt_common.errors import UserError
from rpt_train.compare import paired_by_position
from rpt_train.evaluate import EVAL_BUCKETS, MTP_FIELDS, replace_atomically

FIELDS = ("n", "ntr_accuracy", "ntr_greedy_accuracy", "ntr_pass_at_k", "answer_rate", "ntp_accuracy")
TITLES = {"ntr_accuracy": "NTR accuracy (sampled: first sample per position)", "ntr_greedy_accuracy": "NTR accuracy (greedy)",
          "ntr_pass_at_k": "NTR pass@k", "ntp_accuracy": "NTP accuracy (greedy next token)"}
FLOPS_FORMULA = ("flops = 2 N forward_tokens + 4 N backward_tokens, N = non-embedding parameters (Kaplan et al. "
                 "2020: the token embedding and the output head are left out). forward_tokens: rollout prefill (each "
                 "distinct prompt once) + generated tokens + the learnability sampler's scoring pass + the update's "
                 "forward passes (old / reference log-probs included); backward_tokens: the update's backward passes "
                 "(SFT: every token of every row). Evaluation is the same for every arm and not counted. The output head "
                 "is left out on both sides although SFT computes it on every token: compare FLOPs, not seconds.")
COMPUTE = ("rollout_tokens", "forward_tokens", "backward_tokens", "flops", "seconds", "machine")


def outcome(position: dict, metric: str) -> float:
    """One position's 0/1 outcome under `metric` (from an eval record's `positions`)."""
    if metric == "ntr_accuracy":
        return float(position["correct"][0])
    if metric == "ntr_pass_at_k":
        return float(any(position["correct"]))
    return float(position["greedy_correct" if metric == "ntr_greedy_accuracy" else "ntp_correct"])


def arm_buckets(record: dict) -> dict:
    """bucket -> the eval fields of an arm record (multi-token fields None in records written before they existed)."""
    ev = record["eval"]
    return {b: {f: ev[b].get(f) for f in FIELDS} | {f"{m}_ci": ev[b].get(f"{m}_ci") for m in TITLES}
            | {f: ev[b].get(f) for f in MTP_FIELDS} for b in EVAL_BUCKETS}


def arm_compute(record: dict) -> dict:
    """The compute fields of an arm record; records of the bespoke power script (issue 23) lack the token counters:
    None there."""
    c = record.get("compute") or {}
    out = {k: c.get(k) for k in COMPUTE}
    out["seconds"] = out["seconds"] if out["seconds"] is not None else record.get("seconds")
    out["machine"] = out["machine"] or record.get("device")
    if record.get("kind") == "eval":
        out |= {k: out[k] or 0 for k in ("rollout_tokens", "forward_tokens", "backward_tokens", "flops")}
    for k in ("params", "train_seconds", "eval_seconds", "contexts", "groups_trained", "trained_tokens"):
        if c.get(k) is not None:
            out[k] = c[k]
    sft = record.get("sft")
    if sft:
        out |= {"contexts": sft.get("contexts"), "trained_tokens": sft.get("trained_tokens"),
                "budget_tokens": sft.get("budget_tokens")}
    return out


def compare(ra: dict, rb: dict, metric: str, alpha: float, power: float) -> dict:
    """Per bucket: the paired difference a - b over the positions both arms evaluated (matched by key)."""
    return compare_pairs([(ra, rb)], metric, alpha, power)


def split_windows(records: list[dict]) -> int:
    """The held-out split's block size of arms' evals (their meta; 0: by document, as before blocks existed); arms
    of one spec share the split (load_spec), so one value: another is refused (the positions would not pair)."""
    sizes = {r["eval"].get("meta", {}).get("split_block_windows") or 0 for r in records}
    if len(sizes) > 1:
        raise UserError(f"the arms compared were evaluated on held-out splits of other units (split-block-windows "
                        f"{sorted(sizes)}): their positions are no paired sample")
    return sizes.pop()


def same_task(named: dict[str, dict]) -> None:
    """Refuses arms' records (name -> record) evaluated on other tasks than each other: their eval_config differs in
    a key that decides which positions, labels, contexts, answers or samples are scored (every key but the ones an
    arm's eval: section may set, experiment.ARM_EVAL, and experiment.EVAL_RUNTIME): their outcomes would be paired
    by position key as if of one task. Records without eval_config (older versions) are not compared."""
    from rpt_train.experiment import ARM_EVAL, eval_differences, same_shards, shards_of

    cfgs = [(a, r["eval_config"], shards_of(r)) for a, r in named.items() if isinstance(r.get("eval_config"), dict)]
    clash = []
    for i, (a, ca, sa) in enumerate(cfgs):
        for b, cb, sb in cfgs[i + 1:]:
            clash += [f"{k.replace('_', '-')} {ca[k]!r} in '{a}', {cb[k]!r} in '{b}'"
                      for k in eval_differences(ca, cb, ARM_EVAL, same_shards(sa, sb))]
    if clash:
        raise UserError(f"the arms compared were evaluated on other tasks ({'; '.join(clash)}): their outcomes "
                        "are no paired sample; run the arm(s) that differ from the spec over (`rpt-train experiment "
                        "SPEC ARM --rerun`)")


def compare_pairs(pairs: list[tuple[dict, dict]], metric: str, alpha: float, power: float) -> dict:
    """Per bucket: the paired difference of the mean outcome of the pairs' `a` arms and of their `b` arms over the
    positions every arm evaluated: one pair is a comparison, several a factor's main effect (the mean of its simple
    effects, e.g. high-entropy - all positions under each sampler)."""
    records = [r for pair in pairs for r in pair]
    same_task({f"arm {i + 1}": r for i, r in enumerate(records)})
    pos = [{p["key"]: p for p in r["eval"]["positions"]} for r in records]
    out = {}
    for b in EVAL_BUCKETS:
        common = set.intersection(*(set(r["eval"]["chosen"][b]) for r in records))
        keys = [k for k in records[0]["eval"]["chosen"][b] if k in common]
        if len(keys) < 2:
            continue
        mean = lambda side, k: sum(outcome(pos[2 * i + side][k], metric) for i in range(len(pairs))) / len(pairs)  # noqa: E731
        xa, xb = [mean(0, k) for k in keys], [mean(1, k) for k in keys]
        r = paired_by_position(xa, xb, keys, split_windows(records), alpha, power)
        out[b] = {"a": sum(xa) / len(keys), "b": sum(xb) / len(keys)} | r
    return out


def verdict_of(name: str, c: dict, metric: str, bucket: str, alpha: float, ca: dict, cb: dict) -> str:
    r = c.get(bucket)
    if r is None or r["diff"] is None:
        return f"{name}: no paired positions in `{bucket}`."
    a, b = name.split(" - ")
    if r["p_value"] < alpha:
        head = f"{a} {'above' if r['diff'] > 0 else 'below'} {b}"
    else:
        head = f"no significant difference (this design detects {r['detectable_effect']:.3f})"
    text = (f"{name}: {TITLES[metric]} on `{bucket}` {r['a']:.3f} vs {r['b']:.3f}, {r['diff']:+.3f} "
            f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}], p {pval(r['p_value'])} (paired, n = {r['n']}, design effect "
            f"{r['design_effect']:.2f}): {head}")
    if ca.get("flops") and cb.get("flops"):
        text += f"; {a} used {ca['flops'] / cb['flops']:.2f}x the FLOPs of {b}"
    return text + "."


def kept_records(spec) -> tuple[dict[str, dict], list[str]]:
    """The spec's finished arms' records (arm -> record, in the spec's order) and the arms without one."""
    records, missing = {}, []
    for name in spec.arms:
        p = spec.arms_dir / f"{name}.json"
        if p.exists():
            records[name] = json.loads(p.read_text())
        else:
            missing.append(name)
    return records, missing


def check_design(spec, records: dict[str, dict]) -> list[str]:
    """Refuses records evaluated on another task than the spec's eval design gives their arm, or than each other
    (same_task's keys); returns the report's notes on what may differ: records without eval_config (older
    versions: not checked), the arms' eval settings (ARM_EVAL, where and how fast aside: dtype, a template, a
    budget) that differ between arms or from what the spec now gives an arm."""
    from rpt_common.shards import shards_identity
    from rpt_train.config import to_dict
    from rpt_train.experiment import ARM_EVAL, EVAL_RUNTIME, Experiment, eval_differences, same_shards, shards_of

    exp, stale, notes, own = Experiment(spec), [], [], {}
    for a, r in records.items():
        there = r.get("eval_config")
        if not isinstance(there, dict):
            continue
        now = to_dict(exp.eval_config("demo", spec.arms[a]))
        moved = same_shards(shards_of(r), shards_identity(now["shards"]))
        stale += [(a, k, there[k], now[k]) for k in eval_differences(there, now, ARM_EVAL, moved)]
        own[a] = [(k, there[k], now[k]) for k in eval_differences(there, now) if k in ARM_EVAL]
    if stale:
        arms = list(dict.fromkeys(a for a, *_ in stale))
        raise UserError(f"spec '{spec.path}': arm(s) {', '.join(arms)} were evaluated on another task than the "
                        "spec's eval design gives (" + "; ".join(f"'{a}': {k.replace('_', '-')} {t!r} there, {n!r} "
                                                                 "in the spec" for a, k, t, n in stale)
                        + "); the report pairs every arm's outcomes position by position on one task. Run them over "
                        f"(`rpt-train experiment {spec.path} {' '.join(arms)} --rerun`) or restore the spec's eval "
                        "values")
    same_task(records)
    old = [a for a, r in records.items() if not isinstance(r.get("eval_config"), dict)]
    if old:
        notes.append(f"The record(s) of {', '.join(f'`{a}`' for a in old)} were written without their eval "
                     "settings (an older version): that they share the design with the other arms is not checked.")
    cfgs = {a: r["eval_config"] for a, r in records.items() if isinstance(r.get("eval_config"), dict)}
    for k in (k for k in ARM_EVAL if k not in EVAL_RUNTIME):
        values = {a: c[k] for a, c in cfgs.items() if k in c}
        if len({json.dumps(v) for v in values.values()}) > 1:
            notes.append(f"Arms evaluated with different {k.replace('_', '-')} ("
                         + ", ".join(f"`{a}` {v!r}" for a, v in values.items())
                         + "): their comparisons compare these settings too, not only the models.")
    for a, keys in own.items():
        if keys:
            notes.append(f"`{a}` was evaluated with " + ", ".join(f"{k.replace('_', '-')} {t!r}" for k, t, _ in keys)
                         + "; the spec now gives " + ", ".join(f"{n!r}" for *_, n in keys) + ": its numbers are the "
                         f"record's (`rpt-train experiment {spec.path} {a} --rerun` evaluates it as the spec says).")
    return notes


def build_report(spec) -> dict:
    """The report dict of a spec from its finished arms (missing ones listed: an interim report, naming those that
    another process is running); refused when the records were evaluated on other tasks (check_design)."""
    from rpt_train.experiment import arm_lock, lock_holder

    kept = spec.arms_dir
    records, missing = kept_records(spec)
    eval_notes = check_design(spec, records)
    running = {a: h for a in missing if (h := lock_holder(arm_lock(spec, a)))}
    arms = {a: arm_buckets(r) for a, r in records.items()}
    compute = {a: arm_compute(r) for a, r in records.items()}
    comparisons, verdicts = {}, []
    for a, b in spec.comparisons:
        if a not in records or b not in records:
            continue
        name = f"{a} - {b}"
        by_metric = {m: compare(records[a], records[b], m, spec.alpha, spec.power) for m in spec.metrics}
        mtp = {bk: (None if arms[a][bk]["right_tokens_mean"] is None or arms[b][bk]["right_tokens_mean"] is None
                    else arms[a][bk]["right_tokens_mean"] - arms[b][bk]["right_tokens_mean"]) for bk in EVAL_BUCKETS}
        primary = spec.metrics[0]
        v = verdict_of(name, by_metric[primary], primary, spec.primary_bucket, spec.alpha, compute[a], compute[b])
        comparisons[name] = {"a": a, "b": b, "metric": primary, "buckets": by_metric[primary],
                             "by_metric": by_metric, "right_tokens_mean_diff": mtp, "verdict": v}
        verdicts.append(v)
    factors = {}
    for name, pairs in spec.factors.items():
        if any(x not in records for pair in pairs for x in pair):
            continue
        recs = [(records[a], records[b]) for a, b in pairs]
        by_metric = {m: compare_pairs(recs, m, spec.alpha, spec.power) for m in spec.metrics}
        mtp = {}
        for bk in EVAL_BUCKETS:
            diffs = [None if arms[a][bk]["right_tokens_mean"] is None or arms[b][bk]["right_tokens_mean"] is None
                     else arms[a][bk]["right_tokens_mean"] - arms[b][bk]["right_tokens_mean"] for a, b in pairs]
            mtp[bk] = None if None in diffs else sum(diffs) / len(diffs)
        label = f"{name} ({'; '.join(f'{a} - {b}' for a, b in pairs)})"
        r = by_metric[spec.metrics[0]].get(spec.primary_bucket)
        v = (f"Factor {label}: {TITLES[spec.metrics[0]]} on `{spec.primary_bucket}` moves by {r['diff']:+.3f} "
             f"[{r['ci'][0]:+.3f}, {r['ci'][1]:+.3f}], p {pval(r['p_value'])}"
             + (f"; NTP by {by_metric['ntp_accuracy'][spec.primary_bucket]['diff']:+.3f}"
                if "ntp_accuracy" in by_metric and spec.primary_bucket in by_metric["ntp_accuracy"] else "")
             + ("" if mtp[spec.primary_bucket] is None else
                f"; right-answer length by {mtp[spec.primary_bucket]:+.2f} tokens") + "."
             if r and r["diff"] is not None else f"Factor {label}: no paired positions.")
        factors[name] = {"pairs": [list(p) for p in pairs], "by_metric": by_metric, "right_tokens_mean_diff": mtp,
                         "verdict": v}
        verdicts.append(v)
    warm, levers = kept / "warm.json", kept / "levers.json"
    verdict = " ".join(verdicts) or "No declared comparison has both arms finished yet."
    verdict += multiplicity(spec, comparisons, factors)
    if running:
        verdict += " Interim: arm(s) " + ", ".join(f"{a} ({h})" for a, h in running.items()) + " running."
    if set(missing) - set(running):
        idle = ", ".join(a for a in missing if a not in running)
        verdict += f" {'Arm' if running else 'Interim: arm'}(s) {idle} not run yet."
    arm_evals = {a: dict(spec.arms[a].eval) for a in records if a in spec.arms and spec.arms[a].eval}
    return {"name": spec.name, "title": spec.title, "spec": spec.path, "eval_design": spec.eval,
            "arm_eval_overrides": arm_evals,
            "arms": arms, "compute": compute, "flops_formula": FLOPS_FORMULA, "comparisons": comparisons,
            "factors": factors,
            "verdict": verdict, "missing_arms": missing, "running_arms": running, "eval_notes": eval_notes,
            "alpha": spec.alpha, "power": spec.power,
            "test": "paired difference over the same held-out positions, normal interval, variance x design effect "
                    "1 + (m - 1) ICC of the differences grouped by problem",
            "warm_start": json.loads(warm.read_text()) if warm.exists() else None,
            "prompt_levers": json.loads(levers.read_text()) if levers.exists() else None, "notes": spec.notes}


def arm_metrics(spec, arm: str) -> list[dict]:
    """An arm's per-step training metrics: this machine's run, else the copy kept beside its record."""
    from rpt_train.sft import read_jsonl

    for p in (Path(spec.out) / arm / "train" / "metrics.jsonl", spec.arms_dir / f"{arm}.metrics.jsonl"):
        if p.exists():
            return read_jsonl(p)
    return []


def multiplicity(spec, comparisons: dict, factors: dict) -> str:
    """One sentence: every test above is at an unadjusted alpha; which primary results survive Bonferroni over
    the K tests of this report (comparisons + factors, primary metric and bucket)."""
    ps = {}
    for name, c in comparisons.items():
        ps[name] = (c["buckets"].get(spec.primary_bucket) or {}).get("p_value")
    for name, f in factors.items():
        ps[f"factor {name}"] = (f["by_metric"][spec.metrics[0]].get(spec.primary_bucket) or {}).get("p_value")
    ps = {k: v for k, v in ps.items() if v is not None}
    if len(ps) < 2:
        return ""
    cut = spec.alpha / len(ps)
    kept = [k for k, v in ps.items() if v < cut]
    return (f" Each test is at alpha {spec.alpha:g} unadjusted; over these {len(ps)} tests Bonferroni asks p < "
            f"{cut:.4f}, which {'only ' + ', '.join(kept) + (' passes' if len(kept) == 1 else ' pass') if kept else 'none passes'}.")


def pval(p: float) -> str:
    """`= 0.042`, or `< 0.001` where three decimals would print 0."""
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def cell(r: dict, key: str) -> str:
    if r.get(key) is None:
        return "-"
    ci = r.get(f"{key}_ci")
    return f"{r[key]:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{r[key]:.3f}"


def num(v, fmt: str = "{:,}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(res: dict, png: str) -> str:
    head = "| arm | " + " | ".join(EVAL_BUCKETS) + " |"
    rule = "|---|" + "---|" * len(EVAL_BUCKETS)
    design = res["eval_design"]
    lines = [f"# {res['title']}", "",
             f"Spec `{res['spec']}`. Held-out positions: up to {design.get('limit', '?')} per bucket, "
             f"{design.get('samples', '?')} samples each, eval seed {design.get('seed', 0)}; 95% Wilson intervals in "
             "brackets.", ""]
    for a, over in (res.get("arm_eval_overrides") or {}).items():  # comparisons with it mix two eval prompts
        said = ", ".join(f"{k.replace('_', '-')} {v!r}" for k, v in over.items())
        lines += [f"**`{a}` is evaluated with its own settings** ({said}): its comparisons with arms evaluated "
                  "with the common design compare two eval prompts, not only two models.", ""]
    for note in res.get("eval_notes") or []:  # older records unchecked, eval settings that differ between arms
        lines += [note, ""]
    if res.get("warm_start"):
        w = res["warm_start"]
        blocks = w.get("split_block_windows") if "units" in w else None  # older records: documents only
        what = (f"{w['units']} blocks of {blocks} windows in {w['documents']} documents" if blocks else
                f"{w['documents']} documents")
        lines += [f"Warm start (the start of every arm): SFT on {what} neither held out nor "
                  f"trained on by an arm, {w['steps']} steps of {w['batch']} contexts, lr {w['lr']:g}; loss "
                  f"{w['loss_first']:.3f} -> {w['loss_last']:.3f}.", ""]
    if res.get("prompt_levers"):
        from rpt_train.levers import levers_lines

        lines += levers_lines(res["prompt_levers"])
    lines += ["## Compute per arm", "", FLOPS_FORMULA, "",
              "| arm | rollout tokens | forward tokens | backward tokens | FLOPs | seconds | machine |",
              "|---|---|---|---|---|---|---|"]
    for a, c in res["compute"].items():
        lines.append(f"| {a} | {num(c['rollout_tokens'])} | {num(c['forward_tokens'])} | {num(c['backward_tokens'])} "
                     f"| {num(c['flops'], '{:.3g}')} | {num(c['seconds'], '{:.0f}')} | {c['machine'] or '-'} |")
    for key, title in TITLES.items():
        lines += ["", f"## {title}", "", head, rule]
        lines += [f"| {a} | " + " | ".join(cell(r[b], key) for b in EVAL_BUCKETS) + " |" for a, r in res["arms"].items()]
    lines += ["", "## Multi-token prediction (right sampled answers)", "",
              "Cells: mean length of a right answer in label tokens / in bytes / share longer than one token.", "",
              head, rule]
    for a, r in res["arms"].items():
        lines.append(f"| {a} | " + " | ".join(
            "-" if r[b]["right_tokens_mean"] is None else
            f"{r[b]['right_tokens_mean']:.2f} / {r[b]['right_bytes_mean']:.1f} / {r[b]['multi_token_share']:.2f}"
            for b in EVAL_BUCKETS) + " |")
    if res["comparisons"]:
        lines += ["", f"## Comparisons ({res['test']}; alpha {res['alpha']})", "",
                  "Cells: difference [95% interval] (p; design effect; detectable effect at power "
                  f"{res['power']}).", ""]
        metrics = next(iter(res["comparisons"].values()))["by_metric"]
        for m in metrics:
            lines += [f"{TITLES[m]}:", "", "| comparison | " + " | ".join(EVAL_BUCKETS) + " |", rule]
            for name, c in res["comparisons"].items():
                lines.append(f"| {name} | " + " | ".join(
                    "-" if b not in c["by_metric"][m] else
                    "{diff:+.3f} [{lo:+.2f}, {hi:+.2f}] (p {p}; {d:.2f}; {e:.3f})".format(
                        diff=c["by_metric"][m][b]["diff"], lo=c["by_metric"][m][b]["ci"][0],
                        hi=c["by_metric"][m][b]["ci"][1], p=pval(c["by_metric"][m][b]["p_value"]),
                        d=c["by_metric"][m][b]["design_effect"], e=c["by_metric"][m][b]["detectable_effect"])
                    for b in EVAL_BUCKETS) + " |")
            lines.append("")
        lines += ["Right-answer length (tokens), difference of means:", "",
                  "| comparison | " + " | ".join(EVAL_BUCKETS) + " |", rule]
        for name, c in res["comparisons"].items():
            lines.append(f"| {name} | " + " | ".join(num(c["right_tokens_mean_diff"][b], "{:+.2f}")
                                                   for b in EVAL_BUCKETS) + " |")
    if res.get("factors"):
        lines += ["", "## Factors (main effects: the mean of each factor's simple effects, paired)", ""]
        for name, f in res["factors"].items():
            lines += [f"{name}: " + "; ".join(f"{a} - {b}" for a, b in f["pairs"]), "",
                      "| metric | " + " | ".join(EVAL_BUCKETS) + " |", rule]
            for m, by in f["by_metric"].items():
                lines.append(f"| {TITLES[m]} | " + " | ".join(
                    "-" if b not in by else f"{by[b]['diff']:+.3f} [{by[b]['ci'][0]:+.2f}, {by[b]['ci'][1]:+.2f}] "
                    f"(p {pval(by[b]['p_value'])})" for b in EVAL_BUCKETS) + " |")
            lines += ["| right-answer length (tokens) | " + " | ".join(num(f["right_tokens_mean_diff"][b], "{:+.2f}")
                                                                     for b in EVAL_BUCKETS) + " |", ""]
    lines += ["", f"![accuracy per arm and training curves]({png})", "", "## Verdict", "", res["verdict"], ""]
    if res.get("notes"):
        lines += ["## Notes", ""] + [n + "\n" for n in res["notes"]]
    return "\n".join(lines)


def plot(res: dict, runs: dict[str, list[dict]], path: Path, metric: str, bucket: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    names = list(res["arms"])
    vals = [res["arms"][a][bucket][metric] or 0.0 for a in names]
    cis = [res["arms"][a][bucket].get(f"{metric}_ci") or [v, v] for a, v in zip(names, vals)]
    ax.bar(range(len(names)), vals, yerr=[[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]],
           capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"{TITLES[metric]}, `{bucket}` (95% Wilson)")
    for arm, metrics in runs.items():
        pts = [(m["step"], m["reward"]) for m in metrics if m.get("reward") is not None]
        if pts:
            ax2.plot(*zip(*pts), marker=".", label=arm)
    ax2.set_title("mean reward per training step")
    ax2.set_xlabel("step")
    if ax2.lines:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    try:  # the temp file's name has no .png: the format is named
        replace_atomically(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    finally:
        plt.close(fig)


def write_report(spec) -> Path:
    """RESULTS/NAME.json, .md and .png, each atomically (processes, one per GPU, write it at the end of their arms);
    the plot keeps an earlier one when no training metrics are left."""
    from rpt_train.evaluate import write_json

    res = build_report(spec)
    dest = Path(spec.results)
    dest.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = dest / f"{spec.name}.json", dest / f"{spec.name}.md", dest / f"{spec.name}.png"
    write_json(res, json_path)
    runs = {a: arm_metrics(spec, a) for a in res["arms"]}
    if res["arms"]:
        plot(res, runs, png_path, spec.metrics[0], spec.primary_bucket)
    text = markdown(res, png_path.name)
    replace_atomically(md_path, lambda tmp: tmp.write_text(text))
    print(res["verdict"])
    print(f"wrote {json_path}, {md_path}, {png_path}")
    return json_path
