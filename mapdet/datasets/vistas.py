"""Read one split of a raw Mapillary Vistas download (v1.2 or v2.0) into boxes per image.

The download's layout, versions and class sets are in ``mapdet.datasets.layout``; reading and
checking one image's files (and ``BadSample``) in ``mapdet.datasets.sample_files``.

Boxes are ``float64 (N, 4)`` xyxy, pixel-edge, in ORIGINAL image pixels: a one-pixel object at
column c spans [c, c+1]. Two sources give identical boxes, labels and order (sorted by
(label, x1, y1, x2, y2)):

- ``panoptic``: the COCO panoptic JSON (fast, no mask decode). Its ``bbox`` is [x, y, w, h] with
  w = max_col - min_col + 1, so xyxy = [x, y, x + w, y + h]. The convention is not trusted: the
  reader checks it against the instance PNGs of the first images that have objects. A JSON whose
  w is one short is corrected (with a warning); any other disagreement makes ``auto`` fall back
  to the instance PNGs (with a warning) and makes an explicit ``panoptic`` raise.
- ``instances``: the 16-bit instance PNGs (class = value >> 8, one instance per distinct value of
  a thing class). These PNGs carry no crowd flag: ``iscrowd`` is looked up in the panoptic JSON by
  (label, box) when the JSON exists (an image missing from it is then a ``BadSample``), and is 0
  when there is no JSON or it disagrees with the PNGs (with a warning).

A split without labels (``testing``) gets ``source == "none"`` and empty targets.
Input the caller must skip raises ``BadSample`` whose message names the file and the reason.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from mapdet import boxes as box_ops
from mapdet.datasets.layout import (
    VERSIONS,
    config_path,
    detect_version,
    labels_dir,
    load_classes,
    not_evaluated_classes,
    panoptic_json_path,
)
from mapdet.datasets.sample_files import (
    BadSample,
    RawSample,
    check_mask_header,
    image_size,
    read_instance_png,
    value_boxes,
)

SOURCES = ("auto", "panoptic", "instances")
_CHECK_IMAGES = 2  # images with objects compared when checking the JSON bbox convention


def _canonical(boxes, labels, iscrowd=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted by (label, x1, y1, x2, y2, iscrowd): the same order whichever source read them."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    labels = np.asarray(labels, np.int64)
    iscrowd = np.zeros(len(labels), np.uint8) if iscrowd is None else np.asarray(iscrowd, np.uint8)
    order = np.lexsort((iscrowd, boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], labels))
    return boxes[order], labels[order], iscrowd[order]


class VistasReader:
    """Boxes of one split, one image at a time; see the module docstring for sources and checks.

    Build it before forking worker processes: the parsed panoptic JSON is then shared.
    """

    def __init__(
        self, root, split: str, version: str | None = None, source: str = "auto", class_set: str = "evaluated"
    ):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        self.root = Path(root)
        self.split = split
        self.version = version or detect_version(self.root)
        if self.version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {self.version!r}")
        self.image_dir = self.root / split / "images"
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f"{self.image_dir} not found: is {split!r} a split of {self.root}?")
        self.class_set = class_set
        self.classes, self.label_names = load_classes(config_path(self.root, self.version), class_set)
        # instance classes that Vistas does not evaluate, and those of them left out of the class set
        not_evaluated = not_evaluated_classes(config_path(self.root, self.version))
        self.not_evaluated = [name for _, name in not_evaluated]
        kept = {c.config_index for c in self.classes}
        self._left_out = {i: name for i, name in not_evaluated if i not in kept}  # config index -> name
        self.num_labels = len(self.label_names)
        self._class_of_index = np.zeros(self.num_labels, np.int64)  # config index -> 1..K, 0 = stuff or left out
        for c in self.classes:
            self._class_of_index[c.config_index] = c.id
        self.instance_dir = labels_dir(self.root, split, self.version, "instances")
        self.panoptic_dir = labels_dir(self.root, split, self.version, "panoptic")
        self.json_path = panoptic_json_path(self.root, split, self.version)
        self._segments, self._category_index = self._load_panoptic() if self.json_path.exists() else ({}, {})
        self._wh_offset = 0  # added to the JSON's w and h when it uses w = max_col - min_col
        self.source = self._choose_source(source)
        self.nothing_to_pack = f"{self.image_dir} holds no .jpg images: nothing to pack"

    def stems(self) -> list[str]:
        return sorted(p.stem for p in self.image_dir.glob("*.jpg"))

    keys = stems  # the packer's name: sample keys are the image stems, in this order

    def plan(self) -> dict:
        """What the pack plan records about this input (a resume must find the same)."""
        return {
            "version": self.version,
            "source": self.source,
            "class_set": self.class_set,
            "classes": [{"id": c.id, "name": c.name} for c in self.classes],
            "not_evaluated": self.not_evaluated,  # instance classes Vistas does not evaluate
        }

    def read(self, stem: str) -> RawSample:
        image_path = self.image_dir / f"{stem}.jpg"
        width, height = image_size(image_path)
        left_out: dict = {}
        if self.source == "panoptic":
            boxes, labels, iscrowd = self._panoptic_targets(stem, (width, height), left_out)
        elif self.source == "instances":
            boxes, labels, iscrowd = self._instance_targets(stem, (width, height), left_out=left_out)
        else:
            boxes, labels, iscrowd = np.zeros((0, 4)), np.zeros(0, np.int64), np.zeros(0, np.uint8)
        boxes, labels, iscrowd = _canonical(boxes, labels, iscrowd)
        return RawSample(stem, image_path, width, height, boxes, labels, iscrowd, left_out)

    def _count_left_out(self, index: np.ndarray, left_out: dict | None) -> None:
        """Add the objects of left-out instance classes among config indices ``index`` to ``left_out``."""
        if left_out is None or not self._left_out:
            return
        for i in index.tolist():
            if i in self._left_out:
                name = self._left_out[i]
                left_out[name] = left_out.get(name, 0) + 1

    # -- which source ---------------------------------------------------------------------------
    def _choose_source(self, source: str) -> str:
        has_json, has_png = self.json_path.exists(), self.instance_dir.is_dir()
        if source == "panoptic" and not has_json:
            raise FileNotFoundError(f"{self.json_path} not found (source='panoptic')")
        if source == "instances" and not has_png:
            raise FileNotFoundError(f"{self.instance_dir} not found (source='instances')")
        chosen = source if source != "auto" else "panoptic" if has_json else "instances" if has_png else "none"
        if not (has_json and has_png):
            return chosen
        # Both exist: the JSON gives the boxes (panoptic) or the crowd flags (instances, matched by
        # box), so its bbox convention must agree with the PNGs either way.
        offset, problem = self._check_json_convention()
        if problem is None:
            self._wh_offset = offset
            if offset:
                warnings.warn(
                    f"{self.json_path}: bbox w/h are max - min (one short of the pixel "
                    "count); adding 1 to match the instance PNGs",
                    stacklevel=2,
                )
            return chosen
        if source == "panoptic":
            raise ValueError(f"{problem}; read with source='instances'")
        self._segments = {}
        warnings.warn(f"{problem}; reading boxes from the instance PNGs instead, with iscrowd = 0", stacklevel=2)
        return "instances"

    def _check_json_convention(self, max_tries: int = 50) -> tuple[int, str | None]:
        """Compare JSON and instance-PNG boxes on the first images with objects.

        Returns (w/h offset the JSON needs: 0 or 1, None) or (0, a description of the mismatch).
        """
        offsets, checked = set(), 0
        for stem in self.stems()[:max_tries]:
            try:
                size = image_size(self.image_dir / f"{stem}.jpg")
                index, json_boxes, _ = self._thing_segments(stem)
                png = _canonical(*self._instance_targets(stem, size, crowd=False)[:2])
            except BadSample:
                continue
            if len(png[0]) == 0:
                continue
            labels = self._class_of_index[index]
            fits = [k for k in (0, 1) if _same(_canonical(json_boxes + [0, 0, k, k], labels), png)]
            if not fits:
                return 0, (
                    f"{self.json_path}: boxes of image {stem} disagree with {self.instance_dir / (stem + '.png')}"
                )
            offsets.add(fits[0])
            if len(offsets) > 1:
                return 0, f"{self.json_path}: bbox convention differs between images"
            checked += 1
            if checked == _CHECK_IMAGES:
                break
        return (offsets.pop() if offsets else 0), None

    # -- panoptic JSON ------------------------------------------------------------------------
    def _load_panoptic(self) -> tuple[dict, dict]:
        try:
            data = json.loads(self.json_path.read_text())
            segments = {Path(a["file_name"]).stem: a["segments_info"] for a in data["annotations"]}
            categories = data["categories"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{self.json_path}: not a COCO panoptic JSON ({e!r})") from e
        names = {name: i for i, name in enumerate(self.label_names)}
        index = {}
        for cat in categories:
            # Long "a--b--c" names sit in supercategory (2018) or name; else id = config index + 1.
            by_name = [names[n] for n in (cat.get("supercategory"), cat.get("name")) if n in names]
            fallback = cat["id"] - 1 if 1 <= cat["id"] <= self.num_labels else None
            index[cat["id"]] = by_name[0] if by_name else fallback
        return segments, index

    def _thing_segments(self, stem: str, left_out: dict | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(config_index, xyxy boxes, iscrowd) of the thing segments the JSON lists for ``stem``.

        Segments of left-out instance classes are counted into ``left_out`` (name -> n).
        """
        if stem not in self._segments:
            raise BadSample(f"{self.json_path}: no entry for image {stem}")
        rows, dropped = [], []
        for seg in self._segments[stem]:
            try:
                index = self._category_index.get(seg["category_id"])
                if index is None:
                    raise BadSample(
                        f"{self.json_path}: image {stem} segment {seg['id']} has unknown "
                        f"category_id {seg['category_id']}"
                    )
                if index in self._left_out:
                    dropped.append(index)
                if self._class_of_index[index]:
                    x, y, w, h = (float(v) for v in seg["bbox"])
                    rows.append((index, x, y, w, h, float(seg["area"]), int(seg.get("iscrowd", 0)), seg["id"]))
            except (KeyError, TypeError, ValueError) as e:
                raise BadSample(f"{self.json_path}: image {stem} has a malformed segment {seg!r} ({e!r})") from e
        self._count_left_out(np.asarray(dropped, np.int64), left_out)
        rows = np.asarray(rows, np.float64).reshape(-1, 8)
        w, h = rows[:, 3] + self._wh_offset, rows[:, 4] + self._wh_offset
        bad = (w <= 0) | (h <= 0) | (rows[:, 5] <= 0)
        if bad.any():
            raise BadSample(
                f"{self.json_path}: image {stem} segment {int(rows[bad, 7][0])} has zero area "
                "or a box of non-positive size"
            )
        boxes = box_ops.xywh_to_xyxy(np.stack([rows[:, 1], rows[:, 2], w, h], 1))
        return rows[:, 0].astype(np.int64), boxes, rows[:, 6].astype(np.uint8)

    def _panoptic_targets(self, stem: str, size: tuple[int, int], left_out: dict | None = None):
        png = self.panoptic_dir / f"{stem}.png"
        check_mask_header(png, size)
        index, boxes, iscrowd = self._thing_segments(stem, left_out)
        if len(boxes) and ((boxes[:, :2] < 0).any() or (boxes[:, 2:] > size).any()):
            raise BadSample(f"{self.json_path}: image {stem} has a box outside the {size[0]}x{size[1]} image")
        return boxes, self._class_of_index[index], iscrowd

    # -- instance PNG -------------------------------------------------------------------------
    def _instance_targets(self, stem: str, size: tuple[int, int], crowd: bool = True, left_out: dict | None = None):
        png = self.instance_dir / f"{stem}.png"
        values_map = read_instance_png(png, size)
        values, boxes, _ = value_boxes(values_map)
        index = values >> 8
        if (index >= self.num_labels).any():
            raise BadSample(f"{png}: label index {int(index.max())} is not in the config's {self.num_labels} labels")
        self._count_left_out(index, left_out)
        keep = self._class_of_index[index] > 0
        boxes, labels = boxes[keep], self._class_of_index[index[keep]]
        iscrowd = self._crowd_flags(stem, index[keep], boxes) if crowd else np.zeros(len(boxes), np.uint8)
        return boxes, labels, iscrowd

    def _crowd_flags(self, stem: str, index: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """iscrowd of each instance, matched to the JSON's segments by (label, box); 0 without JSON."""
        if not self._segments:  # no JSON, or one that disagrees with the PNGs
            return np.zeros(len(boxes), np.uint8)
        seg_index, seg_boxes, seg_crowd = self._thing_segments(stem)
        crowd = {(i, *b): c for i, b, c in zip(seg_index.tolist(), seg_boxes.tolist(), seg_crowd.tolist())}
        return np.array([crowd.get((i, *b), 0) for i, b in zip(index.tolist(), boxes.tolist())], np.uint8)


def _same(a: tuple, b: tuple) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b))
