"""COCO ground truth and detections as validated arrays for the evaluator (``mapdet.cocoengine``).

Image and category ids become indices into the sorted ids of the ground truth. Detections come
either as COCO result dicts (``bbox`` [x, y, w, h] read as float64, exactly what pycocotools
reads) or packed (``mapdet.evaluator.Detections``, whose ``xywh()`` gives the numbers its results
file carries). Their ids are read and checked for all detections; boxes and scores only for the
categories a rank scores, so that parsing splits across ranks too.

Checks that differ from pycocotools, all loud: detections on images or categories missing from
the GT raise ``ValueError`` naming them (pycocotools asserts on images and silently drops
categories); GT annotation ids must be unique and >= 1 (pycocotools' matching treats id 0 as
"unmatched"); a missing ``iscrowd`` means 0 (pycocotools raises KeyError).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from mapdet.cocoengine import BoxSet


@dataclass
class GroundTruth:
    """A COCO ground-truth dict as arrays; ``boxes.img``/``boxes.cat`` index the sorted ids."""

    image_ids: np.ndarray  # int64 (I,) sorted
    cat_ids: np.ndarray  # int64 (K,) sorted
    boxes: BoxSet  # xywh float64 as in the file, area = the COCO 'area' field

    @staticmethod
    def parse(gt: dict) -> GroundTruth:
        if not isinstance(gt, dict):
            raise ValueError("ground truth must be a COCO dict with images, annotations, categories")
        for key in ("images", "annotations", "categories"):
            if not isinstance(gt.get(key), list):
                raise ValueError(f"ground truth has no list {key!r}")
        image_ids = _unique_ids([im.get("id") for im in gt["images"]], "image")
        cat_ids = _unique_ids([c.get("id") for c in gt["categories"]], "category")
        anns = gt["annotations"]
        try:
            ann_ids = np.array([a["id"] for a in anns], np.int64)
            img = np.array([a["image_id"] for a in anns], np.int64)
            cat = np.array([a["category_id"] for a in anns], np.int64)
            xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
            area = np.array([a["area"] for a in anns], np.float64)
            crowd = np.array([a.get("iscrowd", 0) for a in anns], bool)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed ground-truth annotation ({type(e).__name__}: {e}); each "
                             "needs id, image_id, category_id, bbox [x,y,w,h], area") from e
        if len(ann_ids) and (ann_ids.min() < 1 or len(np.unique(ann_ids)) != len(ann_ids)):
            raise ValueError("ground-truth annotation ids must be unique and >= 1 "
                             "(COCO matching treats id 0 as 'unmatched')")
        boxes = BoxSet(index_of(img, image_ids, "ground-truth annotations", "image"),
                       index_of(cat, cat_ids, "ground-truth annotations", "category"),
                       xywh, area, np.zeros(len(anns)), crowd)
        return GroundTruth(image_ids, cat_ids, boxes)


def _unique_ids(ids: list, what: str) -> np.ndarray:
    try:
        arr = np.array(ids, np.int64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"every {what} needs an integer 'id'") from e
    uniq = np.unique(arr)
    if len(uniq) != len(arr):
        raise ValueError(f"duplicate {what} ids in the ground truth")
    return uniq


def index_of(values: np.ndarray, ids: np.ndarray, who: str, what: str) -> np.ndarray:
    """Position of each value in the sorted ``ids``; ValueError naming values not there."""
    idx = np.minimum(np.searchsorted(ids, values), max(len(ids) - 1, 0))
    bad = ids[idx] != values if len(ids) else np.ones(len(values), bool)
    if bad.any():
        missing = np.unique(values[bad])
        raise ValueError(f"{bad.sum()} {who} refer to {what} ids not in the ground truth: "
                         f"{missing[:10].tolist()}{' ...' if len(missing) > 10 else ''}")
    return idx


def _malformed(e: Exception) -> ValueError:
    return ValueError(f"malformed detection ({type(e).__name__}: {e}); each needs image_id, "
                      "category_id, bbox [x,y,w,h] and score")


def _ids(dets) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(dets, list):
        return dets.image_id, dets.labels
    n = len(dets)
    try:
        return (np.fromiter((r["image_id"] for r in dets), np.int64, n),
                np.fromiter((r["category_id"] for r in dets), np.int64, n))
    except (KeyError, TypeError, ValueError) as e:
        raise _malformed(e) from e


def detection_indices(dets, truth: GroundTruth) -> tuple[np.ndarray, np.ndarray]:
    """Image and category index of every detection (COCO result dicts or ``Detections``)."""
    if not isinstance(dets, list) and not hasattr(dets, "labels"):
        raise ValueError("COCO results must be a list of detection objects")
    img, cat = _ids(dets)
    return (index_of(img, truth.image_ids, "detections", "image"),
            index_of(cat, truth.cat_ids, "detections", "category"))


def boxes_and_scores(results: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """float64 xywh (n, 4) and scores (n,) of COCO result dicts."""
    n = len(results)
    try:
        score = np.fromiter((r["score"] for r in results), np.float64, n)
        bbox = [r["bbox"] for r in results]
        if n and not (np.fromiter(map(len, bbox), np.int64, n) == 4).all():
            raise ValueError("a bbox does not have 4 numbers")
        # one flat pass is about twice as fast as np.array on a list of lists
        xywh = np.fromiter(itertools.chain.from_iterable(bbox), np.float64, 4 * n).reshape(n, 4)
    except (KeyError, TypeError, ValueError) as e:
        raise _malformed(e) from e
    return xywh, score


def parse_results(results: list[dict]):
    """COCO result dicts as (image_id, category_id, xywh float64, score float64) arrays."""
    if not isinstance(results, list):
        raise ValueError("COCO results must be a list of detection objects")
    return (*_ids(results), *boxes_and_scores(results))


def detection_boxes(dets, img: np.ndarray, cat: np.ndarray, sel: np.ndarray) -> BoxSet:
    """The detections ``sel`` (indices) as a BoxSet; ``img``/``cat`` from ``detection_indices``."""
    if isinstance(dets, list):
        xywh, score = boxes_and_scores(dets if len(sel) == len(dets) else [dets[i] for i in sel])
    else:
        xywh, score = dets.xywh(sel), dets.scores[sel].astype(np.float64)
    if not (np.isfinite(xywh).all() and np.isfinite(score).all()):
        raise ValueError("detections contain non-finite boxes or scores")
    return BoxSet(img[sel], cat[sel], xywh, xywh[:, 2] * xywh[:, 3], score,
                  np.zeros(len(sel), bool))
