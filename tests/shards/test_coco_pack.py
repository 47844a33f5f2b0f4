"""Packing COCO detection JSON: the synthetic Vistas packs to the same objects through both paths;
the COCO file keeps the input's ids, names and areas, so results score the same against it as
against the input; resize, determinism, jobs; every bad input counted and named."""

from __future__ import annotations

import copy
import io
import json
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mapdet.evaluation.coco import evaluate_coco
from mapdet.shards.manifest import class_names, describe, load_manifest, sample_key
from mapdet.shards.merge import merge
from mapdet.shards.reader import decode_sample, read_shard
from tests.helpers import pack_coco

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def _raw(out: Path, split: str) -> dict[str, dict]:
    """key -> the raw sample (``jpg`` and ``json`` bytes), over every shard of the split."""
    return {s["__key__"]: s for shard in load_manifest(out, split)["shards"] for s in read_shard(out / shard["name"])}


def _samples(out: Path, split: str) -> dict[str, dict]:
    """key -> the sample's record, plus its jpg bytes under "jpg"."""
    return {k: {**json.loads(s["json"]), "jpg": s["jpg"]} for k, s in _raw(out, split).items()}


def _objects(rec: dict, names: dict[int, str]) -> list[tuple]:
    return sorted((names[k], tuple(b), c) for b, k, c in zip(rec["boxes"], rec["labels"], rec["iscrowd"]))


@pytest.mark.parametrize("split", ["training", "validation"])
def test_coco_json_packs_to_the_vistas_objects(shards, coco_shards, split):
    vistas, coco = load_manifest(shards, split), load_manifest(coco_shards, split)
    assert sorted(c["name"] for c in vistas["classes"]) == sorted(c["name"] for c in coco["classes"])
    assert [c["name"] for c in coco["classes"]] != [c["name"] for c in vistas["classes"]]  # another order
    stems = {
        im["id"]: im["file_name"][: -len(".jpg")]
        for im in json.loads((coco_shards / coco["coco"]).read_text())["images"]
    }
    by_stem = {stems[int(k)]: rec for k, rec in _samples(coco_shards, split).items()}
    theirs = _samples(shards, split)
    assert sorted(by_stem) == sorted(theirs) and len(theirs) == vistas["num_samples"] == coco["num_samples"]
    n = 0
    for stem, rec in theirs.items():
        mine = by_stem[stem]
        assert _objects(mine, class_names(coco)) == _objects(rec, class_names(vistas)), stem
        assert mine["jpg"] == rec["jpg"]  # the untouched original bytes through both paths
        n += len(rec["labels"])
    assert n > 20 and sum(sum(r["iscrowd"]) for r in theirs.values()) > 0  # the check covers objects and crowd
    assert coco["num_instances"] == vistas["num_instances"]
    stats = {c["name"]: coco["class_stats"][str(c["id"])] for c in coco["classes"]}
    assert stats == {c["name"]: vistas["class_stats"][str(c["id"])] for c in vistas["classes"]}


def test_coco_file_keeps_the_inputs_ids_names_and_areas(coco_files, coco_shards):
    original = json.loads((coco_files / "validation.json").read_text())
    packed = json.loads((coco_shards / "validation.coco.json").read_text())
    manifest = load_manifest(coco_shards, "validation")
    assert sorted((c["id"], c["name"]) for c in packed["categories"]) == sorted(
        (c["id"], c["name"]) for c in original["categories"]
    )
    assert [c["category_id"] for c in manifest["classes"]] == sorted(c["id"] for c in original["categories"])
    assert sorted(tuple(im.values()) for im in packed["images"]) == sorted(
        tuple(im.values()) for im in original["images"]
    )
    assert [k for s in manifest["shards"] for k in s["keys"]] == [
        str(i) for i in sorted(im["id"] for im in original["images"])
    ]

    def per_image(coco):
        out = {}
        for a in coco["annotations"]:
            out.setdefault(a["image_id"], []).append((a["category_id"], a["bbox"], a["area"], a["iscrowd"]))
        return out

    assert per_image(packed) == per_image(original)  # in the file's order within each image
    assert any(a["area"] != a["bbox"][2] * a["bbox"][3] for a in packed["annotations"])  # segment areas, not boxes'


@pytest.mark.parametrize("pack", ["shards", "coco_shards"])
def test_each_image_of_the_coco_file_names_its_sample_key(request, pack):
    """What evaluation relies on to drop a corrupt sample's image from the ground truth."""
    out = request.getfixturevalue(pack)
    manifest = load_manifest(out, "validation")
    images = json.loads((out / "validation.coco.json").read_text())["images"]
    assert [sample_key(manifest, im) for im in images] == [k for s in manifest["shards"] for k in s["keys"]]


