"""The proxy pass: windows -> hidden states -> chunked head + stats, batched by token budget."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rpt_data.entropy import head_token_stats
from rpt_data.windows import Window


@dataclass(slots=True)
class WindowStats:
    """Per-position stats of one window; NaN / -1 where a position is not scored."""

    entropy: np.ndarray
    topk_entropy: np.ndarray
    target_logprob: np.ndarray
    argmax: np.ndarray


class Proxy:
    """Wraps an HF causal LM: the trunk gives hidden states, the head is applied chunk by chunk."""

    def __init__(self, model: torch.nn.Module, top_k: int = 16, chunk_rows: int | None = None):
        self.model = model
        self.trunk = getattr(model, model.base_model_prefix)
        head = model.get_output_embeddings()
        self.weight, self.bias = head.weight, getattr(head, "bias", None)
        cfg = model.config
        self.softcap = getattr(cfg, "final_logit_softcapping", None)
        self.logit_scale = getattr(cfg, "logit_scale", None)
        self.top_k, self.chunk_rows = top_k, chunk_rows
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def score_batch(self, windows: list[Window]) -> list[WindowStats]:
        """One forward over right-padded windows; stats only for positions t >= score_start."""
        longest = max(len(w.token_ids) for w in windows)
        ids = torch.zeros(len(windows), longest, dtype=torch.long)
        mask = torch.zeros(len(windows), longest, dtype=torch.long)
        for i, w in enumerate(windows):
            ids[i, : len(w.token_ids)] = torch.from_numpy(w.token_ids.astype(np.int64))
            mask[i, : len(w.token_ids)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        hidden = self.trunk(input_ids=ids, attention_mask=mask).last_hidden_state
        # Stats at index t describe p(. | x<t): they come from the hidden state at t - 1.
        rows, targets = [], []
        for i, w in enumerate(windows):
            n = len(w.token_ids)
            rows.append(hidden[i, w.score_start - 1 : n - 1])
            targets.append(ids[i, w.score_start : n])
        st = head_token_stats(
            torch.cat(rows), self.weight, torch.cat(targets), top_k=self.top_k, chunk_rows=self.chunk_rows,
            bias=self.bias, softcap=self.softcap, logit_scale=self.logit_scale,
        )
        cols = [t.cpu().numpy() for t in st]
        out, off = [], 0
        for w in windows:
            n, s = len(w.token_ids), w.score_start
            k = max(n - s, 0)
            per = []
            for col, fill, dt in zip(cols, (np.nan, np.nan, np.nan, -1), (np.float32,) * 3 + (np.int32,)):
                a = np.full(n, fill, dtype=dt)
                a[s:] = col[off : off + k]
                per.append(a)
            off += k
            # NaN/inf logits (a numerical fault, not a distribution): every stat of that position is
            # null, so no tag and no greedy token come from it; the manifest counts them as `nan`.
            broken = np.isnan(per[0]) | np.isnan(per[1]) | np.isnan(per[2])
            per[0][broken] = per[1][broken] = per[2][broken] = np.nan
            per[3][broken] = -1
            out.append(WindowStats(*per))
        return out


def token_budget_batches(windows: list[Window], batch_tokens: int, max_pad: float = 0.125) -> list[list[int]]:
    """Indices of `windows` grouped longest first so that rows x longest <= batch_tokens; a window shorter than
    (1 - max_pad) x its batch's longest starts a new batch, so padding stays under max_pad of every batch."""
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].token_ids))
    batches: list[list[int]] = []
    longest = 0
    for i in order:
        n = len(windows[i].token_ids)
        if batches and (len(batches[-1]) + 1) * longest <= batch_tokens and n >= (1 - max_pad) * longest:
            batches[-1].append(i)
        else:
            batches.append([i])
            longest = n
    return batches
