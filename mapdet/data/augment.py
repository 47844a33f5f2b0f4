"""Per-batch augmentation on the training device (Kornia), with boxes kept exact against the pixels.

``BatchAugment(cfg)(images, targets) -> (images, targets)``, under ``torch.no_grad()``:
    in   images: uint8 (3, Hi, Wi) tensors on the device (sizes may differ within the batch);
         targets: dicts with ``boxes`` float32 (Ni, 4) xyxy pixel-edge in that image (a one-pixel
         object at column c spans [c, c+1]) and ``labels`` int64 (Ni,); ``iscrowd`` (Ni,) if present
         is filtered with them, every other key passes through untouched.
    out  float images in [0, 1], (3, Hi, Wi) (or (3, Wi, Hi) after a 90-degree turn), and targets
         whose boxes lie inside that image, each with width and height >= ``min_box_size`` (> 0).

Ops, each drawn per image with its config probability: horizontal flip, vertical flip (off by
default: street scenes have a sky and a road), random resized crop (crop area share in
[scale_min, 1], crop aspect within 3/4..4/3 of the image's, resized back to the image's size: a
zoom-in of up to 1/sqrt(scale_min)), Kornia ColorJitter, and a 90-degree turn (off by default).

Batching of different sizes: images are grouped by (H, W) and each group is one Kornia call on a
(B, 3, H, W) tensor; every output keeps its own size. Nothing is padded here, so no box can fall on
padding and no content is cut by a pad-then-crop; the model's transform resizes each image to
``model.min_size`` and pads the batch itself afterwards. Padding to the batch maximum first would
make crops and flips act on the padding (a flip moves it to the left of the content) and need a
per-image mask; the cost of grouping is one Kornia call per distinct size (at most the batch size).

Coordinates: Kornia maps box corners like pixel centres (a flip sends x to (W-1)-x, notes/
pitfalls.md), so boxes go in shifted by -0.5 and come back +0.5: the flip is then exact and the
resized crop agrees with the moved pixels to a fraction of a pixel. Kornia neither clips nor drops
boxes; here they are clipped to the image and a box is dropped with its label when its clipped
width or height is below ``min_box_size`` or less than ``min_visible`` of its area is left inside
the image. ``boxes_seen``/``boxes_dropped`` count them for logging. The 90-degree turn is done
with ``torch.rot90`` per image after Kornia (Kornia's RandomRotation90 keeps the canvas and cuts
the corners of non-square images).

Randomness: every draw (Kornia's parameters and the turns) comes from torch's global CPU
generator, whatever the device: the Kornia pipelines are built per call and never registered as
submodules, so ``.to(device)`` cannot move their samplers off the CPU. A run is therefore reproducible per rank once the
training loop seeds torch per rank (``set_seed(seed + rank)``), and resumes exactly when the
checkpoint restores the CPU RNG state.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from torch import Tensor, nn

from mapdet.config import AugmentConfig
from mapdet.host_syncs import true_indices

PER_BOX_KEYS = ("labels", "iscrowd")  # filtered together with the boxes they describe
_CROP_ASPECT = (3 / 4, 4 / 3)  # crop w/h relative to the image's


class BatchAugment(nn.Module):
    def __init__(self, cfg: AugmentConfig):
        super().__init__()
        for key in ("hflip", "vflip", "rot90", "color_jitter", "scale_jitter", "min_visible"):
            if not 0.0 <= getattr(cfg, key) <= 1.0:
                raise ValueError(f"augment.{key}={getattr(cfg, key)} must be within [0, 1]")
        if not 0.0 < cfg.scale_min <= 1.0:
            raise ValueError(f"augment.scale_min={cfg.scale_min} must be within (0, 1]")
        self.cfg = cfg
        self.boxes_seen = 0
        self.boxes_dropped = 0

    def forward(self, images: list[Tensor], targets: list[dict]) -> tuple[list[Tensor], list[dict]]:
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        out_images: list[Tensor] = [torch.empty(0)] * len(images)
        moved: list[Tensor] = [torch.empty(0)] * len(images)  # boxes after the ops, unclipped
        for size, idx in _group_by_size(images).items():
            batch = torch.stack([_to_float(images[i]) for i in idx])
            boxes = [_checked_boxes(targets[i]) for i in idx]
            pipeline = _make_pipeline(self.cfg, size)  # about 0.5 ms: cheaper than caching every size
            if pipeline is not None:
                shifted = [b - 0.5 for b in boxes]  # into Kornia's pixel-centre frame
                batch, shifted = pipeline(batch, shifted)
                boxes = [b.reshape(-1, 4) + 0.5 for b in shifted]
            for j, i in enumerate(idx):
                out_images[i], moved[i] = self._maybe_rot90(batch[j], boxes[j])
        return out_images, self._keep_visible(targets, moved, [im.shape[-2:] for im in out_images])

    def _maybe_rot90(self, image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
        if self.cfg.rot90 <= 0 or torch.rand(()) >= self.cfg.rot90:
            return image, boxes
        turns = 1 if torch.rand(()) < 0.5 else 3  # +-90 degrees
        return rot90(image, boxes, turns)

    def _keep_visible(self, targets: list[dict], boxes: list[Tensor], sizes: list[torch.Size]) -> list[dict]:
        """Each target with its visible boxes, clipped. How many each image keeps is read back once
        for the whole batch (one host sync on CUDA, not one per image): the kept boxes are then
        gathered by integer index, which needs no sync, where a boolean mask would sync per tensor."""
        rules = (self.cfg.min_box_size, self.cfg.min_visible)
        kept = [visible_boxes(b, size, *rules) for b, size in zip(boxes, sizes)]
        counts = torch.stack([keep.sum() for keep, _ in kept]).tolist() if kept else []
        out = []
        for target, (keep, clipped), n in zip(targets, kept, counts):
            index = true_indices(keep, n)  # the kept rows, in order
            self.boxes_seen += len(keep)
            self.boxes_dropped += len(keep) - n
            row = dict(target, boxes=clipped[index].to(torch.float32))
            for key in PER_BOX_KEYS:
                if key in target:
                    row[key] = target[key][index.to(target[key].device)]
            out.append(row)
        return out


def _make_pipeline(cfg: AugmentConfig, size: tuple[int, int]) -> K.AugmentationSequential | None:
    """Kornia ops for one image size (the crop resizes back to it); None when all are off."""
    h, w = size
    ops: list[nn.Module] = []
    if cfg.hflip > 0:
        ops.append(K.RandomHorizontalFlip(p=cfg.hflip))
    if cfg.vflip > 0:
        ops.append(K.RandomVerticalFlip(p=cfg.vflip))
    if cfg.scale_jitter > 0:
        aspect = w / h
        ops.append(
            K.RandomResizedCrop(
                (h, w),
                scale=(cfg.scale_min, 1.0),
                p=cfg.scale_jitter,
                ratio=(aspect * _CROP_ASPECT[0], aspect * _CROP_ASPECT[1]),
            )
        )
    if cfg.color_jitter > 0:
        ops.append(K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=cfg.color_jitter))
    return K.AugmentationSequential(*ops, data_keys=["input", "bbox_xyxy"]) if ops else None


def _group_by_size(images: list[Tensor]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {i} has shape {tuple(image.shape)}; expected (3, H, W)")
        groups.setdefault((int(image.shape[1]), int(image.shape[2])), []).append(i)
    return groups


def _to_float(image: Tensor) -> Tensor:
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    if image.is_floating_point():
        return image.float()
    raise TypeError(f"images must be uint8 (or float in [0, 1]), got {image.dtype}")


def _checked_boxes(target: dict) -> Tensor:
    boxes, labels = target["boxes"], target["labels"]
    if boxes.dim() != 2 or boxes.shape[1] != 4 or len(labels) != len(boxes):
        raise ValueError(f"target boxes {tuple(boxes.shape)} and labels {tuple(labels.shape)} must be (N, 4) and (N,)")
    return boxes.float()


def rot90(image: Tensor, boxes: Tensor, turns: int) -> tuple[Tensor, Tensor]:
    """Turn a (3, H, W) image and its xyxy pixel-edge boxes by ``turns`` x 90 degrees counter-clockwise."""
    height, width = image.shape[-2:]
    for _ in range(turns % 4):
        # a pixel at column c, row r lands at row (W-1)-c, column r; H and W swap
        boxes = torch.stack([boxes[:, 1], width - boxes[:, 2], boxes[:, 3], width - boxes[:, 0]], dim=1)
        height, width = width, height
    return torch.rot90(image, turns, dims=(-2, -1)), boxes


def visible_boxes(boxes: Tensor, size: tuple[int, int], min_size: float, min_visible: float) -> tuple[Tensor, Tensor]:
    """(keep (N,) bool, boxes clipped to an image of ``size`` = (H, W)).

    Kept: finite boxes whose clipped width and height are positive and >= ``min_size`` and that keep
    at least ``min_visible`` of their (unclipped) area inside the image.
    """
    h, w = size
    lo = boxes.new_zeros(4)
    hi = boxes.new_tensor([w, h, w, h])
    clipped = torch.minimum(torch.maximum(boxes, lo), hi)
    cw, ch = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    visible = cw.clamp(min=0) * ch.clamp(min=0)
    keep = (
        torch.isfinite(boxes).all(dim=1)
        & (cw > 0)
        & (ch > 0)
        & (cw >= min_size)
        & (ch >= min_size)
        & (visible >= min_visible * area)
    )
    return keep, clipped
