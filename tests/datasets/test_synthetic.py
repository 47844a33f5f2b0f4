"""The synthetic Vistas generator: layout, encodings agree, determinism, Vistas-likeness, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mapdet.datasets.synthetic import scene, shapes
from mapdet.datasets.synthetic.classes import STUFF, THINGS, label_table
from mapdet.datasets.synthetic.writer import SynthConfig, synthesize

SMALL = SynthConfig(size=(160, 120))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _panoptic(root: Path, split: str, version: str) -> dict:
    name = {"v2.0": "panoptic_2020.json", "v1.2": "panoptic_2018.json"}[version]
    return json.loads((root / split / version / "panoptic" / name).read_text())


@pytest.fixture(scope="module", params=["v1.2", "v2.0"])
def small(request, tmp_path_factory):
    version = request.param
    root = synthesize(tmp_path_factory.mktemp(version) / "raw", version, n_train=8, n_val=3, seed=1, cfg=SMALL)
    return root, version


@pytest.fixture(scope="module")
def likeness(tmp_path_factory):
    """300 training images at 256x192: enough for the frequency claims, a few seconds to write."""
    root = synthesize(
        tmp_path_factory.mktemp("like") / "raw", "v2.0", n_train=300, n_val=0, seed=0, cfg=SynthConfig(size=(256, 192))
    )
    pan = _panoptic(root, "training", "v2.0")
    thing_ids = {c["id"] for c in pan["categories"] if c["isthing"]}
    per_image = [[s for s in a["segments_info"] if s["category_id"] in thing_ids] for a in pan["annotations"]]
    return pan, thing_ids, per_image


def test_layout_and_config(small):
    root, version = small
    config = json.loads((root / f"config_{version}.json").read_text())
    assert config["version"] == version
    names = [lab["name"] for lab in config["labels"]]
    assert names == sorted(names) and len(set(names)) == len(names)
    things = [lab["name"] for lab in config["labels"] if lab["instances"]]
    assert len(things) == 12 and "object--support--pole" in things
    assert "object--vehicle--on-rails" in names and "object--vehicle--on-rails" not in things
    assert ("human--person--individual" in things) == (version == "v2.0")
    for split, n in (("training", 8), ("validation", 3)):
        stems = sorted(p.stem for p in (root / split / "images").glob("*.jpg"))
        assert len(stems) == n and all(len(s) == 22 for s in stems)
        for kind in ("labels", "instances", "panoptic"):
            assert sorted(p.stem for p in (root / split / version / kind).glob("*.png")) == stems
        pan = _panoptic(root, split, version)
        assert sorted(a["image_id"] for a in pan["annotations"]) == stems
        assert [c["id"] for c in pan["categories"]] == list(range(1, len(names) + 1))
        assert [c["supercategory"] for c in pan["categories"]] == names


def test_encodings_agree(small):
    """Label PNG = instance >> 8; each JSON segment's area and bbox are those of its panoptic pixels."""
    root, version = small
    pan = _panoptic(root, "training", version)
    for ann in pan["annotations"]:
        stem = ann["image_id"]
        d = root / "training" / version
        label_png, inst_png = Image.open(d / "labels" / f"{stem}.png"), Image.open(d / "instances" / f"{stem}.png")
        assert (label_png.mode, inst_png.mode) == ("P", "I;16")
        label, inst = np.asarray(label_png), np.asarray(inst_png).astype(np.int64)
        rgb = np.asarray(Image.open(d / "panoptic" / f"{stem}.png")).astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        assert np.array_equal(inst >> 8, label)
        assert Image.open(root / "training" / "images" / f"{stem}.jpg").size == label_png.size
        for seg in ann["segments_info"]:
            mask = ids == seg["id"]
            ys, xs = np.nonzero(mask)
            assert seg["area"] == mask.sum() > 0
            assert seg["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            values = np.unique(inst[mask])
            assert len(values) == 1 and values[0] >> 8 == seg["category_id"] - 1
            assert np.array_equal(inst == values[0], mask)  # one instance value <-> one segment


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = _files(synthesize(tmp_path / "a", "v2.0", n_train=3, n_val=1, seed=5, cfg=SMALL))
    b = _files(synthesize(tmp_path / "b", "v2.0", n_train=3, n_val=1, seed=5, cfg=SMALL))
    c = _files(synthesize(tmp_path / "c", "v2.0", n_train=3, n_val=1, seed=6, cfg=SMALL))
    assert a == b
    images = lambda files: {k: v for k, v in files.items() if k.endswith(".jpg")}  # noqa: E731
    assert not set(images(a).values()) & set(images(c).values())
    # image i depends only on (seed, split, i): a longer run starts with the same images
    longer = _files(synthesize(tmp_path / "d", "v2.0", n_train=5, n_val=1, seed=5, cfg=SMALL))
    assert set(images(a).items()) <= set(images(longer).items())
    # worker processes draw the same files, the panoptic JSON included (its order is the index order)
    assert _files(synthesize(tmp_path / "e", "v2.0", n_train=3, n_val=1, seed=5, cfg=SMALL, workers=2)) == a


def test_refuses_existing_dataset_unless_overwrite(tmp_path):
    synthesize(tmp_path, "v1.2", n_train=3, n_val=1, seed=0, cfg=SMALL)
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize(tmp_path, "v1.2", n_train=1, n_val=1, seed=0, cfg=SMALL)
    synthesize(tmp_path, "v2.0", n_train=1, n_val=0, seed=0, cfg=SMALL, overwrite=True)
    assert not (tmp_path / "config_v1.2.json").exists()
    assert len(list((tmp_path / "training" / "images").glob("*.jpg"))) == 1


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown classes"):
        synthesize(tmp_path / "a", cfg=SynthConfig(class_shares={"object--boat": 0.5}))
    with pytest.raises(ValueError, match="too small"):
        synthesize(tmp_path / "b", cfg=SynthConfig(size=(8, 8)))
    with pytest.raises(ValueError, match="version"):
        synthesize(tmp_path / "c", version="v3.0")


def test_class_share_override(tmp_path):
    cfg = SynthConfig(size=(96, 72), class_shares={"object--vehicle--caravan": 1.0}, empty_share=0, dense_share=0)
    root = synthesize(tmp_path, "v1.2", n_train=6, n_val=0, seed=0, cfg=cfg)
    pan = _panoptic(root, "training", "v1.2")
    caravan = next(c["id"] for c in pan["categories"] if c["supercategory"] == "object--vehicle--caravan")
    with_caravan = [any(s["category_id"] == caravan for s in a["segments_info"]) for a in pan["annotations"]]
    assert sum(with_caravan) >= 5  # drawn in every image; at most one may be hidden by nearer objects


def test_long_tail(likeness):
    pan, thing_ids, per_image = likeness
    n = len(per_image)
    share = {c: sum(any(s["category_id"] == c for s in segs) for segs in per_image) / n for c in thing_ids}
    frequent = [c for c, s in share.items() if s > 0.5]
    rare = [c for c, s in share.items() if 0 < s < 0.03]
    assert len(frequent) >= 2, share
    assert len(rare) >= 3, share
    assert all(s > 0 for s in share.values()), share


def test_empty_dense_crowd_and_thin(likeness):
    _, _, per_image = likeness
    counts = np.array([len(segs) for segs in per_image])
    assert (counts == 0).sum() >= 3
    assert (counts > 100).sum() >= 1
    assert sum(s["iscrowd"] for segs in per_image for s in segs) >= 10
    boxes = np.array([s["bbox"] for segs in per_image for s in segs if not s["iscrowd"]])
    thin = np.minimum(boxes[:, 2], boxes[:, 3]) <= 4
    assert thin.mean() > 0.2  # poles
    assert boxes[:, 2:].max() >= 100  # and large vehicles


def test_occlusion_boxes_are_visible_pixels():
    """A nearer car hides the bottom of a pole: the pole's box ends where the car starts."""
    cfg = SynthConfig(size=(64, 48))
    pole, car = 0, 1  # indices into THINGS
    assert THINGS[pole].draw is shapes.pole and THINGS[car].draw is shapes.car
    hidden = scene._Planned(pole, 20, 32, 8, 3, 0)  # painted before the car, which covers it entirely
    planned = [scene._Planned(pole, 10, 5, 40, 4, 0), hidden, scene._Planned(car, 0, 30, 18, 40, 0)]
    rng = np.random.default_rng(0)
    objects, _, drawn = scene._paint(rng, planned, 64, 48)
    objects, kept = scene._drop_hidden(objects, planned, drawn, cfg)
    assert [p.thing for p in kept] == [pole, car]
    ys, xs = np.nonzero(objects == 1)
    assert (xs.min(), xs.max() + 1, ys.min()) == (10, 14, 5)
    assert ys.max() + 1 < 45  # drawn to row 45, visible only down to the car's top edge


def test_cli_writes_layout(tmp_path):
    out = tmp_path / "raw"
    cmd = [
        sys.executable,
        "-m",
        "mapdet",
        "synth",
        str(out),
        "--version",
        "v1.2",
        "--train",
        "2",
        "--val",
        "1",
        "--size",
        "64x48",
        "--seed",
        "3",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "wrote 2 training + 1 validation" in done.stdout
    assert (out / "config_v1.2.json").exists()
    assert len(list((out / "training" / "v1.2" / "instances").glob("*.png"))) == 2
    assert (out / "validation" / "v1.2" / "panoptic" / "panoptic_2018.json").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    bad = subprocess.run(cmd[:4] + ["--size", "64"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "WxH" in bad.stderr


@pytest.mark.parametrize("version", ["v1.2", "v2.0"])
def test_label_table_lists_each_release_its_own_labels(version):
    v = int(version == "v2.0")
    table = label_table(version)
    names = [n[v] for n, _, _, _ in table]
    assert None not in names and len(set(names)) == len(names)
    assert [n for (n, _, _, thing) in table if thing] == [t.names for t in THINGS]
    groups = {"human--person--person-group", "object--vehicle--vehicle-group"}  # stuff only v2.0 has
    assert groups & set(names) == (groups if version == "v2.0" else set())
    assert len(table) == len(THINGS) + sum(spec[0][v] is not None for spec in STUFF.values())
