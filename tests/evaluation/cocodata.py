"""Shared test data for the evaluation tests: COCO ground truth and results with every edge case,
and pycocotools' own evaluation of them (the reference every mapdet number must equal)."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

STATS = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
CATS = [1, 2, 3, 5, 7]  # 5: crowd GT only; 7: no GT at all


def random_coco(seed: int, n_images: int = 10):
    """GT and results with crowd regions, images without GT, categories without GT, score ties,
    duplicate GT boxes (IoU ties), integer boxes (IoUs exactly at thresholds), GT ``area`` unlike
    w * h, detections of all sizes, and 150 detections of one category in one image."""
    rng = np.random.default_rng(seed)
    images = [{"id": 100 + 7 * i} for i in range(n_images)]  # sparse, unsorted ids below
    images.reverse()
    anns = []
    for im in images[2:]:  # the first two images have no GT
        for _ in range(rng.integers(0, 10)):
            c = int(rng.choice([1, 2, 3, 5], p=[0.4, 0.3, 0.2, 0.1]))
            x, y, w, h = (int(v) for v in (*rng.integers(0, 150, 2), *rng.integers(1, 130, 2)))
            for _ in range(2 if rng.random() < 0.1 else 1):  # sometimes a duplicate GT box
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": im["id"],
                        "category_id": c,
                        "bbox": [x, y, w, h],
                        "area": float(w * h * rng.uniform(0.6, 1.2)),
                        "iscrowd": int(c == 5 or rng.random() < 0.08),
                    }
                )
    dets = []
    for im in images:
        own = [a for a in anns if a["image_id"] == im["id"]]
        for _ in range(rng.integers(0, 40)):
            if own and rng.random() < 0.7:
                a = own[rng.integers(len(own))]
                box = [v + int(rng.integers(-6, 7)) for v in a["bbox"]]
                box[2:] = [max(v, 1) for v in box[2:]]
                c = a["category_id"] if rng.random() < 0.85 else int(rng.choice(CATS))
            else:
                box = [int(v) for v in (*rng.integers(0, 200, 2), *rng.integers(1, 150, 2))]
                c = int(rng.choice(CATS))
            dets.append({"image_id": im["id"], "category_id": c, "bbox": box, "score": round(float(rng.random()), 1)})
    crowded = images[3]["id"]
    for _ in range(150):  # > 100 detections of one category in one image
        x, y = (int(v) for v in rng.integers(0, 100, 2))
        dets.append(
            {"image_id": crowded, "category_id": 1, "bbox": [x, y, 40, 40], "score": round(float(rng.random()), 2)}
        )
    gt = {"images": images, "annotations": anns, "categories": [{"id": c, "name": f"class{c}"} for c in CATS]}
    return gt, dets


def pycocotools_eval(gt: dict, dets: list, max_dets=(1, 10, 100)) -> COCOeval:
    """Plain single-process pycocotools on copies (it mutates its inputs)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(copy.deepcopy(dets))
        else:  # loadRes([]) raises IndexError
            coco_dt = COCO()
            coco_dt.dataset = {**copy.deepcopy(gt), "annotations": []}
            coco_dt.createIndex()
        E = COCOeval(coco_gt, coco_dt, "bbox")
        E.params.maxDets = list(max_dets)
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E


def assert_same_as_pycocotools(result, E: COCOeval) -> None:
    for key in ("precision", "recall", "scores"):
        assert np.array_equal(getattr(result, key), E.eval[key]), key
