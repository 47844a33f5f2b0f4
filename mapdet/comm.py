"""Rank logic, in one place: plain functions that also work in a single process.

Accelerate (or torchrun) initialises ``torch.distributed``; these helpers only read it. When no
process group exists every function behaves as rank 0 of a world of 1, so library code never
branches on "am I distributed?" itself.

torch is imported only when a process group can exist (torch already imported) or a function
needs tensors: a single process that never imports torch (``mapdet cocoeval``) does not pay its
start-up of about 1.5 s. Byte payloads (``all_to_all_bytes``, ``stream_to_main``) are 1-D uint8
numpy arrays, carried as CPU tensors on gloo and as tensors of the current CUDA device on NCCL.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np


def make_accelerator(cpu: bool = False, **kwargs):
    """An ``accelerate.Accelerator`` that runs on the CPU when no CUDA device exists (or ``cpu``).

    accelerate's multi-GPU launcher forks N processes even on a CPU machine, but they only join
    one gloo group when the Accelerator is told ``cpu=True``; without it each process silently
    trains alone on its share of the data. Launch-time topology stays in launch/accelerate/*.yaml.
    """
    import torch
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=cpu or not torch.cuda.is_available(), **kwargs)
    launched = launched_processes()
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"the launcher started {launched} processes but accelerate joined "
            f"{accelerator.num_processes}: they are not connected. On a CPU machine use "
            "`accelerate launch --config_file launch/accelerate/cpu2.yaml`."
        )
    return accelerator


def launched_processes() -> int:
    """How many processes the launcher started (accelerate launch, torchrun: WORLD_SIZE), known
    before any process group exists; 1 without a launcher."""
    return int(os.environ.get("WORLD_SIZE", 1))


def _dist():
    """``torch.distributed`` when a process group is up, else None. Without torch imported no
    group can exist, so that case answers without importing it."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def get_rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else 0


def get_world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else 1


def get_num_nodes() -> int:
    # The launchers (accelerate launch, torchrun) set LOCAL_WORLD_SIZE: the processes on this node.
    return max(1, get_world_size() // int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size())))


def is_main_process() -> bool:
    return get_rank() == 0


def share(n: int, i: int, parts: int) -> tuple[int, int]:
    """``[lo, hi)`` of part ``i`` when ``n`` items in order are cut into ``parts`` contiguous ranges
    whose sizes differ by at most one: every item in exactly one part (no padding, no repeats)."""
    return n * i // parts, n * (i + 1) // parts


def barrier() -> None:
    if dist := _dist():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list without a process group)."""
    if not (dist := _dist()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not (dist := _dist()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(model, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank, in place.

    DDP broadcasts them at the start of each forward, so after the last training step every rank
    holds its own update of rank 0's statistics. Validating with those would score a model that no
    checkpoint holds (checkpoints and exports are rank 0's).
    """
    if dist := _dist():
        for buf in model.buffers():
            dist.broadcast(buf.data, src=src)


def leave() -> None:
    """Leave the process group now, on a rank that cannot go on and takes part in no collective
    after this. On gloo, peers waiting for it in a collective then fail at once ("Connection closed
    by peer") instead of when this process has finished exiting (seconds, more on a loaded machine).
    NCCL peers cannot be told so (their collective waits out its timeout): the launcher stops them
    when this process exits."""
    if (dist := _dist()) and dist.get_backend() == "gloo":
        dist.destroy_process_group()


def all_reduce_sum(t):
    """Sum of the tensor ``t`` over ranks (in place where distributed; returns ``t`` either way)."""
    if dist := _dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device="cpu") -> bool:
    """True on every rank if ``flag`` is true on at least one (used for preemption and stop)."""
    import torch

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_sum(t).item() > 0)


def _payload_device(dist):
    """Where collectives of this group need tensors: NCCL only moves CUDA memory."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"


def all_to_all_bytes(send: np.ndarray, sizes: list[int]) -> tuple[np.ndarray, list[int]]:
    """Personalised exchange: the first ``sizes[0]`` bytes of ``send`` go to rank 0, the next
    ``sizes[1]`` to rank 1, and so on; returns the bytes received, in source-rank order, and how
    many came from each rank. One all-to-all of the sizes, one of the data (no pickling)."""
    if not (dist := _dist()):
        return send, [len(send)]
    import torch

    device = _payload_device(dist)
    counts = torch.tensor(sizes, dtype=torch.int64, device=device)
    got = torch.empty_like(counts)
    dist.all_to_all_single(got, counts)
    got_sizes = got.tolist()
    out = torch.empty(sum(got_sizes), dtype=torch.uint8, device=device)
    dist.all_to_all_single(
        out, torch.from_numpy(np.ascontiguousarray(send, np.uint8)).to(device), got_sizes, list(sizes)
    )
    return out.cpu().numpy(), got_sizes


def stream_to_main(data: np.ndarray, consume: Callable[[np.ndarray], None] | None) -> None:
    """Collective: ``consume(bytes of rank r)`` on the main process for r = 0, 1, ... in order.

    Only one other rank's bytes are in the main process's memory at a time, so it can write every
    rank's share of something (detections.json) without ever holding all of it. ``consume`` is
    not called on the other ranks (pass None there).
    """
    if not (dist := _dist()):
        consume(data)
        return
    import torch

    device, rank = _payload_device(dist), dist.get_rank()
    if rank != 0:
        dist.send(torch.tensor([len(data)], dtype=torch.int64, device=device), 0)
        if len(data):  # nothing follows an empty share
            dist.send(torch.from_numpy(np.ascontiguousarray(data, np.uint8)).to(device), 0)
        return
    consume(data)
    for src in range(1, dist.get_world_size()):
        size = torch.empty(1, dtype=torch.int64, device=device)
        dist.recv(size, src)
        buf = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        if len(buf):
            dist.recv(buf, src)
        consume(buf.cpu().numpy())
