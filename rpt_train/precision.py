"""Training precision: the policy's master weights and AdamW state are float32 whatever --dtype says; bf16 or fp16
is a compute dtype only (autocast on one device; FSDP2's MixedPrecisionPolicy under torchrun). At the paper's lr
(1e-6) an AdamW step on bf16 weights is below bf16's spacing and rounds away: the policy would not move."""
from __future__ import annotations

import contextlib

import torch

from rpt_common.models import pick_dtype

MASTER = torch.float32  # dtype of the trained weights, their gradients and the AdamW moments


def compute_dtype(cfg, device) -> torch.dtype | None:
    """Autocast dtype of the training forwards on `device` (None: float32 throughout): --dtype bfloat16/float16
    (auto: bf16 on CUDA) on any device, else bf16 on CUDA with --bf16."""
    dev = torch.device(device)
    dt = pick_dtype(cfg.dtype, dev)
    if dt != torch.float32:
        return dt
    return torch.bfloat16 if getattr(cfg, "bf16", False) and dev.type == "cuda" else None


def autocast(cfg, device) -> contextlib.AbstractContextManager:
    """Autocast to the run's compute dtype over float32 weights; a no-op when it computes in float32."""
    dt = compute_dtype(cfg, device)
    return torch.autocast(torch.device(device).type, dtype=dt) if dt is not None else contextlib.nullcontext()


def element_bytes(dtype: torch.dtype | None) -> int:
    """Bytes per element of a compute dtype (None = float32)."""
    return torch.empty(0, dtype=dtype or MASTER).element_size()
