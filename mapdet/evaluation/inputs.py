"""COCO ground truth and detections as validated arrays for the evaluator (``mapdet.evaluation.matching``).

``GroundTruth.parse`` is the one reader of a COCO ground-truth dict in mapdet (the diagnosis
regroups its arrays by image: ``mapdet.diagnosis.tide_matching.ImageTruth``). Image and category
ids become indices into the sorted ids of the ground truth. Ground truth ids (annotation, image,
category of every annotation) are read and checked for all annotations; boxes, areas and crowd
flags only for the categories asked for (``GroundTruth.boxes``: a rank, those it scores).

Detections become packed rows (``detection_rows``), the unit that ranks route to each other:
a structured array with ``img`` and ``cat`` (int32 indices) and either
- ``NARROW`` rows (28 bytes) from ``mapdet.structures.Detections``: ``box`` float32 xyxy
  pixel-edge as the model gave it, ``score`` float32; or
- ``WIDE`` rows (48 bytes) from COCO result dicts: ``box`` float64 COCO ``[x, y, w, h]`` and
  ``score`` float64, exactly the numbers pycocotools reads.
``rows_to_boxes`` turns either into the float64 xywh ``BoxSet`` that is scored; a narrow box
becomes ``[x1, y1, x2 - x1, y2 - y1]`` in float64 (``mapdet.boxes.xyxy_to_xywh``), the numbers
its results file carries, so routing float32 loses nothing.

Checks that differ from pycocotools, all loud: detections on images or categories missing from
the GT raise ``ValueError`` naming them (pycocotools asserts on images and silently drops
categories); GT annotation ids must be unique and >= 1 (pycocotools' matching treats id 0 as
"unmatched"); a missing ``iscrowd`` means 0 (pycocotools raises KeyError). Every id, in the GT and
in the results, must be a JSON integer: ``integer_ids`` refuses the first that is not, naming it.
pycocotools compares ids by Python equality, so a string "3" or 1.5 matches nothing (an image id:
"Results do not correspond to current coco set"; a category id: the detection is silently
dropped), while 1.0 and true happen to equal 1; a cast to int64 would turn "3" into 3 and 1.5 into
1 and score what pycocotools refuses, so none of them is taken.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from operator import itemgetter

import numpy as np

from mapdet.boxes import xywh_to_xyxy, xyxy_to_xywh
from mapdet.evaluation.matching import BoxSet
from mapdet.structures import Detections

NARROW = np.dtype([("img", "<i4"), ("cat", "<i4"), ("box", "<f4", (4,)), ("score", "<f4")])
WIDE = np.dtype([("img", "<i4"), ("cat", "<i4"), ("box", "<f8", (4,)), ("score", "<f8")])


@dataclass
class GroundTruth:
    """A COCO ground-truth dict's ids as arrays; boxes are parsed per category by ``boxes``."""

    image_ids: np.ndarray  # int64 (I,) sorted
    cat_ids: np.ndarray  # int64 (K,) sorted
    ann_img: np.ndarray  # int64 (G,) image index of every annotation, file order
    ann_cat: np.ndarray  # int64 (G,) category index of every annotation
    annotations: list  # the dict's annotations (not copied)
    listed: np.ndarray  # int64 (I,) image index of each entry of the dict's "images", in its order

    @staticmethod
    def parse(gt: dict) -> GroundTruth:
        if not isinstance(gt, dict):
            raise ValueError("ground truth must be a COCO dict with images, annotations, categories")
        for key in ("images", "annotations", "categories"):
            if not isinstance(gt.get(key), list):
                raise ValueError(f"ground truth has no list {key!r}")
        image_ids, listed = _unique_ids([im.get("id") for im in gt["images"]], "image")
        cat_ids, _ = _unique_ids([c.get("id") for c in gt["categories"]], "category")
        anns = gt["annotations"]
        try:
            ann_ids, img, cat = (
                integer_ids([a[key] for a in anns], "ground-truth annotation", key)
                for key in ("id", "image_id", "category_id")
            )
        except (KeyError, TypeError) as e:
            raise _malformed_gt(e) from e
        if len(ann_ids) and (ann_ids.min() < 1 or len(np.unique(ann_ids)) != len(ann_ids)):
            raise ValueError(
                "ground-truth annotation ids must be unique and >= 1 (COCO matching treats id 0 as 'unmatched')"
            )
        return GroundTruth(
            image_ids,
            cat_ids,
            index_of(img, image_ids, "ground-truth annotations", "image"),
            index_of(cat, cat_ids, "ground-truth annotations", "category"),
            anns,
            listed,
        )

    def counts(self) -> np.ndarray:
        """int64 (K,): annotations per category (crowd included)."""
        return np.bincount(self.ann_cat, minlength=len(self.cat_ids))

    def boxes(self, cats: np.ndarray | None = None) -> BoxSet:
        """The annotations of the categories ``cats`` (indices; None: all), in file order; xywh
        float64 as in the file, ``area`` the COCO 'area' field."""
        sel = np.arange(len(self.ann_cat)) if cats is None else np.flatnonzero(np.isin(self.ann_cat, cats))
        anns = [self.annotations[i] for i in sel]
        try:
            xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
            area = np.array([a["area"] for a in anns], np.float64)
            crowd = np.array([a.get("iscrowd", 0) for a in anns], bool)
        except (KeyError, TypeError, ValueError) as e:
            raise _malformed_gt(e) from e
        return BoxSet(self.ann_img[sel], self.ann_cat[sel], xywh, area, np.zeros(len(sel)), crowd)


