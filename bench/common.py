"""Shared helpers of the end-to-end benchmarks (bench/tag.py, rollout.py, trainer.py): threads, timing of two
sides alternated in one process, device names and peak FLOP/s, synthetic model shapes, CHAMP records, JSON."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

# Dense bf16 tensor-core peak (FLOP/s) by device-name substring, most specific first. Override: RPT_PEAK_TFLOPS.
PEAK_BF16 = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("4090", 165e12),
]

# Synthetic shapes for the GPU runs (random weights: only the speed means something).
SHAPES = {
    # Qwen2-1.5B: 28 layers, d=1536, 12 heads / 2 KV heads, FFN 8960, vocab 151936, tied embeddings.
    "qwen2-1.5b": dict(model_type="qwen2", hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=32768, rope_theta=1e6),
    # Qwen2-0.5B: 24 layers, d=896, 14 heads / 2 KV heads, FFN 4864 (vocab set by the tokenizer used with it).
    "qwen2-0.5b": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=32768, rope_theta=1e6),
    # 2 layers, d=64: only to smoke-test the GPU presets' code paths on CPU (`--model qwen2-tiny`).
    "qwen2-tiny": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=32768, rope_theta=1e6),
}


def setup_threads(threads: int | None) -> int:
    """Fix torch's intra-op threads (both sides of a comparison run with the same count)."""
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is available")
    return torch.device(spec)


def apply_preset(args, presets: dict):
    """Fill every option left unset (None) from the preset: --preset, else gpu on a CUDA device, else cpu."""
    preset = args.preset or ("gpu" if pick_device(args.device).type == "cuda" else "cpu")
    for k, v in presets[preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.preset = preset
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the device (FLOP/s), None when unknown (MFU is then not reported)."""
    if os.environ.get("RPT_PEAK_TFLOPS"):
        return float(os.environ["RPT_PEAK_TFLOPS"]) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16:
        if key in name:
            return value
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(seconds, result) of fn(), synchronising the device around it."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def alternate(sides: dict, reps: int, device: torch.device, log=print) -> dict[str, list[float]]:
    """Run each side once per round, in turn (A B A B ...), so slow phases of a shared machine hit both alike.
    `sides`: name -> zero-argument callable. Returns name -> seconds per round."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    for r in range(reps):
        for name, fn in sides.items():
            seconds, _ = timed(fn, device)
            times[name].append(seconds)
            log(f"  round {r + 1}/{reps} {name}: {seconds:.2f} s")
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device, threads: int) -> dict:
    import transformers

    env = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
           "transformers": transformers.__version__, "torch_threads": threads, "cpu_count": os.cpu_count(),
           "loadavg_start": loadavg(), "date": _dt.datetime.now().isoformat(timespec="seconds")}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def champ_records(limit: int | None = None) -> list[dict]:
    """The CHAMP problems (demo data written by `make setup`), in file order."""
    from rpt_common.assets import demo_data_path

    with open(demo_data_path()) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return records[:limit] if limit else records


CHAMP_TEMPLATE = "Problem: {problem}\n\nSolution: {solution}"


def champ_text(record: dict) -> str:
    return CHAMP_TEMPLATE.format(problem=record["problem"], solution=record["solution"])


def synthetic_model(shape: str, device: torch.device, dtype: torch.dtype, vocab_size: int | None = None,
                    seed: int = 0):
    """A randomly initialised causal LM of a named shape (SHAPES), built directly on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(SHAPES[shape])
    if vocab_size:
        kw["vocab_size"] = vocab_size
    config = AutoConfig.for_model(**kw)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def trunk_params(model) -> int:
    """Parameters of the decoder stack (embeddings and LM head excluded)."""
    emb = {id(p) for p in model.get_input_embeddings().parameters()}
    emb |= {id(p) for p in model.get_output_embeddings().parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb)


def forward_flops(model, lengths: list[int], head_rows: int | None = None) -> float:
    """Forward FLOPs of causal sequences of these lengths: 2 x trunk params per token, causal attention
    (QK^T and AV: 2 x 2 x d_attn x n(n+1)/2 per layer), and the LM head (2 x d x V per row, all tokens by default)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    tokens = sum(lengths)
    attn = sum(2 * d_attn * n * (n + 1) for n in lengths) * cfg.num_hidden_layers
    head = 2 * cfg.hidden_size * cfg.vocab_size * (tokens if head_rows is None else head_rows)
    return 2 * trunk_params(model) * tokens + attn + head


def write_json(path: str | Path, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def results_path(kind: str, device: torch.device, out: str | None) -> Path:
    """bench/results/<kind>-<device-slug>.json unless --out says otherwise."""
    if out:
        return Path(out)
    return REPO / "bench" / "results" / f"{kind}-{slug(device_name(device))}.json"