def _results(original: dict, seed: int = 0) -> list[dict]:
    """Detections of the file's own ids: every object found with a jittered box, plus false positives."""
    rng = np.random.default_rng(seed)
    cats = [c["id"] for c in original["categories"]]
    out = []
    for a in original["annotations"]:
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, 0.15, 4) * [w, h, w, h]
        box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 1), max(h + jitter[3], 1)]
        out.append({"image_id": a["image_id"], "category_id": a["category_id"], "bbox": box, "score": rng.random()})
    for im in original["images"]:
        for _ in range(3):
            box = [*(rng.random(2) * [im["width"] - 20, im["height"] - 20]), *(rng.random(2) * 40 + 2)]
            out.append({"image_id": im["id"], "category_id": int(rng.choice(cats)), "bbox": box, "score": rng.random()})
    return out


def _pycocotools(gt_path: Path, results: list[dict]) -> np.ndarray:
    with redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        e = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def test_results_score_the_same_against_the_packed_file_as_against_the_input(tmp_path, synth_root, coco_files):
    original = json.loads((coco_files / "validation.json").read_text())
    for a in original["annotations"][::4]:  # COCO's area is the segment's, not the box's: here some are large
        a["area"] = 10_000 + a["id"]
    (tmp_path / "val.json").write_text(json.dumps(original))
    pack_coco(tmp_path / "val.json", synth_root / "validation" / "images", tmp_path / "out", "validation")
    results = _results(original)
    expected = _pycocotools(tmp_path / "val.json", results)
    assert (expected > 0).all() and (expected < 1).all()  # every stat means something here
    np.testing.assert_array_equal(_pycocotools(tmp_path / "out" / "validation.coco.json", results), expected)
    summary = evaluate_coco(json.loads((tmp_path / "out" / "validation.coco.json").read_text()), results).summary()
    np.testing.assert_array_equal([summary[k] for k in STATS], expected)


def test_max_side_scales_boxes_and_each_annotations_own_area(tmp_path, synth_root, coco_files, coco_shards):
    pack_coco(coco_files / "validation.json", synth_root / "validation" / "images", tmp_path, "validation", max_side=80)
    small = json.loads((tmp_path / "validation.coco.json").read_text())
    full = json.loads((coco_shards / "validation.coco.json").read_text())
    assert {(im["width"], im["height"]) for im in small["images"]} == {(80, 60)}
    for a, b in zip(small["annotations"], full["annotations"], strict=True):
        assert a["area"] == b["area"] * 0.25 and a["bbox"] == [v * 0.5 for v in b["bbox"]]
        assert (a["id"], a["image_id"], a["category_id"]) == (b["id"], b["image_id"], b["category_id"])
    for rec in _samples(tmp_path, "validation").values():
        assert (rec["orig_width"], rec["orig_height"]) == (160, 120) and len(rec["area"]) == len(rec["labels"])


