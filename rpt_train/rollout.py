"""Rollouts behind a small interface: `RolloutEngine.generate(prompts, params) -> RolloutBatch`.
`HFRollout` samples with the HF model itself (KV cache, left padding); a faster engine (vLLM, SGLang) can plug in."""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from rpt_common.errors import UserError
from rpt_common.models import cuda_autocast
from rpt_train import distributed
from rpt_train.decoding import decode_batch_after
from rpt_train.plan import CACHE_BUCKET, GIB, kv_cache_bytes


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    n: int = 1  # completions per prompt, stored group-contiguous (prompt i -> rows i*n .. i*n+n-1)
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    greedy: bool = False
    # a row also ends once its decoded completion (as `completion_texts` reads it) contains this text, the token
    # that completes it kept, as at EOS: rlp's `</think>` (rpt_train/objectives.py). HFRollout honours it; an engine
    # that ignores it decodes on to EOS or the budget (still correct for rlp, whose update masks the completion after
    # its first `</think>`, but the tokens after it are paid for)
    stop_text: str | None = None


@dataclass(kw_only=True, slots=True)
class RolloutBatch:
    """N = prompts x n rows; prompts left-padded to P tokens, completions right-padded to C tokens."""

    prompt_ids: torch.Tensor  # [N, P]
    prompt_mask: torch.Tensor  # [N, P] 1 = real token
    completion_ids: torch.Tensor  # [N, C]
    completion_mask: torch.Tensor  # [N, C] 1 = generated, up to and including the first EOS
    logprobs: torch.Tensor | None  # [N, C] the sampler's log-probs (tempered logits); None if the engine has none
    texts: list[str]  # completions decoded without special tokens but the think tags, as they read after their prompt
    entropy: torch.Tensor | None = None  # [N, C] nats of the sampling distribution (tempered logits) per token
    # [N, C] 1 = a token forced into the completion, not sampled (--think-overflow close: rpt_train/overflow.py);
    # None = every completion token is the policy's sample
    forced: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)

    @property
    def trained_mask(self) -> torch.Tensor:
        """[N, C] 1 = a token the policy sampled: the completion mask less forced tokens. The loss, its normaliser
        and the clip / KL / entropy statistics use it; forwards read the whole completion (completion_mask)."""
        return self.completion_mask if self.forced is None else self.completion_mask * (1 - self.forced)


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


