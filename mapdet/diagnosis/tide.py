"""TIDE-style error decomposition of box detections (Bolya et al., ECCV 2020).

Every detection that is not a true positive at IoU ``t_f`` (0.5) gets exactly one error type,
tested in this order (IoU against ground truth of the detection's own class = "same-class IoU"):

- ``loc``:  best same-class IoU in ``[t_b, t_f]``;
- ``cls``:  IoU >= ``t_f`` with a ground-truth box of another class;
- ``dupe``: IoU >= ``t_f`` with a same-class box already matched by a higher-scoring detection;
- ``bkg``:  IoU <= ``t_b`` with every ground-truth box;
- ``both``: everything else (wrong class and ``t_b`` < IoU < ``t_f``).

A ground-truth box that is not matched and not the target of a ``cls``/``loc`` error is a
``miss``. dAP(type) = AP50 after fixing only that type minus the baseline AP50, in AP points
(0-100): ``cls`` relabels the best-scoring error per target box to its class and counts it a
true positive (other errors on that box are removed), ``loc`` does the same keeping the class,
``dupe``/``bkg``/``both`` remove their detections, ``miss`` removes the missed boxes. ``fp``
removes every false positive, ``fn`` removes every unmatched ground-truth box. Main dAPs are
clipped at 0, as tidecv does.

AP is TIDE's (and COCO's) 101-point interpolated AP at IoU ``t_f`` with at most ``max_dets``
detections per image (over all classes, highest scores first). Deliberate differences from
tidecv 1.0.1, which follow COCO instead: the mean is over classes with ground truth (tidecv also
averages in a 0 for a class that is predicted but absent from the ground truth), and detections
absorbed by a crowd box (crowd IoU = intersection / detection area >= ``t_f``, same class) are
neither true positives nor errors (tidecv classifies them as errors too).

The matching itself is ``mapdet.diagnosis.tide_matching``. Boxes are xyxy in pixel-edge
coordinates (ground truth comes from COCO ``bbox`` xywh). Detections are any object with
``image_id`` (M,), ``boxes`` (M, 4) xyxy, ``scores`` (M,), ``labels`` (M,) arrays, e.g.
``mapdet.structures.Detections``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mapdet.diagnosis.tide_matching import BKG, BOTH, CLS, DUPE, IGNORED, LOC, TP, ImageTruth, Matching, match
from mapdet.evaluation.accumulate import REC_THRS

ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")
ALL_TYPES = ERROR_TYPES + ("fp", "fn")
_CODE = {"cls": CLS, "loc": LOC, "both": BOTH, "dupe": DUPE, "bkg": BKG}


def mean_ap(labels: np.ndarray, scores: np.ndarray, tp: np.ndarray, classes: np.ndarray, npos: np.ndarray) -> float:
    """Mean over ``classes`` of COCO's 101-point interpolated AP (``REC_THRS``), in points (0-100).

    ``labels``/``scores``/``tp`` (D,) describe ranked detections in processing order (ties keep
    it); ``npos`` (K,) counts the positives of each class in ``classes`` (K,). A class with no
    positive and no detection left is dropped from the mean (tidecv's "empty" class); one with
    detections but no positive scores 0. Returns 0 when no class is left.
    """
    order = np.lexsort((-scores, labels))  # stable: by class, then descending score
    labels, tp = labels[order], tp[order]
    bounds = np.searchsorted(labels, np.stack([classes, classes + 1]))
    aps = []
    for k, (lo, hi) in enumerate(bounds.T):
        if npos[k] <= 0:
            if hi > lo:
                aps.append(0.0)
            continue
        hits = tp[lo:hi]
        tps = np.cumsum(hits)
        precision = tps / np.arange(1, len(hits) + 1)
        precision = np.maximum.accumulate(precision[::-1])[::-1]  # COCO's precision envelope
        idx = np.searchsorted(tps / npos[k], REC_THRS, side="left")
        reached = idx < len(hits)
        aps.append(precision[idx[reached]].sum() / len(REC_THRS))
    return 100.0 * float(np.mean(aps)) if aps else 0.0


def fixed_ap(m: Matching, fix: str | None = None, gt_mask: np.ndarray | None = None) -> float:
    """AP50 after fixing one error type (None: the baseline). ``gt_mask`` (G,) restricts a
    ``miss`` fix to the marked ground-truth rows (to attribute misses to causes)."""
    gt = m.gt
    classes = np.unique(gt.labels[~gt.crowd])
    label, tp = m.label.copy(), m.kind == TP
    keep = m.kind != IGNORED
    npos = _count(gt.labels[~gt.crowd], classes)
    if fix in ("cls", "loc"):
        err = m.kind == _CODE[fix]
        fixed = err & m.best
        keep &= ~err | fixed  # the other errors on the same box are suppressed
        tp = tp | fixed
        if fix == "cls":
            label[fixed] = gt.labels[m.target[fixed]]
    elif fix in ("both", "dupe", "bkg"):
        keep &= m.kind != _CODE[fix]
    elif fix == "miss":
        removed = m.miss if gt_mask is None else m.miss & gt_mask
        npos = npos - _count(gt.labels[removed], classes)
    elif fix == "fp":
        keep &= tp
    elif fix == "fn":
        npos = _count(label[tp], classes)
    elif fix is not None:
        raise ValueError(f"unknown TIDE fix {fix!r}; choose from {', '.join(ALL_TYPES)}")
    return mean_ap(label[keep], m.score[keep], tp[keep], classes, npos)


def _count(labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.sort(labels), classes, side="right") - np.searchsorted(np.sort(labels), classes)


@dataclass
class TideResult:
    """Baseline AP50 and, per type in ``ALL_TYPES``, dAP (AP points) and error counts."""

    ap: float
    errors: dict[str, float]
    counts: dict[str, int]
    matching: Matching = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "ap50": self.ap,
            "errors": dict(self.errors),
            "counts": dict(self.counts),
            "dropped_by_cap": self.matching.dropped_by_cap,
            "outside_gt": self.matching.outside_gt,
        }


def decompose(
    gt: dict | ImageTruth,
    dets,
    pos_thr: float = 0.5,
    bkg_thr: float = 0.1,
    max_dets: int = 100,
    progress: bool = False,
) -> TideResult:
    """TIDE decomposition of ``dets`` against COCO ground truth ``gt`` (see the module doc)."""
    if not isinstance(gt, ImageTruth):
        gt = ImageTruth.from_coco(gt)
    m = match(gt, dets, pos_thr, bkg_thr, max_dets, progress)
    base = fixed_ap(m)
    errors = {t: max(fixed_ap(m, t) - base, 0.0) for t in ERROR_TYPES}
    errors.update({t: fixed_ap(m, t) - base for t in ("fp", "fn")})
    counts = {t: int((m.kind == code).sum()) for t, code in _CODE.items()}
    counts["miss"] = int(m.miss.sum())
    counts["fp"] = int(((m.kind != TP) & (m.kind != IGNORED)).sum())
    counts["fn"] = int((~m.matched & ~gt.crowd).sum())
    return TideResult(ap=base, errors=errors, counts=counts, matching=m)
