"""Box arithmetic shared by the packer, the loaders, the evaluator and the diagnosis.

Every box in mapdet is ``xyxy`` in pixel-edge coordinates of the image it belongs to: a one-pixel
object at column ``c`` spans ``[c, c + 1]``, so an image of width ``W`` has boxes within ``[0, W]``
and a box's width is ``x2 - x1`` (no ``+ 1``). COCO files carry ``[x, y, w, h]`` with the same
``w = x2 - x1``; ``xyxy_to_xywh`` and ``xywh_to_xyxy`` are the only conversions between the two.
Arrays are float (N, 4); functions accept anything numpy reads and compute in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SanitizeCounts:
    """How many boxes ``sanitize`` had to clip or drop (kept so bad data is counted, not hidden)."""

    clipped: int = 0
    dropped: int = 0

    def add(self, other: SanitizeCounts) -> None:
        self.clipped += other.clipped
        self.dropped += other.dropped


def sanitize(boxes: np.ndarray, width: int, height: int, min_size: float = 0.0):
    """Clip (N, 4) xyxy boxes to ``[0, width] x [0, height]``; drop those left without area.

    A box is kept when its clipped width and height both exceed ``min_size`` (and are positive).
    Non-finite boxes are dropped. Returns ``(clipped_boxes (M, 4), keep (N,) bool, SanitizeCounts)``.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    finite = np.isfinite(boxes).all(axis=1)
    safe = np.where(finite[:, None], boxes, 0.0)
    out = np.empty_like(safe)
    out[:, [0, 2]] = np.clip(safe[:, [0, 2]], 0.0, float(width))
    out[:, [1, 3]] = np.clip(safe[:, [1, 3]], 0.0, float(height))
    w, h = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    keep = finite & (w > max(min_size, 0.0)) & (h > max(min_size, 0.0))
    changed = (np.abs(out - safe) > 0).any(axis=1)
    counts = SanitizeCounts(clipped=int((changed & keep).sum()), dropped=int((~keep).sum()))
    return out[keep], keep, counts


def scale(boxes: np.ndarray, sx: float, sy: float) -> np.ndarray:
    """Boxes of an image resized by ``sx`` horizontally and ``sy`` vertically (exact for pixel-edge)."""
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * np.array([sx, sy, sx, sy])


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """float64 (N, 4) ``[x1, y1, x2 - x1, y2 - y1]``: float32 boxes are widened first, so the
    numbers are exactly those a COCO results file written from them carries (what the evaluator
    needs to equal pycocotools bitwise)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """float64 (N, 4) ``[x, y, x + w, y + h]`` of COCO ``[x, y, w, h]`` boxes."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def area(boxes: np.ndarray) -> np.ndarray:
    """float64 (N,) ``(x2 - x1) * (y2 - y1)`` of xyxy boxes."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
