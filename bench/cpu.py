"""`make bench-cpu`: the three CPU comparisons with the demo model, in one process, in about 10-15 minutes.

1. tagging: `rpt-data tag` (run_tag end to end) vs the naive HF-logits tagger on the same windows (bench/tag.py);
2. rollouts: HFRollout vs HF `generate(do_sample=True)` on the same prompts, batch and lengths (bench/rollout.py);
3. trainer step: `rpt_train` vs TRL's GRPOTrainer, identical settings (bench/trainer.py);
4. sample access: one 256-context step from 1 GB of synthetic shards, old reader/layout vs new (bench/samples.py).
5. memory: peak of the log-prob/entropy pass and of one micro-batch, full [B, C, V] vs chunked (bench/memory.py).
6. step: one RPT step with and without --share-prefix over C = 256/1024, R = 12/64, G = 8/16, and TRL's
   GRPOTrainer at C = 1024, R = 12, G = 16 (bench/step.py -> bench/results/step-cpu.json; the longest part).
7. tagging-path memory: peak RSS of read + tokenize + window for 8 -> 128 MiB inputs, each size in a fresh process
   (bench/stream.py --tag-path -> bench/results/stream-tag.json).
8. overlap: the tagging loop around a stand-in forward of fixed time per batch, overlap on and off: wall time /
   (batches x forward time) and the batch fill on a web-like mix (bench/overlap.py -> bench/results/overlap-cpu.json).

Each comparison alternates the two sides and takes medians. Writes bench/results/cpu-<N>core.json and prints a
table, then, as its last line, one JSON object with the headline numbers. Only the ratios of one run mean much on
a shared machine; absolute numbers move with the load (recorded as loadavg).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, environment, pick_device, write_json  # noqa: E402

import rollout  # noqa: E402
import samples  # noqa: E402
import tag  # noqa: E402
import trainer  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for every side (default 1: on a shared 2-core machine two OpenMP threads "
                        "stall whenever another job holds a core, and timings swing 10x)")
    p.add_argument("--tag-records", type=int, default=32)
    p.add_argument("--tag-reps", type=int, default=2)
    p.add_argument("--rollout-reps", type=int, default=2)
    p.add_argument("--trainer-steps", type=int, default=3)
    p.add_argument("--trainer-reward", default="shaped,rpt")
    p.add_argument("--samples-gb", type=float, default=1.0, help="synthetic shard GB for the sample-access bench")
    p.add_argument("--step-shapes", default=None, help="C:R:G list for bench/step.py (default: its full grid)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / f"cpu-{os.cpu_count()}core.json"))
    args = p.parse_args(argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("error: the TRL baseline needs `trl`: run `make bench-cpu` (it installs it) or "
                 "`.venv/bin/python -m pip install trl`")
    t_start = time.perf_counter()
    device = pick_device("cpu")

    log("== tagging: rpt-data tag vs naive HF logits ==")
    targs = tag.resolve(tag.parser().parse_args(["--preset", "cpu", "--device", "cpu", "--threads", str(args.threads),
                                                 "--records", str(args.tag_records), "--reps", str(args.tag_reps)]))
    t = tag.run(targs, log)
    log("== rollouts: HFRollout vs HF generate ==")
    rargs = rollout.resolve(rollout.parser().parse_args(["--preset", "cpu", "--device", "cpu",
                                                         "--threads", str(args.threads),
                                                         "--reps", str(args.rollout_reps)]))
    r = rollout.run(rargs, log)
    log("== trainer step: rpt_train vs TRL GRPOTrainer ==")
    trargs = trainer.resolve(trainer.parser().parse_args(["--preset", "cpu", "--device", "cpu",
                                                          "--threads", str(args.threads),
                                                          "--steps", str(args.trainer_steps),
                                                          "--reward", args.trainer_reward]))
    tr = trainer.run(trargs, log, shards=t["shards_dir"])
    log("== sample access: candidate table and 256-context step, old vs new ==")
    sa = samples.run(samples.parser().parse_args(["--gb", str(args.samples_gb)]), log)
    log("== memory: log-prob/entropy path and one micro-batch, full [B, C, V] vs chunked (bench/memory.py) ==")
    subprocess.run([sys.executable, str(REPO / "bench" / "memory.py"), "--device", "cpu"], check=True)  # own malloc env
    mem = json.loads((REPO / "bench" / "results" / "memory-cpu.json").read_text())
    log("== step: shared-prefix update vs unshared vs TRL GRPOTrainer (bench/step.py) ==")
    step_args = ["--device", "cpu", "--threads", str(args.threads)]
    step_args += ["--shapes", args.step_shapes] if args.step_shapes else []
    subprocess.run([sys.executable, str(REPO / "bench" / "step.py"), *step_args], check=True)  # own malloc env
    step = json.loads((REPO / "bench" / "results" / "step-cpu.json").read_text())
    log("== tagging-path memory: read + tokenize + window, 8 -> 128 MiB (bench/stream.py --tag-path) ==")
    subprocess.run([sys.executable, str(REPO / "bench" / "stream.py"), "--tag-path", "--sizes", "8,16,32,64,128",
                    "--json", str(REPO / "bench" / "results" / "stream-tag.json")], check=True)

    log("== overlap: does the device wait on CPU work? (bench/overlap.py) ==")
    subprocess.run([sys.executable, str(REPO / "bench" / "overlap.py")], check=True)  # patches the pipeline: own process
    ov = json.loads((REPO / "bench" / "results" / "overlap-cpu.json").read_text())

    shaped = tr["rewards"].get("shaped") or next(iter(tr["rewards"].values()))
    headline = {
        "tag_tokens_per_s": t["tokens_per_s"], "naive_tokens_per_s": t["naive_tokens_per_s"],
        "tag_speedup": t["speedup_vs_naive"],
        "rollout_tokens_per_s": r["tokens_per_s"], "hf_generate_tokens_per_s": r["hf_generate_tokens_per_s"],
        "rollout_speedup": r["speedup_vs_hf_generate"],
        "rollout_group_speedup": r["scenarios"].get("group", {}).get("speedup_vs_hf_generate"),
        "step_seconds": tr["step_seconds"], "trl_step_seconds": tr["trl_step_seconds"],
        "trainer_speedup": tr["speedup_vs_trl"],
        "step_split": {k: shaped["ours"][f"{k}_seconds"] for k in trainer.PHASES},
        "trl_step_split": {k: shaped["trl"][f"{k}_seconds"] for k in trainer.PHASES},
    }
    new, old = sa["results"]["new_reader/new_layout"], sa["results"]["old_reader/old_layout"]
    ov_on = next(r for r in ov["runs"] if r["overlap"])
    headline |= {"overlap_ratio_steady": ov_on["ratio_steady"], "overlap_fill": ov_on["fill"]}
    headline |= {"sample_batch_seconds": new["batch_seconds"], "old_sample_batch_seconds": old["batch_seconds"],
                 "candidate_bytes_per_position": round(new["bytes_per_position"], 2)}
    if "rpt" in tr["rewards"]:
        headline["step_seconds_rpt_reward"] = tr["rewards"]["rpt"]["ours"]["step_seconds"]
        headline["trl_step_seconds_rpt_reward"] = tr["rewards"]["rpt"]["trl"]["step_seconds"]
    main_shape = next((row for row in step["shapes"]
                       if (row["context_tokens"], row["new_tokens"], row["group_size"]) == (1024, 12, 16)), None)
    if main_shape is not None:
        headline["shared_update_speedup"] = main_shape["update_speedup"]
        headline["step_speedup_vs_trl"] = main_shape.get("step_speedup_vs_trl")
    headline |= {"targets": {"tag_speedup>=1.3": headline["tag_speedup"] >= 1.3,
                             "rollout_not_slower": headline["rollout_speedup"] >= 1.0},
                 "device": environment(device, args.threads)["device"], "torch_threads": args.threads,
                 "wall_seconds": round(time.perf_counter() - t_start, 1)}
    headline["targets"] |= ov.get("targets", {})
    if main_shape is not None:
        headline["targets"]["shared_update>=4x"] = main_shape["update_speedup"] >= 4
        if main_shape.get("step_speedup_vs_trl") is not None:
            headline["targets"]["step_vs_trl>=4x"] = main_shape["step_speedup_vs_trl"] >= 4
    for part in (t, r, tr):
        part.pop("shards_dir", None)
    write_json(args.out, {**headline, "tag": t, "rollout": r, "trainer": tr, "samples": sa, "memory": mem, "overlap": ov,
                          "step": {k: v for k, v in step.items() if k != "details"}})

    rows = [("tagging (tokens/s)", t["tokens_per_s"], t["naive_tokens_per_s"], "naive HF logits"),
            ("rollout, 8 distinct prompts (tokens/s)", r["tokens_per_s"], r["hf_generate_tokens_per_s"], "HF generate")]
    if "group" in r["scenarios"]:
        g = r["scenarios"]["group"]
        rows.append(("rollout, 2 prompts x 4 (tokens/s)", g["ours_tokens_per_s"], g["hf_generate_tokens_per_s"],
                     "HF generate"))
    for name, res in tr["rewards"].items():
        rows.append((f"trainer step, {name} reward (s/step)", res["ours"]["step_seconds"], res["trl"]["step_seconds"],
                     "TRL GRPOTrainer"))
    rows.append(("sample access, 256 contexts (s/step)", new["batch_seconds"], old["batch_seconds"],
                 "old reader, 1 row group/shard"))
    print(f"\n{'':42s} {'ours':>10s} {'baseline':>10s} {'ratio':>7s}")
    for name, ours, base, what in rows:
        ratio = base / ours if "s/step" in name else ours / base
        print(f"{name:42s} {ours:10.2f} {base:10.2f} {ratio:6.2f}x  vs {what}")
    print(f"results: {args.out} ({headline['wall_seconds']:.0f} s, {args.threads} thread(s), "
          f"load {t['loadavg_start']} -> {tr['loadavg_end']})")
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
