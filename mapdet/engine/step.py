"""One optimizer step of training torchvision Faster R-CNN, collective over ranks.

``train_step(parts, batches, optim_cfg)``: ``optim_cfg.grad_accum`` micro-batches are drawn from the stream (the wait is
timed), moved to the device, augmented there (``BatchAugment``: uint8 (3,H,W) -> float [0,1],
boxes xyxy pixel-edge, degenerate boxes dropped), and fed to the model under accelerate's
autocast. Gradients are synchronised only on the last micro-batch. Every rank runs every backward,
whatever its loss, so DDP never waits on a rank that skipped one; a non-finite loss on ANY rank
then makes every rank skip the update together (its gradients are thrown away).

Host syncs: ONE per step. Loss components and the non-finite flag stay on the device until, after
the last backward, one small float64 tensor (non-finite count, this step's corrupt-sample entries,
images, and the caller's ``shared`` values) is summed over ranks in one all-reduce and read back,
together with this rank's losses, in one ``.tolist()``. The gradient norm stays a device tensor
until ``StepResult.grad_norm`` is read (the training loop reads it only on logging steps).
``cuda_speedups`` holds the device settings ``mapdet train`` applies on CUDA.

Profiling: each phase runs inside a ``torch.profiler.record_function`` range named in ``PHASES``
(``step/data``, ``step/augment``, ...), so a torch.profiler trace of ``mapdet train`` (or
``bench/profile_step.py``) splits a step into them; outside a profiler a range costs about 10 us.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from mapdet import comm
from mapdet.config import OptimConfig
from mapdet.structures import Batch

# The profiler ranges of a step, in the order they run (a micro-batch repeats the first four).
PHASES = ("step/data", "step/augment", "step/forward", "step/backward", "step/sync", "step/optimizer")
DATA, AUGMENT, FORWARD, BACKWARD, SYNC, OPTIMIZER = PHASES


@dataclass
class TrainParts:
    """What a training step works on: accelerate's ``Accelerator`` and the objects it prepared."""

    accelerator: object
    model: torch.nn.Module  # as prepared (DDP-wrapped when distributed)
    raw_model: torch.nn.Module  # unwrapped: checkpoints, validation, exports
    optimizer: torch.optim.Optimizer
    scheduler: object  # stepped once per optimizer step, never prepared
    augment: torch.nn.Module  # data.augment.BatchAugment on the training device


@dataclass
class StepResult:
    losses: dict[str, float]  # mean over micro-batches, this rank
    grad_norm_t: torch.Tensor | None  # before clipping, on the device (None: no clipping or skipped)
    skipped: bool  # non-finite loss on some rank: no update on any rank
    data_wait_s: float
    step_time_s: float
    images: int  # this rank, all micro-batches
    bad: list[dict] = field(default_factory=list)  # corrupt samples met in this step (this rank)
    last_images: list | None = None  # augmented inputs of the last micro-batch (for image logs)
    last_targets: list | None = None
    all_bad: int = 0  # len(bad) summed over ranks
    all_images: int = 0  # images summed over ranks
    shared: list[float] = field(default_factory=list)  # the caller's ``shared`` values, summed over ranks

    @property
    def grad_norm(self) -> float:
        """Gradient norm before clipping (NaN without clipping or when skipped); reading it syncs."""
        return float("nan") if self.grad_norm_t is None else float(self.grad_norm_t)


def to_device(batch: Batch, device) -> tuple[list[torch.Tensor], list[dict]]:
    images = [im.to(device, non_blocking=True) for im in batch.images]
    targets = [
        {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in batch.targets
    ]
    return images, targets


def cuda_speedups(model: torch.nn.Module, device) -> None:
    """What ``mapdet train`` sets on a CUDA device (nothing elsewhere): channels-last weights, so
    cuDNN runs its NHWC tensor-core convolutions (activations follow the weights' layout), and
    ``cudnn.benchmark``, which times the convolution algorithms once per input shape. The model's
    transform pads every batch to a multiple of 32 pixels, so real Vistas (a few aspect ratios)
    meets tens of shapes in a run of tens of thousands of steps: a few seconds of timing in all.
    Weights keep their values; checkpoints and exports are written contiguous (NCHW) as before."""
    if torch.device(device).type != "cuda":
        return
    model.to(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True


def train_step(
    parts: TrainParts,
    batches: Iterator[Batch],
    optim_cfg: OptimConfig,
    shared: Callable[[], Sequence[float]] | None = None,
) -> StepResult:
    """One optimizer step over ``optim_cfg.grad_accum`` micro-batches, gradients clipped to
    ``optim_cfg.clip_norm`` (collective: every rank calls it).

    ``shared``: called once after the step's batches are drawn; its numbers are summed over ranks
    in the step's one all-reduce and returned as ``StepResult.shared`` (the training loop passes
    its sanitised-box tally and its preemption flag, so they cost no collective of their own).
    """
    accelerator, model, optimizer = parts.accelerator, parts.model, parts.optimizer
    grad_accum, clip_norm = optim_cfg.grad_accum, optim_cfg.clip_norm
    start, wait, n_images, bad = time.perf_counter(), 0.0, 0, []
    device = accelerator.device
    names: list[str] = []
    local = nonfinite = None  # device tensors: summed loss components / non-finite micro-batches
    for micro in range(grad_accum):
        t0 = time.perf_counter()
        with record_function(DATA):
            batch = next(batches)
            wait += time.perf_counter() - t0
            bad += batch.bad
            images, targets = to_device(batch, device)
        with torch.no_grad(), record_function(AUGMENT):
            images, targets = parts.augment(images, targets)
        last = micro == grad_accum - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast(), record_function(FORWARD):
                loss_dict = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
            with record_function(BACKWARD):
                loss = sum(loss_dict.values())
                accelerator.backward(loss / grad_accum)  # also when not finite: the update is skipped below
        names = list(loss_dict)
        components = torch.stack([v.detach().float() for v in loss_dict.values()]) / grad_accum
        bad_loss = (~torch.isfinite(loss.detach())).double().reshape(1)
        local = components if local is None else local + components
        nonfinite = bad_loss if nonfinite is None else nonfinite + bad_loss
        n_images += len(images)
    with record_function(SYNC):
        extra = [*shared()] if shared is not None else []
        host = torch.tensor([float(len(bad)), float(n_images), *map(float, extra)], dtype=torch.float64)
        if device.type == "cuda":
            host = host.pin_memory()  # copied without a stream sync
        flags = comm.all_reduce_sum(torch.cat([nonfinite, host.to(device, non_blocking=True)]))
        values = torch.cat([flags, local.double()]).tolist()  # the step's one host sync
    skipped = values[0] > 0
    grad_norm = None
    with record_function(OPTIMIZER):
        if skipped:
            optimizer.zero_grad(set_to_none=True)
        else:
            if clip_norm:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            parts.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    sums = dict(zip(names, values[3 + len(extra) :]))
    sums["loss"] = sum(sums.values())
    return StepResult(
        sums,
        grad_norm,
        skipped,
        wait,
        time.perf_counter() - start,
        n_images,
        bad,
        images,
        targets,
        all_bad=round(values[1]),
        all_images=round(values[2]),
        shared=values[3 : 3 + len(extra)],
    )
