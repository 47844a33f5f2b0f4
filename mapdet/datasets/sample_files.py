"""One raw image as a dataset reader hands it to the packer (``RawSample``), its files read without
trusting them, and ``BadSample`` for those that fail.

``image_size`` reads an image's (width, height) from its header and checks that a JPEG's
end-of-image marker is there (no decode; another format is checked by PIL's ``verify``);
``check_mask_header`` checks a label PNG exists and has the image's size; ``read_instance_png``
decodes a 16-bit instance PNG to an (H, W) map of values 0..65535 (config index * 256 + instance).
``value_boxes`` gives each distinct value of such a map its box: float64 (V, 4) xyxy pixel-edge in
the map's pixels (a one-pixel object at column c spans [c, c+1]). Every failure raises ``BadSample``
naming the file and the reason; the readers (``mapdet.datasets.vistas``, ``mapdet.datasets.coco``)
raise it too, for faults in their JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


class BadSample(Exception):
    """Input the packer must skip and count; ``str(e)`` names the file and the reason."""


@dataclass
class RawSample:
    """One image and its objects, as a reader (Vistas or COCO JSON) gives them to the packer."""

    key: str  # the sample's key in the shards (a Vistas stem; a COCO image id as text)
    image_path: Path
    width: int  # of the original image
    height: int
    boxes: np.ndarray  # float64 (N, 4) xyxy pixel-edge, original image pixels
    labels: np.ndarray  # int64 (N,) in 1..K
    iscrowd: np.ndarray  # uint8 (N,)
    left_out: dict | None = None  # class name -> objects (crowd included) of classes outside the class set
    image_id: int | None = None  # the input's own image id (COCO); None: the packer numbers the images 1..n
    area: np.ndarray | None = None  # float64 (N,) the input's own object areas (COCO), NaN where it has none
    file_name: str | None = None  # the image's name in the input (COCO ``file_name``); None: image_path.name

    def __post_init__(self):
        if self.file_name is None:
            self.file_name = Path(self.image_path).name


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, plus a cheap truncation check (no decode)."""
    try:
        with Image.open(path) as im:
            size, jpeg = im.size, im.format == "JPEG"
            if not jpeg:
                im.verify()  # PNG and others: chunk checksums, also no pixel decode
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 1024))
            tail = f.read()
    except (OSError, ValueError, SyntaxError) as e:
        raise BadSample(f"{path}: unreadable image ({e})") from e
    # 0xFFD9 only occurs as the end-of-image marker in entropy-coded data (0xFF is byte-stuffed).
    if jpeg and b"\xff\xd9" not in tail:
        raise BadSample(f"{path}: truncated JPEG (no end-of-image marker)")
    return size


def check_mask_header(path: Path, size: tuple[int, int]) -> None:
    """A mask exists and has the image's size (header only, no decode)."""
    try:
        with Image.open(path) as im:
            mask_size = im.size
    except (OSError, ValueError) as e:
        raise BadSample(f"{path}: unreadable mask ({e})") from e
    if mask_size != size:
        raise BadSample(f"{path}: mask is {mask_size[0]}x{mask_size[1]} but the image is {size[0]}x{size[1]}")


def read_instance_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    """The 16-bit instance map (H, W), values 0..65535; never through an 8-bit conversion."""
    check_mask_header(path, size)
    try:
        with Image.open(path) as im:
            if im.mode not in ("I;16", "I;16B", "I"):
                raise BadSample(f"{path}: instance PNG has mode {im.mode}, expected 16-bit")
            values = np.asarray(im)
    except (OSError, ValueError, SyntaxError) as e:
        raise BadSample(f"{path}: unreadable mask ({e})") from e
    if values.min() < 0 or values.max() > 65535:
        raise BadSample(f"{path}: instance values outside 0..65535")
    return values


def value_boxes(values_map: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct values of an integer map (H, W), their pixel-edge xyxy boxes (V, 4) and areas (V,).

    One pass of bincount per axis instead of one mask per value: cost O(H*W), not O(V*H*W).
    """
    h, w = values_map.shape
    counts = np.bincount(values_map.ravel(), minlength=1)
    values = np.flatnonzero(counts)
    lut = np.zeros(counts.size, np.int64)
    lut[values] = np.arange(values.size)
    compact = lut[values_map]
    in_col = np.bincount((compact * w + np.arange(w)).ravel(), minlength=values.size * w)
    in_row = np.bincount((compact * h + np.arange(h)[:, None]).ravel(), minlength=values.size * h)
    in_col = in_col.reshape(values.size, w) > 0
    in_row = in_row.reshape(values.size, h) > 0
    x1, x2 = in_col.argmax(1), w - in_col[:, ::-1].argmax(1)
    y1, y2 = in_row.argmax(1), h - in_row[:, ::-1].argmax(1)
    return values, np.stack([x1, y1, x2, y2], 1).astype(np.float64), counts[values]
