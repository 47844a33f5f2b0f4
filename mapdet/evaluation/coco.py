"""Exact COCO bbox evaluation, split over ranks by category: ``evaluate_coco`` and its inputs.

``evaluate_coco(gt, dets)`` returns the arrays of pycocotools' ``COCOeval.evaluate()`` +
``accumulate()`` (bitwise identical with the default numpy engine) for the COCO ground-truth dict
``gt`` and the detections ``dets``. In a single process ``dets`` are all the detections. Under
``torch.distributed`` every rank passes the same ``gt`` and its OWN detections; the set scored is
all ranks' detections concatenated in rank order. Each rank scores a balanced share of the
categories (categories are independent in evaluate/accumulate): it parses the ground-truth boxes
of those categories only, receives their detections from every rank as packed rows
(``mapdet.evaluation.routing``, one all-to-all), and the ranks gather only the small per-category
precision/recall/scores slices, so every rank returns the full result, identical to one process,
while no rank holds more detections than its own plus those of its categories. The two halves of
that split are public: ``score_categories`` (what one rank computes) and ``assemble`` (how the
ranks' ``CategoryScores`` combine), so a split can be checked in one process at any world size.

Boxes: ``Detections.boxes`` are float32 xyxy pixel-edge in stored-image coordinates (a one-pixel
object at column c spans [c, c+1]); COCO results use ``[x, y, w, h]`` with ``w = x2 - x1``. Both
evaluation and ``to_coco_results`` derive xywh in float64 by ``mapdet.boxes.xyxy_to_xywh`` so
scoring a ``Detections`` equals pycocotools on the written results file. Results given as dicts
are scored from their own float64 xywh numbers.

Input checks are in ``mapdet.evaluation.inputs``; no input makes the ranks hang (errors are gathered).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from mapdet import comm
from mapdet.evaluation.accumulate import REC_THRS
from mapdet.evaluation.inputs import WIDE, GroundTruth, detection_rows, rows_to_boxes
from mapdet.evaluation.matching import AREA_RANGES, IOU_THRS, BoxSet, evaluate_accumulate
from mapdet.evaluation.metrics import CocoResult, format_summary, format_table, write_metrics
from mapdet.evaluation.routing import route, share_categories
from mapdet.structures import Detections

__all__ = [
    "ENGINES",
    "CategoryScores",
    "CocoResult",
    "assemble",
    "evaluate_coco",
    "format_summary",
    "format_table",
    "score_categories",
    "write_metrics",
]
ENGINES = ("auto", "numpy", "faster-coco-eval", "pycocotools")


class CategoryScores(NamedTuple):
    """pycocotools' arrays for the categories ``cats`` (indices, k of them): one rank's share."""

    cats: np.ndarray  # int64 (k,)
    precision: np.ndarray  # (T, R, k, A, M)
    recall: np.ndarray  # (T, k, A, M)
    scores: np.ndarray  # (T, R, k, A, M)
    num_gt: np.ndarray  # int64 (k,) non-crowd GT boxes per category


class _Counted(NamedTuple):
    """What every rank tells the others before routing (all_gather_object)."""

    counts: np.ndarray  # int64 (K,) its detections per category
    wide: bool  # it holds WIDE rows (COCO result dicts)
    error: Exception | None  # its own, picklable (``_portable``)


class _Scored(NamedTuple):
    """What every rank tells the others after scoring (all_gather_object)."""

    part: CategoryScores | None
    error: Exception | None


def evaluate_coco(
    gt: dict, dets: Detections | list[dict], max_dets=(1, 10, 100, 300), iou_thrs=None, engine: str = "auto"
) -> CocoResult:
    """Score ``dets`` against the COCO ground-truth dict ``gt``; see the module docstring.

    ``max_dets`` always gains 1, 10 and 100 so the standard summary is pycocotools' ``stats``.
    ``engine``: "auto"/"numpy" (exact re-implementation, fastest), "faster-coco-eval" or
    "pycocotools" (run on this rank's categories). Collective: every rank passes the same ``gt``,
    ``max_dets``, ``iou_thrs`` and ``engine``, and its own ``dets``. ``result.traffic`` says what
    this rank held and moved (``mapdet.evaluation.routing.Traffic``).
    """
    max_dets, iou_thrs = _settings(max_dets, iou_thrs, engine)
    truth = GroundTruth.parse(gt)  # same input, same outcome on every rank
    rows, error = _attempt(detection_rows, dets, truth)
    counts = np.zeros(len(truth.cat_ids), np.int64)
    if error is None:
        counts = np.bincount(rows["cat"], minlength=len(counts))
    told = comm.all_gather_object(_Counted(counts, error is None and rows.dtype == WIDE, _portable(error)))
    _raise_first(error, [t.error for t in told])
    owner = share_categories(truth.counts(), np.stack([t.counts for t in told]), len(told))
    routed, traffic = route(rows, owner, wide=any(t.wide for t in told))
    del rows  # the caller's detections stay theirs; this rank's packed copy is no longer needed
    cats = np.flatnonzero(owner == comm.get_rank())
    found, error = _attempt(rows_to_boxes, routed)
    del routed  # scored as float64 boxes from here on
    part = None
    if error is None:
        part, error = _attempt(score_categories, engine, gt, truth, found, cats, iou_thrs, max_dets)
    shares = comm.all_gather_object(_Scored(part, _portable(error)))
    _raise_first(error, [s.error for s in shares])
    result = assemble([s.part for s in shares], truth, iou_thrs, max_dets)
    result.traffic = traffic.to_dict()
    return result


def _settings(max_dets, iou_thrs, engine: str) -> tuple[list[int], np.ndarray]:
    """Checked ``max_dets`` (with 1, 10 and 100, sorted) and IoU thresholds (float64)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {ENGINES}")
    max_dets = sorted({int(m) for m in max_dets} | {1, 10, 100})
    iou_thrs = IOU_THRS if iou_thrs is None else np.asarray(iou_thrs, np.float64).reshape(-1)
    if not (len(iou_thrs) and (iou_thrs > 0).all() and (iou_thrs <= 1).all()):
        raise ValueError(f"IoU thresholds must lie in (0, 1], got {iou_thrs.tolist()}")
    return max_dets, iou_thrs


def _attempt(fn, *args):
    """``(fn(*args), None)``, or ``(None, error)``: a rank that fails must still join the next
    collective, where every rank learns of the error, so that none waits forever."""
    try:
        return fn(*args), None
    except Exception as e:  # noqa: BLE001 - re-raised on every rank by _raise_first
        return None, e


def _portable(e: Exception | None) -> Exception | None:
    """A picklable stand-in for another rank's error: ValueError for bad input, else RuntimeError."""
    if e is None:
        return None
    text = f"on rank {comm.get_rank()}: {e}"
    return ValueError(text) if isinstance(e, ValueError) else RuntimeError(f"{type(e).__name__} {text}")


def _raise_first(own: Exception | None, gathered: list) -> None:
    """Raise this rank's own error (with its traceback), else the first rank's that failed."""
    if own is not None:
        raise own
    for e in gathered:
        if e is not None:
            raise e


def score_categories(
    engine: str,
    gt: dict,
    truth: GroundTruth,
    found: BoxSet,
    cats: np.ndarray,
    iou_thrs: np.ndarray,
    max_dets: list[int],
) -> CategoryScores:
    """The arrays of the categories ``cats`` (indices) from the detections ``found``: one rank's
    share. ``found`` must hold every detection of those categories (others are ignored)."""
    gt_boxes = truth.boxes(cats)
    num_gt = np.bincount(gt_boxes.cat[~gt_boxes.crowd], minlength=len(truth.cat_ids))[cats]
    if engine in ("auto", "numpy"):
        arrays = evaluate_accumulate(gt_boxes, found, cats, len(truth.image_ids), iou_thrs, max_dets)
    else:
        from mapdet.evaluation.reference import reference_arrays

        arrays = reference_arrays(engine, gt, truth, found, cats, iou_thrs, max_dets)
    return CategoryScores(cats, *arrays, num_gt)


def assemble(parts: list[CategoryScores], truth: GroundTruth, iou_thrs, max_dets) -> CocoResult:
    """The full result from the shares of every category (each in exactly one part)."""
    T, R, K, A, M = len(iou_thrs), len(REC_THRS), len(truth.cat_ids), len(AREA_RANGES), len(max_dets)
    precision, recall, scores = -np.ones((T, R, K, A, M)), -np.ones((T, K, A, M)), -np.ones((T, R, K, A, M))
    num_gt = np.zeros(K, np.int64)
    for p in parts:
        precision[:, :, p.cats], recall[:, p.cats], scores[:, :, p.cats] = p.precision, p.recall, p.scores
        num_gt[p.cats] = p.num_gt
    return CocoResult(precision, recall, scores, iou_thrs, truth.cat_ids.tolist(), max_dets, num_gt=num_gt)
