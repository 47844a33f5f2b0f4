"""Read COCO detection ground truth (a JSON file and its image folder) into boxes per image.

Input: the file any COCO tool reads, ``{"images": [{"id", "file_name", "width", "height"}],
"annotations": [{"id", "image_id", "category_id", "bbox": [x, y, w, h], "area", "iscrowd"}],
"categories": [{"id", "name", "supercategory"}]}``; ``file_name`` is relative to the image folder.

Classes: the categories, in the order of their ids, are numbered 1..K (``CocoClass.id``; 0 is
background); ``category_id`` keeps the file's own id, which may be sparse and listed in any order.
``categories`` (ids or names) keeps a subset: annotations of the other categories are left out and
counted per image in ``RawSample.left_out`` (by name).

Samples: the key is the image id as decimal text, in the order of the ids (not the file name:
WebDataset cuts a key at its first dot), and ``RawSample.image_id`` is the file's own id. Boxes are
``float64 (N, 4)`` xyxy pixel-edge in original image pixels: ``[x, y, x + w, y + h]`` (COCO's
``w`` is ``x2 - x1`` in the same convention, ``mapdet.boxes``), in the file's order within an
image; ``RawSample.area`` carries each annotation's own ``area`` (the segment's, which decides
COCO's small / medium / large), NaN where it has none.

Faults, all named:
- the file as a whole (missing, not JSON, not a dict of ``images``, ``annotations`` and
  ``categories`` lists, a panoptic or results file, image or category ids that are not integers or
  appear twice, an unknown ``categories`` choice): ``ValueError``, one line (``mapdet pack`` exits 2);
- an annotation on an unknown image or category, or with a malformed ``bbox`` (not 4 finite
  numbers, or w or h <= 0), ``iscrowd`` or ``area``: left out and listed in ``bad_annotations``
  (``{"index", "id", "reason"}``);
- an image entry without ``file_name``/``width``/``height``, an image file that is missing or
  unreadable, or whose real size differs from ``width``/``height``: ``BadSample`` from ``read``
  (the packer skips the image and lists it).
"""

from __future__ import annotations

import gc
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mapdet.datasets.sample_files import BadSample, RawSample, image_size
from mapdet.fileio import read_json

CLASS_SETS = ("all-categories", "chosen-categories")  # without and with ``categories``


@dataclass
class CocoClass:
    id: int  # 1..K, in the order of the category ids
    name: str
    category_id: int  # the file's own id
    supercategory: str | None = None

    def record(self) -> dict:
        """The class as the manifest lists it."""
        out = {"id": self.id, "name": self.name, "category_id": self.category_id}
        return out if self.supercategory is None else {**out, "supercategory": self.supercategory}


class _BadAnnotation(Exception):
    pass


