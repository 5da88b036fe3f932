"""Load the policy (or a frozen reference) through rpt_common.models, checked for use by rpt_train:
the tokenizer must fit the model's embedding, padding goes left, a `rpt-train run` dir means its latest checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from rpt_common.errors import UserError
from rpt_common.models import (LoadedModel, load_causal_lm, load_tokenizer, pick_dtype, resolve_model_path,
                                 tokenizer_identity)
from rpt_train.rundir import latest_checkpoint


def resolve_policy(spec: str) -> str:
    """`spec`, or the latest checkpoint when `spec` is a `rpt-train run` output directory."""
    p = Path(spec)
    if spec != "demo" and p.is_dir() and not (p / "config.json").exists() and (p / "checkpoints").is_dir():
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise UserError(f"'{spec}' is a training directory without a complete checkpoint yet")
        return str(ckpt)
    return spec


def load_policy(spec: str, device: str = "auto", dtype: str = "float32", weights: bool = True) -> LoadedModel:
    """The causal LM and tokenizer, with the tokenizer checked against the embedding and padding set left.
    weights=False: the model built from its config on the meta device (no weights read; FSDP ranks > 0)."""
    loaded = load_causal_lm(resolve_policy(spec), device=device, dtype=dtype) if weights else \
        meta_causal_lm(resolve_policy(spec), dtype)
    tok, model = loaded.tokenizer, loaded.model
    if loaded.path.endswith(".gguf"):
        # GGUF weights come back de-quantized; the stale quantized flag would make save_pretrained refuse.
        model.is_quantized, model.hf_quantizer = False, None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise UserError(f"the tokenizer of '{spec}' has {len(tok)} tokens but the model's embedding has only {rows} "
                        "rows: this tokenizer does not belong to this model")
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise UserError(f"the tokenizer of '{spec}' has neither a pad nor an EOS token; batched rollouts need one")
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return loaded


def meta_causal_lm(spec: str, dtype: str) -> LoadedModel:
    """Tokenizer + the model's skeleton on the meta device, for a rank that receives its weights by broadcast."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, gguf = resolve_model_path(spec)
    config = AutoConfig.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=pick_dtype(dtype, torch.device("cpu")))
    tok = load_tokenizer(spec)
    return LoadedModel(model=model.eval(), tokenizer=tok, path=str(directory / gguf) if gguf else str(directory),
                       identity={"path": spec}, tokenizer_identity=tokenizer_identity(tok))


def eos_ids(loaded: LoadedModel) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = set()
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(loaded.tokenizer.eos_token_id)
    gen = getattr(loaded.model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids.update([extra] if isinstance(extra, int) else (extra or []))
    return sorted(ids)


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
