"""Rank logic, in one place: plain functions that also work in a single process.

Accelerate (or torchrun) initialises ``torch.distributed``; these helpers only read it. When no
process group exists every function behaves as rank 0 of a world of 1, so library code never
branches on "am I distributed?" itself.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def make_accelerator(**kwargs):
    """An ``accelerate.Accelerator`` that runs on the CPU when no CUDA device exists.

    accelerate's multi-GPU launcher forks N processes even on a CPU machine, but they only join
    one gloo group when the Accelerator is told ``cpu=True``; without it each process silently
    trains alone on its share of the data. Launch-time topology stays in launch/accelerate/*.yaml.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **kwargs)
    launched = int(os.environ.get("WORLD_SIZE", 1))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"the launcher started {launched} processes but accelerate joined "
            f"{accelerator.num_processes}: they are not connected. On a CPU machine use "
            "`accelerate launch --config_file launch/accelerate/cpu2.yaml`."
        )
    return accelerator


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_local_rank() -> int:
    # LOCAL_RANK is set by every launcher we support (accelerate, torchrun); 0 otherwise.
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank, in place.

    DDP broadcasts them at the start of each forward, so after the last training step every rank
    holds its own update of rank 0's statistics. Validating with those would score a model that no
    checkpoint holds (checkpoints and exports are rank 0's).
    """
    if is_dist():
        for buf in model.buffers():
            dist.broadcast(buf.data, src=src)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (in place where distributed; returns ``t`` either way)."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank if ``flag`` is true on at least one (used for preemption and stop)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)

