"""The types that cross stages, in one place: what loaders yield and the model steps consume.

``Batch(images, targets, bad)``, from ``mapdet.data`` (shards or an image folder) to
``mapdet.engine``:
- ``images``: list of uint8 tensors (3, H, W), RGB, at stored size (sizes may differ in a batch);
- ``targets``: list of dicts: ``boxes`` float32 (N, 4) xyxy pixel-edge in the stored image (a
  one-pixel object at column c spans [c, c+1]), ``labels`` int64 (N,) in 1..K, ``iscrowd`` int64
  (N,), ``image_id`` int, ``key`` str, ``shard`` str. An image without objects has boxes (0, 4)
  and labels (0,);
- ``bad``: inputs that failed to read since the previous batch, ``{"shard", "key", "reason",
  "samples"}``, so that they are counted, never silently dropped.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    images: list[torch.Tensor]
    targets: list[dict]
    bad: list[dict]
