"""Planned peak memory per device of `rpt-train run`, from the model's config alone (no weights loaded):
weights, AdamW moments, gradients, the rollouts' KV cache, one micro-batch's activations, the log-prob chunks.

Precision (rpt_train.precision): weights, gradients and AdamW moments are float32 whatever --dtype says; the
KV cache and activations are in the compute dtype (on one device autocast keeps the residual stream and norms in
float32: see activation_bytes), and a bf16/fp16 compute dtype adds the low-precision weight
copies autocast keeps (one device) or FSDP all-gathers (a block or two at a time, or the whole model with
--rollout-gather). Rollouts and the policy update do not overlap in time (gradients are freed after each update),
so the peak is weights + optimizer + those copies + the largest of (the rollouts' largest phase: the KV cache, a
generate call's prefill, --think-overflow close's second call), (gradients + activations + log-prob chunk, or
the AdamW step's temporaries) and (--sampler learnability's scoring forward). --static-cache's cache is allocated
at the first generate call and kept to the end of the run, so it is in every one of those phases; --eval-every's
evals generate through the same engine, so the rollout phases and that cache are the largest of their calls and
training's. Activations
count what autograd keeps per token of a Llama/Qwen-style block (no T x T attention: flash / memory-efficient
SDPA); tests/test_train_plan.py checks the whole against CPU peaks."""
from __future__ import annotations

import gc
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rpt_common.errors import UserError
from rpt_train import packing, precision
from rpt_train.budget import forced_bound, planned_new_tokens, think_budget

GIB = 1024 ** 3
TERMS = ("weights", "optimizer", "gradients", "kv_cache", "activations", "logprobs")
# The option that shrinks each term, named when the plan does not fit. Never bf16 weights: AdamW at lr 1e-6
# cannot move them (rpt_train.precision).
REMEDY = {"weights": "--world-size (more FSDP ranks)",
          "optimizer": "--world-size (more FSDP ranks)",
          "gradients": "--world-size (more FSDP ranks)",
          "kv_cache": "--rollout-batch-size (fewer sequences per generate call) or --max-new-tokens",
          "activations": "--gradient-checkpointing or a smaller --micro-batch-size",
          "logprobs": "--logprob-chunk-tokens"}
CACHE_BUCKET = 256  # --static-cache: the cache's length is rounded up to a multiple of this (HFRollout)
SCORER_BATCH = 16  # --sampler learnability: prompts per scoring forward when --rollout-batch-size is 0
DEFAULT_PROMPT_TOKENS = 1024  # planned prompt length when --max-context-tokens is 0 and no shards are given
TEMPLATE_TOKENS = 128  # the prompt template around a context, at most


