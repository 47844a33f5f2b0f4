"""What the training benchmarks share: the torchvision-references-style pipeline mapdet is measured
against, main's old step (the baseline of the one-sync lever), and synthetic shards.

- ``reference_batches``: the workers decode (``decode_sample``: torchvision's libjpeg-turbo decoder,
  at least as fast as the references' PIL) AND augment each sample with torchvision.transforms.v2 on
  tv_tensors (flip, RandomResizedCrop, ColorJitter with the config's probabilities and strengths,
  ToDtype, SanitizeBoundingBoxes), map-style dataset with a shuffling sampler, as torchvision's
  detection references do; the step gets float (3,H,W) images in [0,1] and xyxy pixel-edge boxes and
  augments nothing (``no_augment``). Its raw samples (the shards' bytes) are held in memory, so it
  never pays for tar reading: a favour to the reference.
- ``main_train_step``: ``mapdet.engine.step.train_step`` as it was before issue 11 (a sync per
  micro-batch, ``float()`` per loss, 3 small all-reduces per step).
- ``make_shards``: synthesize + pack + merge ``n`` training images of ``size`` (W, H); ``shards_in``
  reuses them across scripts.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torchvision.transforms.v2 as T
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from mapdet import comm
from mapdet.config import AugmentConfig
from mapdet.data.augment import _CROP_ASPECT
from mapdet.datasets.synthetic.writer import SynthConfig, synthesize
from mapdet.engine.step import StepResult, to_device
from mapdet.shards.merge import merge
from mapdet.shards.reader import decode_sample
from mapdet.shards.writer import PackOptions, pack
from mapdet.structures import Batch


class ReferenceDataset(Dataset):
    """One raw sample -> (float (3,H,W) in [0,1], {boxes xyxy pixel-edge (N,4), labels (N,)}),
    decoded and augmented per sample in the DataLoader worker (torchvision-references style)."""

    def __init__(self, samples: list[dict], cfg: AugmentConfig, num_classes: int):
        self.samples, self.cfg, self.num_classes = samples, cfg, num_classes
        self._transforms: dict[tuple[int, int], T.Compose] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        image, target = decode_sample(self.samples[i], self.num_classes)
        size = tuple(image.shape[-2:])
        plain = target["iscrowd"] == 0  # training leaves crowd regions out, as TrainStream does
        boxes = tv_tensors.BoundingBoxes(target["boxes"][plain], format="XYXY", canvas_size=size, clamping_mode="hard")
        if size not in self._transforms:
            self._transforms[size] = reference_transform(self.cfg, size)
        image, out = self._transforms[size](
            tv_tensors.Image(image), {"boxes": boxes, "labels": target["labels"][plain]}
        )
        return image.as_subclass(torch.Tensor), {
            "boxes": out["boxes"].as_subclass(torch.Tensor),
            "labels": out["labels"],
        }


def reference_transform(cfg: AugmentConfig, size: tuple[int, int]) -> T.Compose:
    """transforms.v2 ops of the same strength as ``BatchAugment`` (no vflip/rot90: off by default).
    SanitizeBoundingBoxes drops boxes by size only (BatchAugment also drops mostly cut-away ones)."""
    h, w = size
    ops = [T.RandomHorizontalFlip(cfg.hflip)]
    if cfg.scale_jitter > 0:
        ratio = (w / h * _CROP_ASPECT[0], w / h * _CROP_ASPECT[1])  # the crop aspect range BatchAugment draws
        ops.append(
            T.RandomApply([T.RandomResizedCrop((h, w), scale=(cfg.scale_min, 1.0), ratio=ratio)], p=cfg.scale_jitter)
        )
    if cfg.color_jitter > 0:
        ops.append(
            T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.color_jitter)
        )
    ops += [T.ToDtype(torch.float32, scale=True), T.SanitizeBoundingBoxes(min_size=cfg.min_box_size)]
    return T.Compose(ops)


def _collate(items) -> Batch:
    images, targets = zip(*items)
    return Batch(list(images), list(targets), [])


def reference_batches(
    samples: list[dict],
    cfg: AugmentConfig,
    num_classes: int,
    batch_size: int,
    workers: int,
    seed: int,
    prefetch: int = 4,
):
    dataset = ReferenceDataset(samples, cfg, num_classes)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch if workers else None,
        generator=torch.Generator().manual_seed(seed),
    )  # CPU: prefetch as TrainStream's
    while True:
        yield from loader


def no_augment(images, targets):
    return [im.float() for im in images], targets


def shards_in(root: Path, n: int, size: tuple[int, int], max_side: int | None, workers: int = 2) -> Path:
    """The shards folder of ``make_shards(root / <n, size, max_side>, ...)``, made only if that folder
    has no manifest yet: the GPU check's benchmark and profile share one set."""
    folder = root / f"synthetic_{n}_{size[0]}x{size[1]}_max{max_side}"
    if not (folder / "shards" / "training.manifest.json").exists():  # merge writes it last
        make_shards(folder, n, size, max_side, workers)
    return folder / "shards"


def make_shards(root: Path, n: int, size: tuple[int, int], max_side: int | None = None, workers: int = 2) -> dict:
    raw = synthesize(root / "raw", "v2.0", n_train=n, n_val=0, seed=0, cfg=SynthConfig(size=size))
    pack(
        raw,
        root / "shards",
        "training",
        PackOptions(samples_per_shard=max(1, n // 4), workers=workers, max_side=max_side),
    )
    return merge(root / "shards", "training")


def main_train_step(parts, batches, optim_cfg):
    """main's train_step before the one-sync change, verbatim, plus the 3 small all-reduces its training
    loop made per step (counts, stop flag, preemption flag): the baseline of the sync lever."""
    accelerator, model, optimizer, scheduler, augment = (
        parts.accelerator,
        parts.model,
        parts.optimizer,
        parts.scheduler,
        parts.augment,
    )
    grad_accum, clip_norm = optim_cfg.grad_accum, optim_cfg.clip_norm
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
        with contextlib.nullcontext() if micro == grad_accum - 1 else accelerator.no_sync(model):
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
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        if clip_norm:
            float(accelerator.clip_grad_norm_(model.parameters(), clip_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    sums["loss"] = sum(sums.values())
    totals = comm.all_reduce_sum(torch.tensor([float(len(bad)), float(n_images), 0.0], device=accelerator.device))
    int(totals[1])
    comm.any_rank(False, accelerator.device)
    comm.any_rank(False, accelerator.device)
    return StepResult(sums, None, skipped, wait, time.perf_counter() - start, n_images, bad)
