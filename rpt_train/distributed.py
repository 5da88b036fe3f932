"""Multi-process plumbing for `rpt-train run` under torchrun: process group from the environment, rank helpers,
reductions that are no-ops in a single process, FSDP2 sharding, and rank-count-independent (full) state dicts.

Every FSDP2 forward all-gathers parameters, so every rank must run the same number of forwards and backwards:
loops over a rank's own micro-batches are padded to the longest rank's count (`pad_to_max`) with zero-weight
dummy passes (`dummy_inputs`). A single process (no WORLD_SIZE > 1 in the environment) never touches
torch.distributed and behaves exactly as without this module."""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist

from rpt_common.errors import UserError

_OWNED = False  # this module started the process group (and so ends it)
_DRAIN_REGISTERED = False  # the atexit wait for gloo's threads is registered (once a process)
_JOINED = False  # this process was a rank of a multi-process group (end_process ends it without finalization)


def init_from_env(device: str) -> str:
    """Join torchrun's process group when WORLD_SIZE > 1 (cuda:LOCAL_RANK with nccl, else CPU with gloo) and return
    this rank's device; in a single process return `device` untouched. Reuses a group that is already up."""
    global _OWNED, _JOINED, _DRAIN_REGISTERED
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not is_initialized():
        return device
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda was requested but no CUDA device is available")
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        # CPU tensors (small reductions, objects) go through gloo, CUDA tensors (FSDP collectives) through nccl
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
        _OWNED = _JOINED = True
    if not _DRAIN_REGISTERED:  # a group this module started or the caller's: either may leave gloo threads busy
        atexit.register(_let_gloo_threads_finish)
        _DRAIN_REGISTERED = True
    return f"cuda:{local}" if cuda else "cpu"


def shutdown() -> None:
    global _OWNED
    if _OWNED and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED = False


def joined() -> bool:
    """This process was a rank of a multi-process group that this module started (ended or not)."""
    return _JOINED


GLOO_DRAIN_S = 0.5  # how long a rank's interpreter waits at exit for gloo's threads (see below)


def _let_gloo_threads_finish() -> None:
    """atexit, in a process that joined a group: sleep GLOO_DRAIN_S with the GIL released, before the interpreter
    finalizes. A gloo worker thread that has yet to free a finished collective's tensors takes the GIL to do so;
    once the interpreter is finalizing, that thread is terminated and the process aborts (end_process). atexit
    handlers run before that point, so the wait lets such a thread finish. For code that calls train() or
    run_eval() itself under torchrun (the CLI ends with end_process, which skips finalization): a wait, not a
    guarantee (a thread not scheduled for GLOO_DRAIN_S still aborts)."""
    time.sleep(GLOO_DRAIN_S)