def _malformed_gt(e: Exception) -> ValueError:
    return ValueError(
        f"malformed ground-truth annotation ({type(e).__name__}: {e}); each "
        "needs id, image_id, category_id, bbox [x,y,w,h], area"
    )


# What a parsed JSON integer can be: int (orjson, json), or a numpy integer in dicts built in code.
_INTEGER_TYPES = frozenset({int, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64})


def integer_ids(values: list, who: str, key: str) -> np.ndarray:
    """``values`` as int64; ``ValueError`` naming the first that is not an integer (see the module
    docstring): ``"detection 4: image_id '3' is not an integer"``. ``who`` names an item, ``key`` the id."""
    if not set(map(type, values)) <= _INTEGER_TYPES:  # one pass in C; 1M ids: ~30 ms
        i, v = next((i, v) for i, v in enumerate(values) if type(v) not in _INTEGER_TYPES)
        raise ValueError(
            f"{who} {i}: {key} {v!r} is not an integer (ids must be JSON integers, as pycocotools matches them)"
        )
    try:
        return np.fromiter(values, np.int64, len(values))
    except OverflowError:
        raise ValueError(f"{who}: a {key} does not fit in 64 bits") from None


def _unique_ids(ids: list, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The sorted ids, and the index into them of each id as listed."""
    arr = integer_ids(ids, f"ground-truth {what}", "id")
    uniq, listed = np.unique(arr, return_inverse=True)
    if len(uniq) != len(arr):
        raise ValueError(f"duplicate {what} ids in the ground truth")
    return uniq, listed.reshape(-1)


def index_of(values: np.ndarray, ids: np.ndarray, who: str, what: str) -> np.ndarray:
    """Position of each value in the sorted ``ids``; ValueError naming values not there."""
    idx = np.minimum(np.searchsorted(ids, values), max(len(ids) - 1, 0))
    bad = ids[idx] != values if len(ids) else np.ones(len(values), bool)
    if bad.any():
        missing = np.unique(values[bad])
        raise ValueError(
            f"{bad.sum()} {who} refer to {what} ids not in the ground truth: "
            f"{missing[:10].tolist()}{' ...' if len(missing) > 10 else ''}"
        )
    return idx


def _malformed(e: Exception) -> ValueError:
    return ValueError(
        f"malformed detection ({type(e).__name__}: {e}); each needs image_id, category_id, bbox [x,y,w,h] and score"
    )


def _ids(dets: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    try:
        return tuple(
            integer_ids(list(map(itemgetter(key), dets)), "detection", key) for key in ("image_id", "category_id")
        )
    except (KeyError, TypeError) as e:
        raise _malformed(e) from e


def boxes_and_scores(results: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """float64 xywh (n, 4) and scores (n,) of COCO result dicts."""
    n = len(results)
    try:
        score = np.fromiter(map(itemgetter("score"), results), np.float64, n)
        bbox = list(map(itemgetter("bbox"), results))
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


def detections_from_results(results: list[dict]) -> Detections:
    """``Detections`` from COCO results dicts (bbox xywh -> xyxy, rounded to float32)."""
    img, cat, xywh, score = parse_results(results)
    return Detections(img, xywh_to_xyxy(xywh), score, cat)


def detection_rows(dets, truth: GroundTruth) -> np.ndarray:
    """Checked packed rows (NARROW for ``Detections``, WIDE for COCO result dicts), input order."""
    if isinstance(dets, list):
        img, cat, box, score = parse_results(dets)
        rows = np.empty(len(dets), WIDE)
    elif hasattr(dets, "labels"):
        img, cat, box, score = dets.image_id, dets.labels, dets.boxes, dets.scores
        rows = np.empty(len(dets), NARROW)
    else:
        raise ValueError("COCO results must be a list of detection objects")
    rows["img"] = index_of(img, truth.image_ids, "detections", "image")
    rows["cat"] = index_of(cat, truth.cat_ids, "detections", "category")
    if not (np.isfinite(box).all() and np.isfinite(score).all()):
        raise ValueError("detections contain non-finite boxes or scores")
    rows["box"], rows["score"] = box, score
    return rows


def widen(rows: np.ndarray) -> np.ndarray:
    """NARROW rows as WIDE rows (same numbers as their results file); WIDE rows unchanged."""
    if rows.dtype == WIDE:
        return rows
    out = np.empty(len(rows), WIDE)
    out["img"], out["cat"], out["score"] = rows["img"], rows["cat"], rows["score"]
    out["box"] = xyxy_to_xywh(rows["box"])
    return out


def rows_to_boxes(rows: np.ndarray) -> BoxSet:
    """Detections to score: xywh and score float64, ``area`` w * h as ``loadRes``."""
    xywh = rows["box"].astype(np.float64) if rows.dtype == WIDE else xyxy_to_xywh(rows["box"])
    return BoxSet(
        rows["img"].astype(np.int64),
        rows["cat"].astype(np.int64),
        xywh,
        xywh[:, 2] * xywh[:, 3],
        rows["score"].astype(np.float64),
        np.zeros(len(rows), bool),
    )
