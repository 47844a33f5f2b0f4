"""Exact numpy re-implementation of pycocotools' bbox ``COCOeval.evaluate()`` + ``accumulate()``.

Inputs are packed arrays, never per-box dicts. Boxes are COCO ``[x, y, w, h]`` in float64, exactly
the numbers pycocotools would read from a results file, so every floating point operation below
is the one pycocotools performs in the same order and the output arrays are bitwise identical:

- IoU follows ``bbIou`` in pycocotools' maskApi.c: ``w = min(x+w) - max(x)``, zero when
  ``w <= 0`` or ``h <= 0``, union ``da + ga - i`` (``da`` alone for a crowd GT).
- Matching follows ``evaluateImg``: detections highest score first (stable, ties keep file
  order), capped at the largest maxDets per image and category; each detection takes the
  unmatched (or crowd) GT of highest IoU >= threshold, the last one on ties, preferring GT that
  is not ignored (crowd or outside the area range). Unmatched detections outside the area range
  are ignored.
- Accumulation follows ``accumulate``: per category, area range and maxDets the detections of
  all images are ranked by score (stable: image order, then rank in image), precision is made
  monotone from the right and read at the 101 recall thresholds.

The greedy matching is sequential only within one (image, category); it runs as one vectorised
step per detection rank (at most maxDets steps), over all images and categories at once, and only
over (detection, GT) pairs with IoU >= the lowest threshold, the only pairs that can ever match.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from mapdet.boxes import xywh_to_xyxy
from mapdet.evaluation.accumulate import Matches, accumulate

# pycocotools' Params for bbox: the IoU thresholds, and the area ranges (rows) with their names
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
SMALL, MEDIUM = 32.0**2, 96.0**2  # COCO's small objects have area < SMALL, medium < MEDIUM
AREA_RANGES = np.array([[0.0, 1e5**2], [0.0, SMALL], [SMALL, MEDIUM], [MEDIUM, 1e5**2]])
AREA_LABELS = ("all", "small", "medium", "large")
_PAIR_CHUNK = 1_000_000  # (detection, GT) pairs per IoU batch: bounds its memory at ~0.15 GB


@dataclass
class BoxSet:
    """One side of the evaluation (GT or detections) as parallel arrays of length N.

    ``img`` and ``cat`` index the sorted image ids and category ids of the ground truth.
    ``area``: the GT's COCO ``area`` field; for detections ``w * h`` as in ``loadRes``.
    ``score`` is zero for GT; ``crowd`` is False for detections.
    """

    img: np.ndarray  # int64 (N,)
    cat: np.ndarray  # int64 (N,)
    xywh: np.ndarray  # float64 (N, 4)
    area: np.ndarray  # float64 (N,)
    score: np.ndarray  # float64 (N,)
    crowd: np.ndarray  # bool (N,)

    def take(self, idx: np.ndarray) -> BoxSet:
        return BoxSet(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def evaluate_accumulate(
    gt: BoxSet, dt: BoxSet, cats: np.ndarray, num_images: int, iou_thrs: np.ndarray, max_dets: list[int]
):
    """COCOeval arrays for the categories ``cats`` (indices, in the order given).

    Returns ``precision`` (T, R, K, A, M), ``recall`` (T, K, A, M), ``scores`` (T, R, K, A, M),
    with K = len(cats), -1 where a category has no non-ignored GT in an area range.
    """
    size = max(cats.max(initial=-1), gt.cat.max(initial=-1), dt.cat.max(initial=-1)) + 1
    local = np.full(size, -1)
    local[cats] = np.arange(len(cats))
    gt, dt = _relabel(gt, local), _relabel(dt, local)
    dt, rank, key = _rank_detections(dt, num_images, max_dets[-1])
    gt = gt.take(np.lexsort((gt.img, gt.cat)))  # stable: file order within (category, image)
    g_ig = gt.crowd[None, :] | _outside(gt.area)  # (A, G)
    matches = _match(gt, dt, rank, key, g_ig, num_images, iou_thrs)
    npig = np.stack([np.bincount(gt.cat[~ig], minlength=len(cats)) for ig in g_ig], 1)
    return accumulate(dt.cat, dt.score, rank, _outside(dt.area), matches, npig, len(iou_thrs), max_dets)


def _relabel(boxes: BoxSet, local: np.ndarray) -> BoxSet:
    """Only the boxes of the selected categories, ``cat`` renumbered 0..K-1 in their order."""
    keep = local[boxes.cat] >= 0
    if not keep.all():  # a rank is usually given only its categories' boxes: no copy then
        boxes = boxes.take(keep)
    return dataclasses.replace(boxes, cat=local[boxes.cat])


def _outside(area: np.ndarray) -> np.ndarray:
    """(A, N): area outside each range (bounds inclusive, as ``evaluateImg``)."""
    return (area[None, :] < AREA_RANGES[:, :1]) | (area[None, :] > AREA_RANGES[:, 1:])


def _rank_detections(dt: BoxSet, num_images: int, max_det: int):
    """Detections sorted by (category, image, score desc, file order), capped at ``max_det``.

    Also returns each one's rank within its (image, category) and that group's key.
    """
    key = dt.cat * num_images + dt.img
    order = np.lexsort((-dt.score, key))
    key = key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, int)
    rank = np.arange(len(key)) - np.repeat(starts, np.diff(np.r_[starts, len(key)]))
    keep = rank < max_det
    return dt.take(order[keep]), rank[keep], key[keep]  # one copy of the boxes, not two


class _Edges(NamedTuple):
    """Columns x, y, x + w, y + h and w * h: the terms maskApi.c's ``bbIou`` forms per box."""

    x1: np.ndarray
    y1: np.ndarray
    x2: np.ndarray
    y2: np.ndarray
    area: np.ndarray


