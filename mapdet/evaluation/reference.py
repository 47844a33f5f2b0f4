"""pycocotools and faster-coco-eval as engines of ``evaluate_coco``, on a subset of categories.

Slower than mapdet's numpy engine; kept to cross-check it on any data and to measure the choice
(bench/bench_eval.py). pycocotools' arrays equal the numpy engine's bitwise; faster-coco-eval's
precision differs from pycocotools' by up to ~2e-16.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

from mapdet.evaluation.accumulate import REC_THRS
from mapdet.evaluation.inputs import GroundTruth
from mapdet.evaluation.matching import AREA_RANGES, BoxSet


def reference_arrays(engine: str, gt: dict, truth: GroundTruth, found: BoxSet, cats: np.ndarray, iou_thrs, max_dets):
    """precision (T, R, K, A, M), recall (T, K, A, M), scores for the categories ``cats``.

    ``truth`` is the parsed ``gt``; ``found`` the parsed detections; ``iou_thrs`` float64 (T,),
    ``max_dets`` (M,) ints.
    """
    if len(cats) == 0:
        T, R, A, M = len(iou_thrs), len(REC_THRS), len(AREA_RANGES), len(max_dets)
        return np.zeros((T, R, 0, A, M)), np.zeros((T, 0, A, M)), np.zeros((T, R, 0, A, M))
    if engine == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    else:
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    # both tools write flags into the annotation dicts they are given: hand them copies
    gt = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = _index(COCO(), gt)
        coco_dt = _index(COCO(), {**gt, "annotations": _results(truth, found, cats)})
        E = COCOeval(coco_gt, coco_dt, "bbox")
        E.params.catIds = [int(truth.cat_ids[k]) for k in cats]
        E.params.maxDets = list(max_dets)
        E.params.iouThrs = np.asarray(iou_thrs)
        E.evaluate()
        E.accumulate()
    return tuple(np.asarray(E.eval[k]) for k in ("precision", "recall", "scores"))


def _index(coco, dataset: dict):
    coco.dataset = dataset
    coco.createIndex()
    return coco


def _results(truth: GroundTruth, found: BoxSet, cats: np.ndarray) -> list[dict]:
    """The detections of ``cats`` as ``loadRes`` would store them (ids from 1, area w * h)."""
    sel = np.flatnonzero(np.isin(found.cat, cats))
    return [
        {
            "id": n + 1,
            "image_id": int(truth.image_ids[found.img[i]]),
            "category_id": int(truth.cat_ids[found.cat[i]]),
            "bbox": found.xywh[i].tolist(),
            "score": float(found.score[i]),
            "area": float(found.area[i]),
            "iscrowd": 0,
        }
        for n, i in enumerate(sel)
    ]
