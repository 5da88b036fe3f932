"""What a causal LM's forward does between the trunk's last hidden state and its logits, per family.

Read from transformers' modeling code (`*ForCausalLM.forward`): the final norm is inside the trunk for
every family below (Llama, Qwen2/3, Mistral, Gemma 1-3, Phi3, GPT-2, GPT-NeoX, OLMo2, Cohere, Granite,
Falcon-H1, ...; Gemma's embedding scale is in the trunk too), then
    logits = softcap(scale * (hidden @ weight.T + bias)),   softcap(x) = cap * tanh(x / cap)
with `bias` only where the lm_head has one, `scale` from the config attribute of the table below and `cap`
from `final_logit_softcapping` (Gemma-2/3) or `logits_soft_cap` (RecurrentGemma). A family that does
anything else is caught by the tagger's start-up check (rpt_data.proxy.Proxy.verify), not trusted.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# (model_type prefix, config attribute, power): logits are multiplied by value ** power.
LOGIT_SCALES = (
    ("granite", "logits_scaling", -1),  # Granite (+ MoE, hybrid, shared): logits / logits_scaling
    ("hyperclovax", "logits_scaling", 1),  # HyperCLOVA X: logits * logits_scaling (the opposite of Granite)
    ("cohere", "logit_scale", 1),  # Cohere, Cohere2: logits * logit_scale
    ("falcon_h1", "lm_head_multiplier", 1),  # Falcon-H1: lm_head(h) * lm_head_multiplier
)
SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap")


@dataclass(frozen=True, slots=True)
class HeadSpec:
    """logits = softcap(scale * (hidden @ weight.T + bias)); None = that step is absent."""

    model_type: str
    weight: torch.Tensor  # [V, D]; tied embeddings are just the embedding matrix
    bias: torch.Tensor | None
    scale: float | None
    softcap: float | None


def head_spec(model: torch.nn.Module) -> HeadSpec:
    """The head of an HF causal LM, from its output embeddings and its (text) config."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = {getattr(config, "model_type", "") or "", getattr(text, "model_type", "") or ""}
    head = model.get_output_embeddings()
    scale = None
    for prefix, attr, power in LOGIT_SCALES:
        value = getattr(text, attr, None)
        if value is not None and any(t.startswith(prefix) for t in types) and float(value) != 1.0:
            scale = float(value) ** power
    cap = next((float(getattr(text, a)) for a in SOFTCAPS if getattr(text, a, None)), None)
    return HeadSpec(model_type=getattr(config, "model_type", "") or type(model).__name__, weight=head.weight,
                    bias=getattr(head, "bias", None), scale=scale, softcap=cap)


def logits_fp32(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`hidden @ weight.T` as float32 logits (into `out`, float32 [N, V], when given), never rounded to the hidden
    dtype first: bf16/fp16 inputs on a GPU go through one matmul that accumulates and writes in float32
    (`torch.mm(..., out_dtype=float32)`, cuBLAS); on the CPU, where that kernel does not exist, they are upcast."""
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.mm(hidden, weight.t(), out=out)
    if hidden.device.type != "cpu":  # CUDA (and the meta device, which tests use to check what is asked for)
        try:
            if out is None:
                return torch.mm(hidden, weight.t(), out_dtype=torch.float32)
            return torch.mm(hidden, weight.t(), out_dtype=torch.float32, out=out)
        except (RuntimeError, NotImplementedError):  # a build or device without that kernel: upcast (still exact
            pass  # products: bf16 values fit TF32's mantissa)
    return torch.mm(hidden.float(), weight.float().t(), out=out)