def _edges(boxes: BoxSet) -> _Edges:
    xyxy = xywh_to_xyxy(boxes.xywh)
    return _Edges(*xyxy.T, boxes.xywh[:, 2] * boxes.xywh[:, 3])


def _pair_iou(di, gi, d: _Edges, g: _Edges, crowd, min_iou: float):
    """The pairs (di, gi) with IoU >= ``min_iou`` (> 0), and their IoU, exactly as ``bbIou``.

    Boxes that do not overlap in x are dropped before y is looked at (most pairs), which is
    exact because ``bbIou`` gives them 0.
    """
    w = np.minimum(d.x2[di], g.x2[gi]) - np.maximum(d.x1[di], g.x1[gi])
    s = np.flatnonzero(w > 0)
    di, gi, w = di[s], gi[s], w[s]
    h = np.minimum(d.y2[di], g.y2[gi]) - np.maximum(d.y1[di], g.y1[gi])
    s = np.flatnonzero(h > 0)
    di, gi, inter = di[s], gi[s], w[s] * h[s]
    da = d.area[di]
    union = np.where(crowd[gi], da, da + g.area[gi] - inter)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    s = np.flatnonzero(iou >= min_iou)
    return di[s], gi[s], iou[s]


def _candidate_pairs(gt: BoxSet, dt: BoxSet, key: np.ndarray, num_images: int, min_iou: float):
    """(detection, GT, IoU) for same image and category with IoU >= ``min_iou``."""
    gkey = gt.cat * num_images + gt.img
    lo = np.searchsorted(gkey, key, "left")
    count = np.searchsorted(gkey, key, "right") - lo
    d, g = _edges(dt), _edges(gt)
    cum = np.cumsum(count)
    out = []
    for d0, d1 in _chunks(cum):
        cnt = count[d0:d1]
        di = np.repeat(np.arange(d0, d1), cnt)
        first = np.repeat(np.cumsum(cnt) - cnt, cnt)
        gi = np.repeat(lo[d0:d1], cnt) + np.arange(len(di)) - first
        out.append(_pair_iou(di, gi, d, g, gt.crowd, min_iou))
    if not out:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    return tuple(np.concatenate(parts) for parts in zip(*out))


def _chunks(cum: np.ndarray):
    """Contiguous detection ranges holding about ``_PAIR_CHUNK`` pairs each."""
    start = 0
    while start < len(cum):
        base = cum[start - 1] if start else 0
        stop = max(int(np.searchsorted(cum, base + _PAIR_CHUNK, "right")), start + 1)
        yield start, stop
        start = stop


def _match(gt: BoxSet, dt: BoxSet, rank, key, g_ig, num_images: int, iou_thrs: np.ndarray):
    """Greedy matching of ``evaluateImg``, as a list of matches.

    Returns ``Matches``: area range, IoU threshold and detection of every match, and whether the
    GT it took is ignored (crowd or outside that area range).
    """
    A, T = len(AREA_RANGES), len(iou_thrs)
    thr = np.minimum(iou_thrs, 1 - 1e-10)
    pd, pg, piou = _candidate_pairs(gt, dt, key, num_images, float(thr.min(initial=1.0)))
    if len(pd) == 0:
        return Matches.concat([])
    pd, pg, piou, seg, pref, span = _rank_candidates(pd, pg, piou, rank, g_ig)
    can = piou[None, :] >= thr[:, None]  # (T, P)
    taken = np.zeros((A, T, len(gt.img)), bool)
    step_of_seg = rank[pd[seg]]
    bounds = np.searchsorted(step_of_seg, np.arange(step_of_seg[-1] + 2))
    found = []
    for s0, s1 in itertools.pairwise(bounds):  # detections of one rank: one per (image, cat)
        if s0 == s1:
            continue
        p0, p1 = seg[s0], (seg[s1] if s1 < len(seg) else len(pd))
        g = pg[p0:p1]
        free = gt.crowd[g] | ~taken[:, :, g]
        choice = np.where(free & can[None, :, p0:p1], pref[:, None, p0:p1], -1)  # (A, T, p)
        best = np.maximum.reduceat(choice, seg[s0:s1] - p0, axis=2)
        a, t, s = np.nonzero(best >= 0)
        chosen = seg[s0 + s] + best[a, t, s] % span
        taken[a, t, pg[chosen]] = True
        found.append(Matches(a, t, pd[chosen], g_ig[a, pg[chosen]]))
    return Matches.concat(found)


def _rank_candidates(pd, pg, piou, rank, g_ig):
    """Candidate pairs grouped by detection (in rank order), with a preference per area range.

    Returns the pairs reordered, each detection's first pair ``seg``, and ``pref`` (A, P): larger
    is better, so the first maximum among available candidates is ``evaluateImg``'s choice, a GT
    that is not ignored over an ignored one, then the highest IoU, then the later GT.
    """
    order = np.lexsort((pg, piou, pd, rank[pd]))  # within a detection: ascending (IoU, GT order)
    pd, pg, piou = pd[order], pg[order], piou[order]
    seg = np.flatnonzero(np.r_[True, pd[1:] != pd[:-1]])
    seg_len = np.diff(np.r_[seg, len(pd)])
    pos = np.arange(len(pd)) - np.repeat(seg, seg_len)
    span = int(seg_len.max()) + 1
    pref = (~g_ig[:, pg]).astype(np.int64) * span + pos
    return pd, pg, piou, seg, pref, span
