"""Exact COCO bbox evaluation, split over ranks by category: ``evaluate_coco`` and its inputs.

``evaluate_coco(gt, dets)`` returns the arrays of pycocotools' ``COCOeval.evaluate()`` +
``accumulate()`` (bitwise identical with the default numpy engine) for the COCO ground-truth dict
``gt`` and the detections ``dets``. Under ``torch.distributed`` each rank scores a balanced subset
of the categories (categories are independent in evaluate/accumulate) and the slices are gathered
with ``mapdet.comm``, so every rank returns the full result, identical to one process.

Boxes: ``Detections.boxes`` are float32 xyxy pixel-edge in stored-image coordinates (a one-pixel
object at column c spans [c, c+1]); COCO results use ``[x, y, w, h]`` with ``w = x2 - x1``. Both
evaluation and ``to_coco_results`` derive xywh in float64 by ``Detections.xywh`` so scoring a
``Detections`` equals pycocotools on the written results file. Results given as dicts are scored
from their own float64 xywh numbers.

Input checks are in ``mapdet.cocoinput``; no input makes the ranks hang (errors are gathered).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mapdet import comm
from mapdet.cocoaccumulate import REC_THRS
from mapdet.cocoengine import IOU_THRS, BoxSet, evaluate_accumulate
from mapdet.cocoinput import GroundTruth, detection_boxes, detection_indices, parse_results
from mapdet.cocoresult import CocoResult, format_summary, format_table, write_metrics

__all__ = [
    "ENGINES",
    "CocoResult",
    "Detections",
    "evaluate_coco",
    "format_summary",
    "format_table",
    "write_metrics",
]
ENGINES = ("auto", "numpy", "faster-coco-eval", "pycocotools")


@dataclass
class Detections:
    """Packed detections of many images (what ranks gather; never per-box dicts).

    image_id: int64 (M,); boxes: float32 (M, 4) xyxy pixel-edge, stored-image coordinates;
    scores: float32 (M,); labels: int64 (M,) category ids (1..K).
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
        return Detections(*(np.concatenate([getattr(p, f) for p in parts])
                            for f in ("image_id", "boxes", "scores", "labels")))

    @staticmethod
    def from_coco_results(results: list[dict]) -> Detections:
        """From COCO results dicts (bbox xywh -> xyxy, rounded to float32)."""
        img, cat, xywh, score = parse_results(results)
        return Detections(img, np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                          score, cat)

    def xywh(self, idx=slice(None)) -> np.ndarray:
        """float64 (M, 4) ``[x1, y1, x2 - x1, y2 - y1]``: the numbers COCO results carry."""
        b = self.boxes[idx].astype(np.float64)
        return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1)

    def to_coco_results(self) -> list[dict]:
        """Standard COCO results: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``."""
        return [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in
                zip(self.image_id.tolist(), self.labels.tolist(), self.xywh().tolist(),
                    self.scores.astype(np.float64).tolist())]


def rank_categories(truth: GroundTruth, det_cat: np.ndarray, world: int) -> list[np.ndarray]:
    """Category indices per rank, balanced by GT + detection count (largest first)."""
    K = len(truth.cat_ids)
    cost = np.bincount(truth.boxes.cat, minlength=K) + np.bincount(det_cat, minlength=K)
    load, shares = np.zeros(world), [[] for _ in range(world)]
    for k in np.argsort(-cost, kind="stable"):
        r = int(np.argmin(load))
        shares[r].append(k)
        load[r] += cost[k] + 1
    return [np.sort(np.array(s, np.int64)) for s in shares]


def evaluate_coco(gt: dict, dets: Detections | list[dict], max_dets=(1, 10, 100, 300),
                  iou_thrs=None, engine: str = "auto") -> CocoResult:
    """Score ``dets`` against the COCO ground-truth dict ``gt``; see the module docstring.

    ``max_dets`` always gains 1, 10 and 100 so the standard summary is pycocotools' ``stats``.
    ``engine``: "auto"/"numpy" (exact re-implementation, fastest), "faster-coco-eval" or
    "pycocotools" (run on this rank's categories). Every rank must pass the same inputs.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {ENGINES}")
    max_dets = sorted({int(m) for m in max_dets} | {1, 10, 100})
    iou_thrs = IOU_THRS if iou_thrs is None else np.asarray(iou_thrs, np.float64).reshape(-1)
    if not (len(iou_thrs) and (iou_thrs > 0).all() and (iou_thrs <= 1).all()):
        raise ValueError(f"IoU thresholds must lie in (0, 1], got {iou_thrs.tolist()}")
    truth = GroundTruth.parse(gt)  # same input, same outcome on every rank
    img, cat = detection_indices(dets, truth)
    cats = rank_categories(truth, cat, comm.get_world_size())[comm.get_rank()]
    error = None
    try:
        found = detection_boxes(dets, img, cat, np.flatnonzero(np.isin(cat, cats)))
        part = _score(engine, gt, truth, found, cats, iou_thrs, max_dets)
    except Exception as e:  # noqa: BLE001 - every rank learns of it below, so none waits forever
        error, part = e, _portable(e)
    parts = comm.all_gather_object((cats, part))
    if error is not None:
        raise error
    for _, p in parts:
        if isinstance(p, Exception):
            raise p
    return _assemble(parts, truth, iou_thrs, max_dets)


def _portable(e: Exception) -> Exception:
    """A picklable stand-in for another rank's error: ValueError for bad input, else RuntimeError."""
    text = f"on rank {comm.get_rank()}: {e}"
    return ValueError(text) if isinstance(e, ValueError) else RuntimeError(f"{type(e).__name__} {text}")


def _score(engine: str, gt: dict, truth: GroundTruth, found: BoxSet, cats, iou_thrs, max_dets):
    if engine in ("auto", "numpy"):
        return evaluate_accumulate(truth.boxes, found, cats, len(truth.image_ids), iou_thrs,
                                   max_dets)
    from mapdet.cocoref import reference_arrays

    return reference_arrays(engine, gt, truth, found, cats, iou_thrs, max_dets)


def _assemble(parts, truth: GroundTruth, iou_thrs, max_dets) -> CocoResult:
    T, K, M = len(iou_thrs), len(truth.cat_ids), len(max_dets)
    R = len(REC_THRS)
    precision, recall, scores = -np.ones((T, R, K, 4, M)), -np.ones((T, K, 4, M)), -np.ones((T, R, K, 4, M))
    for cats, (p, r, s) in parts:
        precision[:, :, cats], recall[:, cats], scores[:, :, cats] = p, r, s
    num_gt = np.bincount(truth.boxes.cat[~truth.boxes.crowd], minlength=K)
    return CocoResult(precision, recall, scores, iou_thrs, truth.cat_ids.tolist(), max_dets,
                      num_gt=num_gt)