class CocoReader:
    """The images of one COCO detection JSON, one at a time; see the module docstring.

    Build it before forking worker processes: the parsed file is then shared.
    """

    def __init__(self, annotations, images, categories: list[str] | None = None):
        self.path, self.image_dir = Path(annotations), Path(images)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"--images {self.image_dir}: not a folder")
        with _no_gc():
            data = read_json(self.path, "COCO annotations")
            _check_detection_file(data, self.path)
            every = _categories(data["categories"], self.path)
            kept = _choose(every, categories, self.path)
            self.class_set = CLASS_SETS[categories is not None]
            self.classes = [CocoClass(k, c.name, c.category_id, c.supercategory) for k, c in enumerate(kept, 1)]
            self.left_out_classes = [c.name for c in every if c not in kept]
            self._images = _images(data["images"], self.path)
            self._objects, self._left_out, self.bad_annotations = self._annotations(data["annotations"], every)
            del data
        self.nothing_to_pack = f"{self.path} lists no images: nothing to pack"

    def keys(self) -> list[str]:
        return [str(i) for i in sorted(self._images)]

    def plan(self) -> dict:
        """What the pack plan records about this input (a resume must find the same)."""
        return {
            "version": "coco",
            "source": "coco",
            "annotations": self.path.name,
            "class_set": self.class_set,
            "classes": [c.record() for c in self.classes],
            "left_out": self.left_out_classes,  # categories not kept (``categories``)
            "bad_annotations": self.bad_annotations,
        }

    def read(self, key: str) -> RawSample:
        image_id = int(key)
        entry = self._images[image_id]
        file_name, width, height = entry.get("file_name"), entry.get("width"), entry.get("height")
        where = f"{self.path.name}: image {image_id}"
        if not isinstance(file_name, str) or not file_name:
            raise BadSample(f"{where} has no file_name")
        if not (_is_int(width) and _is_int(height) and width > 0 and height > 0):
            raise BadSample(f"{where} ({file_name}) has no valid width and height ({width!r} x {height!r})")
        path = self.image_dir / file_name
        if not path.is_file():
            raise BadSample(f"{path}: image file not found ({where})")
        size = image_size(path)
        if size != (width, height):
            raise BadSample(f"{path}: the image is {size[0]}x{size[1]} but {where} says {width}x{height}")
        rows = self._objects.get(image_id, np.zeros((0, 7)))
        return RawSample(
            key,
            path,
            width,
            height,
            boxes=rows[:, :4],
            labels=rows[:, 4].astype(np.int64),
            iscrowd=rows[:, 5].astype(np.uint8),
            left_out=dict(self._left_out.get(image_id, {})),
            image_id=image_id,
            area=rows[:, 6],
            file_name=file_name,
        )

    def _annotations(self, annotations: list, every: list[CocoClass]):
        """Objects per image id, float64 (N, 7) ``[x1, y1, x2, y2, label, iscrowd, area]`` rows in
        file order (arrays: a quarter of the memory of lists of floats, 63 vs 264 MB at COCO
        train2017's size, and untouched by refcounting in forked workers), left-out counts per image
        id ``{name: n}``, and the bad annotations."""
        label_of = {c.category_id: c.id for c in self.classes}
        name_of = {c.category_id: c.name for c in every}
        objects: dict[int, list] = {}
        left_out: dict[int, dict[str, int]] = {}
        bad = []
        for index, a in enumerate(annotations):
            plain = _plain(a, self._images, label_of)
            if plain is not None:  # the common case; 2.2x faster than the checks one by one (bench_coco_read.py)
                objects.setdefault(plain[0], []).append(plain[1])
                continue
            try:
                image_id, category_id = _ids(a, self._images, name_of)
                if category_id not in label_of:
                    counts = left_out.setdefault(image_id, {})
                    counts[name_of[category_id]] = counts.get(name_of[category_id], 0) + 1
                    continue
                row = [*_box(a), label_of[category_id], _crowd(a), _area(a)]
            except _BadAnnotation as e:
                bad.append({"index": index, "id": a.get("id") if isinstance(a, dict) else None, "reason": str(e)})
                continue
            objects.setdefault(image_id, []).append(row)
        return {k: np.asarray(v, np.float64) for k, v in objects.items()}, left_out, bad


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@contextmanager
def _no_gc():
    """The cyclic garbage collector paused: parsing allocates millions of containers and none is
    garbage, yet each full collection walks them all (bench_coco_read.py: "gc on")."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


_REAL = (int, float)  # by type(): bool is not a number here


def _plain(a, images: dict, label_of: dict) -> tuple[int, list] | None:
    """``(image_id, [x1, y1, x2, y2, label, iscrowd, area])`` of an annotation of a kept category that
    passes every check at a glance, else None: then ``_ids``, ``_box``, ``_crowd`` and ``_area`` decide
    one by one and name the fault (this is only the fast path to the same outcome)."""
    try:
        image_id, category_id, (x, y, w, h) = a["image_id"], a["category_id"], a["bbox"]
        crowd, area = a.get("iscrowd", 0), a.get("area", 0.0)
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
    ok = (
        type(image_id) is int
        and image_id in images
        and type(category_id) is int
        and category_id in label_of
        and type(x) in _REAL
        and type(y) in _REAL
        and type(w) in _REAL
        and type(h) in _REAL
        and w > 0
        and h > 0
        and math.isfinite(x + y + w + h)
        and type(crowd) in (int, bool)
        and crowd in (0, 1)
        and type(area) in _REAL
        and 0 <= area < math.inf
    )
    if not ok:
        return None
    x, y, w, h = float(x), float(y), float(w), float(h)  # the arithmetic of _box
    return image_id, [x, y, x + w, y + h, label_of[category_id], int(crowd), float(area) if "area" in a else math.nan]


def _check_detection_file(data, path: Path) -> None:
    """ValueError unless ``data`` looks like COCO detection ground truth."""
    if isinstance(data, list):
        raise ValueError(f"{path} is a JSON list (a COCO results file?), not COCO detection ground truth")
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not COCO detection ground truth (a JSON object with images, annotations, ...)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path} has no {key!r} list: not COCO detection ground truth")
    anns = data["annotations"]
    if anns and all(isinstance(a, dict) and "segments_info" in a for a in anns):
        raise ValueError(f"{path} is COCO panoptic (segments_info), not detection: convert it to boxes first")
    if anns and not any(isinstance(a, dict) and "bbox" in a for a in anns):
        raise ValueError(f"{path}: no annotation has a 'bbox': not COCO detection ground truth")
    if not data["categories"]:
        raise ValueError(f"{path} lists no categories: there would be no classes")


def _categories(entries: list, path: Path) -> list[CocoClass]:
    """Every category, sorted by id (the ``id`` field is 0 here: numbered once chosen)."""
    found: dict[int, CocoClass] = {}
    for i, c in enumerate(entries):
        if not (isinstance(c, dict) and _is_int(c.get("id")) and isinstance(c.get("name"), str)):
            raise ValueError(f"{path}: categories[{i}] needs an integer 'id' and a 'name', got {c!r}")
        if c["id"] in found:
            raise ValueError(f"{path}: category id {c['id']} is listed twice")
        sup = c.get("supercategory")
        found[c["id"]] = CocoClass(0, c["name"], c["id"], sup if isinstance(sup, str) else None)
    return [found[k] for k in sorted(found)]


def _choose(every: list[CocoClass], wanted: list[str] | None, path: Path) -> list[CocoClass]:
    """The categories named by ``wanted`` (ids or names), in id order; all of them for None."""
    if wanted is None:
        return every
    chosen = set()
    for item in wanted:
        match = [c.category_id for c in every if item.strip() in (str(c.category_id), c.name)]
        if len(match) != 1:
            what = "two categories" if match else "no category id or name"
            raise ValueError(
                f"--categories {item!r} matches {what} in {path} "
                f"(categories: {', '.join(f'{c.category_id} {c.name}' for c in every[:20])}"
                f"{' ...' if len(every) > 20 else ''})"
            )
        chosen.add(match[0])
    return [c for c in every if c.category_id in chosen]


def _images(entries: list, path: Path) -> dict[int, dict]:
    found: dict[int, dict] = {}
    for i, im in enumerate(entries):
        if not (isinstance(im, dict) and _is_int(im.get("id"))):
            raise ValueError(f"{path}: images[{i}] has no integer 'id' ({str(im)[:80]})")
        if im["id"] in found:
            raise ValueError(f"{path}: image id {im['id']} is listed twice")
        found[im["id"]] = im
    return found


def _ids(a, images: dict, categories: dict) -> tuple[int, int]:
    if not isinstance(a, dict):
        raise _BadAnnotation(f"not a JSON object: {str(a)[:80]}")
    image_id, category_id = a.get("image_id"), a.get("category_id")
    if not _is_int(image_id) or image_id not in images:
        raise _BadAnnotation(f"unknown image_id {image_id!r}")
    if not _is_int(category_id) or category_id not in categories:
        raise _BadAnnotation(f"image {image_id}: unknown category_id {category_id!r}")
    return image_id, category_id


def _box(a: dict) -> list[float]:
    """xyxy pixel-edge of a valid ``bbox`` [x, y, w, h]."""
    bbox = a.get("bbox")
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise _BadAnnotation(f"image {a['image_id']}: malformed bbox {bbox!r} (expected [x, y, w, h])")
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        raise _BadAnnotation(f"image {a['image_id']}: bbox {bbox} has no area")
    return [x, y, x + w, y + h]


def _crowd(a: dict) -> int:
    crowd = a.get("iscrowd", 0)
    if crowd not in (0, 1) or not isinstance(crowd, (int, bool)):
        raise _BadAnnotation(f"image {a['image_id']}: iscrowd {crowd!r} is not 0 or 1")
    return int(crowd)


def _area(a: dict) -> float:
    if "area" not in a:
        return math.nan  # the packer computes it from the stored box
    if not _is_number(a["area"]) or a["area"] < 0:
        raise _BadAnnotation(f"image {a['image_id']}: area {a['area']!r} is not a number >= 0")
    return float(a["area"])
