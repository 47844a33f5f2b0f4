"""COCO detection JSON reader: classes from sparse unordered ids, keys, boxes in file order, areas,
--categories, and every fault: the file refused in one line, annotations and images named."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from mapdet.datasets import coco
from mapdet.datasets.coco import CocoReader
from mapdet.datasets.sample_files import BadSample

W, H = 40, 30


def _coco(tmp_path, images=None, annotations=None, categories=None) -> tuple:
    """A tiny COCO file and image folder: images 7 (a.jpg) and 3 (b.png), categories 50 and 4."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (W, H), (90, 120, 30)).save(folder / "a.jpg")
    Image.new("RGB", (W, H), (10, 20, 200)).save(folder / "b.png")
    data = {
        "images": images
        if images is not None
        else [
            {"id": 7, "file_name": "a.jpg", "width": W, "height": H},
            {"id": 3, "file_name": "b.png", "width": W, "height": H},
        ],
        "annotations": annotations
        if annotations is not None
        else [
            {"id": 1, "image_id": 7, "category_id": 50, "bbox": [1.5, 2, 10, 5], "area": 20.5, "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 4, "bbox": [0, 0, 3, 4], "iscrowd": 1},
            {"id": 5, "image_id": 7, "category_id": 50, "bbox": [20, 10, 4, 4], "area": 9},
        ],
        "categories": categories
        if categories is not None
        else [{"id": 50, "name": "car", "supercategory": "vehicle"}, {"id": 4, "name": "person"}],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path, folder


def test_classes_keys_boxes_areas_and_crowd(tmp_path):
    reader = CocoReader(*_coco(tmp_path))
    assert [(c.id, c.name, c.category_id) for c in reader.classes] == [(1, "person", 4), (2, "car", 50)]
    assert reader.classes[1].record() == {"id": 2, "name": "car", "category_id": 50, "supercategory": "vehicle"}
    assert reader.keys() == ["3", "7"]  # by id, not by file name or listing order
    a = reader.read("7")
    assert (a.image_id, a.file_name, a.width, a.height) == (7, "a.jpg", W, H)
    np.testing.assert_array_equal(a.boxes, [[1.5, 2, 11.5, 7], [0, 0, 3, 4], [20, 10, 24, 14]])  # file order
    assert a.labels.tolist() == [2, 1, 2] and a.iscrowd.tolist() == [0, 1, 0]
    assert a.area[0] == 20.5 and math.isnan(a.area[1]) and a.area[2] == 9  # NaN: computed from the box later
    b = reader.read("3")
    assert b.boxes.shape == (0, 4) and b.labels.shape == (0,) and b.file_name == "b.png"
    assert reader.bad_annotations == [] and reader.plan()["classes"][0] == {"id": 1, "name": "person", "category_id": 4}


@pytest.mark.parametrize(
    "ann",
    [
        {"image_id": 7, "category_id": 50, "bbox": [1.5, 2, 10, 5], "area": 20.5, "iscrowd": 0},
        {"image_id": 7, "category_id": 4, "bbox": [0.1, 0.2, 0.3, 0.7], "iscrowd": True},
        {"image_id": 7, "category_id": 4, "bbox": [2**60, 1, 1, 1], "area": 0},
        {"image_id": 7, "category_id": 4, "bbox": [1e308, 1e308, 1e308, 1e308]},  # sum overflows: checked slowly
    ],
)
def test_the_fast_path_gives_what_the_checks_one_by_one_give(ann):
    label_of = {50: 2, 4: 1}
    slow = [*coco._box(ann), label_of[ann["category_id"]], coco._crowd(ann), coco._area(ann)]
    fast = coco._plain(ann, {7: {}}, label_of)
    if fast is None:
        assert not math.isfinite(sum(ann["bbox"]))
        return
    assert fast[0] == 7
    np.testing.assert_array_equal(fast[1], slow)  # NaN (no area) equal to NaN
    assert [type(v) for v in fast[1]] == [type(v) for v in slow]


def test_categories_keep_a_subset_and_count_the_rest(tmp_path):
    reader = CocoReader(*_coco(tmp_path), categories=["50"])
    assert [(c.id, c.category_id) for c in reader.classes] == [(1, 50)]
    a = reader.read("7")
    assert a.labels.tolist() == [1, 1] and a.left_out == {"person": 1}
    assert reader.left_out_classes == ["person"] and reader.class_set == "chosen-categories"
    assert [c.category_id for c in CocoReader(*_coco(tmp_path), categories=["person", "car"]).classes] == [4, 50]
    with pytest.raises(ValueError, match="'truck' matches no category id or name"):
        CocoReader(*_coco(tmp_path), categories=["truck"])


CAT = [{"id": 1, "name": "a"}]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "is not valid JSON"),
        ([], "is a JSON list"),
        ({"images": [], "annotations": []}, "has no 'categories' list"),
        ({"images": [], "annotations": [], "categories": []}, "lists no categories"),
        ({"images": [], "annotations": [{"image_id": 1, "segments_info": []}], "categories": CAT}, "COCO panoptic"),
        (
            {"images": [], "annotations": [{"image_id": 1, "caption": "a"}], "categories": CAT},
            "no annotation has a 'bbox'",
        ),
        ({"images": [], "annotations": [], "categories": [{"id": "1", "name": "a"}]}, "categories[0] needs"),
        ({"images": [], "annotations": [], "categories": CAT + CAT}, "category id 1 is listed twice"),
        ({"images": [{"file_name": "a.jpg"}], "annotations": [], "categories": CAT}, "images[0] has no integer 'id'"),
        ({"images": [{"id": 2}, {"id": 2}], "annotations": [], "categories": CAT}, "image id 2 is listed twice"),
    ],
)
def test_a_file_that_is_not_coco_detection_is_refused_in_one_line(tmp_path, content, message):
    _, folder = _coco(tmp_path)
    (tmp_path / "bad.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        CocoReader(tmp_path / "bad.json", folder)
    assert "\n" not in str(e.value) and "bad.json" in str(e.value)


def test_bad_annotations_are_left_out_and_named(tmp_path):
    good = {"image_id": 7, "category_id": 50, "bbox": [1, 1, 5, 5]}
    bad = [
        ({**good, "image_id": 99}, "unknown image_id 99"),
        ({**good, "category_id": 8}, "unknown category_id 8"),
        ({**good, "bbox": [1, 2, 3]}, "malformed bbox [1, 2, 3]"),
        ({**good, "bbox": [1, "2", 3, 4]}, "malformed bbox"),
        ({**good, "bbox": None}, "malformed bbox None"),
        ({**good, "bbox": [1, 2, 0, 4]}, "has no area"),
        ({**good, "bbox": [1, 2, 3, -4]}, "has no area"),
        ({**good, "iscrowd": 2}, "iscrowd 2 is not 0 or 1"),
        ({**good, "area": -1}, "area -1 is not a number >= 0"),
        ("an annotation", "not a JSON object"),
    ]
    anns = [{**good, "id": 1}] + [a if isinstance(a, str) else {**a, "id": 100 + i} for i, (a, _) in enumerate(bad)]
    reader = CocoReader(*_coco(tmp_path, annotations=anns))
    assert [b["index"] for b in reader.bad_annotations] == list(range(1, len(bad) + 1))
    assert [b["id"] for b in reader.bad_annotations] == [100 + i for i in range(len(bad) - 1)] + [None]
    for found, (_, words) in zip(reader.bad_annotations, bad):
        assert words in found["reason"]
    assert len(reader.read("7").labels) == 1  # the good one
    assert reader.plan()["bad_annotations"] == reader.bad_annotations


@pytest.mark.parametrize(
    "damage, words",
    [
        ("missing", "a.jpg: image file not found (ann.json: image 7)"),
        ("unreadable", "a.jpg: unreadable image"),
        ("truncated", "a.jpg: truncated JPEG"),
        ("size", "a.jpg: the image is 40x30 but ann.json: image 7 says 41x30"),
        ("no width", "ann.json: image 7 (a.jpg) has no valid width and height (None x 30)"),
        ("no file_name", "ann.json: image 7 has no file_name"),
    ],
)
def test_bad_images_raise_badsample_naming_the_file(tmp_path, damage, words):
    images = [{"id": 7, "file_name": "a.jpg", "width": W, "height": H}]
    if damage == "size":
        images[0]["width"] = W + 1
    elif damage == "no width":
        del images[0]["width"]
    elif damage == "no file_name":
        del images[0]["file_name"]
    path, folder = _coco(tmp_path, images=images)
    jpg = folder / "a.jpg"
    if damage == "missing":
        jpg.unlink()
    elif damage == "unreadable":
        jpg.write_bytes(b"not an image at all")
    elif damage == "truncated":
        jpg.write_bytes(jpg.read_bytes()[:-20])  # the end-of-image marker goes
    with pytest.raises(BadSample) as e:
        CocoReader(path, folder).read("7")
    assert words in str(e.value)


def test_a_truncated_png_is_unreadable(tmp_path):
    path, folder = _coco(tmp_path)
    png = folder / "b.png"
    big = np.random.default_rng(0).integers(0, 255, (H, W, 3), np.uint8)
    Image.fromarray(big).save(png)
    png.write_bytes(png.read_bytes()[:-60])
    with pytest.raises(BadSample, match="b.png: unreadable image"):
        CocoReader(path, folder).read("3")


def test_images_must_be_a_folder(tmp_path):
    path, folder = _coco(tmp_path)
    shutil.rmtree(folder)
    with pytest.raises(FileNotFoundError, match="--images .*: not a folder"):
        CocoReader(path, folder)
