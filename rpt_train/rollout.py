"""Rollouts behind a small interface: `RolloutEngine.generate(prompts, params) -> RolloutBatch`.
`HFRollout` samples with the HF model itself (KV cache, left padding); a faster engine (vLLM, SGLang) can plug in."""
from __future__ import annotations

from dataclasses import dataclass
import inspect
from typing import Protocol

import torch


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    n: int = 1  # completions per prompt, stored group-contiguous (prompt i -> rows i*n .. i*n+n-1)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    greedy: bool = False


@dataclass(kw_only=True, slots=True)
class RolloutBatch:
    """N = prompts x n rows; prompts left-padded to P tokens, completions right-padded to C tokens."""

    prompt_ids: torch.Tensor  # [N, P]
    prompt_mask: torch.Tensor  # [N, P] 1 = real token
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C] 1 = generated, up to and including the first EOS
    logprobs: torch.Tensor | None  # [N, C] the sampler's log-probs (tempered logits); None if the engine has none
    texts: list[str]  # completions decoded without special tokens

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch: ...

    def sync(self, model: torch.nn.Module) -> None:
        """Called after optimizer updates; engines holding their own weights copy them here."""


def filter_logits(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """-inf outside the top-k tokens and outside the smallest set whose probability reaches top_p."""
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        drop = probs.cumsum(-1) - probs > top_p  # mass before this token already reaches top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


class HFRollout:
    """Sampling with the HF model and its KV cache: each distinct prompt is prefilled once and its cache
    repeated for the n completions; chunks of `batch_size` sequences (0 = all at once)."""

    def __init__(self, model, tokenizer, eos_token_ids: list[int], batch_size: int = 0):
        self.model, self.tokenizer, self.eos, self.batch_size = model, tokenizer, eos_token_ids, batch_size
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5

    def sync(self, model: torch.nn.Module) -> None:
        self.model = model  # same module: nothing to copy

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        per_call = max(1, (self.batch_size or len(prompts) * params.n) // params.n)
        chunks = [self._generate(prompts[i:i + per_call], params) for i in range(0, len(prompts), per_call)]
        return concat_batches(chunks, self.tokenizer.pad_token_id)

    def _forward(self, **kw):
        out = self.model(**{k if k != "cache" else self.cache_kw: v for k, v in kw.items()}, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1], out[self.cache_kw] if self.cache_kw in out else out[1]

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        device, pad, n = next(self.model.parameters()).device, self.tokenizer.pad_token_id, params.n
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        was_training = self.model.training
        self.model.eval()
        logits, cache = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions)
        cache.batch_repeat_interleave(n)
        logits, attn = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        next_pos = positions[:, -1].repeat_interleave(n) + 1
        eos = torch.tensor(self.eos or [-1], device=device)
        done = torch.zeros(len(attn), dtype=torch.bool, device=device)
        tokens, logprobs = [], []
        for step in range(params.max_new_tokens):
            scores = logits.float() / (1.0 if params.greedy else params.temperature)
            logp = torch.log_softmax(scores, dim=-1)
            if params.greedy:
                tok = scores.argmax(-1)
            else:
                probs = torch.softmax(filter_logits(scores, params.top_k, params.top_p), dim=-1)
                tok = torch.multinomial(probs, 1)[:, 0]
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            tokens.append(tok)
            logprobs.append(logp.gather(-1, tok[:, None])[:, 0])
            done |= torch.isin(tok, eos)
            if bool(done.all()) or step == params.max_new_tokens - 1:
                break
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            logits, cache = self._forward(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                                          cache=cache)
            next_pos = next_pos + 1
        self.model.train(was_training)
        completion = torch.stack(tokens, dim=1)
        cmask = completion_mask(completion, self.eos)
        completion = torch.where(cmask.bool(), completion, torch.full_like(completion, pad))
        texts = self.tokenizer.batch_decode([c[m.bool()] for c, m in zip(completion, cmask)], skip_special_tokens=True)
        return RolloutBatch(prompt_ids=ids.repeat_interleave(n, 0), prompt_mask=mask.repeat_interleave(n, 0),
                            completion_ids=completion, completion_mask=cmask,
                            logprobs=torch.stack(logprobs, dim=1) * cmask, texts=texts)


def completion_mask(completion: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """1 for tokens up to and including the first EOS of each row (all tokens when there is none)."""
    if not eos or completion.shape[1] == 0:
        return torch.ones_like(completion)
    is_eos = torch.isin(completion, torch.tensor(eos, device=completion.device))
    after = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS seen strictly before this token
    return (after == 0).long()


def select_rows(batch: RolloutBatch, rows: list[int]) -> RolloutBatch:
    return RolloutBatch(prompt_ids=batch.prompt_ids[rows], prompt_mask=batch.prompt_mask[rows],
                        completion_ids=batch.completion_ids[rows], completion_mask=batch.completion_mask[rows],
                        logprobs=batch.logprobs[rows] if batch.logprobs is not None else None,
                        texts=[batch.texts[r] for r in rows])


def concat_batches(chunks: list[RolloutBatch], pad: int) -> RolloutBatch:
    """Stack batches, re-padding prompts on the left and completions on the right to common widths."""
    if len(chunks) == 1:
        return chunks[0]
    P = max(c.prompt_ids.shape[1] for c in chunks)
    C = max(c.completion_ids.shape[1] for c in chunks)

    def left(t, w, v):
        return torch.nn.functional.pad(t, (w - t.shape[1], 0), value=v)

    def right(t, w, v):
        return torch.nn.functional.pad(t, (0, w - t.shape[1]), value=v)

    return RolloutBatch(
        prompt_ids=torch.cat([left(c.prompt_ids, P, pad) for c in chunks]),
        prompt_mask=torch.cat([left(c.prompt_mask, P, 0) for c in chunks]),
        completion_ids=torch.cat([right(c.completion_ids, C, pad) for c in chunks]),
        completion_mask=torch.cat([right(c.completion_mask, C, 0) for c in chunks]),
        logprobs=None if any(c.logprobs is None for c in chunks) else torch.cat([right(c.logprobs, C, 0.0) for c in chunks]),
        texts=[t for c in chunks for t in c.texts],
    )
