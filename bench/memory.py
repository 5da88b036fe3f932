"""Peak extra memory of the log-prob/entropy path and of one training micro-batch against completion length C
and vocabulary V: the old full [B, C, V] log-softmax vs the chunked, checkpointed lm_head (rpt_train/logprobs.py),
beside what rpt_train/plan.py plans. CPU: VmHWM from /proc (reset per measurement) in a process whose malloc
returns freed tensors to the OS; CUDA: torch.cuda.max_memory_allocated. Prints a table, writes
bench/results/memory-<device>.json.  Usage: python bench/memory.py [--device cpu|cuda] [--quick]"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MIB = 2 ** 20


def peak(fn, device: str) -> int:
    """Peak bytes above the start while fn() runs on `device`."""
    import torch

    from rpt_train.plan import measured_peak

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    return measured_peak(fn)[1]


def measure(device: str, shapes: list[tuple[int, int]], rows: int, chunk: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rpt_train.config import TrainConfig
    from rpt_train.logprobs import forward_logprobs, forward_logprobs_full
    from rpt_train.plan import Shapes, full_logprob_bytes, plan_memory

    results = []
    for C, V in shapes:
        config = LlamaConfig(vocab_size=V, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=C + 64,
                             tie_word_embeddings=False)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to(device)
        P = 32
        ids = torch.randint(0, V, (rows, P), device=device)
        cids = torch.randint(0, V, (rows, C), device=device)
        ones = torch.ones(rows, P + C, dtype=torch.long, device=device)
        inputs = (ids, ones[:, :P], cids, ones[:, P:])

        def entropy(path):  # the no-grad pass: old log-probs / entropy of idle rows
            with torch.no_grad():
                path(model, *inputs, 0.8, True)

        def micro_batch(path):  # forward + backward of one micro-batch (gradients included)
            model.zero_grad(set_to_none=True)
            path(model, *inputs, 0.8, True)[0].sum().backward()

        new = lambda *a: forward_logprobs(*a, chunk_tokens=chunk)  # noqa: E731
        row = {"C": C, "V": V, "rows": rows, "chunk_tokens": chunk}
        for name, fn in (("nograd", entropy), ("microbatch", micro_batch)):
            for label, path in (("old", forward_logprobs_full), ("new", new)):
                fn(path)  # warm-up: one-off allocations
                row[f"{name}_{label}_mib"] = round(peak(lambda: fn(path), device) / MIB, 1)
        cfg = TrainConfig(shards="x", micro_batch_size=rows, max_new_tokens=C, logprob_chunk_tokens=chunk,
                          device=device)
        terms = plan_memory(cfg, Shapes.from_config(config), device_type=device, prompt_tokens=P).terms
        row["microbatch_planned_mib"] = round((terms["gradients"] + terms["activations"] + terms["logprobs"]) / MIB, 1)
        row["old_logits_formula_mib"] = round(full_logprob_bytes(V, rows, C) / MIB, 1)
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def table(results: list[dict]) -> str:
    head = ("C", "V", "no-grad old", "no-grad new", "micro-batch old", "micro-batch new", "planned (new)")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for r in results:
        lines.append(" | ".join([str(r["C"]), str(r["V"])] + [f"{r[k]:.0f} MiB" for k in (
            "nograd_old_mib", "nograd_new_mib", "microbatch_old_mib", "microbatch_new_mib", "microbatch_planned_mib")]))
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--quick", action="store_true", help="two small shapes only")
    p.add_argument("--rows", type=int, default=2, help="sequences per micro-batch (B)")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # a fixed mmap threshold: freed tensors return to the OS, so each peak is seen from a clean start
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        os.execve(sys.executable, [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])], env)
    import torch

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    shapes = [(256, 32768), (1024, 32768)] if args.quick else \
        [(256, 32768), (1024, 32768), (256, 151936), (1024, 151936)]
    results = measure(args.device, shapes, args.rows, args.chunk_tokens)
    out = Path(args.out or REPO / "bench" / "results" / f"memory-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = f"{os.cpu_count()}-core CPU" if args.device == "cpu" else torch.cuda.get_device_name()
    data = {"device": args.device, "machine": machine, "model": "Llama-style, hidden 128, 2 layers, fp32",
            "measure": "VmHWM above start (CPU) / max_memory_allocated (CUDA), after one warm-up call",
            "results": results}
    out.write_text(json.dumps(data, indent=1))
    print(table(results))
    print(f"results: {out}")
    return data


if __name__ == "__main__":
    main()
