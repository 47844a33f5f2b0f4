"""pycocotools' bbox ``COCOeval.accumulate()`` from a sparse list of matches, bitwise exact.

pycocotools builds, per category, area range and maxDets, dense (T, n) true/false positive flags
over the n detections of all images in score order, takes cumulative sums, precision
``tp / (fp + tp + eps)`` made monotone from the right, and reads it at the first detection whose
recall ``tp / npig`` reaches each of the 101 recall thresholds. Recall only moves and precision
only peaks at true positives, so the same float values are computed here at the true positives
alone, with fp counted from the matches and the out-of-area flags; the cost is O(matches + n)
per category instead of O(T * A * n).

A detection is a true positive when it took a GT that is not ignored; ignored when it took an
ignored GT (crowd or outside the area range), or took none and is itself outside the area range;
a false positive otherwise.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

REC_THRS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
_GROUP_CELLS = 2_000_000  # see _area_groups: about 16 MB per array of float64


@dataclass
class Matches:
    """Every (area range, IoU threshold, detection) that took a GT, and whether that GT is ignored."""

    area: np.ndarray  # int64 (P,) area-range index
    thr: np.ndarray  # int64 (P,) IoU-threshold index
    det: np.ndarray  # int64 (P,) detection index
    ignored: np.ndarray  # bool (P,)

    @staticmethod
    def concat(parts: list[Matches]) -> Matches:
        if not parts:
            return Matches(*(np.zeros(0, np.int64) for _ in range(3)), np.zeros(0, bool))
        return Matches(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("area", "thr", "det", "ignored")))

    def take(self, idx: np.ndarray) -> Matches:
        return Matches(self.area[idx], self.thr[idx], self.det[idx], self.ignored[idx])


def accumulate(cat, score, rank, outside, matches: Matches, npig, T: int, max_dets: list[int]):
    """precision (T, R, K, A, M), recall (T, K, A, M), scores (T, R, K, A, M) as pycocotools.

    Detections (N,), indexed in (category, image, rank) order: ``cat`` category 0..K-1,
    ``score`` float64, ``rank`` within its (image, category) by score; ``outside`` (A, N) area
    outside each range. ``npig`` (K, A): GT that are not ignored; -1 entries where it is 0.
    """
    K, A = npig.shape
    R, M = len(REC_THRS), len(max_dets)
    precision, recall, scores = -np.ones((T, R, K, A, M)), -np.ones((T, K, A, M)), -np.ones((T, R, K, A, M))
    bounds = np.searchsorted(cat, np.arange(K + 1))
    # per category by score, stable: ties keep (image, rank) order, as pycocotools' mergesort
    order = np.concatenate(
        [b0 + np.argsort(-score[b0:b1], kind="stable") for b0, b1 in itertools.pairwise(bounds)]
        + [np.zeros(0, np.int64)]
    )
    _sort_matches(matches, cat, order, A, T)
    m_bounds = np.searchsorted(cat[matches.det], np.arange(K + 1))
    position = np.zeros(len(cat), np.int64)
    for k, areas in _area_groups(npig, np.diff(bounds), T):
        local_area = np.full(A, -1)
        local_area[areas] = np.arange(len(areas))
        in_cat = order[bounds[k] : bounds[k + 1]]
        mine = matches.take(slice(m_bounds[k], m_bounds[k + 1]))
        mine = mine.take(local_area[mine.area] >= 0)
        for m, max_det in enumerate(max_dets):
            cols = in_cat[rank[in_cat] < max_det]
            position[cols] = np.arange(len(cols))
            kept = mine.take(rank[mine.det] < max_det)
            q, rc, ss = _curves(
                local_area[kept.area] * T + kept.thr,
                position[kept.det],
                kept.ignored,
                outside[np.ix_(areas, cols)],
                score[cols],
                npig[k, areas],
                T,
            )
            precision[:, :, k, areas, m] = q.transpose(1, 2, 0)
            recall[:, k, areas, m] = rc.T
            scores[:, :, k, areas, m] = ss.transpose(1, 2, 0)
    return precision, recall, scores


def _sort_matches(matches: Matches, cat, order, A: int, T: int) -> None:
    """Sort ``matches`` in place by (category, area, threshold, score order), so that every
    subset taken from them stays sorted. In place, field by field: they are the largest arrays
    here (up to A * T per detection), so no second copy of them is ever alive."""
    in_order = np.empty(len(cat), np.int64)
    in_order[order] = np.arange(len(cat))
    key = ((cat[matches.det] * A + matches.area) * T + matches.thr) * max(len(cat), 1)
    key += in_order[matches.det]
    del in_order
    idx = np.argsort(key)
    del key
    for f in ("area", "thr", "det", "ignored"):
        setattr(matches, f, getattr(matches, f)[idx])


def _area_groups(npig, n_dets, T: int):
    """(category, its area ranges with GT) to accumulate together: all at once, or one at a time
    for a large category, whose per-call arrays (detections x areas, matches, and the dense
    (areas x T, true positives) matrices of ``_curves``) would pass ``_GROUP_CELLS``; a category
    cannot be split across ranks, so this bounds the part of the memory that ranks cannot share.
    A category without GT in any area range is skipped (it stays -1)."""
    for k, counts in enumerate(npig):
        areas = np.flatnonzero(counts > 0)
        if len(areas) == 0:
            continue
        if len(areas) * max(T * counts.max(), n_dets[k]) <= _GROUP_CELLS:
            yield k, areas
        else:
            yield from ((k, areas[i : i + 1]) for i in range(len(areas)))


def _curves(row, pos, ignored, outside, score_sorted, npig, T: int):
    """Precision and scores (A', T, R) at the recall thresholds and final recall (A', T).

    Matches of one category and maxDets, sorted by (row, pos): ``row`` = area * T + threshold,
    ``pos`` the column in score order, ``ignored`` whether the GT taken is ignored.
    ``outside`` (A', n) per column.
    """
    A, n = outside.shape
    R = len(REC_THRS)
    if n == 0:
        return np.zeros((A, T, R)), np.zeros((A, T)), np.zeros((A, T, R))
    per_row = np.bincount(row, minlength=A * T)
    start = (np.cumsum(per_row) - per_row)[row]  # index of the row's first match
    m_out = outside[row // T, pos]
    out_before = np.cumsum(outside, axis=1)[row // T, pos] - m_out
    # ignored columns before: unmatched outside the area range, or matched to an ignored GT
    ig_before = out_before - _before_in_row(m_out, start) + _before_in_row(ignored, start)
    j = _before_in_row(~ignored, start)  # true positives before
    tp = ~ignored
    row, pos, j, fp = row[tp], pos[tp], j[tp], (pos - j - ig_before)[tp]
    ntp = np.bincount(row, minlength=A * T)
    width = max(int(ntp.max(initial=0)), 1)
    tpc = (j + 1).astype(np.float64)
    pr = np.zeros((A * T, width))  # zero padding never exceeds a precision
    pr[row, j] = tpc / (fp.astype(np.float64) + tpc + np.spacing(1))
    peak = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
    first = np.zeros((A * T, width), np.int64)
    first[row, j] = pos
    # fewest true positives whose recall tp / npig reaches each threshold (0: from column 0)
    need = np.repeat(np.stack([np.searchsorted(np.arange(g + 1) / g, REC_THRS) for g in npig]), T, axis=0)
    valid = need <= ntp[:, None]
    col = np.clip(need - 1, 0, width - 1)
    rows = np.arange(A * T)[:, None]
    q = np.where(valid, peak[rows, col], 0.0)
    at = np.where(need == 0, 0, first[rows, col])
    ss = np.where(valid, score_sorted[np.minimum(at, n - 1)], 0.0)
    rc = ntp / np.repeat(npig, T).astype(np.float64)
    return q.reshape(A, T, R), rc.reshape(A, T), ss.reshape(A, T, R)


def _before_in_row(flags: np.ndarray, start: np.ndarray) -> np.ndarray:
    """For entries sorted by row: how many earlier entries of the same row have ``flags``."""
    c = np.cumsum(flags) - flags
    return c - c[start]
