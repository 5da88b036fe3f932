"""Load a causal LM + tokenizer from `demo`, an HF directory or a `.gguf` file, with clear errors."""
from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rpt_common.errors import UserError


@dataclass(kw_only=True, slots=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    path: str
    identity: dict  # {"path", "config_hash"}: what produced the stats
    tokenizer_identity: dict  # {"name", "vocab_hash", "vocab_size"}


def resolve_model_path(spec: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for `demo`, an HF directory or a .gguf path."""
    if spec == "demo":
        from rpt_common.assets import demo_model_dir

        return demo_model_dir(), None
    p = Path(spec).expanduser()
    if not p.exists():
        raise UserError(f"model path '{spec}' does not exist (give an HF model directory, a .gguf file or 'demo')")
    if p.is_file():
        if p.suffix != ".gguf":
            raise UserError(f"model file '{spec}' is not a .gguf file; give an HF model directory, a .gguf file or 'demo'")
        return p.parent, p.name
    if not (p / "config.json").exists():
        raise UserError(f"model directory '{spec}' has no config.json; it is not a Hugging Face model directory")
    return p, None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bf16 on GPU, fp32 on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16")
    return table[dtype]


def cuda_autocast(device, dtype: torch.dtype = torch.bfloat16, enabled: bool = True):
    """Autocast to `dtype` on a CUDA device; a no-op elsewhere or when disabled (the CPU path stays as it is)."""
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def enable_tf32(device, dtype: torch.dtype | None = None) -> bool:
    """TF32 matmuls and convolutions on CUDA only with a bf16/fp16 compute dtype (for what autocast leaves in
    float32); float32 (or no dtype given) means exact float32, so TF32 is switched off. Nothing on CPU.
    Returns whether TF32 is on."""
    if torch.device(device).type != "cuda":
        return False
    on = dtype in (torch.bfloat16, torch.float16)
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on
    return on


def tokenizer_identity(tokenizer) -> dict:
    vocab = sorted(tokenizer.get_vocab().items())
    digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
    return {"name": getattr(tokenizer, "name_or_path", ""), "vocab_hash": digest, "vocab_size": len(vocab)}


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    directory, gguf = resolve_model_path(spec)
    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # transformers raises many types here; the user needs one sentence
        raise UserError(f"cannot load a tokenizer from '{spec}': {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if not getattr(tok, "is_fast", False):
        raise UserError(f"the tokenizer of '{spec}' is not a fast (Rust) tokenizer; byte offsets need a fast tokenizer")
    return tok


def load_causal_lm(spec: str, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, gguf = resolve_model_path(spec)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    tok = load_tokenizer(spec)
    try:
        kwargs = {"gguf_file": gguf} if gguf else {}
        config = AutoConfig.from_pretrained(directory, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dt, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:  # SafetensorError: a corrupt file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load a causal language model from '{spec}': {msg}")
    model.to(dev).eval()
    config_hash = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
    return LoadedModel(
        model=model,
        tokenizer=tok,
        path=str(directory / gguf) if gguf else str(directory),
        identity={"path": spec if spec == "demo" else str(Path(spec).resolve()), "config_hash": config_hash},
        tokenizer_identity=tokenizer_identity(tok),
    )
