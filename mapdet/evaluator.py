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

Differences from pycocotools, all loud: detections on images or categories missing from the GT
raise ``ValueError`` naming them (pycocotools asserts on images and silently drops categories);
GT annotation ids must be unique and >= 1 (pycocotools' matching breaks on id 0); a missing
``iscrowd`` means 0. Empty results are scored (pycocotools' ``loadRes([])`` raises IndexError).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from mapdet import comm
from mapdet.cocoengine import IOU_THRS, REC_THRS, BoxSet, evaluate_accumulate
from mapdet.cocoresult import CocoResult, format_summary, format_table, write_metrics

__all__ = ["Detections", "CocoResult", "evaluate_coco", "write_metrics", "format_table",
           "format_summary", "ENGINES"]
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
    def empty() -> "Detections":
        return Detections(np.zeros(0), np.zeros((0, 4)), np.zeros(0), np.zeros(0))

    @staticmethod
    def concat(parts) -> "Detections":
        parts = list(parts)
        if not parts:
            return Detections.empty()
        return Detections(*(np.concatenate([getattr(p, f) for p in parts])
                            for f in ("image_id", "boxes", "scores", "labels")))

    @staticmethod
    def from_coco_results(results: list[dict]) -> "Detections":
        """From COCO results dicts (bbox xywh -> xyxy, rounded to float32)."""
        img, cat, xywh, score = _parse_results(results)
        return Detections(img, np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                          score, cat)

    def xywh(self) -> np.ndarray:
        """float64 (M, 4) ``[x1, y1, x2 - x1, y2 - y1]``: the numbers COCO results carry."""
        b = self.boxes.astype(np.float64)
        return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1)

    def to_coco_results(self) -> list[dict]:
        """Standard COCO results: ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``."""
        return [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in
                zip(self.image_id.tolist(), self.labels.tolist(), self.xywh().tolist(),
                    self.scores.astype(np.float64).tolist())]


@dataclass
class GroundTruth:
    """A COCO ground-truth dict as arrays; ``boxes.img``/``boxes.cat`` index the sorted ids."""

    image_ids: np.ndarray  # int64 (I,) sorted
    cat_ids: np.ndarray  # int64 (K,) sorted
    boxes: BoxSet

    @staticmethod
    def parse(gt: dict) -> "GroundTruth":
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
            crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], bool)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"malformed ground-truth annotation ({type(e).__name__}: {e}); each "
                             "needs id, image_id, category_id, bbox [x,y,w,h], area") from e
        if len(ann_ids) and (ann_ids.min() < 1 or len(np.unique(ann_ids)) != len(ann_ids)):
            raise ValueError("ground-truth annotation ids must be unique and >= 1 "
                             "(COCO matching treats id 0 as 'unmatched')")
        boxes = BoxSet(_index_of(img, image_ids, "ground-truth annotations", "image"),
                       _index_of(cat, cat_ids, "ground-truth annotations", "category"),
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


def _index_of(values: np.ndarray, ids: np.ndarray, who: str, what: str) -> np.ndarray:
    """Position of each value in the sorted ``ids``; ValueError naming values not there."""
    idx = np.minimum(np.searchsorted(ids, values), max(len(ids) - 1, 0))
    bad = ids[idx] != values if len(ids) else np.ones(len(values), bool)
    if bad.any():
        missing = np.unique(values[bad])
        raise ValueError(f"{bad.sum()} {who} refer to {what} ids not in the ground truth: "
                         f"{missing[:10].tolist()}{' ...' if len(missing) > 10 else ''}")
    return idx


def _parse_results(results: list[dict]):
    if not isinstance(results, list):
        raise ValueError("COCO results must be a list of detection objects")
    n = len(results)
    try:
        img = np.fromiter((r["image_id"] for r in results), np.int64, n)
        cat = np.fromiter((r["category_id"] for r in results), np.int64, n)
        score = np.fromiter((r["score"] for r in results), np.float64, n)
        bbox = [r["bbox"] for r in results]
        if n and not (np.fromiter(map(len, bbox), np.int64, n) == 4).all():
            raise ValueError("a bbox does not have 4 numbers")
        # one flat pass is about twice as fast as np.array on a list of lists
        xywh = np.fromiter(itertools.chain.from_iterable(bbox), np.float64, 4 * n).reshape(n, 4)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed detection ({type(e).__name__}: {e}); each needs image_id, "
                         "category_id, bbox [x,y,w,h] and score") from e
    return img, cat, xywh, score


def _detection_boxes(dets, truth: GroundTruth) -> BoxSet:
    if isinstance(dets, Detections):
        img, cat, xywh, score = dets.image_id, dets.labels, dets.xywh(), dets.scores.astype(np.float64)
    else:
        img, cat, xywh, score = _parse_results(dets)
    if not (np.isfinite(xywh).all() and np.isfinite(score).all()):
        raise ValueError("detections contain non-finite boxes or scores")
    return BoxSet(_index_of(img, truth.image_ids, "detections", "image"),
                  _index_of(cat, truth.cat_ids, "detections", "category"),
                  xywh, xywh[:, 2] * xywh[:, 3], score, np.zeros(len(img), bool))


def rank_categories(truth: GroundTruth, found: BoxSet, world: int) -> list[np.ndarray]:
    """Category indices per rank, balanced by GT + detection count (largest first)."""
    K = len(truth.cat_ids)
    cost = np.bincount(truth.boxes.cat, minlength=K) + np.bincount(found.cat, minlength=K)
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
    truth = GroundTruth.parse(gt)
    found = _detection_boxes(dets, truth)
    cats = rank_categories(truth, found, comm.get_world_size())[comm.get_rank()]
    if engine in ("auto", "numpy"):
        part = evaluate_accumulate(truth.boxes, found, cats, len(truth.image_ids), iou_thrs,
                                   max_dets)
    else:
        from mapdet.cocoref import reference_arrays

        part = reference_arrays(engine, gt, truth, found, cats, iou_thrs, max_dets)
    return _assemble(comm.all_gather_object((cats, part)), truth, iou_thrs, max_dets)


def _assemble(parts, truth: GroundTruth, iou_thrs, max_dets) -> CocoResult:
    T, K, M = len(iou_thrs), len(truth.cat_ids), len(max_dets)
    R = len(REC_THRS)
    precision, recall, scores = -np.ones((T, R, K, 4, M)), -np.ones((T, K, 4, M)), -np.ones((T, R, K, 4, M))
    for cats, (p, r, s) in parts:
        precision[:, :, cats], recall[:, cats], scores[:, :, cats] = p, r, s
    num_gt = np.bincount(truth.boxes.cat[~truth.boxes.crowd], minlength=K)
    return CocoResult(precision, recall, scores, iou_thrs, truth.cat_ids.tolist(), max_dets,
                      num_gt=num_gt)
