"""The synthetic Vistas written also as COCO detection JSON (as converters such as Mapillary2COCO do),
with the ids a real file may have: sparse, listed in any order, unrelated to the Vistas numbering."""

from __future__ import annotations

import json
import random
from pathlib import Path

from mapdet.datasets.layout import config_path, detect_version, panoptic_json_path


def category_id(config_index: int) -> int:
    """Sparse, and in the reverse of config order: the COCO classes 1..K come out in another order."""
    return 900 - 7 * config_index


def image_id(position: int) -> int:
    """Sparse, and in the reverse of the stems' order."""
    return 5000 - 3 * position


def vistas_as_coco(root: Path, split: str, path: Path, seed: int = 0) -> dict:
    """Write the thing segments of ``split``'s panoptic JSON as COCO detection ground truth to
    ``path`` (boxes, segment areas, crowd flags; the classes Vistas evaluates, named as in Vistas);
    images, annotations and categories listed in shuffled order. Returns the dict written."""
    root = Path(root)
    version = detect_version(root)
    labels = json.loads(config_path(root, version).read_text())["labels"]
    things = {i for i, lab in enumerate(labels) if lab.get("instances") and lab.get("evaluate", True)}
    pan = json.loads(panoptic_json_path(root, split, version).read_text())
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in pan["images"]}
    stems = sorted(Path(a["file_name"]).stem for a in pan["annotations"])
    ids = {stem: image_id(i) for i, stem in enumerate(stems)}
    images, annotations = [], []
    for a in pan["annotations"]:
        stem = Path(a["file_name"]).stem
        w, h = sizes[f"{stem}.jpg"]
        images.append({"id": ids[stem], "file_name": f"{stem}.jpg", "width": w, "height": h})
        for seg in a["segments_info"]:
            index = seg["category_id"] - 1  # the synthetic panoptic ids are config index + 1
            if index in things:
                annotations.append(
                    {
                        "id": 11 + 2 * len(annotations),
                        "image_id": ids[stem],
                        "category_id": category_id(index),
                        "bbox": seg["bbox"],
                        "area": seg["area"],
                        "iscrowd": seg["iscrowd"],
                    }
                )
    categories = [
        {"id": category_id(i), "name": labels[i]["name"], "supercategory": labels[i]["name"].split("--")[0]}
        for i in sorted(things)
    ]
    rng = random.Random(seed)
    for items in (images, annotations, categories):
        rng.shuffle(items)
    coco = {
        "info": {"description": "synthetic Vistas as COCO"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    Path(path).write_text(json.dumps(coco))
    return coco
