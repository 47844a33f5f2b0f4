"""One optimizer step of training, and one pass of inference, for torchvision Faster R-CNN.

Training (``train_step``): ``grad_accum`` micro-batches are drawn from the stream (the wait is
timed), moved to the device, augmented there (``BatchAugment``: uint8 (3,H,W) -> float [0,1],
boxes xyxy pixel-edge, degenerate boxes dropped), and fed to the model under accelerate's
autocast. Gradients are synchronised only on the last micro-batch. A non-finite loss on ANY rank
makes every rank skip the step together (the flag is all-reduced first), so DDP never deadlocks
on a rank that skipped its backward.

Inference (``predict``): the unwrapped model in eval mode on one rank's share; detections go to
the CPU as packed arrays (``Detections``). With ``with_loss`` the same batch is also run in
training mode under ``no_grad`` with BatchNorm kept in eval mode and the RNG forked, so the
validation loss changes no model state and no random stream.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from mapdet import comm
from mapdet.data import Batch
from mapdet.evaluator import Detections


@dataclass
class StepResult:
    losses: dict[str, float]  # mean over micro-batches, this rank
    grad_norm: float
    skipped: bool  # non-finite loss somewhere: no update
    data_wait_s: float
    step_time_s: float
    images: int  # this rank, all micro-batches
    bad: list[dict] = field(default_factory=list)  # corrupt samples met in this step
    last_images: list | None = None  # augmented inputs of the last micro-batch (for image logs)
    last_targets: list | None = None


def to_device(batch: Batch, device) -> tuple[list[torch.Tensor], list[dict]]:
    images = [im.to(device, non_blocking=True) for im in batch.images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in batch.targets]
    return images, targets


def train_step(accelerator, model, optimizer, scheduler, batches: Iterator[Batch], augment,
               grad_accum: int, clip_norm: float | None) -> StepResult:
    start, wait, n_images, bad = time.perf_counter(), 0.0, 0, []
    sums: dict[str, float] = {}
    skipped = False
    for micro in range(grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t0
        bad += batch.bad
        images, targets = to_device(batch, accelerator.device)
        with torch.no_grad():
            images, targets = augment(images, targets)
        last = micro == grad_accum - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                loss_dict = model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
            loss = sum(loss_dict.values())
            if comm.any_rank(not bool(torch.isfinite(loss)), accelerator.device):
                skipped = True
                break
            accelerator.backward(loss / grad_accum)
        for k, v in loss_dict.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) / grad_accum
        n_images += len(images)
    grad_norm = float("nan")
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        if clip_norm:
            grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), clip_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    sums["loss"] = sum(sums.values())
    return StepResult(sums, grad_norm, skipped, wait, time.perf_counter() - start, n_images, bad, images, targets)


@dataclass
class Predictions:
    detections: Detections  # this rank's, stored-image coordinates
    keys: list[str]  # image keys seen, in order
    loss_sum: dict[str, float]  # summed over images (divide by len(keys) for the mean)
    skipped: list[dict]  # corrupt samples left out (only with skip_corrupt)


@torch.no_grad()
def predict(model, loader, device, with_loss: bool, progress=None) -> Predictions:
    """Run ``model`` (unwrapped) over one rank's evaluation loader."""
    parts, keys, loss_sum, skipped = [], [], {}, []
    was_training = model.training
    for batch in loader:
        skipped += batch.bad
        if not batch.images:
            continue
        images, targets = to_device(batch, device)
        floats = [im.float() / 255 for im in images]
        model.eval()
        outputs = model(floats)
        for t, out in zip(targets, outputs):
            keys.append(t["key"])
            parts.append(_pack(t["image_id"], out))
        if with_loss:
            for k, v in validation_loss(model, floats, targets).items():
                loss_sum[k] = loss_sum.get(k, 0.0) + v * len(images)
        if progress is not None:
            progress.update(len(images))
    model.train(was_training)
    return Predictions(Detections.concat(parts), keys, loss_sum, skipped)


def validation_loss(model, images: list[torch.Tensor], targets: list[dict]) -> dict[str, float]:
    """torchvision's training losses on a batch, changing neither weights, BN stats nor RNG."""
    clean = [{"boxes": t["boxes"][t["iscrowd"] == 0], "labels": t["labels"][t["iscrowd"] == 0]} for t in targets]
    devices = [images[0].device.index] if images[0].is_cuda else []
    with torch.random.fork_rng(devices=devices):  # RPN/RoI sampling draws random numbers
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()  # keep running statistics untouched
        losses = model(images, clean)
        model.eval()
    out = {k: float(v) for k, v in losses.items()}
    out["loss"] = sum(out.values())
    return out


def _pack(image_id: int, out: dict) -> Detections:
    n = len(out["scores"])
    return Detections(
        image_id=np.full(n, image_id, dtype=np.int64),
        boxes=out["boxes"].float().cpu().numpy().reshape(-1, 4),
        scores=out["scores"].float().cpu().numpy(),
        labels=out["labels"].cpu().numpy().astype(np.int64),
    )