def end_process(code: int = 0) -> None:
    """End a rank's process once its command is over (the CLI's `run` and `eval`, cli.ends_rank, whatever the
    outcome): stdout and stderr flushed, then os._exit(code), without interpreter finalization. Gloo's worker
    threads free a finished collective's tensors after it returns, and freeing one whose Python object is gone takes
    the GIL; a thread that reaches for it once the interpreter is finalizing is terminated (Python 3.11-3.13), and
    the rank dies with SIGABRT ('terminate called without an active exception') after a finished run: torchrun then
    reports the run failed (seen in 1 of 5 to 25 runs of the 2-rank CLI test, on CI too; barrier() narrows this,
    only skipping finalization closes it). Every file is closed by then and the process group was destroyed in
    train's / run_eval's finally; the one atexit handler this skips is _let_gloo_threads_finish, a wait it makes
    unneeded. A process that was no rank returns. Code that
    calls the CLI commands in-process (click's standalone_mode=False) under torchrun ends with them: call train() or
    run_eval() instead."""
    if not _JOINED:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: exit all the same
            pass
    os._exit(code)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Every rank gets here before any goes on: an all-reduce of one CPU int (gloo under both backends), not
    dist.barrier(). Gloo's barrier keeps the works still in flight when it is called (a broadcast just returned) and
    its worker thread frees them, with their tensors, after the barrier returns; freeing a tensor whose Python object
    is gone takes the GIL, and when the process was already finalizing (the barrier before exit) that thread was
    terminated: SIGABRT, 'terminate called without an active exception', after a finished run (1 run in 5 to 25 of
    the 2-rank CLI test). The all-reduce holds no other work, and this waits (GIL released) until gloo has let go of
    its tensor."""
    if world_size() > 1:
        t = torch.zeros(1, dtype=torch.int32)
        dist.all_reduce(t)
        _released(t)


def _released(t: torch.Tensor, wait_s: float = 10.0) -> None:
    """Wait until only this frame holds `t` (the collective's worker thread has freed its work), sleeping so that
    thread can take the GIL; after `wait_s` go on regardless (a slow thread costs nothing but the wait)."""
    end = time.monotonic() + wait_s
    while t._use_count() > 1 and time.monotonic() < end:
        time.sleep(0.001)


def rank_seed(seed: int, *extra: int) -> int:
    """The seed of this rank: `seed` itself on rank 0 (a single process is seeded as before), a SeedSequence
    mix of (seed, *extra, rank) elsewhere."""
    if rank() == 0 and not extra:
        return seed
    return int(np.random.SeedSequence([seed, *extra, rank()]).generate_state(1)[0])


# ---- reductions (CPU tensors: gloo under both backends) ---------------------------------------------------------
def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over ranks (float64; NaN/inf propagate)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def all_max(value: float) -> float:
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def all_true(flag: bool) -> bool:
    """True on every rank iff `flag` is True on every rank."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t)


def all_gather_objects(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def cat_from_ranks(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `t` stacked in rank order (`t` itself in a single process)."""
    if world_size() == 1:
        return t
    return torch.cat([x.cpu() for x in all_gather_objects(t.detach().cpu())])


def broadcast_from_main(fn):
    """fn() on rank 0 and its result on every rank; a UserError on rank 0 is raised on every rank (no hang)."""
    if world_size() == 1:
        return fn()
    box = [None]
    if is_main():
        try:
            box = [("ok", fn())]
        except UserError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def pad_to_max(items: list, filler=None) -> list:
    """`items` padded with `filler` to the longest rank's length: loops that run FSDP passes stay in lockstep."""
    if world_size() == 1:
        return items
    return items + [filler] * (int(all_max(len(items))) - len(items))


def dummy_inputs(device) -> tuple[torch.Tensor, ...]:
    """A one-token prompt and one-token completion (prompt_ids, prompt_mask, completion_ids, completion_mask) for
    the padding passes of a rank with fewer micro-batches; their loss is multiplied by 0."""
    one = torch.ones(1, 1, dtype=torch.long, device=device)
    return one * 0, one, one * 0, one


# ---- FSDP2 ------------------------------------------------------------------------------------------------------
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (HF `_no_split_modules` classes, e.g. LlamaDecoderLayer): one FSDP unit each."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise UserError(f"cannot find the decoder layers of {type(model).__name__} to shard (no _no_split_modules)")
    return layers


def load_sharded_policy(spec: str, device: str, compute_dtype: torch.dtype | None = None, prepare=None):
    """`policy.load_policy` in float32 (the master weights: a bf16 checkpoint is upcast), then prepare(model); under
    torchrun FSDP2-sharded with `compute_dtype` as its parameter dtype, its weights read once, into host memory:
    rank 0 loads them on the CPU (prepared too) and broadcasts them (`set_model_state_dict(broadcast_from_rank0=True)`
    copies one full tensor at a time to the device); every rank, rank 0 included, shards the model's skeleton built
    on the meta device, so no rank ever holds the whole model on its device. Buffers (rotary tables, which
    `to_empty` leaves uninitialised) are copied from rank 0's CPU model and broadcast. Rank 0 returns the
    tokenizer, generation config and identity of its CPU load; the CPU model is freed before returning. A load
    that fails on any rank (rank 0's host load, any rank's skeleton) stops every rank with its error before any
    other collective (`stop_if_any_failed`), so no rank is left waiting for it."""
    from rpt_train.policy import load_policy

    if world_size() == 1:
        loaded = load_policy(spec, device, "float32")
        if prepare:
            prepare(loaded.model)
        return loaded
    import dataclasses

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    host, skeleton, failure = None, None, None
    try:  # before any other collective: a rank that fails here must not leave the others waiting in one
        if is_main():
            host = load_policy(spec, "cpu", "float32")
            if prepare:
                prepare(host.model)
        skeleton = load_policy(spec, device, "float32", weights=False)
    except Exception as e:  # noqa: BLE001 - every rank must learn of it; re-raised below
        failure = e
    stop_if_any_failed(failure, f"load '{spec}'")
    model = skeleton.model
    if host is not None:
        if getattr(host.model, "generation_config", None) is not None:  # generation_config.json's, not config.json's
            model.generation_config = host.model.generation_config
        loaded = dataclasses.replace(host, model=model)
    else:
        loaded = skeleton
    agree_with_main(loaded, spec)
    full, buffers = {}, {}
    if host is not None:
        full = dict(host.model.state_dict())
        buffers = dict(host.model.named_buffers())
    if prepare:
        prepare(model)
    shard_model(model, device, compute_dtype)
    model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buf in model.named_buffers():
        if host is not None:
            buf.copy_(buffers[name])
        dist.broadcast(buf, src=0)
    del host, full, buffers
    return loaded


def stop_if_any_failed(failure: BaseException | None, what: str) -> None:
    """One collective after a step that may fail on some ranks (`failure`: this rank's exception, or None): if any
    rank failed, every rank raises. A UserError's sentence is raised on every rank as it is when rank 0 failed,
    prefixed "rank N: " when rank N > 0 was the first to fail; a rank whose own failure was another exception
    re-raises it (its traceback), the others a UserError naming it."""
    if world_size() == 1:
        if failure is not None:
            raise failure
        return
    user = isinstance(failure, UserError)
    mine = None if failure is None else (user, type(failure).__name__, str(failure) if user else
                                         (str(failure).splitlines() or [""])[0])
    failed = [(r, f) for r, f in enumerate(all_gather_objects(mine)) if f is not None]
    if not failed:
        return
    if failure is not None and not isinstance(failure, UserError):
        raise failure
    r, (user, kind, message) = failed[0]
    if not user:
        message = f"could not {what}: {kind}: {message}"
    raise UserError(message if r == 0 else f"rank {r}: {message}")


def agree_with_main(loaded, spec: str) -> None:
    """Give every rank rank 0's view of what rollouts read from the checkpoint: its generation config (EOS ids:
    ranks > 0 build the model from config.json, whose EOS may be fewer than generation_config.json's), pad and EOS
    tokens and chat template; a rank whose tokenizer has another vocabulary than rank 0's stops every rank."""
    from transformers import GenerationConfig

    if world_size() == 1:
        return
    tok, model = loaded.tokenizer, loaded.model
    gen = getattr(model, "generation_config", None)
    main = broadcast_from_main(lambda: {
        "generation_config": gen.to_dict() if gen is not None else None, "pad_token": tok.pad_token,
        "eos_token": tok.eos_token, "chat_template": getattr(tok, "chat_template", None),
        "vocab": {k: v for k, v in loaded.tokenizer_identity.items() if k != "name"}})
    vocab = {k: v for k, v in loaded.tokenizer_identity.items() if k != "name"}
    if not all_true(vocab == main["vocab"]):
        raise UserError(f"the tokenizer of '{spec}' differs between ranks (vocabulary {main['vocab']} on rank 0); "
                        "every rank must read the same checkpoint")
    if main["generation_config"] is not None:
        model.generation_config = GenerationConfig.from_dict(main["generation_config"])
    tok.pad_token, tok.eos_token = main["pad_token"], main["eos_token"]
    if main["chat_template"] is not None or getattr(tok, "chat_template", None) is not None:
        tok.chat_template = main["chat_template"]


def shard_model(model: torch.nn.Module, device: str, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """FSDP2 over all ranks: `fully_shard` per decoder layer, then the root (embeddings, final norm, head). The
    parameters move to `device` as they are sharded and stay float32 (the masters AdamW steps); with a
    `compute_dtype` (bf16) they are all-gathered and computed in it, gradients reduced and kept in float32.
    Gradients are summed across ranks, not averaged: the loss is already normalised by global counts (see
    update.update_policy). The root reshards after forward too (FSDP2 keeps it gathered by default): no-grad
    forwards (old/reference log-probs, entropy) would otherwise leave its full parameters registered in place of
    the sharded ones that the optimizer holds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(torch.device(device).type, (world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype is not None \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM; NCCL is zero-copy only for SUM
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gathered(model: torch.nn.Module, enabled: bool = True):
    """Hold the full parameters on every rank inside the block (one all-gather per FSDP unit on entry), so that
    forwards in it need no collective: ranks may then run different numbers of them (rollouts of different
    lengths). Costs the memory of the unsharded model on each rank. No-op for an unsharded model."""
    if not enabled or not is_sharded(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    model.set_reshard_after_forward(False)
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
        model.set_reshard_after_forward(True)


class GatheredEngine:
    """A rollout engine whose generate() runs inside `gathered(model)`: one all-gather per call instead of one
    per layer per generated token. Every rank must call generate() the same number of times."""

    def __init__(self, engine, model):
        self.engine, self.model = engine, model
        self.tokenizer = getattr(engine, "tokenizer", None)

    def generate(self, prompts, params):
        with gathered(self.model):
            return self.engine.generate(prompts, params)

    def sync(self, model) -> None:
        self.model = model
        self.engine.sync(model)


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip to `max_norm` and return the pre-clip norm of the whole (global) gradient."""
    if not is_initialized():
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    from torch.distributed.tensor import DTensor

    if not any(isinstance(p, DTensor) for p in params):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if isinstance(norm, DTensor):  # a partial (per-shard) norm: reduce to the full one
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return float(norm)


# ---- rank-count-independent state dicts -------------------------------------------------------------------------
def full_state_dict(model: torch.nn.Module) -> dict | None:
    """The unsharded weights, on CPU, on rank 0 ({} elsewhere); None for an unsharded model (read it directly).
    Tied copies (lm_head = embeddings) are left out, as save_pretrained does for a plain model. A collective."""
    if not is_sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return {k: v for k, v in full.items() if k not in tied}


def _trained_names(model: torch.nn.Module) -> list[str]:
    """Parameter names in the order of the optimizer's parameter list (trainer: requires_grad, deduplicated)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def optimizer_state_dict(model: torch.nn.Module, optimizer) -> dict:
    """optimizer.state_dict() for an unsharded model; for FSDP2 the full state keyed by parameter name (on rank 0,
    {} elsewhere), loadable on any number of ranks. A collective when sharded."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state_dict(model: torch.nn.Module, optimizer, state: dict) -> None:
    """Restore either form (index-keyed from a single process, name-keyed from FSDP2) into either kind of model.
    Sharded: `state` is needed on rank 0 only (the checkpoint is read there), which broadcasts every rank's shard."""
    names = _trained_names(model)
    if is_sharded(model) and not is_main():
        state = {"state": {}, "param_groups": []}
    by_name = any(isinstance(k, str) for k in state["state"]) or any(
        isinstance(p, str) for g in state["param_groups"] for p in g["params"])
    if not is_sharded(model):
        if by_name:  # name -> index in the optimizer's parameter list
            index = {n: i for i, n in enumerate(names)}
            state = {"state": {index[k]: v for k, v in state["state"].items()},
                     "param_groups": [{**g, "params": [index[p] for p in g["params"]]} for g in state["param_groups"]]}
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not by_name:
        state = {"state": {names[k]: v for k, v in state["state"].items()},
                 "param_groups": [{**g, "params": [names[p] for p in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state if is_main() else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def warn(message: str) -> None:
    """A warning printed once (by rank 0)."""
    if is_main():
        print(f"warning: {message}", file=sys.stderr, flush=True)