def _tree(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def test_repack_with_workers_and_jobs_is_byte_identical(tmp_path, synth_root, coco_files, coco_shards):
    args = (coco_files / "training.json", synth_root / "training" / "images")
    pack_coco(*args, tmp_path / "workers", "training", workers=2)
    for j in range(3):
        pack_coco(*args, tmp_path / "jobs", "training", job_index=j, num_jobs=3)
    assert not (tmp_path / "jobs" / "training.manifest.json").exists()
    merge(tmp_path / "jobs", "training", root=str(args[0]))
    want = {k: v for k, v in _tree(coco_shards).items() if k.startswith("training")}
    assert _tree(tmp_path / "workers") == want and _tree(tmp_path / "jobs") == want


def test_other_categories_into_the_same_folder_are_refused(tmp_path, synth_root, coco_files):
    args = (coco_files / "validation.json", synth_root / "validation" / "images", tmp_path, "validation")
    pack_coco(*args, job_index=0, num_jobs=2)
    with pytest.raises(ValueError, match="differs in: class_set, classes, left_out"):
        pack_coco(*args, categories=["900"], job_index=1, num_jobs=2)


def test_categories_keep_a_subset_and_the_manifest_counts_the_rest(tmp_path, synth_root, coco_files, coco_shards):
    kept = ["823", "object--vehicle--car"]  # an id (the pole's) and a name
    m = pack_coco(coco_files / "validation.json", synth_root / "validation" / "images", tmp_path, "validation", kept)
    full = load_manifest(coco_shards, "validation")
    assert [(c["id"], c["category_id"]) for c in m["classes"]] == [(1, 788), (2, 823)]
    kept = {c["name"] for c in m["classes"]}
    objects = lambda man: {c["name"]: man["class_stats"][str(c["id"])] for c in man["classes"]}  # noqa: E731
    assert objects(m) == {k: v for k, v in objects(full).items() if k in kept}
    others = {k: v["instances"] + v["crowd"] for k, v in objects(full).items() if k not in kept}
    assert m["left_out"] == {
        "classes": [c["name"] for c in full["classes"] if c["name"] not in kept],
        "objects": others,
    }
    assert sum(others.values()) > 0 and m["class_set"] == "chosen-categories"
    gt = json.loads((tmp_path / "validation.coco.json").read_text())
    assert {c["id"] for c in gt["categories"]} == {788, 823} and {a["category_id"] for a in gt["annotations"]} <= {
        788,
        823,
    }


def test_bad_inputs_are_counted_and_named(tmp_path, synth_root, coco_files):
    """Six validation images: four skipped (missing, unreadable, wrong size, no height), one PNG
    packed as JPEG, and bad annotations, clipped and dropped boxes on the last."""
    coco = json.loads((coco_files / "validation.json").read_text())
    images = tmp_path / "images"
    shutil.copytree(synth_root / "validation" / "images", images)
    ims = sorted(coco["images"], key=lambda im: im["id"])
    missing, unreadable, wrong, no_height, png, last = ims
    (images / missing["file_name"]).unlink()
    (images / unreadable["file_name"]).write_bytes(b"\xff\xd8 not a jpeg")
    wrong["height"] += 1
    del no_height["height"]
    Image.open(images / png["file_name"]).save(images / "p.png")
    png["file_name"] = "p.png"
    some = {"image_id": last["id"], "category_id": coco["categories"][0]["id"]}
    coco["annotations"] += [
        {**some, "id": 1001, "image_id": 12345, "bbox": [1, 1, 5, 5]},
        {**some, "id": 1002, "category_id": 3, "bbox": [1, 1, 5, 5]},
        {**some, "id": 1003, "bbox": [1, 1, 5]},
        {**some, "id": 1004, "bbox": [1, 1, 0, 5]},
        {**some, "id": 1005, "bbox": [150, 100, 30, 30], "area": 50},  # clipped to the 160x120 image
        {**some, "id": 1006, "bbox": [170, 10, 5, 5]},  # outside: dropped
    ]
    (tmp_path / "bad.json").write_text(json.dumps(coco))
    m = pack_coco(tmp_path / "bad.json", images, tmp_path / "out", "validation")
    skipped = {s["key"]: s["reason"] for s in m["skipped"]}
    assert sorted(skipped) == sorted(str(im["id"]) for im in (missing, unreadable, wrong, no_height))
    assert "image file not found" in skipped[str(missing["id"])]
    assert "unreadable image" in skipped[str(unreadable["id"])]
    assert "but bad.json: image" in skipped[str(wrong["id"])] and "says 160x121" in skipped[str(wrong["id"])]
    assert "has no valid width and height" in skipped[str(no_height["id"])]
    assert [(b["id"], b["reason"].split(": ", 1)[-1]) for b in m["bad_annotations"]] == [
        (1001, "unknown image_id 12345"),
        (1002, "unknown category_id 3"),
        (1003, "malformed bbox [1, 1, 5] (expected [x, y, w, h])"),
        (1004, "bbox [1, 1, 0, 5] has no area"),
    ]
    assert m["sanitized"] == {"clipped": 1, "dropped": 1} and m["num_samples"] == 2 and m["num_inputs"] == 6
    samples = _raw(tmp_path / "out", "validation")
    assert sorted(samples) == sorted([str(png["id"]), str(last["id"])])
    assert tuple(decode_sample(samples[str(png["id"])])[0].shape) == (3, 120, 160)  # the PNG, re-encoded as JPEG
    gt = json.loads((tmp_path / "out" / "validation.coco.json").read_text())
    clipped = [a for a in gt["annotations"] if a["image_id"] == last["id"]][-1]
    assert clipped["bbox"] == [150, 100, 10, 20] and clipped["area"] == 50  # its own area, as given
    text = describe(m)
    assert "skipped 4 bad input(s)" in text and "left out 4 bad annotation(s)" in text and "1 clipped" in text
