"""Which rank this process is: explicit flags, else torchrun, Slurm array or Slurm task environment.

One process per GPU: a process with a local rank (LOCAL_RANK from torchrun, SLURM_LOCALID from srun)
uses cuda:<local rank>. Under torchrun, torch.distributed (gloo) is used only at the end: a barrier
so that rank 0 writes manifest.json once every rank has finished.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from rpt_common.errors import UserError

# Ranks finish at different times (uneven files); the first one done waits this long at most.
WAIT_FOR_RANKS = timedelta(days=7)
# Every rank joins at the start, before any work; one missing this long (a process started with torchrun's
# variables but without torchrun, or a node that never came up) stops the job (RPT_JOIN_RANKS_S overrides it).
JOIN_RANKS = timedelta(minutes=15)


@dataclass(frozen=True, slots=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int | None = None  # GPU index on this node, when a launcher gave one
    launcher: str = "single"  # flags | torchrun | slurm-array | slurm | single

    @property
    def torch_distributed(self) -> bool:
        """Rank 0 waits for the others through torch.distributed (torchrun sets MASTER_ADDR)."""
        return self.launcher == "torchrun" and self.world_size > 1 and "MASTER_ADDR" in os.environ


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def _checked(rank: int, world_size: int, where: str) -> tuple[int, int]:
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"{where} gives rank {rank} of world size {world_size}; the rank must be in [0, world size)")
    return rank, world_size


def resolve_ranks(rank: int | None = None, world_size: int | None = None,
                  env: Mapping[str, str] | None = None) -> RankInfo:
    """Explicit --rank/--world-size win; else torchrun's RANK/WORLD_SIZE; else a Slurm job array
    (SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN of SLURM_ARRAY_TASK_COUNT); else SLURM_PROCID of
    SLURM_NTASKS; else rank 0 of 1."""
    env = os.environ if env is None else env
    local = _int(env, "LOCAL_RANK")
    local = _int(env, "SLURM_LOCALID") if local is None else local
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise UserError("--rank and --world-size go together: give both, or neither to take them from "
                            "torchrun or Slurm")
        return RankInfo(*_checked(rank, world_size, "--rank/--world-size"), local, "flags")
    if "RANK" in env or "WORLD_SIZE" in env:
        r, w = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        if r is None or w is None:
            raise UserError("RANK and WORLD_SIZE must both be set (as torchrun does), or neither")
        return RankInfo(*_checked(r, w, "RANK/WORLD_SIZE"), local, "torchrun")
    task = _int(env, "SLURM_ARRAY_TASK_ID")
    if task is not None:
        count, lo, hi = (_int(env, f"SLURM_ARRAY_TASK_{k}") for k in ("COUNT", "MIN", "MAX"))
        step = _int(env, "SLURM_ARRAY_TASK_STEP") or 1
        if count is None:
            raise UserError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; "
                            "pass --rank and --world-size")
        lo = 0 if lo is None else lo
        if step != 1 or (hi is not None and hi - lo + 1 != count):
            raise UserError(f"the Slurm job array must be one contiguous range such as --array=0-{count - 1} "
                            f"(it runs tasks {lo}-{hi} step {step}, {count} tasks); or pass --rank and --world-size")
        if (_int(env, "SLURM_NTASKS") or 1) > 1:
            raise UserError("each element of a Slurm job array must run one task (--ntasks=1): several tasks "
                            "of one element would tag the same part of the input")
        return RankInfo(*_checked(task - lo, count, "the Slurm job array"), local, "slurm-array")
    procid, ntasks = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
    if procid is not None and ntasks is not None:
        return RankInfo(*_checked(procid, ntasks, "SLURM_PROCID/SLURM_NTASKS"), local, "slurm")
    return RankInfo(0, 1, local, "single")


def rank_device(device: str, local_rank: int | None) -> str:
    """cuda:<local rank> for `auto`/`cuda` when a launcher gave a local rank and CUDA is there; else `device`."""
    import torch

    if device not in ("auto", "cuda") or local_rank is None or not torch.cuda.is_available():
        return device
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise UserError(f"local rank {local_rank} needs GPU {local_rank} but only {n} CUDA device(s) are visible; "
                        f"start at most {n} processes per node, or pass --device cuda:N")
    torch.cuda.set_device(local_rank)
    return f"cuda:{local_rank}"


@contextlib.contextmanager
def process_group(info: RankInfo | None = None):
    """The default torch.distributed group (gloo), created from torchrun's env when there is none yet and
    destroyed on exit only in that case. Enter it before the work: every rank must join within JOIN_RANKS (else a
    UserError says who is missing and what to do), so a missing rank is found in minutes, not after the whole
    stripe. The join is checked on the rendezvous store alone; the group itself waits up to WAIT_FOR_RANKS (gloo
    gives a group's init timeout to every later wait: a 15-minute group would fail the end barrier of a rank done
    early)."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        store, rank, world = _joined(dist, info)
        store.set_timeout(WAIT_FOR_RANKS)
        dist.init_process_group("gloo", store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world,
                                timeout=WAIT_FOR_RANKS)
    try:
        yield dist
    finally:
        if created:
            dist.destroy_process_group()


def _joined(dist, info: RankInfo | None):
    """The env:// rendezvous store (torchrun's agent store, or rank 0's) once every rank has joined it, within
    JOIN_RANKS (RPT_JOIN_RANKS_S overrides it); (store, rank, world size)."""
    join = float(os.environ.get("RPT_JOIN_RANKS_S", JOIN_RANKS.total_seconds()))
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT', '29500')}"
    who = f"rank {info.rank} of {info.world_size}" if info else "this rank"
    try:
        store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(seconds=join)))
        # torchrun's agent store outlives a restart of its workers: count this attempt's ranks only
        key = f"rpt-data/joined/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        store.set_timeout(timedelta(seconds=join))
        joined, deadline = store.add(key, 1), time.monotonic() + join
        while joined < world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{joined} of {world} ranks joined")
            time.sleep(0.2)
            joined = store.add(key, 0)
    except (RuntimeError, TimeoutError, ConnectionError) as e:  # DistStoreError, DistNetworkError: RuntimeErrors
        raise UserError(
            f"{who}: the other ranks did not join torch.distributed at {where} within {join:g} s "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Start every rank with torchrun "
            "(RANK/WORLD_SIZE/MASTER_ADDR set by hand start only one), or give --rank/--world-size and run "
            "`rpt-data merge OUT` when all are done") from None
    return store, rank, world


def wait_for_ranks(dist) -> None:
    """The end barrier: every rank's record is complete once all got here; ranks finish at different times, so it
    waits up to WAIT_FOR_RANKS (gloo's monitored barrier: a rank that died is named)."""
    dist.monitored_barrier(timeout=WAIT_FOR_RANKS, wait_all_ranks=True)
