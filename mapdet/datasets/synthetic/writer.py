"""Synthetic street scenes written in the exact raw Mapillary Vistas layout (v1.2 or v2.0).

``synthesize(out, version, n_train, n_val, seed, cfg)`` writes, under ``out``:
``config_{version}.json`` (stuff and thing labels with Vistas names, plus ``"version"``), and per
split (training, validation) ``images/*.jpg``, ``{version}/labels/*.png`` (8-bit palette, pixel =
config index), ``{version}/instances/*.png`` (16-bit, index * 256 + instance), ``{version}/panoptic/*.png``
(RGB segment id = R + 256 G + 65536 B) and the COCO panoptic JSON (``panoptic_2018.json`` for
v1.2, ``panoptic_2020.json`` for v2.0; category id = config index + 1, supercategory = long name,
bbox [x, y, w, h] with w = max_col - min_col + 1). Polygons (optional in v2.0) are not written.

The scenes mimic what makes Vistas hard while staying learnable: each thing class has its own
shape, colour and texture (``mapdet.datasets.synthetic.shapes``); class frequencies are long-tailed (poles
and cars in most images, four classes in under 3 %); poles are thin; some images are empty, a few
are dense (> 100 objects); some segments are crowds (``iscrowd`` = 1). Objects are painted far to
near, so later ones occlude earlier ones; every box and area is measured on the final masks.

Image i of a split depends only on (seed, split, i): same seed, byte-identical files, whatever the
number of worker processes drawing them (``workers``).
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from mapdet.datasets.layout import PANOPTIC_JSON, config_path, labels_dir
from mapdet.datasets.synthetic import scene
from mapdet.datasets.synthetic.classes import THINGS, label_table

SPLITS = ("training", "validation")


@dataclass
class SynthConfig:
    """Knobs of the generator; sizes are fractions of the image height unless marked px."""

    size: tuple[int, int] = (512, 384)  # image width, height in px
    object_scale: float = 1.0  # multiplies every object size
    min_side: int = 3  # px: no object is drawn thinner than this (thin poles)
    max_objects: int = 40  # cap per ordinary image
    empty_share: float = 0.05  # images with no objects
    dense_share: float = 0.03  # images with dense_objects drawn (> 100 survive occlusion)
    dense_objects: tuple[int, int] = (150, 200)
    dense_scale: float = 0.6  # objects in dense images are smaller
    crowd_share: float = 0.15  # ordinary images with one crowd segment (a group of 3-6 members)
    min_visible: float = 0.3  # an object with less of its drawn area visible is removed
    min_pixels: int = 6  # ... and so is one with fewer visible pixels
    noise_std: float = 6.0  # per-pixel Gaussian noise on the whole image
    jpeg_quality: int = 90
    class_shares: dict[str, float] = field(default_factory=dict)  # thing name (v1.2 or v2.0) -> share
    # Thing names (v1.2 or v2.0) written with "evaluate": false, as real v2.0 does for its two ambiguous
    # sign classes (which the generator does not draw): instance classes Vistas does not evaluate.
    not_evaluated: tuple[str, ...] = ()


def config_labels(version: str, not_evaluated=()) -> list[dict]:
    """The config's label list for ``version``: Vistas names sorted, as in the real releases.

    Every label but ``void--*`` and the things named in ``not_evaluated`` has ``"evaluate": true``.
    """
    skip = set(not_evaluated)
    labels = [
        {
            "name": names[version == "v2.0"],
            "readable": readable,
            "instances": thing,
            "evaluate": not names[1].startswith("void--") and not skip & set(names),
            "color": list(color),
        }
        for names, readable, color, thing in label_table(version)
    ]
    return sorted(labels, key=lambda lab: lab["name"])


def synthesize(
    out,
    version: str = "v2.0",
    n_train: int = 20,
    n_val: int = 5,
    seed: int = 0,
    cfg: SynthConfig | None = None,
    progress: bool = False,
    overwrite: bool = False,
    workers: int = 1,
) -> Path:
    """Write a synthetic Vistas release under ``out`` (see the module docstring); returns ``out``.

    An ``out`` that already holds a dataset is refused, or with ``overwrite`` its config files and
    split folders are deleted first (stale images would otherwise be read as unlabelled input).
    ``workers`` > 1 draws and writes images in that many processes (the same files).
    """
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if version not in PANOPTIC_JSON:
        raise ValueError(f"version must be one of {sorted(PANOPTIC_JSON)}, got {version!r}")
    cfg = cfg or SynthConfig()
    _check(cfg)
    out = Path(out)
    _clear(out, overwrite)
    labels = config_labels(version, cfg.not_evaluated)
    config = {"labels": labels, "version": version, "mapdet_synthetic": {"seed": seed, "size": list(cfg.size)}}
    config_path(out, version).write_text(json.dumps(config, indent=1))
    palette = _palette(labels)
    stems: set[str] = set()
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        with tqdm(total=n_train + n_val, desc=f"synth {version}", unit="img", disable=not progress) as bar:
            for split_no, (split, count) in enumerate(zip(SPLITS, (n_train, n_val))):
                _write_split(out, split, version, count, seed, split_no, cfg, labels, palette, stems, bar, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return out


def _write_split(out, split, version, count, seed, split_no, cfg, labels, palette, stems, bar, pool) -> None:
    dirs = {kind: labels_dir(out, split, version, kind) for kind in ("labels", "instances", "panoptic")}
    dirs["images"] = out / split / "images"
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    draw = partial(_draw_one, dirs, seed, split_no, cfg, labels, palette, version)
    images, annotations = [], []
    # Results come back in index order, so the JSON is the same with any number of workers.
    for image, annotation in pool.map(draw, range(count), chunksize=4) if pool else map(draw, range(count)):
        stem = image["id"]
        if stem in stems:  # a stem is drawn from the image's own generator: check across images here
            raise RuntimeError(f"stem {stem} drawn twice; choose another seed")
        stems.add(stem)
        images.append(image)
        annotations.append(annotation)
        bar.update()
    categories = [
        {
            "id": i + 1,
            "name": lab["readable"],
            "supercategory": lab["name"],
            "isthing": int(lab["instances"]),
            "color": lab["color"],
        }
        for i, lab in enumerate(labels)
    ]
    panoptic = {"images": images, "annotations": annotations, "categories": categories}
    (dirs["panoptic"] / PANOPTIC_JSON[version]).write_text(json.dumps(panoptic))


def _draw_one(dirs, seed, split_no, cfg, labels, palette, version, i: int) -> tuple[dict, dict]:
    """Draw and write image ``i`` of a split; its panoptic JSON entries (image, annotation)."""
    rng = np.random.default_rng([seed, split_no, i])
    stem = _stem(rng)
    names = [lab["name"] for lab in labels]
    void_of = np.array([lab["name"].startswith("void--") for lab in labels])
    sample = scene.render(rng, cfg, names, version)
    segments, pan = scene.panoptic(rng, sample, void_of)
    _write_sample(dirs, stem, sample, pan, palette, cfg.jpeg_quality)
    h, w = sample.label.shape
    image = {"id": stem, "file_name": f"{stem}.jpg", "width": w, "height": h}
    return image, {"image_id": stem, "file_name": f"{stem}.png", "segments_info": segments}


def _write_sample(dirs, stem, sample, pan, palette, quality) -> None:
    Image.fromarray(sample.rgb).save(dirs["images"] / f"{stem}.jpg", quality=quality)
    label = Image.fromarray(sample.label, mode="P")
    label.putpalette(palette)
    label.save(dirs["labels"] / f"{stem}.png")
    Image.fromarray(sample.instance).save(dirs["instances"] / f"{stem}.png")
    rgb = np.stack([pan & 255, (pan >> 8) & 255, pan >> 16], -1).astype(np.uint8)
    Image.fromarray(rgb).save(dirs["panoptic"] / f"{stem}.png")


def _clear(out: Path, overwrite: bool) -> None:
    ours = [*out.glob("config_v*.json"), *(out / split for split in SPLITS if (out / split).exists())]
    if ours and not overwrite:
        raise FileExistsError(
            f"{out} already holds a dataset ({ours[0].name}); use --overwrite "
            "(overwrite=True) or choose an empty folder"
        )
    for path in ours:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _check(cfg: SynthConfig) -> None:
    known = {name for t in THINGS for name in t.names}
    unknown = sorted(set(cfg.class_shares) - known)
    if unknown:
        raise ValueError(f"class_shares names unknown classes {unknown}; known: {sorted(known)}")
    unknown = sorted(set(cfg.not_evaluated) - known)
    if unknown:
        raise ValueError(f"not_evaluated names unknown classes {unknown}; known: {sorted(known)}")
    if min(cfg.size) < 16:
        raise ValueError(f"size {cfg.size[0]}x{cfg.size[1]} is too small; use at least 16x16")


def _palette(labels: list[dict]) -> list[int]:
    flat = [c for lab in labels for c in lab["color"]]
    return flat + [0] * (768 - len(flat))


def _stem(rng: np.random.Generator) -> str:
    # Real Vistas stems are 22 URL-safe base64 characters.
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
    return "".join(rng.choice(alphabet, 22))