@dataclass(kw_only=True, slots=True)
class Shapes:
    """What the plan needs of a causal LM's config."""

    params: int
    layer_params: int
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # key/value heads x head dim
    vocab: int

    @classmethod
    def from_config(cls, config) -> "Shapes":
        """Exact parameter counts from the model built on the meta device (no memory, no weights read)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        params = sum(p.numel() for p in model.parameters())  # tied weights counted once
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        layers = text.num_hidden_layers
        blocks = [m for m in model.modules() if type(m).__name__ in set(model._no_split_modules or [])]
        layer_params = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=params // layers)
        return cls(params=params, layer_params=layer_params, layers=layers, hidden=text.hidden_size,
                   intermediate=text.intermediate_size, kv_dim=getattr(text, "num_key_value_heads", heads) * head_dim,
                   vocab=text.vocab_size)


@dataclass(kw_only=True, slots=True)
class MemoryPlan:
    terms: dict[str, int]  # bytes per device
    extra: dict[str, int] = field(default_factory=dict)  # parts of the peak that are no term of their own
    total: int = 0
    device_bytes: int | None = None
    device_source: str = "device"  # what device_bytes is: the device's (or --device-memory), or the machine's RAM
    notes: list[str] = field(default_factory=list)
    rollout_gather: bool = False  # rollouts on the whole model gathered once per call (FSDP)
    rollout_reason: str = ""  # why (the --rollout-gather decision)
    kv_cache_kind: str = ""  # dynamic or static, and why
    prompt_line: str = ""  # the prompt bound scaled to the policy's tokenizer, or why it could not be
    host_bytes: int = 0  # FSDP: rank 0's host memory (RAM, not the device) for the full float32 weights it reads
    host_peak_bytes: int = 0  # FSDP: rank 0's RAM while it saves a checkpoint or a --resume loads one (host_peak)

    @property
    def fits(self) -> bool | None:
        """Whether the peak fits the device; None when no device size is known (a CPU plan for a GPU run)."""
        return None if self.device_bytes is None else self.total <= self.device_bytes

    def largest(self) -> str:
        return max(self.terms, key=self.terms.get)

    def to_json(self) -> dict:
        return {"fits": self.fits, "device_bytes": self.device_bytes, "total_bytes": self.total, **self.terms,
                **self.extra, "rollout_gather": self.rollout_gather, "rollout_reason": self.rollout_reason,
                "kv_cache_kind": self.kv_cache_kind, "host_bytes": self.host_bytes,
                "host_peak_bytes": self.host_peak_bytes}


def kv_cache_bytes(layers: int, kv_dim: int, rows: int, tokens: int, element: int) -> int:
    """Keys and values of `rows` sequences of `tokens` tokens in every layer."""
    return 2 * layers * kv_dim * rows * tokens * element


def activation_bytes(s: Shapes, rows: int, tokens: int, element: int, checkpointed: bool,
                     float32_weights: bool = True) -> int:
    """What autograd keeps for one micro-batch of `rows` x `tokens`, in bytes of the compute dtype (`element`).
    In float32, per token and block ~6 hidden-size tensors (the two norms' inputs and outputs, rotated q, attention
    output), k and v, and 4 MLP-width ones (gate, act, up, product). In a low-precision compute dtype it depends on
    the weights the forward reads (rpt_train.precision; counted with saved-tensor hooks on a Llama block):
    `float32_weights` (autocast over the float32 masters: one device) keeps the residual stream, the norms' inputs
    and outputs and the embeddings in float32 (4 hidden-size tensors), and every linear saves its own low-precision
    copy of its input (q, k, v, gate, up: 5 more beside rotated q and the attention output); weights in the compute
    dtype (FSDP2's MixedPrecisionPolicy param_dtype) keep the stream in it, each norm adding the float32 copy of its
    input it computes in. With gradient checkpointing one hidden state per block (the residual stream's dtype) plus
    one block recomputed."""
    if element >= 4:
        per_block = element * (6 * s.hidden + 2 * s.kv_dim + 4 * s.intermediate)
        outer, stream = 4 * s.hidden * element, element  # embeddings and final norm
    elif float32_weights:
        per_block = 4 * 4 * s.hidden + element * (7 * s.hidden + 2 * s.kv_dim + 4 * s.intermediate)
        outer, stream = 4 * s.hidden * 4, 4  # embeddings and final norm, float32
    else:
        per_block = 2 * 4 * s.hidden + element * (6 * s.hidden + 2 * s.kv_dim + 4 * s.intermediate)
        outer, stream = 4 * s.hidden * element, element
    if checkpointed:
        return rows * tokens * (s.layers * s.hidden * stream + per_block + outer)
    return rows * tokens * (s.layers * per_block + outer)


def logprob_bytes(vocab: int, tokens: int, chunk_tokens: int) -> int:
    """One checkpointed chunk of the log-prob path at the backward's peak: the recomputed logits and log-softmax
    and their gradients, ~4 float32 [chunk, V] tensors."""
    return 4 * min(tokens, chunk_tokens) * vocab * 4


def full_logprob_bytes(vocab: int, rows: int, completion: int) -> int:
    """The old [B, C, V] path for comparison: logits, tempered copy, log-softmax and its gradient in float32."""
    return 4 * rows * completion * vocab * 4


def overflow_cache(cfg, shapes: Shapes, prompt: int, contexts: int, rows: int, element: int,
                   lockstep: bool = False) -> tuple[int, int, int]:
    """(bytes, rows, padded tokens) of the largest generate call of --think-overflow close's second call
    (rpt_train/overflow.py, `ForcedClose._second`); (0, 0, 0) without close. It prefills prompt + thought + forced
    ids (no prefix shared across the group) and writes --answer-room tokens. The code chunks those rows so that
    rows x longest <= the first call's padded prefill (`contexts` prompts x `prompt` tokens; one row at least), and
    the engine cuts a chunk into --rollout-batch-size rows: a call has at most `rows` rows (the forced rows of the
    call, or --rollout-batch-size), each at most prompt + the largest budget + the forced text, and its cache holds
    min(rows x that, the prefill bound) tokens + --answer-room per row; costed as the kv_cache term is.
    `lockstep` (FSDP ranks decoding through the sharded model, `HFRollout(lockstep=True)`): the engine pads each
    rank's chunk to the largest rank's row count with copies of the chunk's first row (`distributed.pad_to_max`),
    so a rank whose chunk is one row of the longest length may run it as `rows` rows (another rank's many short
    ones) of that length: rows x (longest + --answer-room), the prefill bound no longer holds."""
    forced = forced_bound(cfg)
    if not forced or getattr(cfg, "think_budget", 0) <= 0:
        return 0, 0, 0
    budget = max(think_budget(cfg, 1), think_budget(cfg, 1 + max(0, cfg.think_decay_steps)))
    longest = prompt + budget + forced
    padded = rows * longest if lockstep else min(rows * longest, max(contexts * prompt, longest))
    tokens = padded + rows * cfg.answer_room
    cache = kv_cache_bytes(shapes.layers, shapes.kv_dim, 1, tokens, element) * (shapes.layers + 1) // shapes.layers
    return cache + 6 * rows * shapes.vocab * 4, rows, tokens


def engine_rows(cfg, contexts: int, n: int | None = None) -> int:
    """Rows of the largest generate call HFRollout makes for `contexts` prompts of `n` completions each (default
    --group-size): it cuts whole groups, --rollout-batch-size // n prompts a call and one prompt at least (each
    distinct prompt is prefilled once and its cache repeated for its n rows), so a --rollout-batch-size below n
    still decodes n rows, and one that is no multiple of n decodes the multiple below it."""
    n = cfg.group_size if n is None else n
    per_call = max(1, cfg.rollout_batch_size // n) if cfg.rollout_batch_size else contexts
    return min(contexts, per_call) * n


def prefill_bytes(s: Shapes, rows: int, tokens: int, element: int) -> int:
    """What one prefill forward (no autograd) holds besides the KV cache it writes, for `rows` left-padded rows of
    `tokens` tokens: per token the residual stream, the norm's float32 copy and its output (float32: the weights
    are, so the embeddings and every residual add are too), and the widest moment of one block in the compute
    dtype (q, k, v, rotated q and k, attention and o_proj outputs, or the MLP's gate, up, activation and product
    and its output); the attention mask (bool, and the float copy SDPA makes of it: rows x tokens x tokens); and
    the logits of the last position only ([rows, V] in the compute dtype and the float32 copy; the engine asks
    for one position, `logits_to_keep=1`, never [rows, tokens, V])."""
    stream = 3 * s.hidden * 4
    block = max(4 * s.hidden + 3 * s.kv_dim, 4 * s.intermediate + s.hidden) * element
    return rows * tokens * (stream + block) + rows * tokens * tokens * (1 + element) + rows * s.vocab * (element + 4)


def prefill_peak(cfg, s: Shapes, prompt: int, contexts: int, element: int, lockstep: bool = False,
                 n: int | None = None) -> int:
    """The largest prefill of the rollouts: its activations (`prefill_bytes`) and the KV cache written so far. The
    first call prefills each distinct prompt once (engine_rows / G prompts of `prompt` tokens); --think-overflow
    close's second call (overflow.ForcedClose._second) prefills forced rows of prompt + largest budget + forced
    text, chunked to no more padded tokens than the first call's prefill (`contexts` x `prompt`; one row at
    least) and cut by the engine into --rollout-batch-size rows. Under `lockstep` (see `overflow_cache`) a chunk
    is padded to the largest rank's row count: up to the rank's forced rows (or --rollout-batch-size) of the
    longest length. `n`: completions a prompt (default --group-size; an in-run eval's --eval-samples)."""
    n = cfg.group_size if n is None else n
    prompts = engine_rows(cfg, contexts, n) // n
    peak = kv_cache_bytes(s.layers, s.kv_dim, prompts, prompt, element) + prefill_bytes(s, prompts, prompt, element)
    forced = forced_bound(cfg)
    if forced and getattr(cfg, "think_budget", 0) > 0:
        budget = max(think_budget(cfg, 1), think_budget(cfg, 1 + max(0, cfg.think_decay_steps)))
        longest = prompt + budget + forced
        rows = engine_rows(cfg, contexts * n, 1)
        rows = rows if lockstep else min(rows, max(1, contexts * prompt // longest))
        peak = max(peak, kv_cache_bytes(s.layers, s.kv_dim, rows, longest, element)
                   + prefill_bytes(s, rows, longest, element))
    return peak


def eval_positions(cfg) -> int:
    """Positions of one in-run --eval-every generate call (evaluate.eval_chunks: --rollout-batch-size //
    --eval-samples, 32 // without one; one at least), each with --eval-samples completions; 0 without evals. They
    go through the training run's engine, so their calls are rollout phases too: with --rollout-batch-size 12 and
    G = 8 training decodes 8 rows a call and an eval 12."""
    if not getattr(cfg, "eval_every", 0):
        return 0
    return max(1, (cfg.rollout_batch_size or 32) // max(1, cfg.eval_samples))


def scorer_batch(cfg) -> int:
    """Prompts per forward of --sampler learnability's scorer (sampler.LearnabilityScorer): --rollout-batch-size
    PROMPTS (not rows: the scorer has no group), or SCORER_BATCH without one."""
    return cfg.rollout_batch_size or SCORER_BATCH


def scorer_peak(cfg, s: Shapes, prompt: int, world_size: int, element: int) -> int:
    """The largest forward of --sampler learnability's scorer (0 with another sampler): each rank scores its
    stripe of a pool of --sampler-pool x --batch-prompts contexts (sampler.pool_probabilities), scorer_batch
    prompts at a time, in one left-padded forward without a KV cache (use_cache=False) that keeps the last
    position's logits: `prefill_bytes` of those rows, and the float32 probabilities ([rows, V]) read from them."""
    if getattr(cfg, "sampler", "uniform") != "learnability":
        return 0
    rows = min(scorer_batch(cfg), -(-cfg.batch_prompts * cfg.sampler_pool // max(1, world_size)))
    return prefill_bytes(s, rows, prompt, element) + rows * s.vocab * 4


def static_cache(rows: int, tokens: int, second: tuple[int, int], bucket: int = CACHE_BUCKET) -> tuple[int, int]:
    """(most rows of a decoding batch, tokens in all the rows of the cache) of the --static-cache HFRollout keeps
    (`HFRollout._static_cache`): made at a generate call for its rows and length (prompt width + new tokens,
    rounded up to `bucket`) and kept to the end of the run, reused by every call it is large enough for (their
    rows padded to its rows); a call it is too small for frees it and makes its own, so there is one at a time,
    the largest of: the first call's (`rows` x `tokens` rounded up) and --think-overflow close's second call's
    (`second` = (rows, tokens) as overflow_cache plans them: a chunk of r rows of width w and --answer-room a
    holds r x round_up(w + a) <= r x (w + a + bucket - 1), so at most those tokens + rows x (bucket - 1))."""
    first = rows * (-(-tokens // bucket) * bucket)
    rows2, tokens2 = second
    later = tokens2 + rows2 * (bucket - 1) if rows2 else 0
    return max(rows, rows2), max(first, later)


def gather_mode(cfg) -> str:
    """--rollout-gather as auto, on or off (a bool from a config built in code: on / off)."""
    mode = getattr(cfg, "rollout_gather", "auto")
    return ("on" if mode else "off") if isinstance(mode, bool) else mode


def plan_memory(cfg, shapes: Shapes, *, world_size: int = 1, device_type: str = "cuda",
                device_bytes: int | None = None, device_source: str = "device",
                prompt_tokens: int | None = None, gather: bool | None = None) -> MemoryPlan:
    """The plan of `rpt-train run` with TrainConfig `cfg` on `world_size` devices of `device_bytes` each; `gather`:
    plan rollouts on gathered weights or not (None: decide as --rollout-gather says, see `choose_rollouts`)."""
    W = max(1, world_size)
    if gather is None:
        return choose_rollouts(cfg, shapes, dict(world_size=W, device_type=device_type, device_bytes=device_bytes,
                                                 device_source=device_source, prompt_tokens=prompt_tokens))
    weight = precision.element_bytes(precision.MASTER)  # float32 masters, gradients and AdamW moments
    compute = precision.compute_dtype(cfg, device_type)
    act = precision.element_bytes(compute)  # activations and the KV cache
    prompt, prompt_source, prompt_line = (prompt_tokens, "given", "") if prompt_tokens else prompt_bound(cfg)
    new = planned_new_tokens(cfg)  # --max-new-tokens, or the largest thinking budget (+ forced text) + answer room
    tokens = prompt + new
    policy = shapes.params * weight
    # the frozen reference (--beta > 0) and rlp's EMA copy have the policy's shapes
    models = policy * (1 + (cfg.beta > 0) + (getattr(cfg, "objective", "rpt") == "rlp"))
    rows_per_rank = -(-cfg.batch_prompts // W) * cfg.group_size
    contexts = -(-cfg.batch_prompts // W)
    rows = engine_rows(cfg, contexts)  # whole groups per generate call, one at least
    # --eval-every: an eval's calls (its chunks of positions x --eval-samples, the greedy call's positions x 1) go
    # through the same engine, with at most the training length (the last step's budget, the same prompt bound)
    evals, samples = eval_positions(cfg), max(1, getattr(cfg, "eval_samples", 1))
    eval_rows = engine_rows(cfg, evals, samples) if evals else 0
    kv_rows = max(rows, eval_rows)
    micro = cfg.micro_batch_size
    # --share-prefix, where it pays at these lengths: a micro-batch is `micro` groups, each one packed row of a
    # context and its G completions with a [T, T] bool block mask (rpt_train/packing.py)
    shared = getattr(cfg, "share_prefix", False) and packing.pays(prompt, new, cfg.group_size,
                                                                 shapes.hidden, shapes.intermediate)
    row_tokens = prompt + cfg.group_size * new if shared else tokens
    terms = {
        "weights": -(-models // W),
        "optimizer": -(-2 * policy // W),  # AdamW's two moments, in the parameters' dtype
        "gradients": -(-policy // W),
        # the dynamic cache grows by torch.cat: one layer's keys and values exist twice for a moment; plus the
        # sampler's [rows, V] float32 buffers (logits, tempered, log-softmax, filtered, probabilities, copy)
        "kv_cache": kv_cache_bytes(shapes.layers, shapes.kv_dim, kv_rows, tokens, act) * (shapes.layers + 1)
        // shapes.layers + 6 * kv_rows * shapes.vocab * 4,
        "activations": activation_bytes(shapes, micro, row_tokens, act, cfg.gradient_checkpointing, W == 1)
        + (micro * row_tokens ** 2 if shared else 0),
        "logprobs": logprob_bytes(shapes.vocab, micro * new * (cfg.group_size if shared else 1),
                                  cfg.logprob_chunk_tokens),
    }
    extra = {"optimizer_step": -(-policy // W)}  # foreach AdamW: one parameter-sized temporary while stepping
    # --think-overflow close: the second generate call (forced rows), after the first call's cache is freed
    # (n=1 rows: the engine cuts them by --rollout-batch-size alone); FSDP ranks decoding through the sharded
    # model pad each chunk to the largest rank's rows (HFRollout lockstep)
    lockstep = W > 1 and not gather
    seconds = [overflow_cache(cfg, shapes, prompt, contexts, engine_rows(cfg, rows_per_rank, 1), act, lockstep)]
    extra["prefill"] = prefill_peak(cfg, shapes, prompt, contexts, act, lockstep)
    if evals:  # an eval's first call prefills its positions once each; close's second call: its forced rows
        seconds.append(overflow_cache(cfg, shapes, prompt, evals, engine_rows(cfg, evals * samples, 1), act, lockstep))
        extra["prefill"] = max(extra["prefill"], prefill_peak(cfg, shapes, prompt, evals, act, lockstep, samples))
    second = max(b for b, _, _ in seconds)
    held, copy = 0, 0  # --static-cache: the cache kept from the first generate call on, and its creation's extra
    if getattr(cfg, "static_cache", False):
        # preallocated for its rows x rounded length, finished rows kept; at its creation the call's dynamic cache
        # (the first call's prompts repeated G times, or the second call's rows) is copied into it
        # (the largest any call makes: training's or an eval's, which is kept through every later update)
        kept = [static_cache(kv_rows, tokens, (r2, t2)) for _, r2, t2 in seconds]
        decoding, tokens_held = max(k[0] for k in kept), max(k[1] for k in kept)
        held = kv_cache_bytes(shapes.layers, shapes.kv_dim, 1, tokens_held, act)
        terms["kv_cache"] = held + 6 * decoding * shapes.vocab * 4
        copy = kv_cache_bytes(shapes.layers, shapes.kv_dim, 1,
                              max([kv_rows * prompt] + [t2 - r2 * cfg.answer_room for _, r2, t2 in seconds]), act)
        extra["static_cache"] = held
    elif second:
        extra["overflow_cache"] = second
    if getattr(cfg, "sampler", "uniform") == "learnability":
        extra["scorer"] = scorer_peak(cfg, shapes, prompt, W, act)
    if W > 1:  # FSDP: full parameters of a block (and the next, prefetched) in the compute dtype while it runs
        extra["fsdp_gather"] = 2 * shapes.layer_params * act
        if gather:  # the whole model all-gathered (compute dtype) for each generate call
            extra["rollout_gather"] = shapes.params * act if compute is not None else policy - -(-policy // W)
    elif compute is not None:  # autocast's cached bf16/fp16 copy of every weight inside a forward and backward
        extra["autocast_weights"] = shapes.params * act
    rollout = (max(terms["kv_cache"], extra.get("overflow_cache", 0), held + copy, held + extra["prefill"])
               + extra.get("rollout_gather", 0))
    update = held + terms["gradients"] + max(terms["activations"] + terms["logprobs"], extra["optimizer_step"])
    scorer = held + extra.get("scorer", 0)  # through the sharded model block by block, no gathered copy
    total = (terms["weights"] + terms["optimizer"] + max(rollout, update, scorer) + extra.get("fsdp_gather", 0)
             + extra.get("autocast_weights", 0))
    notes = [f"{shapes.params / 1e9:.3g}B parameters, {W} device(s), {rows} rollout rows"
             f"{f' ({eval_rows} in an --eval-every call)' if eval_rows > rows else ''} x {tokens} tokens "
             f"(prompt {prompt} planned: {prompt_source}; + {new} new), micro-batch {micro}"
             f"{' groups (shared prefix)' if shared else ''}, float32 weights, "
             f"compute in {str(compute or precision.MASTER).removeprefix('torch.')}"]
    # FSDP: rank 0 reads each model's full float32 weights into host memory and broadcasts them to the shards
    # (distributed.load_sharded_policy), one model at a time; no device holds the whole model
    return MemoryPlan(terms=terms, extra=extra, total=total, device_bytes=device_bytes, device_source=device_source,
                      notes=notes, prompt_line=prompt_line, host_bytes=policy if W > 1 else 0,
                      host_peak_bytes=host_peak(cfg, policy) if W > 1 else 0)


def host_peak(cfg, policy: int) -> int:
    """Rank 0's host memory at its peak, `policy` = the float32 model's bytes: a checkpoint save gathers the full
    weights, both AdamW moments and rlp's EMA copy there; a --resume holds the loaded trainer_state.pt (AdamW, the
    EMA copy) while it reads one model's full weights. The trainer drops the loaded state once it is in the
    optimizer and the EMA (trainer._train), so nothing of it is held between the two."""
    return policy * (3 + (getattr(cfg, "objective", "rpt") == "rlp"))


def choose_rollouts(cfg, shapes: Shapes, kw: dict) -> MemoryPlan:
    """The plan with the rollout choices made and said: gathered weights under FSDP (--rollout-gather auto: when the
    plan with the gathered copy fits the device; otherwise every decoded token all-gathers every layer) and the KV
    cache kind."""
    W, mode = kw["world_size"], gather_mode(cfg)
    if W == 1:
        memory, why = plan_memory(cfg, shapes, **kw, gather=False), "one device: rollouts read its own weights"
    elif mode != "auto":
        memory, why = plan_memory(cfg, shapes, **kw, gather=mode == "on"), f"--rollout-gather {mode}"
    else:
        on = plan_memory(cfg, shapes, **kw, gather=True)
        copy = on.extra.get("rollout_gather", 0) / GIB
        if on.fits:
            memory, why = on, (f"auto: the gathered copy ({copy:.2f} GiB) fits, planned peak {on.total / GIB:.2f} of "
                               f"{on.device_bytes / GIB:.2f} GiB")
        else:
            memory = plan_memory(cfg, shapes, **kw, gather=False)
            why = (f"auto: no device size to check that the gathered copy ({copy:.2f} GiB) fits (pass --device-memory "
                   "GIB, or --rollout-gather on)" if on.fits is None else
                   f"auto: the gathered copy ({copy:.2f} GiB) would bring the peak to {on.total / GIB:.2f} GiB, over "
                   f"the device's {on.device_bytes / GIB:.2f} GiB")
    memory.rollout_gather, memory.rollout_reason = W > 1 and "rollout_gather" in memory.extra, why
    if W > 1 and not memory.rollout_gather:
        compute = precision.compute_dtype(cfg, kw["device_type"])
        per_token = shapes.params * (precision.element_bytes(compute) if compute is not None else 4) * (W - 1) / W
        memory.rollout_reason += (f"; lockstep decoding all-gathers every layer at every decoded token: "
                                  f"{per_token / 1e9:.3g} GB received per rank per token")
    # The static cache is opt-in (--static-cache): it pads every call to the cache's rows and rounded-up length and
    # keeps finished rows in the batch, and it has not been measured faster than the dynamic path on a GPU yet;
    # sliding-window families (Gemma-2, Mistral with a window) always decode with the dynamic cache.
    memory.kv_cache_kind = ("static (preallocated, rows and length rounded up; sliding-window families: dynamic)"
                            if getattr(cfg, "static_cache", False) else
                            "dynamic (grows by concatenation each token, finished rows leave the batch); "
                            "--static-cache preallocates it, opt-in until measured faster on a GPU")
    return memory


def gathers_rollouts(cfg, device: str, world_size: int) -> bool:
    """Whether `run` on `world_size` ranks rolls out on gathered weights: --rollout-gather on/off, or auto's choice
    by the memory plan of this device (off when the model's config cannot be planned)."""
    mode = gather_mode(cfg)
    if world_size == 1 or mode != "auto":
        return world_size > 1 and mode == "on"
    try:
        shapes = load_shapes(cfg.model)
    except UserError:
        return False
    size, source = device_memory(cfg, device)
    return plan_memory(cfg, shapes, world_size=world_size, device_type=torch.device(device).type, device_bytes=size,
                       device_source=source).rollout_gather


def shard_window(shards: str) -> int | None:
    """The window (tokens per row) the shards in `shards` were tagged with, from their manifest; None when there
    are no such shards."""
    from rpt_common.shards import read_manifest

    if not shards or not Path(shards).is_dir():
        return None
    try:
        window = (read_manifest(shards).get("config") or {}).get("window")
    except UserError:
        return None
    return int(window) if window else None


def planned_prompt(cfg) -> tuple[int, str]:
    """(prompt tokens the plan counts, where the bound comes from): the context cut + template with
    --max-context-tokens, else the shards' window + template (a context is at most one row), else 1024."""
    return prompt_bound(cfg)[:2]


def prompt_bound(cfg) -> tuple[int, str, str]:
    """planned_prompt and a line for the plan's output ("" when there is nothing to say): with the shards' window
    and a policy tokenizer other than the shards' proxy tokenizer, the window is scaled by the worst policy/proxy
    tokens ratio of a sample of rows (rpt_train.prompt_ratio), never below 1."""
    if cfg.max_context_tokens:
        return cfg.max_context_tokens + TEMPLATE_TOKENS, f"--max-context-tokens + {TEMPLATE_TOKENS} template", ""
    shards = getattr(cfg, "shards", "")
    window = shard_window(shards)
    if not window:
        return DEFAULT_PROMPT_TOKENS, "default, no --shards to bound it", ""
    from rpt_train.prompt_ratio import policy_token_ratio

    ratio, rows, warning = policy_token_ratio(str(cfg.model), str(Path(shards).resolve()))
    if not rows:
        return window + TEMPLATE_TOKENS, f"shard window {window} + {TEMPLATE_TOKENS} template", warning
    scaled = math.ceil(window * max(1.0, ratio))
    bound = scaled + TEMPLATE_TOKENS
    line = (f"prompt bound: {window} proxy tokens x {max(1.0, ratio):.2f} (policy/proxy tokens, worst of {rows} rows"
            f"{f'; {ratio:.2f} measured, not scaled below 1' if ratio < 1 else ''}) + {TEMPLATE_TOKENS} template "
            f"tokens = {bound}")
    return bound, f"shard window {window} x {max(1.0, ratio):.2f} policy/proxy + {TEMPLATE_TOKENS} template", line


def load_shapes(spec: str) -> Shapes:
    """Shapes of `demo`, an HF model directory (config.json is enough), a .gguf file or a `rpt-train run` dir."""
    from transformers import AutoConfig

    from rpt_common.models import resolve_model_path
    from rpt_train.policy import resolve_policy

    directory, gguf = resolve_model_path(resolve_policy(spec))
    try:
        config = AutoConfig.from_pretrained(directory, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(directory)
        return Shapes.from_config(config)
    except (OSError, ValueError, KeyError) as e:  # also a config that is no causal LM's (e.g. T5)
        raise UserError(f"cannot plan for '{spec}': {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def device_memory(cfg, device: str) -> tuple[int | None, str]:
    """(bytes of one device, what they are): --device-memory (GiB) when given, else the CUDA device's own, on CPU
    the machine's memory; (None, ...) for a CUDA device this machine does not have."""
    if cfg.device_memory:
        return int(cfg.device_memory * GIB), "device"
    if str(device).startswith(("cuda", "auto")) and torch.cuda.is_available():
        cuda = torch.device("cuda" if device == "auto" else device)
        return torch.cuda.get_device_properties(cuda).total_memory, "device"
    if str(device).startswith("cpu"):
        return machine_memory(), "machine"
    return None, "device"


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def render(plan: MemoryPlan) -> str:
    lines = [f"memory plan per device ({plan.notes[0]}):"] + ([f"  {plan.prompt_line}"] if plan.prompt_line else [])
    lines += [f"  {k:<16} {v / GIB:9.2f} GiB" for k, v in plan.terms.items()]
    said = {"overflow_cache": "(--think-overflow close's second call; the peak holds the largest of it, kv_cache "
                              "and prefill)",
            "prefill": "(the largest prefill: cache + one block's activations; the peak holds the largest of it, "
                       "kv_cache and overflow_cache)",
            "static_cache": "(--static-cache, rounded up and kept to the end of the run: in kv_cache and in every "
                            "phase, the update's too)",
            "scorer": "(--sampler learnability's scoring forward, no KV cache: a phase of its own)"}
    lines += [f"  {k:<16} {v / GIB:9.2f} GiB  {said.get(k, '(part of the peak)')}" for k, v in plan.extra.items()]
    if plan.device_bytes is None:
        verdict = " (no device size known): fit unknown; pass --device-memory GIB"
    else:
        of = "this machine's memory" if plan.device_source == "machine" else "the device's"
        verdict = f" of {plan.device_bytes / GIB:.2f} GiB ({of}): {'fits' if plan.fits else 'DOES NOT FIT'}"
    lines.append(f"  planned peak {plan.total / GIB:.2f} GiB{verdict}")
    if plan.host_bytes:
        lines.append(f"  host: rank 0 reads the full float32 weights: {plan.host_bytes / GIB:.2f} GiB of RAM (one "
                     f"model at a time, freed once sharded; a checkpoint save gathers weights and AdamW there, "
                     f"{'and the EMA copy, ' if plan.host_peak_bytes > 3 * plan.host_bytes else ''}and a --resume "
                     f"holds the loaded ones while it reads the weights: {plan.host_peak_bytes / GIB:.2f} GiB)")
    if plan.rollout_reason:
        lines.append(f"  rollouts: {'gathered weights' if plan.rollout_gather else 'no gathered copy'} "
                     f"({plan.rollout_reason})")
    if plan.kv_cache_kind:
        lines.append(f"  KV cache: {plan.kv_cache_kind}")
    return "\n".join(lines)


def refusal(plan: MemoryPlan) -> str:
    """One sentence: the plan, the largest term and the option that shrinks it."""
    big = plan.largest()
    of = "this machine's memory" if plan.device_source == "machine" else "the device's"
    return (f"the planned peak memory {plan.total / GIB:.1f} GiB exceeds {of} {plan.device_bytes / GIB:.1f} "
            f"GiB; the largest term is {big} ({plan.terms[big] / GIB:.1f} GiB): lower it with {REMEDY[big]}")


def check(plan: MemoryPlan) -> None:
    """Refuse a plan beyond the device; beyond this machine's memory (a CPU run without --device-memory: the plan
    counts every rollout at full length) only warn."""
    if plan.fits is False:
        if plan.device_source == "machine":
            print(f"warning: {refusal(plan)}; going on (pass --device-memory GIB to stop instead)", file=sys.stderr)
            return
        raise UserError(refusal(plan))


def _proc_status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(key + ":"))) * 1024


def measured_peak(fn):
    """(fn(), peak resident bytes above the start while it ran): Linux /proc, VmHWM reset through clear_refs; sees
    torch's CPU allocations (tracemalloc does not). Run with MALLOC_MMAP_THRESHOLD_ fixed so freed tensors go back
    to the OS and do not hide later ones."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    start = _proc_status("VmRSS")
    out = fn()
    return out, _proc_status("VmHWM") - start
