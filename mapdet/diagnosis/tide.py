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

Boxes are xyxy in pixel-edge coordinates (ground truth comes from COCO ``bbox`` xywh). Detections
are any object with ``image_id`` (M,), ``boxes`` (M, 4) xyxy, ``scores`` (M,), ``labels`` (M,)
arrays, e.g. ``mapdet.evaluation.coco.Detections``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

ERROR_TYPES = ("cls", "loc", "both", "dupe", "bkg", "miss")
ALL_TYPES = ERROR_TYPES + ("fp", "fn")
# per-detection outcome codes
TP, CLS, LOC, BOTH, DUPE, BKG, IGNORED = range(7)
_CODE = {"cls": CLS, "loc": LOC, "both": BOTH, "dupe": DUPE, "bkg": BKG}


@dataclass
class GroundTruth:
    """COCO ground truth as flat arrays sorted by image (images in the json's order).

    ``boxes`` (G, 4) xyxy, ``labels`` (G,), ``crowd`` (G,) bool, ``area`` (G,) (the json's area,
    used for COCO size ranges), ``image`` (G,) index into ``image_ids``; ``offsets`` (N+1,) so that
    image i owns rows ``offsets[i]:offsets[i+1]``.
    """

    image_ids: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray
    area: np.ndarray
    image: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_coco(cls, gt: dict) -> "GroundTruth":
        image_ids = np.array([im["id"] for im in gt["images"]], dtype=np.int64)
        anns = gt.get("annotations", [])
        index = _image_index(image_ids, np.array([a["image_id"] for a in anns], dtype=np.int64))
        if (index < 0).any():
            raise ValueError(f"{int((index < 0).sum())} annotations name an image id missing from 'images'")
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        area = np.array([a.get("area", w * h) for a, (_, _, w, h) in zip(anns, xywh)], dtype=np.float64)
        order = np.argsort(index, kind="stable")
        return cls(
            image_ids=image_ids,
            boxes=boxes[order],
            labels=np.array([a["category_id"] for a in anns], dtype=np.int64)[order],
            crowd=np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)[order],
            area=area[order],
            image=index[order],
            offsets=np.searchsorted(index[order], np.arange(len(image_ids) + 1)),
        )


