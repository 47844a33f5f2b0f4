"""The raw Vistas reader: classes, both box sources agree, conventions, every BadSample case."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mapdet.datasets.layout import detect_version, panoptic_json_path
from mapdet.datasets.sample_files import BadSample
from mapdet.datasets.synthetic.writer import SynthConfig, synthesize
from mapdet.datasets.vistas import VistasReader


@pytest.fixture(scope="module", params=["v1.2", "v2.0"])
def raw(request, tmp_path_factory) -> Path:
    return synthesize(
        tmp_path_factory.mktemp(request.param) / "raw",
        request.param,
        n_train=10,
        n_val=3,
        seed=2,
        cfg=SynthConfig(size=(160, 120)),
    )


@pytest.fixture
def damaged(tmp_path, raw) -> Path:
    dst = tmp_path / "raw"
    shutil.copytree(raw, dst)
    return dst


def _config(root: Path) -> list[dict]:
    return json.loads(next(root.glob("config_v*.json")).read_text())["labels"]


def _edit_json(root: Path, version: str, edit) -> None:
    path = panoptic_json_path(root, "training", version)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _same(a, b) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("boxes", "labels", "iscrowd"))


def test_classes_are_config_things_numbered_in_order(raw):
    reader = VistasReader(raw, "training")
    labels = _config(raw)
    things = [i for i, lab in enumerate(labels) if lab["instances"]]
    assert [c.config_index for c in reader.classes] == things
    assert [c.id for c in reader.classes] == list(range(1, len(things) + 1))
    assert [c.name for c in reader.classes] == [labels[i]["name"] for i in things]
    assert reader.source == "panoptic" and (raw / f"config_{reader.version}.json").exists()


def test_counts_and_no_stuff(raw):
    reader = VistasReader(raw, "training")
    version = reader.version
    pan = json.loads(panoptic_json_path(raw, "training", version).read_text())
    things = {c["id"] for c in pan["categories"] if c["isthing"]}
    expected = {a["image_id"]: sum(s["category_id"] in things for s in a["segments_info"]) for a in pan["annotations"]}
    stems = reader.stems()
    assert stems == sorted(expected) and len(stems) == 10
    total = 0
    for stem in stems:
        s = reader.read(stem)
        assert len(s.boxes) == len(s.labels) == len(s.iscrowd) == expected[stem]
        assert s.boxes.dtype == np.float64 and s.labels.dtype == np.int64 and s.iscrowd.dtype == np.uint8
        assert ((s.labels >= 1) & (s.labels <= len(reader.classes))).all()
        assert (s.boxes[:, 2:] > s.boxes[:, :2]).all() and (s.boxes[:, 2:] <= [s.width, s.height]).all()
        assert (s.width, s.height) == (160, 120)
        total += len(s.labels)
    assert total > 0


def test_panoptic_and_instance_pngs_agree(raw):
    pan, inst = VistasReader(raw, "training"), VistasReader(raw, "training", source="instances")
    assert (pan.source, inst.source) == ("panoptic", "instances")
    crowd = 0
    for stem in pan.stems():
        a, b = pan.read(stem), inst.read(stem)
        assert _same(a, b), stem
        crowd += int(a.iscrowd.sum())
    assert crowd > 0  # iscrowd survives both paths


def test_version_detection(tmp_path, raw):
    assert (raw / f"config_{detect_version(raw)}.json").exists()
    (tmp_path / "config_v1.2.json").write_text("{}")
    assert detect_version(tmp_path) == "v1.2"
    (tmp_path / "config_v2.0.json").write_text("{}")
    assert detect_version(tmp_path) == "v2.0"
    with pytest.raises(FileNotFoundError, match="config_v2.0.json"):
        detect_version(tmp_path / "nothing")


def _tiny(root: Path, values: np.ndarray, bbox: list[int]) -> Path:
    """A hand-made v1.2 release: label 0 sky (stuff), label 1 pole (thing), one image."""
    labels = [
        {"name": "nature--sky", "instances": False, "color": [70, 130, 180]},
        {"name": "object--support--pole", "instances": True, "color": [153, 153, 153]},
    ]
    (root / "training" / "images").mkdir(parents=True)
    (root / "config_v1.2.json").write_text(json.dumps({"labels": labels}))
    h, w = values.shape
    Image.new("RGB", (w, h)).save(root / "training" / "images" / "a.jpg")
    for kind in ("instances", "panoptic"):
        (root / "training" / "v1.2" / kind).mkdir(parents=True)
    Image.fromarray(values.astype(np.uint16)).save(root / "training" / "v1.2" / "instances" / "a.png")
    Image.new("RGB", (w, h)).save(root / "training" / "v1.2" / "panoptic" / "a.png")
    seg = {"id": 7, "category_id": 2, "area": 1, "bbox": bbox, "iscrowd": 0}
    pan = {
        "images": [{"id": "a"}],
        "annotations": [{"image_id": "a", "file_name": "a.png", "segments_info": [seg]}],
        "categories": [
            {"id": 1, "name": "Sky", "supercategory": "nature--sky", "isthing": 0},
            {"id": 2, "name": "Pole", "supercategory": "object--support--pole", "isthing": 1},
        ],
    }
    (root / "training" / "v1.2" / "panoptic" / "panoptic_2018.json").write_text(json.dumps(pan))
    return root


def test_one_pixel_object_spans_one_pixel_edge_unit(tmp_path):
    values = np.zeros((6, 8), np.int64)
    values[2, 5] = 1 * 256 + 1
    root = _tiny(tmp_path, values, [5, 2, 1, 1])
    for source in ("panoptic", "instances"):
        s = VistasReader(root, "training", source=source).read("a")
        assert s.boxes.tolist() == [[5.0, 2.0, 6.0, 3.0]] and s.labels.tolist() == [1]


def test_json_with_max_minus_min_boxes_is_corrected(damaged):
    version = detect_version(damaged)

    def shrink(data):
        for ann in data["annotations"]:
            for seg in ann["segments_info"]:
                seg["bbox"][2] -= 1
                seg["bbox"][3] -= 1

    _edit_json(damaged, version, shrink)
    with pytest.warns(UserWarning, match="adding 1"):
        reader = VistasReader(damaged, "training")
    with pytest.warns(UserWarning, match="adding 1"):
        truth = VistasReader(damaged, "training", source="instances")
    assert reader.source == "panoptic" and truth.source == "instances"
    assert sum(reader.read(stem).iscrowd.sum() for stem in reader.stems()) > 0
    assert all(_same(reader.read(stem), truth.read(stem)) for stem in reader.stems())


def test_json_disagreeing_with_pngs_falls_back_or_raises(damaged):
    version = detect_version(damaged)

    def shift(data):
        for ann in data["annotations"]:
            for seg in ann["segments_info"]:
                seg["bbox"][0] = max(seg["bbox"][0] - 2, 0)

    _edit_json(damaged, version, shift)
    with pytest.warns(UserWarning, match="instance PNGs instead, with iscrowd = 0"):
        reader = VistasReader(damaged, "training")
    assert reader.source == "instances"
    assert sum(reader.read(stem).iscrowd.sum() for stem in reader.stems()) == 0
    with pytest.raises(ValueError, match="source='instances'"):
        VistasReader(damaged, "training", source="panoptic")


def test_split_without_labels_reads_empty(tmp_path, raw):
    (tmp_path / "testing" / "images").mkdir(parents=True)
    shutil.copy(next((raw / "training" / "images").glob("*.jpg")), tmp_path / "testing" / "images" / "t.jpg")
    shutil.copy(next(raw.glob("config_v*.json")), tmp_path)
    reader = VistasReader(tmp_path, "testing")
    s = reader.read("t")
    assert reader.source == "none" and s.boxes.shape == (0, 4) and s.labels.shape == (0,)
    with pytest.raises(FileNotFoundError, match="source='instances'"):
        VistasReader(tmp_path, "testing", source="instances")
    with pytest.raises(ValueError, match="source must be"):
        VistasReader(tmp_path, "testing", source="bogus")
    with pytest.raises(FileNotFoundError, match="split"):
        VistasReader(tmp_path, "nosuchsplit")


def test_thing_label_without_pixels_is_a_class(damaged):
    config = next(damaged.glob("config_v*.json"))
    data = json.loads(config.read_text())
    data["labels"].append({"name": "object--vehicle--boat", "instances": True, "color": [1, 2, 3]})
    config.write_text(json.dumps(data))
    reader = VistasReader(damaged, "training")
    assert reader.classes[-1].name == "object--vehicle--boat" and reader.classes[-1].id == 13
    labels = np.concatenate([reader.read(s).labels for s in reader.stems()])
    assert 13 not in labels and len(labels) > 0


# -- every BadSample case names the file ---------------------------------------------------------


def _first(root: Path, version: str, kind: str, n: int = 0) -> tuple[str, Path]:
    stem = sorted(p.stem for p in (root / "training" / "images").glob("*.jpg"))[n]
    if kind == "images":
        return stem, root / "training" / "images" / f"{stem}.jpg"
    return stem, root / "training" / version / kind / f"{stem}.png"


def _corrupt_jpeg(path: Path) -> None:
    path.write_bytes(b"this is not a jpeg")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _wrong_size(path: Path) -> None:
    im = Image.open(path)
    im.resize((im.width // 2, im.height // 2), Image.NEAREST).save(path)


def _unknown_label(path: Path) -> None:
    values = np.asarray(Image.open(path)).copy()
    values[0, 0] = 200 * 256 + 1  # label index 200: the config has far fewer labels
    Image.fromarray(values).save(path)


def _eight_bit(path: Path) -> None:
    Image.fromarray((np.asarray(Image.open(path)) >> 8).astype(np.uint8)).save(path)


@pytest.mark.parametrize(
    "kind, damage, source, reason",
    [
        ("images", _corrupt_jpeg, "panoptic", "unreadable image"),
        ("images", _truncate, "panoptic", "truncated JPEG"),
        ("images", Path.unlink, "instances", "unreadable image"),
        ("instances", Path.unlink, "instances", "unreadable mask"),
        ("instances", _truncate, "instances", "unreadable mask"),
        ("instances", _wrong_size, "instances", "mask is 80x60 but the image is 160x120"),
        ("instances", _unknown_label, "instances", "label index 200"),
        ("instances", _eight_bit, "instances", "expected 16-bit"),
        ("panoptic", _wrong_size, "panoptic", "mask is 80x60"),
        ("panoptic", Path.unlink, "panoptic", "unreadable mask"),
    ],
)
def test_bad_files_raise_badsample_naming_them(damaged, kind, damage, source, reason):
    version = detect_version(damaged)
    stem, path = _first(damaged, version, kind, n=3)  # not among the images the convention check reads
    reader = VistasReader(damaged, "training", source=source)
    damage(path)
    with pytest.raises(BadSample, match=reason) as e:
        reader.read(stem)
    assert str(path) in str(e.value)
    assert _same(
        reader.read(reader.stems()[4]), VistasReader(damaged, "training", source="instances").read(reader.stems()[4])
    )  # the others still read


def _last_with_things(data) -> dict:
    """The annotation of the last image (in stem order) that has a thing segment: the convention
    check at construction reads the first ones, so damage here only shows when that image is read."""
    things = {c["id"] for c in data["categories"] if c["isthing"]}
    anns = sorted(data["annotations"], key=lambda a: a["image_id"])
    return next(a for a in reversed(anns) if any(s["category_id"] in things for s in a["segments_info"]))


def _set_segment(field, value):
    def edit(data):
        things = {c["id"] for c in data["categories"] if c["isthing"]}
        ann = _last_with_things(data)
        next(s for s in ann["segments_info"] if s["category_id"] in things)[field] = value
        data["edited"] = ann["image_id"]

    return edit


def _drop_entry(data):
    ann = _last_with_things(data)
    data["annotations"].remove(ann)
    data["edited"] = ann["image_id"]


@pytest.mark.parametrize(
    "edit, reason",
    [
        (_set_segment("category_id", 999), "unknown category_id 999"),
        (_set_segment("area", 0), "zero area"),
        (_set_segment("bbox", [150, 0, 40, 5]), "outside the 160x120 image"),
        (_set_segment("bbox", [1, 2, 3]), "malformed segment"),
        (_drop_entry, "no entry for image"),
    ],
)
def test_bad_json_raises_badsample_naming_it(damaged, edit, reason):
    version = detect_version(damaged)
    _edit_json(damaged, version, edit)
    path = panoptic_json_path(damaged, "training", version)
    stem = json.loads(path.read_text())["edited"]
    reader = VistasReader(damaged, "training", source="panoptic")
    with pytest.raises(BadSample, match=reason) as e:
        reader.read(stem)
    assert str(path) in str(e.value) and stem in str(e.value)
