"""What fixing one kind of error adds to COCO AP: TIDE's fixes applied to the results, scored again.

TIDE (``mapdet.diagnosis.tide``) measures each error type in AP50. The causes are ranked in COCO
AP (``records.UNIT``), so here the same fixes, decided by TIDE's matching at IoU 0.5 (which
detections are duplicates, background, ...), are applied to the detections or the ground truth
themselves, and the fixed set is scored by ``mapdet.evaluation.coco`` at the headline maxDets
(100 per image and class). A gain is ``records.Gain`` (AP and AP50 points over the results' own):

- ``dupe``, ``bkg``: the detections of that kind are removed;
- ``cls``: the best-scoring cls error on each target takes the target's class, the other cls
  errors are removed (TIDE's cls fix);
- ``loc``: every box a better-localizing model would place better is moved to its reference IoU
  with its object: each true positive below its reference, and the best-scoring loc error on each
  target (IoU 0.1-0.5); the other loc errors are removed (TIDE's loc fix keeps none of them
  either). The reference is ``reference_iou`` (0.75: COCO's strict threshold, which a
  well-localizing detector reaches for most of its boxes), or less for a box so small at the
  model's input that one pixel off on every edge already costs more (``reference_ious``). AP
  lost above the reference is the metric's strictness, not an error a better model would fix,
  so it is not counted. A box moves along the straight line to its object (corners
  interpolated) until its IoU reaches the reference;
- ``miss``: missed ground truth (all, or those in ``gt_mask``) is removed from the ground truth.

Detections beyond TIDE's per-image count were not matched and are kept as they are. Boxes are
xyxy pixel-edge in the frame of the ground-truth image.
"""

from __future__ import annotations

import numpy as np

from mapdet.boxes import area
from mapdet.diagnosis.records import HEADLINE_MAX_DETS, Gain
from mapdet.diagnosis.stats import points
from mapdet.diagnosis.tide_matching import BKG, CLS, DUPE, LOC, TP, ImageTruth, Matching
from mapdet.evaluation.coco import evaluate_coco
from mapdet.structures import Detections

LOC_REFERENCE_IOU = 0.75
PIXEL_ERROR = 1.0  # pixels at the model's input: how finely a box edge can be placed at best
_MARGIN = 1e-3  # moved boxes land just above their reference, so float32 rounding keeps them there
_KIND = {"dupe": DUPE, "bkg": BKG}


def score(gt: dict, dets: Detections) -> Gain:
    """COCO AP and AP50 points of ``dets`` at the headline maxDets (0 where undefined)."""
    r = evaluate_coco(gt, dets, max_dets=(HEADLINE_MAX_DETS,))
    return Gain(points(r.ap()) or 0.0, points(r.ap(iou=0.5)) or 0.0)


