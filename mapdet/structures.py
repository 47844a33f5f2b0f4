"""The types that cross stages, in one place: what loaders yield and the model steps consume
(``Batch``), and the detections inference produces and evaluation, diagnosis and predict read
(``Detections``).

``Batch(images, targets, bad)``, from ``mapdet.data`` (shards or an image folder) to
``mapdet.engine``:
- ``images``: list of uint8 tensors (3, H, W), RGB, at stored size (sizes may differ in a batch);
- ``targets``: list of dicts: ``boxes`` float32 (N, 4) xyxy pixel-edge in the stored image (a
  one-pixel object at column c spans [c, c+1]), ``labels`` int64 (N,) in 1..K, ``iscrowd`` int64
  (N,), ``image_id`` int, ``key`` str, ``shard`` str, ``orig_size`` (width, height) of the image
  the pack read (shards; equal to the stored size unless packed with ``--max-side``). An image
  without objects has boxes (0, 4) and labels (0,);
- ``bad``: inputs that failed to read since the previous batch, ``{"shard", "key", "reason",
  "samples"}``, so that they are counted, never silently dropped.

``Detections``: packed arrays of many images' detections (never per-box dicts), boxes float32
xyxy pixel-edge in stored-image coordinates (``mapdet.evaluation.inputs.detections_from_results``
reads them from a COCO results list); COCO results carry ``[x, y, w, h]`` with
``w = x2 - x1`` computed in float64 (``Detections.xywh``), the numbers the evaluator scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from mapdet.boxes import xyxy_to_xywh

if TYPE_CHECKING:  # torch is not imported where only Detections are used (mapdet cocoeval: 1.3 s saved)
    import torch


class Batch(NamedTuple):
    images: list[torch.Tensor]
    targets: list[dict]
    bad: list[dict]


_PACKED = np.dtype([("image_id", "<i8"), ("boxes", "<f4", (4,)), ("scores", "<f4"), ("labels", "<i8")])


@dataclass
class Detections:
    """Packed detections of many images (what ranks exchange; never per-box dicts).

    image_id: int64 (M,); boxes: float32 (M, 4) xyxy pixel-edge, stored-image coordinates;
    scores: float32 (M,); labels: int64 (M,): the model's labels 1..K as inference gives them, COCO
    category ids once ``relabel``-ed (what evaluation and every written COCO file use).
    """

    image_id: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        self.image_id = np.asarray(self.image_id, np.int64).reshape(-1)
        self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
        self.scores = np.asarray(self.scores, np.float32).reshape(-1)
        self.labels = np.asarray(self.labels, np.int64).reshape(-1)
        sizes = {len(self.image_id), len(self.boxes), len(self.scores), len(self.labels)}
        if len(sizes) != 1:
            raise ValueError(f"Detections fields differ in length: {sorted(sizes)}")

    def __len__(self) -> int:
        return len(self.image_id)

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros(0), np.zeros((0, 4)), np.zeros(0), np.zeros(0))

    @staticmethod
    def concat(parts) -> Detections:
        parts = list(parts)
        if not parts:
            return Detections.empty()
        return Detections(
            *(np.concatenate([getattr(p, f) for p in parts]) for f in ("image_id", "boxes", "scores", "labels"))
        )

    def relabel(self, lut: np.ndarray) -> Detections:
        """The same detections with labels ``lut[labels]`` (model labels 1..K -> COCO category ids,
        ``mapdet.shards.manifest.category_ids``)."""
        return Detections(self.image_id, self.boxes, self.scores, np.asarray(lut, np.int64)[self.labels])

    def take(self, idx) -> Detections:
        """The detections selected by ``idx`` (indices or a boolean mask)."""
        return Detections(self.image_id[idx], self.boxes[idx], self.scores[idx], self.labels[idx])

    def to_bytes(self) -> np.ndarray:
        """uint8 (36 M,): the four fields packed row by row (``from_bytes`` reads them back)."""
        rows = np.empty(len(self), _PACKED)
        rows["image_id"], rows["boxes"], rows["scores"], rows["labels"] = (
            self.image_id,
            self.boxes,
            self.scores,
            self.labels,
        )
        return rows.view(np.uint8)

    @staticmethod
    def from_bytes(data: np.ndarray) -> Detections:
        rows = np.asarray(data, np.uint8).view(_PACKED)
        return Detections(rows["image_id"], rows["boxes"], rows["scores"], rows["labels"])

    def xywh(self, idx=slice(None)) -> np.ndarray:
        """float64 (M, 4) ``[x1, y1, x2 - x1, y2 - y1]``: the numbers COCO results carry."""
        return xyxy_to_xywh(self.boxes[idx])

    def to_coco_results(self) -> list[dict]:
        """Standard COCO results: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``."""
        return [
            {"image_id": i, "category_id": c, "bbox": b, "score": s}
            for i, c, b, s in zip(
                self.image_id.tolist(),
                self.labels.tolist(),
                self.xywh().tolist(),
                self.scores.astype(np.float64).tolist(),
            )
        ]
