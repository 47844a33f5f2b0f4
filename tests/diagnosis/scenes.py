"""Shared test data for the diagnosis tests: COCO ground truth on a grid and detections with one
planted cause each (shifted boxes, missing classes, a per-image cap)."""

from __future__ import annotations

import numpy as np

from mapdet.diagnosis.caps import cap_per_image
from mapdet.structures import Detections

PITCH, SIDE = 50, 40  # boxes on a grid: never overlapping, all medium (40 x 40 = 1600 px)


def scene(n_img: int, classes_per_image, width: int = 1000, height: int = 800) -> tuple[dict, list]:
    """GT on a grid; ``classes_per_image(i)`` lists the classes of image i's boxes, in grid order."""
    cols = width // PITCH
    images, anns, objs = [], [], []
    for i in range(1, n_img + 1):
        images.append({"id": i, "width": width, "height": height, "file_name": f"{i}.jpg"})
        for j, c in enumerate(classes_per_image(i)):
            x, y = (j % cols) * PITCH, (j // cols) * PITCH
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "bbox": [x, y, SIDE, SIDE],
                    "area": SIDE * SIDE,
                    "iscrowd": 0,
                    "category_id": c,
                }
            )
            objs.append((i, [x, y, x + SIDE, y + SIDE], c))
    cats = sorted({a["category_id"] for a in anns} | {1, 2, 3})
    return {"images": images, "annotations": anns, "categories": [{"id": k, "name": f"class{k}"} for k in cats]}, objs


def detect(objs: list, dx: float = 0.0, seed: int = 0, keep=lambda c: True) -> Detections:
    rng = np.random.default_rng(seed)
    rows = [o for o in objs if keep(o[2])]
    boxes = np.array([[b[0] + dx, b[1], b[2] + dx, b[3]] for _, b, _ in rows], dtype=np.float32).reshape(-1, 4)
    return Detections(
        np.array([o[0] for o in rows]), boxes, rng.uniform(0.3, 1.0, len(rows)), np.array([o[2] for o in rows])
    )


def manifest(freq_images: dict[int, int], num_samples: int) -> dict:
    return {
        "classes": [{"id": k, "name": f"class{k}"} for k in sorted(freq_images)],
        "num_samples": num_samples,
        "class_stats": {str(k): {"images": n, "instances": 3 * n} for k, n in freq_images.items()},
    }


def small_scene():
    """4 images of 12 objects, every other one shrunk to 10 x 10 (small) and never found; the rest found."""
    gt, objs = scene(4, lambda i: [1, 2] * 6)
    for a in gt["annotations"][::2]:
        a["bbox"][2:] = [10, 10]
        a["area"] = 100
    small = {(a["image_id"], a["bbox"][0], a["bbox"][1]) for a in gt["annotations"] if a["area"] == 100}
    return gt, detect([o for o in objs if (o[0], o[1][0], o[1][1]) not in small])


def capped_scene(n_img: int = 5, objects: int = 150, cap: int = 100):
    """``n_img`` images of ``objects`` objects each, every one detected, results kept to ``cap`` per image."""
    gt, objs = scene(n_img, lambda i: ([1, 2, 3] * objects)[:objects])
    return gt, cap_per_image(detect(objs), cap)