def reference_ious(g: ImageTruth, scale: np.ndarray, reference: float = LOC_REFERENCE_IOU) -> np.ndarray:
    """(G,) the IoU a better-localizing model is credited with per ground-truth box: ``reference``,
    or the IoU of the box with itself grown by ``PIXEL_ERROR`` on every edge at the model's input
    when that is lower. ``scale`` (N,): each image's resize factor to the model's input."""
    wh = (g.boxes[:, 2:] - g.boxes[:, :2]) * scale[g.image][:, None]
    w, h = wh[:, 0], wh[:, 1]
    pixel = np.divide(w * h, (w + 2 * PIXEL_ERROR) * (h + 2 * PIXEL_ERROR), out=np.zeros(len(w)), where=w > 0)
    return np.minimum(reference, pixel)


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n,) IoU of row i of ``a`` with row i of ``b`` (xyxy)."""
    inter = np.clip(np.minimum(a[:, 2:], b[:, 2:]) - np.maximum(a[:, :2], b[:, :2]), 0, None).prod(axis=1)
    union = area(a) + area(b) - inter
    return np.divide(inter, union, out=np.zeros(len(a)), where=union > 0)


def move_to_iou(boxes: np.ndarray, targets: np.ndarray, iou: np.ndarray, steps: int = 40) -> np.ndarray:
    """``boxes`` (n, 4) moved toward ``targets`` (n, 4) just far enough that their IoU reaches
    ``iou`` (n,): corners interpolated, the fraction found by bisection; a box already there stays."""
    boxes, targets = np.asarray(boxes, np.float64), np.asarray(targets, np.float64)
    want = np.minimum(iou + _MARGIN, 1.0)
    lo, hi = np.zeros(len(boxes)), np.ones(len(boxes))
    hi[paired_iou(boxes, targets) >= iou] = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        ok = paired_iou(boxes + mid[:, None] * (targets - boxes), targets) >= want
        hi, lo = np.where(ok, mid, hi), np.where(ok, lo, mid)
    return boxes + hi[:, None] * (targets - boxes)


class Fixer:
    """Gains of TIDE's fixes on one results set: ``gain(fix, gt_mask)``; repeated asks are free.

    ``base``: the results' own AP/AP50 at the headline maxDets; ``reference``: (G,) per
    ground-truth box the IoU the ``loc`` fix moves boxes to (``reference_ious``).
    """

    def __init__(self, gt: dict, dets: Detections, m: Matching, base: Gain, reference: np.ndarray):
        self.gt, self.dets, self.m, self.base, self.reference = gt, dets, m, base, reference
        self.moved = 0
        self._done: dict = {}

    def with_matching(self, m: Matching) -> Fixer:
        """The same results and ground truth, fixed by another matching of them (e.g. at a larger cap)."""
        return Fixer(self.gt, self.dets, m, self.base, self.reference)

    def gain(self, fix: str, gt_mask: np.ndarray | None = None) -> Gain:
        key = (fix, None if gt_mask is None else np.flatnonzero(gt_mask).tobytes())
        if key not in self._done:
            gt, dets = self._fixed(fix, gt_mask)
            if gt is self.gt and dets is self.dets:  # nothing to fix
                self._done[key] = Gain()
            else:
                s = score(gt, dets)
                self._done[key] = Gain(s.ap - self.base.ap, s.ap50 - self.base.ap50)
        return self._done[key]

    def _fixed(self, fix: str, gt_mask) -> tuple[dict, Detections]:
        m = self.m
        if fix in _KIND:
            return self.gt, self._without(m.kind == _KIND[fix])
        if fix == "cls":
            return self.gt, self._relabelled()
        if fix == "loc":
            return self.gt, self._relocated()
        if fix == "miss":
            removed = m.miss if gt_mask is None else m.miss & gt_mask
            if not removed.any():
                return self.gt, self.dets
            drop = set(m.gt.ann[removed].tolist())
            anns = [a for i, a in enumerate(self.gt["annotations"]) if i not in drop]
            return {**self.gt, "annotations": anns}, self.dets
        raise ValueError(f"unknown fix {fix!r}; choose from loc, cls, dupe, bkg, miss")

    def _without(self, mask: np.ndarray) -> Detections:
        """The detections less the matched ones marked in ``mask`` (D,)."""
        if not mask.any():
            return self.dets
        keep = np.ones(len(self.dets), bool)
        keep[self.m.index[mask]] = False
        return self.dets.take(keep)

    def _relabelled(self) -> Detections:
        m = self.m
        err = m.kind == CLS
        if not err.any():
            return self.dets
        fixed = err & m.best
        labels = self.dets.labels.copy()
        labels[m.index[fixed]] = m.gt.labels[m.target[fixed]]
        out = Detections(self.dets.image_id, self.dets.boxes, self.dets.scores, labels)
        keep = np.ones(len(out), bool)
        keep[m.index[err & ~fixed]] = False
        return out.take(keep)

    def _relocated(self) -> Detections:
        m, boxes = self.m, self.dets.boxes.astype(np.float64)
        err = m.kind == LOC
        tp = np.flatnonzero(m.kind == TP)
        tp = tp[paired_iou(boxes[m.index[tp]], m.gt.boxes[m.taken[tp]]) < self.reference[m.taken[tp]]]
        fixed = np.flatnonzero(err & m.best)
        rows, gts = np.concatenate([tp, fixed]), np.concatenate([m.taken[tp], m.target[fixed]])
        self.moved = len(rows)
        if not len(rows) and not err.any():
            return self.dets
        moved = boxes.copy()
        moved[m.index[rows]] = move_to_iou(boxes[m.index[rows]], m.gt.boxes[gts], self.reference[gts])
        out = Detections(self.dets.image_id, moved, self.dets.scores, self.dets.labels)
        keep = np.ones(len(out), bool)
        keep[m.index[err & ~m.best]] = False
        return out.take(keep)
