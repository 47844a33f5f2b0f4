"""Images with their detections drawn, written as PNG or JPEG files (``mapdet predict --draw``).

``DrawnImages`` is an ``engine.predict`` ``on_batch`` callback: for each image of a batch (uint8
(3, H, W) as read) it draws the detections (boxes xyxy pixel-edge in that image's own frame, so they
land on the pixels they cover) scoring at least ``thresh``, each captioned "class score" by
``tracking.draw``, and writes ``OUT/<name>.<fmt>`` at the image's own size. Every image gets a file,
also one without detections, so the folder shows what was looked at. Each rank draws its own share.
"""

from __future__ import annotations

import collections
from pathlib import Path, PurePosixPath

import torchvision

from mapdet.tracking import draw

FORMATS = ("png", "jpg")


def output_names(keys: list[str], fmt: str, strip_suffix: bool) -> dict[str, str]:
    """key -> drawn file name (relative, POSIX): the key with its suffix replaced (``strip_suffix``,
    folder input: ``a/b.jpeg`` -> ``a/b.png``) or extended (shard keys are stems).

    Raises ValueError when two keys would be drawn to one file (``x.jpg`` and ``x.png``).
    """
    names = {k: (str(PurePosixPath(k).with_suffix("")) if strip_suffix else k) + f".{fmt}" for k in keys}
    clashes = [n for n, c in collections.Counter(names.values()).items() if c > 1]
    if clashes:
        sources = sorted(k for k, n in names.items() if n in set(clashes))
        raise ValueError(
            f"--draw: {len(clashes)} drawn file name(s) would be shared by several images "
            f"({', '.join(sources[:6])}); rename those images or predict them without --draw"
        )
    return names


class DrawnImages:
    def __init__(self, out: str | Path, names: dict[str, str], classes: dict[int, str], thresh: float):
        self.out, self.names, self.classes, self.thresh = Path(out), names, classes, thresh

    def __call__(self, batch, detections) -> None:
        for image, target, d in zip(batch.images, batch.targets, detections):
            keep = d.scores >= self.thresh
            # one-pixel lines vanish on a 2048-pixel image viewed whole
            width = max(1, round(max(image.shape[1:]) / 640))
            canvas = draw(image, d.boxes[keep], d.labels[keep], self.classes, d.scores[keep], width=width)
            path = self.out / self.names[target["key"]]
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".png":
                torchvision.io.write_png(canvas, str(path))
            else:
                torchvision.io.write_jpeg(canvas, str(path), quality=90)