def autocast_bf16(device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device (rollouts, eval, the training forward); a no-op elsewhere or when disabled."""
    return cuda_autocast(device, torch.bfloat16, enabled)


class HFRollout:
    """Sampling with the HF model and its KV cache: each distinct prompt is prefilled once and its cache repeated
    for the n completions; chunks of `batch_size` sequences (0 = all at once).

    Prefill (`packed_prefill`, default on CPU): every prompt runs alone, so no compute goes to padding, and the
    caches are stacked with zero (masked) slots on the left; otherwise one left-padded batch (default on CUDA).
    Decode, dynamic path (the default everywhere): a growing KV cache; finished rows leave the batch (cache
    included) once they are a quarter of it, so later steps cost only the live rows. Static path (`static_cache`,
    off until measured on a GPU): the prefilled cache is copied into a preallocated `StaticCache` sized to the call
    (length rounded up to `cache_bucket` tokens) and kept: a later call that fits reuses it, with its rows padded
    (finished copies of row 0) to the cache's row count, so compiled graphs see the same shapes. A cache that would
    not fit the free device memory (or `memory_limit` bytes) is refused up front. With `compile` (default: static
    on CUDA) the step runs through HF's `get_compiled_call` (torch.compile, reduce-overhead: CUDA graphs) and the
    all-finished check syncs every `check_every` steps only. Sliding-window models take the plain paths.
    `SamplingParams.stop_text`: a row whose sampled token can end that text (its string holds the text's last
    character: a vocabulary mask built once per tokenizer) is marked; at each check its last tokens are decoded and
    a row whose text now holds the stop text finishes there, as at EOS (tokens a delayed check let it sample after
    the stop are masked out).
    On CUDA every call runs under bf16 autocast (`bf16`), so the KV cache is bf16 too.

    `lockstep` (an FSDP2-sharded model, whose every forward all-gathers parameters across ranks): every rank runs
    the same number of forwards. Prompt lists are padded to the longest rank's (with a discarded copy), and decoding
    stops only when every rank's rows have finished (an all-reduce per check), so a rank whose completions end
    early keeps stepping (on one finished row) until the slowest rank is done."""

    def __init__(self, model, tokenizer, eos_token_ids: list[int], batch_size: int = 0, *,
                 static_cache: bool | None = None, compile: bool | None = None, check_every: int | None = None,
                 packed_prefill: bool | None = None, cache_bucket: int = CACHE_BUCKET, lockstep: bool = False,
                 bf16: bool = True, memory_limit: int | None = None):
        self.model, self.tokenizer, self.eos, self.batch_size = model, tokenizer, eos_token_ids, batch_size
        self.lockstep = lockstep
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5
        self.static_cache, self.compile, self.check_every = static_cache, compile, check_every
        self.packed_prefill, self.cache_bucket = packed_prefill, cache_bucket
        self.bf16, self.memory_limit = bf16, memory_limit
        self._static = None  # {"cache", "rows", "length", "dtype", "device"}: reused so compiled graphs stay valid
        self._compiled = None
        self._stop_key = self._stop_ids = self._stop_cpu = None  # the stop-candidate vocabulary mask, its key

    def sync(self, model: torch.nn.Module) -> None:
        self.model = model  # same module: nothing to copy

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        count = len(prompts)
        if self.lockstep:  # same chunks and prefill forwards on every rank; the copies are dropped below
            prompts = distributed.pad_to_max(prompts, prompts[0] if prompts else [self.tokenizer.pad_token_id])
        if not prompts:
            return empty_batch()
        per_call = max(1, (self.batch_size or len(prompts) * params.n) // params.n)
        with autocast_bf16(next(self.model.parameters()).device, self.bf16):
            chunks = [self._generate(prompts[i:i + per_call], params) for i in range(0, len(prompts), per_call)]
        batch = concat_batches(chunks, self.tokenizer.pad_token_id)
        return batch if len(prompts) == count else select_rows(batch, list(range(count * params.n)))

    def _forward(self, fn=None, **kw):
        out = (fn or self.model)(**{k if k != "cache" else self.cache_kw: v for k, v in kw.items()}, use_cache=True,
                                 logits_to_keep=1)
        # a copy: compiled (CUDA-graph) outputs are overwritten by the next step
        return out.logits[:, -1].to(torch.float32, copy=True), out[self.cache_kw] if self.cache_kw in out else out[1]

    def _prefill(self, prompts: list[list[int]], ids, mask, positions):
        """Last-position logits [P, V] and the KV cache of the left-padded prompts. On CPU each prompt is run
        alone (no compute on padding) and the caches are left-padded with zeros (masked slots) and stacked; on
        CUDA one padded batch. Caches other than plain dynamic layers (sliding windows) take the batched way."""
        from transformers.cache_utils import DynamicLayer

        packed = self.packed_prefill if self.packed_prefill is not None else ids.device.type == "cpu"
        if packed and len(prompts) > 1:
            parts = [self._forward(input_ids=ids[i:i + 1, ids.shape[1] - len(p):]) for i, p in enumerate(prompts)]
            cache = parts[0][1]
            if all(type(layer) is DynamicLayer for _, c in parts for layer in c.layers):
                def stacked(j: int, kv: str) -> torch.Tensor:  # [P, heads, width, head_dim], zeros on the left
                    return torch.cat([F.pad(getattr(c.layers[j], kv), (0, 0, ids.shape[1] - len(p), 0))
                                      for (_, c), p in zip(parts, prompts)])

                for j, layer in enumerate(cache.layers):
                    layer.keys, layer.values = stacked(j, "keys"), stacked(j, "values")
                return torch.cat([logits for logits, _ in parts]), cache
        return self._forward(input_ids=ids, attention_mask=mask, position_ids=positions)

    def _all_done(self, done: torch.Tensor) -> bool:
        return distributed.all_true(bool(done.all())) if self.lockstep else bool(done.all())

    def _stop_candidates(self, text: str, vocab: int, device: torch.device) -> torch.Tensor:
        """[vocab] bool, built once per tokenizer: the ids whose token string (raw or decoded) holds the last
        character of `text`, less the special ids `completion_texts` drops. A completion's text can come to hold
        `text` only at such a token (decoding appends each token's text), so only those rows are decoded."""
        key = (text[-1], vocab, str(device))
        if self._stop_key != key:
            drop, size = special_ids(self.tokenizer), min(vocab, len(self.tokenizer))
            raw = self.tokenizer.convert_ids_to_tokens(list(range(size)))
            shown = self.tokenizer.batch_decode([[i] for i in range(size)], skip_special_tokens=False,
                                                clean_up_tokenization_spaces=False)
            mask = torch.zeros(vocab, dtype=torch.bool)
            raw = [r.decode("latin-1") if isinstance(r, bytes) else (r or "") for r in raw]  # tiktoken: bytes
            mask[:size] = torch.tensor([i not in drop and (text[-1] in r or text[-1] in t)
                                        for i, (r, t) in enumerate(zip(raw, shown))], dtype=torch.bool)
            self._stop_key, self._stop_ids, self._stop_cpu = key, mask.to(device), mask.tolist()
        return self._stop_ids

    def _stop_rows(self, text: str, prompts: list[list[int]], n: int, tokens: torch.Tensor, live: torch.Tensor,
                   pending: torch.Tensor, done: torch.Tensor, stop_len: torch.Tensor, since: int, made: int) -> None:
        """For each decoding-batch row marked `pending` (it sampled a stop candidate at a step in [since, made)):
        the first such step whose completion text holds `text` ends the row (done; stop_len = that step + 1)."""
        if not bool(pending.any()):
            return
        at = pending.nonzero()[:, 0]
        rows = live[at]
        cand, drop = self._stop_cpu, special_ids(self.tokenizer)
        span = 2 * len(text)  # tokens decoded per test: more than `text` can span (each token adds a character)
        found, lefts, windows = [], [], []
        for j, (row, ids) in enumerate(zip(rows.tolist(), tokens[rows, :made].tolist())):
            for p in range(since, made):
                if ids[p] < len(cand) and cand[ids[p]]:
                    kept = [t for t in ids[:p + 1] if t not in drop]
                    found.append((j, p))
                    lefts.append(prompts[row // n] + kept[:-span])
                    windows.append(kept[-span:])
        texts = decode_batch_after(self.tokenizer, lefts, windows) if found else []
        first: dict[int, int] = {}
        for (j, p), t in zip(found, texts):
            if text in t and j not in first:  # steps in order: the first is where the text was completed
                first[j] = p
        if first:
            hit = torch.tensor(list(first), device=done.device)  # positions among the pending rows
            done[at[hit]] = True
            stop_len[rows[hit]] = torch.tensor(list(first.values()), device=stop_len.device) + 1
        pending.zero_()

    def _use_static(self, device: torch.device) -> bool:
        return bool(self.static_cache)

    def _decode_fn(self, device: torch.device):
        """The model's compiled __call__ (HF's own `get_compiled_call`: inductor, reduce-overhead) or None."""
        if not (self.compile if self.compile is not None else device.type == "cuda" and self._use_static(device)):
            return None
        if self._compiled is None:
            self._compiled = self.model.get_compiled_call(None) if hasattr(self.model, "get_compiled_call") else \
                torch.compile(self.model, mode="reduce-overhead")
        return self._compiled

    def _static_cache(self, cache, rows: int, width: int, total: int):
        """(StaticCache, its row count) holding `cache` (a DynamicCache of `rows` x `width` tokens, padded here to
        the cache's rows with copies of row 0), room for `total` tokens; a kept cache is reused when it is large
        enough. (None, rows) when the model has layers a static cache treats differently (sliding windows)."""
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        first = cache.layers[0].keys
        kept = self._static
        if not (kept and kept["rows"] >= rows and kept["length"] >= total and kept["dtype"] == first.dtype
                and kept["device"] == first.device):
            self._static = kept = None  # freed before the new one is allocated
            length = -(-total // self.cache_bucket) * self.cache_bucket
            self._check_room(len(cache.layers), first.shape[1] * first.shape[3], rows, length, first)
            static = StaticCache(config=self.model.config, max_cache_len=length)
            if any(type(layer) is not StaticLayer for layer in static.layers) or len(static.layers) != len(cache.layers):
                return None, rows
            kept = {"cache": static, "rows": rows, "length": length, "dtype": first.dtype, "device": first.device}
        if kept["rows"] > rows:
            cache.batch_select_indices(torch.cat([torch.arange(rows), torch.zeros(kept["rows"] - rows, dtype=torch.long)])
                                       .to(first.device))
        static = kept["cache"]
        for dst, src in zip(static.layers, cache.layers):
            if not dst.is_initialized:
                dst.lazy_initialization(src.keys, src.values)
            dst.keys[:, :, :width].copy_(src.keys)
            dst.values[:, :, :width].copy_(src.values)
            dst.cumulative_length.fill_(width)  # the next token goes to slot `width`
        self._static = kept
        return static, kept["rows"]

    def _check_room(self, layers: int, kv_dim: int, rows: int, length: int, like: torch.Tensor) -> None:
        """Refuse a static cache larger than the free device memory (or `memory_limit`), before allocating it."""
        need = kv_cache_bytes(layers, kv_dim, rows, length, like.element_size())
        free = self.memory_limit
        if free is None and like.device.type == "cuda":
            free = torch.cuda.mem_get_info(like.device)[0]
        if free is not None and need > free:
            raise UserError(f"the static KV cache for {rows} sequences x {length} tokens needs {need / GIB:.2f} GiB but "
                            f"only {free / GIB:.2f} GiB are free on {like.device}; lower --rollout-batch-size or "
                            "--max-new-tokens, or decode with the dynamic cache (--no-static-cache)")

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        device, pad, n = next(self.model.parameters()).device, self.tokenizer.pad_token_id, params.n
        width, steps = max(len(p) for p in prompts), params.max_new_tokens
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        was_training = self.model.training
        self.model.eval()
        logits, cache = self._prefill(prompts, ids, mask, positions)
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, 0)
        real = N = len(logits)
        static = None
        if self._use_static(device):
            static, N = self._static_cache(cache, N, width, width + steps)
        rows = torch.cat([torch.arange(real), torch.zeros(N - real, dtype=torch.long)]).to(device)  # padded: row 0
        logits, row_mask = logits[rows], mask.repeat_interleave(n, 0)[rows]
        # attention mask over cache slots: the prompt's, then 1 for every generated token (future slots are causal)
        attn = torch.cat([row_mask, mask.new_ones(N, static.layers[0].max_cache_len - width
                                                  if static is not None else steps)], dim=1)
        fn = self._decode_fn(device) if static is not None else None
        cache = static if static is not None else cache
        check_every = self.check_every or (16 if static is not None and device.type == "cuda" else 1)
        next_pos = positions[:, -1].repeat_interleave(n)[rows] + 1
        eos = torch.tensor(self.eos or [-1], device=device)
        tokens = torch.full((N, steps), pad, dtype=torch.long, device=device)
        logprobs = torch.zeros(N, steps, device=device)
        entropy = torch.zeros(N, steps, device=device)  # the policy entropy metric, with no forward of its own
        live = torch.arange(N, device=device)  # rows of the full batch still in the decoding batch
        done = torch.arange(N, device=device) >= real  # per decoding-batch row; padding rows are done from the start
        made = 0
        stop = params.stop_text or None
        if stop:  # rows that sampled a token able to end `stop` since the last check; each row's length at its stop
            candidates = self._stop_candidates(stop, logits.shape[-1], device)
            pending, since = torch.zeros(N, dtype=torch.bool, device=device), 0
            stop_len = torch.full((N,), steps, dtype=torch.long, device=device)
        for step in range(steps):
            scores = logits / (1.0 if params.greedy else params.temperature)
            logp = torch.log_softmax(scores, dim=-1)
            if params.greedy:
                tok = scores.argmax(-1)
            else:
                probs = torch.softmax(filter_logits(scores, params.top_k, params.top_p), dim=-1)
                tok = torch.multinomial(probs, 1)[:, 0]
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            tokens[live, step] = tok
            logprobs[live, step] = logp.gather(-1, tok[:, None])[:, 0]
            entropy[live, step] = torch.special.entr(logp.exp()).sum(-1)
            made = step + 1
            if stop:
                pending |= candidates[tok] & ~done
            done |= torch.isin(tok, eos)
            if stop and (step == steps - 1 or made % check_every == 0):
                self._stop_rows(stop, prompts, n, tokens, live, pending, done, stop_len, since, made)
                since = made
            if step == steps - 1 or (made % check_every == 0 and self._all_done(done)):
                break
            if static is None and 4 * int(done.sum()) >= len(done):  # drop finished rows: later steps skip them
                if stop:  # rows leaving the batch are tested first
                    self._stop_rows(stop, prompts, n, tokens, live, pending, done, stop_len, since, made)
                    since = made
                keep = (~done).nonzero()[:, 0]
                if len(keep) == 0:  # lockstep: this rank is done but another is not; step on with one finished row
                    keep = done.new_zeros(1, dtype=torch.long)
                cache.batch_select_indices(keep)
                live, done, attn, next_pos, tok = live[keep], done[keep], attn[keep], next_pos[keep], tok[keep]
                if stop:
                    pending = pending[keep]
            width_now = attn.shape[1] if static is not None else width + step + 1
            if fn is not None and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                torch.compiler.cudagraph_mark_step_begin()
            logits, cache = self._forward(fn, input_ids=tok[:, None], attention_mask=attn[:, :width_now],
                                          position_ids=next_pos[:, None], cache=cache)
            next_pos = next_pos + 1
        self.model.train(was_training)
        tokens, logprobs, entropy = tokens[:real], logprobs[:real], entropy[:real]
        completion = tokens[:, :made]
        cmask = completion_mask(completion, self.eos)
        if stop:  # up to and including the token that completed the stop text
            cmask = cmask * (torch.arange(made, device=device) < stop_len[:real, None]).to(cmask.dtype)
        completion = torch.where(cmask.bool(), completion, torch.full_like(completion, pad))
        # trailing columns where every row had already finished (the check runs every `check_every` steps)
        width_c = int(cmask.any(0).nonzero()[-1]) + 1 if cmask.any() else made
        completion, cmask = completion[:, :width_c], cmask[:, :width_c]
        texts = completion_texts(self.tokenizer, prompts, n, completion, cmask)
        return RolloutBatch(prompt_ids=ids.repeat_interleave(n, 0), prompt_mask=mask.repeat_interleave(n, 0),
                            completion_ids=completion, completion_mask=cmask,
                            logprobs=logprobs[:, :width_c] * cmask, texts=texts, entropy=entropy[:, :width_c] * cmask)


def completion_texts(tokenizer, prompts: list[list[int]], n: int, completion: torch.Tensor,
                     cmask: torch.Tensor) -> list[str]:
    """Each completion row (prompt r // n's) decoded without special tokens (except `<think>` and `</think>`) as it
    reads after its prompt's last tokens: decoded alone, a SentencePiece token drops its leading space, so the
    answer " the" after a response prefix '\\boxed{' would read "the" and never earn its reward. The think tags stay
    even where the tokenizer registers them as special tokens: the reward reads the answer after `</think>`, and a
    text without it is a thought cut by the budget."""
    drop = special_ids(tokenizer)
    return decode_batch_after(tokenizer, [prompts[r // n] for r in range(len(completion))],
                              [[t for t in c[m.bool()].tolist() if t not in drop] for c, m in zip(completion, cmask)])


def special_ids(tokenizer) -> set[int]:
    """The ids decoding with skip_special_tokens=True drops (EOS, pad, added special tokens), less the think tags."""
    from rpt_train.reward import THINK_END

    added = getattr(tokenizer, "added_tokens_decoder", {})
    ids = set(getattr(tokenizer, "all_special_ids", [])) | {i for i, t in added.items() if getattr(t, "special", False)}
    ids = sorted(ids)
    return {i for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids)) if t not in ("<think>", THINK_END)}


def completion_mask(completion: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """1 for tokens up to and including the first EOS of each row (all tokens when there is none)."""
    if not eos or completion.shape[1] == 0:
        return torch.ones_like(completion)
    is_eos = torch.isin(completion, torch.tensor(eos, device=completion.device))
    after = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS seen strictly before this token
    return (after == 0).long()


def empty_batch() -> RolloutBatch:
    """No rows (a rank whose share of a step's contexts is empty)."""
    none = torch.zeros(0, 0, dtype=torch.long)
    return RolloutBatch(prompt_ids=none, prompt_mask=none, completion_ids=none, completion_mask=none,
                        logprobs=torch.zeros(0, 0), texts=[], entropy=torch.zeros(0, 0))


def select_rows(batch: RolloutBatch, rows: list[int]) -> RolloutBatch:
    return RolloutBatch(prompt_ids=batch.prompt_ids[rows], prompt_mask=batch.prompt_mask[rows],
                        completion_ids=batch.completion_ids[rows], completion_mask=batch.completion_mask[rows],
                        logprobs=batch.logprobs[rows] if batch.logprobs is not None else None,
                        texts=[batch.texts[r] for r in rows],
                        entropy=batch.entropy[rows] if batch.entropy is not None else None,
                        forced=batch.forced[rows] if batch.forced is not None else None)


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
        entropy=None if any(c.entropy is None for c in chunks) else torch.cat([right(c.entropy, C, 0.0) for c in chunks]),
        forced=None if all(c.forced is None for c in chunks) else torch.cat(
            [right(c.forced if c.forced is not None else torch.zeros_like(c.completion_mask), C, 0) for c in chunks]),
    )