def _image_index(image_ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Position of each queried id in ``image_ids`` (-1 when absent)."""
    if len(image_ids) == 0:
        return np.full(len(query), -1, dtype=np.int64)
    sorter = np.argsort(image_ids, kind="stable")
    pos = np.clip(np.searchsorted(image_ids, query, sorter=sorter), 0, len(image_ids) - 1)
    found = sorter[pos]
    return np.where(image_ids[found] == query, found, -1)


def box_iou(a: np.ndarray, b: np.ndarray, crowd: bool = False) -> np.ndarray:
    """(N, M) IoU of xyxy boxes; with ``crowd`` the union is the area of ``a`` (COCO's crowd IoU)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] if crowd else area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@dataclass
class Matching:
    """Per-detection and per-box outcome of TIDE matching: everything the fixes need.

    Detections (D kept after the per-image cap, in image order then descending score):
    ``label``, ``score``, ``image``, ``kind`` (TP/CLS/LOC/BOTH/DUPE/BKG/IGNORED), ``target``
    (ground-truth row of a cls/loc error whose box is still unmatched, else -1), ``best``
    (this error is the highest-scoring one on its target, so a fix turns it into a TP).
    Ground truth (G rows of ``GroundTruth``): ``matched``, ``miss`` (bool), ``gt`` itself.
    ``dets_per_image`` (N,) counts kept detections; ``dropped_by_cap`` and ``outside_gt`` count
    detections beyond ``max_dets`` and on images absent from the ground truth.
    """

    gt: GroundTruth
    label: np.ndarray
    score: np.ndarray
    image: np.ndarray
    kind: np.ndarray
    target: np.ndarray
    best: np.ndarray
    matched: np.ndarray
    miss: np.ndarray
    dets_per_image: np.ndarray
    dropped_by_cap: int = 0
    outside_gt: int = 0


def match(gt: GroundTruth, dets, pos_thr: float = 0.5, bkg_thr: float = 0.1, max_dets: int = 100,
          progress: bool = False) -> Matching:
    """Greedy score-ordered matching per image, then one error type per unmatched detection."""
    img = _image_index(gt.image_ids, np.asarray(dets.image_id, dtype=np.int64))
    scores = np.asarray(dets.scores, dtype=np.float64)
    inside = np.flatnonzero(img >= 0)
    # stable: equal scores keep the results file's order, as tidecv and pycocotools do
    order = inside[np.lexsort((-scores[inside], img[inside]))]
    starts = np.searchsorted(img[order], np.arange(len(gt.image_ids) + 1))
    rank = np.arange(len(order)) - starts[img[order]]
    kept = order[rank < max_dets]
    d_img = img[kept]
    d_off = np.searchsorted(d_img, np.arange(len(gt.image_ids) + 1))
    d_boxes = np.asarray(dets.boxes, dtype=np.float64).reshape(-1, 4)[kept]
    d_labels = np.asarray(dets.labels, dtype=np.int64)[kept]

    kind = np.full(len(kept), TP, dtype=np.int8)
    target = np.full(len(kept), -1, dtype=np.int64)
    matched = np.zeros(len(gt.labels), dtype=bool)
    usable = np.zeros(len(gt.labels), dtype=bool)
    for i in tqdm(range(len(gt.image_ids)), desc="TIDE matching", unit="img", disable=not progress):
        ds, gs = slice(d_off[i], d_off[i + 1]), slice(gt.offsets[i], gt.offsets[i + 1])
        if ds.start == ds.stop:
            continue
        k, t = _match_image(d_boxes[ds], d_labels[ds], gt.boxes[gs], gt.labels[gs], gt.crowd[gs],
                            matched[gs], pos_thr, bkg_thr)
        kind[ds] = k
        has = t >= 0
        target[ds] = np.where(has, t + gs.start, -1)
        usable[t[has] + gs.start] = True
    miss = ~matched & ~usable & ~gt.crowd
    return Matching(
        gt=gt, label=d_labels, score=scores[kept], image=d_img, kind=kind, target=target,
        best=_best_per_target(target, scores[kept]), matched=matched, miss=miss,
        dets_per_image=np.diff(d_off), dropped_by_cap=len(order) - len(kept),
        outside_gt=len(scores) - len(inside),
    )


def _match_image(boxes, labels, gboxes, glabels, gcrowd, gmatched, pos_thr, bkg_thr):
    """One image: kinds (D,) and cls/loc targets (D,) as local GT rows; fills ``gmatched`` in place."""
    d = len(boxes)
    real = np.flatnonzero(~gcrowd)
    kind = np.full(d, TP, dtype=np.int8)
    target = np.full(d, -1, dtype=np.int64)
    if len(real) == 0:
        kind[:] = BKG
        _absorb_by_crowd(kind, boxes, labels, gboxes[gcrowd], glabels[gcrowd], pos_thr)
        return kind, target
    iou = box_iou(boxes, gboxes[real])
    same = labels[:, None] == glabels[real][None, :]
    same_iou = iou * same
    used = np.zeros(len(real), dtype=bool)
    tp = np.zeros(d, dtype=bool)
    # only detections with some same-class IoU >= t_f can match; the loop is over those alone
    buf = same_iou.copy()
    for j in np.flatnonzero(same_iou.max(axis=1) >= pos_thr):
        g = int(buf[j].argmax())
        if buf[j, g] >= pos_thr:
            tp[j], used[g] = True, True
            buf[:, g] = 0.0
    gmatched[real] = used

    kind[~tp] = BKG  # provisional; refined below, then crowd may absorb
    same_max, same_arg = same_iou.max(axis=1), same_iou.argmax(axis=1)
    other_iou = iou * ~same
    other_max, other_arg = other_iou.max(axis=1), other_iou.argmax(axis=1)
    used_max = (same_iou * used[None, :]).max(axis=1)
    open_ = ~tp
    loc = open_ & (same_max >= bkg_thr) & (same_max <= pos_thr)
    cls = open_ & ~loc & (other_max >= pos_thr)
    dupe = open_ & ~loc & ~cls & (used_max >= pos_thr)
    rest = open_ & ~loc & ~cls & ~dupe
    bkg = rest & (iou.max(axis=1) <= bkg_thr)
    kind[loc], kind[cls], kind[dupe], kind[bkg], kind[rest & ~bkg] = LOC, CLS, DUPE, BKG, BOTH
    # a cls/loc error on an already-matched box cannot become a TP: it has no usable target
    tgt = np.where(loc, same_arg, np.where(cls, other_arg, -1))
    ok = tgt >= 0
    ok[ok] = ~used[tgt[ok]]
    target[ok] = real[tgt[ok]]
    absorbed = _absorb_by_crowd(kind, boxes, labels, gboxes[gcrowd], glabels[gcrowd], pos_thr)
    target[absorbed] = -1
    return kind, target


def _absorb_by_crowd(kind, boxes, labels, cboxes, clabels, pos_thr) -> np.ndarray:
    """Mark unmatched detections inside a same-class crowd box IGNORED (COCO); returns the mask."""
    if len(cboxes) == 0:
        return np.zeros(len(kind), dtype=bool)
    hit = (box_iou(boxes, cboxes, crowd=True) >= pos_thr) & (labels[:, None] == clabels[None, :])
    absorbed = (kind != TP) & hit.any(axis=1)
    kind[absorbed] = IGNORED
    return absorbed


def _best_per_target(target: np.ndarray, score: np.ndarray) -> np.ndarray:
    """True for the highest-scoring error on each target (ties: the earliest, as tidecv)."""
    best = np.zeros(len(target), dtype=bool)
    has = np.flatnonzero(target >= 0)
    if len(has):
        order = has[np.lexsort((has, -score[has], target[has]))]
        first = np.ones(len(order), dtype=bool)
        first[1:] = target[order][1:] != target[order][:-1]
        best[order[first]] = True
    return best


RECALL_POINTS = np.linspace(0.0, 1.0, 101)  # pycocotools' recThrs (tidecv uses the same 101 bars)


def mean_ap(labels: np.ndarray, scores: np.ndarray, tp: np.ndarray, classes: np.ndarray,
            npos: np.ndarray) -> float:
    """Mean over ``classes`` of 101-point interpolated AP, in points (0-100).

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
        idx = np.searchsorted(tps / npos[k], RECALL_POINTS, side="left")
        reached = idx < len(hits)
        aps.append(precision[idx[reached]].sum() / len(RECALL_POINTS))
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
        return {"ap50": self.ap, "errors": dict(self.errors), "counts": dict(self.counts),
                "dropped_by_cap": self.matching.dropped_by_cap, "outside_gt": self.matching.outside_gt}


def decompose(gt: dict | GroundTruth, dets, pos_thr: float = 0.5, bkg_thr: float = 0.1,
              max_dets: int = 100, progress: bool = False) -> TideResult:
    """TIDE decomposition of ``dets`` against COCO ground truth ``gt`` (see the module doc)."""
    if not isinstance(gt, GroundTruth):
        gt = GroundTruth.from_coco(gt)
    m = match(gt, dets, pos_thr, bkg_thr, max_dets, progress)
    base = fixed_ap(m)
    errors = {t: max(fixed_ap(m, t) - base, 0.0) for t in ERROR_TYPES}
    errors.update({t: fixed_ap(m, t) - base for t in ("fp", "fn")})
    counts = {t: int((m.kind == code).sum()) for t, code in _CODE.items()}
    counts["miss"] = int(m.miss.sum())
    counts["fp"] = int(((m.kind != TP) & (m.kind != IGNORED)).sum())
    counts["fn"] = int((~m.matched & ~gt.crowd).sum())
    return TideResult(ap=base, errors=errors, counts=counts, matching=m)
