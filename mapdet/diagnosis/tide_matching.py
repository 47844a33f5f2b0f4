"""TIDE's matching: one outcome per detection and per ground-truth box (``mapdet.diagnosis.tide``).

Per image, detections are matched greedily in descending score order (ties keep the results'
order) to unmatched ground truth of their class at IoU >= ``pos_thr``; every detection left is
given exactly one error type (``TP``, ``CLS``, ``LOC``, ``BOTH``, ``DUPE``, ``BKG``; ``IGNORED``
when a same-class crowd box absorbs it), and a ``cls``/``loc`` error gets the ground-truth box it
would have matched as its target. Boxes are xyxy pixel-edge; the ground truth is
``mapdet.evaluation.inputs.GroundTruth`` (the one parser of COCO ground truth) regrouped by image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from mapdet.boxes import area, xywh_to_xyxy
from mapdet.evaluation.inputs import GroundTruth

# per-detection outcome codes
TP, CLS, LOC, BOTH, DUPE, BKG, IGNORED = range(7)


@dataclass
class ImageTruth:
    """COCO ground truth as flat arrays sorted by image (images in the json's order).

    ``boxes`` (G, 4) xyxy, ``labels`` (G,) category ids, ``crowd`` (G,) bool, ``area`` (G,) (the
    json's area, used for COCO size ranges), ``image`` (G,) index into ``image_ids``; ``offsets``
    (N+1,) so that image i owns rows ``offsets[i]:offsets[i+1]``; ``ann`` (G,) position of each row
    in the json's ``annotations`` (``mapdet.diagnosis.fixes`` removes ground truth by it).
    """

    image_ids: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    crowd: np.ndarray
    area: np.ndarray
    image: np.ndarray
    offsets: np.ndarray
    ann: np.ndarray
    ann: np.ndarray

    @classmethod
    def from_coco(cls, gt: dict) -> ImageTruth:
        """Parsed and checked by ``GroundTruth.parse``, as the evaluator reads it."""
        return cls.from_truth(GroundTruth.parse(gt))

    @classmethod
    def from_truth(cls, truth: GroundTruth) -> ImageTruth:
        found = truth.boxes()
        position = np.empty(len(truth.listed), np.int64)  # of each (sorted) image in the json
        position[truth.listed] = np.arange(len(truth.listed))
        index = position[found.img]
        order = np.argsort(index, kind="stable")
        return cls(
            image_ids=truth.image_ids[truth.listed],
            boxes=xywh_to_xyxy(found.xywh)[order],
            labels=truth.cat_ids[found.cat][order],
            crowd=found.crowd[order],
            area=found.area[order],
            image=index[order],
            offsets=np.searchsorted(index[order], np.arange(len(truth.listed) + 1)),
            ann=order,  # truth.boxes() lists every annotation in file order
        )

    def image_index(self, query: np.ndarray) -> np.ndarray:
        """Position of each queried image id in ``image_ids`` (-1 when absent)."""
        if len(self.image_ids) == 0:
            return np.full(len(query), -1, dtype=np.int64)
        sorter = np.argsort(self.image_ids, kind="stable")
        pos = np.clip(np.searchsorted(self.image_ids, query, sorter=sorter), 0, len(self.image_ids) - 1)
        found = sorter[pos]
        return np.where(self.image_ids[found] == query, found, -1)


def box_iou(a: np.ndarray, b: np.ndarray, crowd: bool = False) -> np.ndarray:
    """(N, M) IoU of xyxy boxes; with ``crowd`` the union is the area of ``a`` (COCO's crowd IoU)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a, area_b = area(a), area(b)
    union = area_a[:, None] if crowd else area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@dataclass
class Matching:
    """Per-detection and per-box outcome of TIDE matching: everything the fixes need.

    Detections (D kept after the per-image cap, in image order then descending score):
    ``label``, ``score``, ``image``, ``kind`` (TP/CLS/LOC/BOTH/DUPE/BKG/IGNORED), ``target``
    (ground-truth row of a cls/loc error whose box is still unmatched, else -1), ``best``
    (this error is the highest-scoring one on its target, so a fix turns it into a TP),
    ``taken`` (ground-truth row a TP matched, else -1), ``index`` (position in the detections given).
    Ground truth (G rows of ``ImageTruth``): ``matched``, ``miss`` (bool), ``gt`` itself.
    ``dets_per_image`` (N,) counts kept detections; ``dropped_by_cap`` and ``outside_gt`` count
    detections beyond ``max_dets`` and on images absent from the ground truth.
    """

    gt: ImageTruth
    label: np.ndarray
    score: np.ndarray
    image: np.ndarray
    kind: np.ndarray
    target: np.ndarray
    best: np.ndarray
    taken: np.ndarray
    index: np.ndarray
    matched: np.ndarray
    miss: np.ndarray
    dets_per_image: np.ndarray
    dropped_by_cap: int = 0
    outside_gt: int = 0


def match(
    gt: ImageTruth, dets, pos_thr: float = 0.5, bkg_thr: float = 0.1, max_dets: int = 100, progress: bool = False
) -> Matching:
    """Greedy score-ordered matching per image, then one error type per unmatched detection."""
    img = gt.image_index(np.asarray(dets.image_id, dtype=np.int64))
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
    taken = np.full(len(kept), -1, dtype=np.int64)
    matched = np.zeros(len(gt.labels), dtype=bool)
    usable = np.zeros(len(gt.labels), dtype=bool)
    for i in tqdm(range(len(gt.image_ids)), desc="TIDE matching", unit="img", disable=not progress):
        ds, gs = slice(d_off[i], d_off[i + 1]), slice(gt.offsets[i], gt.offsets[i + 1])
        if ds.start == ds.stop:
            continue
        k, t, took = _match_image(
            d_boxes[ds], d_labels[ds], gt.boxes[gs], gt.labels[gs], gt.crowd[gs], matched[gs], pos_thr, bkg_thr
        )
        kind[ds] = k
        has = t >= 0
        target[ds] = np.where(has, t + gs.start, -1)
        taken[ds] = np.where(took >= 0, took + gs.start, -1)
        usable[t[has] + gs.start] = True
    miss = ~matched & ~usable & ~gt.crowd
    return Matching(
        gt=gt,
        label=d_labels,
        score=scores[kept],
        image=d_img,
        kind=kind,
        target=target,
        best=_best_per_target(target, scores[kept]),
        taken=taken,
        index=kept,
        matched=matched,
        miss=miss,
        dets_per_image=np.diff(d_off),
        dropped_by_cap=len(order) - len(kept),
        outside_gt=len(scores) - len(inside),
    )


def _match_image(boxes, labels, gboxes, glabels, gcrowd, gmatched, pos_thr, bkg_thr):
    """One image: kinds (D,), cls/loc targets (D,) and the box each TP took (D,), as local GT rows
    (-1: none); fills ``gmatched`` in place."""
    real = np.flatnonzero(~gcrowd)
    kind = np.full(len(boxes), BKG, dtype=np.int8)
    target = np.full(len(boxes), -1, dtype=np.int64)
    took = np.full(len(boxes), -1, dtype=np.int64)
    if len(real) > 0:
        iou = box_iou(boxes, gboxes[real])
        same = labels[:, None] == glabels[real][None, :]
        tp, used, col = _greedy(iou * same, pos_thr)
        gmatched[real] = used
        kind[tp] = TP
        took[tp] = real[col[tp]]
        tgt = _classify(kind, tp, iou, same, used, pos_thr, bkg_thr)
        # a cls/loc error on an already-matched box cannot become a TP: it has no usable target
        ok = tgt >= 0
        ok[ok] = ~used[tgt[ok]]
        target[ok] = real[tgt[ok]]
    absorbed = _absorb_by_crowd(kind, boxes, labels, gboxes[gcrowd], glabels[gcrowd], pos_thr)
    target[absorbed] = -1
    return kind, target, took


def _greedy(same_iou: np.ndarray, pos_thr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections (in score order) that match, the ground truth taken, and the column each TP took:
    each takes the unmatched box of its class with the highest IoU >= ``pos_thr``."""
    tp = np.zeros(len(same_iou), dtype=bool)
    used = np.zeros(same_iou.shape[1], dtype=bool)
    col = np.full(len(same_iou), -1, dtype=np.int64)
    # only detections with some same-class IoU >= t_f can match; the loop is over those alone
    buf = same_iou.copy()
    for j in np.flatnonzero(same_iou.max(axis=1) >= pos_thr):
        g = int(buf[j].argmax())
        if buf[j, g] >= pos_thr:
            tp[j], used[g], col[j] = True, True, g
            buf[:, g] = 0.0
    return tp, used, col


def _classify(kind, tp, iou, same, used, pos_thr: float, bkg_thr: float) -> np.ndarray:
    """Set the error type of every detection that is not a TP in ``kind``; return the box (a
    column of ``iou``) each cls/loc error points at, -1 for the others."""
    same_iou = iou * same
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
    return np.where(loc, same_arg, np.where(cls, other_arg, -1))


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
