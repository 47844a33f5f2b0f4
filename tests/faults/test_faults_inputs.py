"""Fault injection, bad inputs and security: bad boxes and labels in the raw data, 1x1 and 30 MP
images, empty splits, bad configs, missing weights, results that do not fit the ground truth,
pickled objects in weights, YAML tags, shard member names that point outside the folder.
Each is a clear message, or sanitised and counted: never a stack trace, never a wrong number."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from mapdet.config import (
    AugmentConfig,
    ConfigError,
    EvalConfig,
    ModelConfig,
    load_config,
)
from mapdet.data.augment import BatchAugment
from mapdet.data.loaders import eval_loader
from mapdet.datasets.layout import panoptic_json_path
from mapdet.engine import checkpoint
from mapdet.evaluation.validation import validate
from mapdet.modeling import run_weights
from mapdet.modeling.build import build_model
from mapdet.modeling.weights_io import load_weights_file
from mapdet.shards.manifest import load_manifest
from mapdet.shards.reader import CorruptSample, checked_samples, decode_sample, read_shard
from mapdet.shards.source import shard_source
from tests.faults.damage import rewrite
from tests.helpers import REPO, TINY, mapdet, pack_all, run_cli

HUGE = (6400, 4800)  # 30.7 megapixels


def _add_raw_image(root: Path, stem: str, size: tuple[int, int], bbox: list[int], category_id: int) -> None:
    """An image, its panoptic PNG and its panoptic JSON entry (one thing segment, bbox [x, y, w, h])."""
    Image.new("RGB", size, (120, 130, 140)).save(root / "training" / "images" / f"{stem}.jpg", quality=90)
    Image.new("RGB", size).save(root / "training" / "v2.0" / "panoptic" / f"{stem}.png")
    path = panoptic_json_path(root, "training", "v2.0")
    data = json.loads(path.read_text())
    data["images"].append({"id": stem, "file_name": f"{stem}.jpg", "width": size[0], "height": size[1]})
    data["annotations"].append(
        {
            "image_id": stem,
            "file_name": f"{stem}.png",
            "segments_info": [
                {"id": 1, "category_id": category_id, "area": bbox[2] * bbox[3], "bbox": bbox, "iscrowd": 0}
            ],
        }
    )
    path.write_text(json.dumps(data))


def _break_last_segments(root: Path) -> dict[str, str]:
    """Damage one thing segment in each of the last three images that have one (the reader checks
    the JSON's box convention on the first ones); returns {stem: expected reason}."""
    path = panoptic_json_path(root, "training", "v2.0")
    data = json.loads(path.read_text())
    things = {c["id"] for c in data["categories"] if c["isthing"]}
    anns = sorted(
        (a for a in data["annotations"] if any(s["category_id"] in things for s in a["segments_info"])),
        key=lambda a: Path(a["file_name"]).stem,
    )
    edits = [
        ("bbox", [150, 0, 40, 5], "outside the 160x120 image"),
        ("bbox", [10, 10, -3, 5], "non-positive size"),
        ("category_id", 999, "unknown category_id 999"),
    ]
    reasons = {}
    for ann, (field, value, reason) in zip(anns[-3:], edits):
        next(s for s in ann["segments_info"] if s["category_id"] in things)[field] = value
        reasons[Path(ann["file_name"]).stem] = reason
    path.write_text(json.dumps(data))
    return reasons


def test_raw_faults_are_skipped_and_named_and_1x1_and_30mp_images_pack_and_train(copy_root, tmp_path):
    reasons = _break_last_segments(copy_root)
    cat = next(
        c["id"]
        for c in json.loads(panoptic_json_path(copy_root, "training", "v2.0").read_text())["categories"]
        if c["isthing"]
    )
    _add_raw_image(copy_root, "zzz_huge", HUGE, [100, 200, 3000, 1500], cat)
    _add_raw_image(copy_root, "zzz_tiny", (1, 1), [0, 0, 1, 1], cat)
    m = pack_all(copy_root, tmp_path / "s", "training", max_side=640)

    skipped = {s["key"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == set(reasons)
    for stem, reason in reasons.items():
        assert stem in skipped[stem] and reason in skipped[stem], skipped[stem]
    assert m["num_inputs"] == 14 and m["num_samples"] == 14 - 3
    samples = {s["__key__"]: s for tar in sorted((tmp_path / "s").glob("*.tar")) for s in read_shard(tar)}
    huge = json.loads(samples["zzz_huge"]["json"])
    assert (huge["width"], huge["height"], huge["orig_width"], huge["orig_height"]) == (640, 480, *HUGE)
    assert huge["boxes"] == [[10.0, 20.0, 310.0, 170.0]]  # [100, 200, 3100, 1700] scaled by exactly 0.1

    # both train and predict through the real decoder, augmentation and model: no error, finite losses
    images, targets = zip(*(decode_sample(samples[k], len(m["classes"])) for k in ("zzz_tiny", "zzz_huge")))
    assert [tuple(im.shape) for im in images] == [(3, 1, 1), (3, 480, 640)]
    assert targets[0]["boxes"].tolist() == [[0.0, 0.0, 1.0, 1.0]]
    torch.manual_seed(0)
    images, targets = BatchAugment(AugmentConfig(hflip=1.0, scale_jitter=1.0))(list(images), list(targets))
    model = build_model(ModelConfig(arch="small", min_size=128, max_size=160), len(m["classes"]) + 1)
    losses = model(list(images), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    assert all(math.isfinite(float(v)) for v in losses.values())
    model.eval()
    assert len(model([im.float() for im in images])) == 2


def test_an_empty_split_is_a_message(synth_root, shards, tmp_path, capsys):
    root = tmp_path / "raw"
    (root / "validation" / "images").mkdir(parents=True)
    shutil.copy(next(synth_root.glob("config_*.json")), root)
    code, _, err = mapdet(capsys, "pack", str(root), str(tmp_path / "out"), "--split", "validation")
    assert code == 2 and "holds no .jpg images: nothing to pack" in err

    empty = tmp_path / "shards"
    shutil.copytree(shards, empty)
    for split in ("training", "validation"):
        path = empty / f"{split}.manifest.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "shards": [], "num_samples": 0}))
    r = run_cli("train", "--set", f"data.shards={empty}", f"train.out={tmp_path / 'run'}", *TINY)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"mapdet train: error: the training split in {empty} has no samples to train on" in r.stderr
    with pytest.raises(ValueError, match="the validation split in .* has no images to evaluate"):
        validate(None, "cpu", EvalConfig(), empty, load_manifest(empty, "validation"), {})


@pytest.mark.parametrize(
    "yaml_text,needle",
    [
        ("optim:\n  lrr: 0.1\n", "config key 'optim.lrr'"),
        ("train:\n  max_steps: many\n", "config key 'train.max_steps'"),
        ("data: [1, 2]\n", "list is not a subclass of DataConfig"),
    ],
)
def test_config_file_errors_name_the_key(tmp_path, capsys, yaml_text, needle):
    (tmp_path / "bad.yaml").write_text(yaml_text)
    code, _, err = mapdet(capsys, "train", "--config", str(tmp_path / "bad.yaml"))
    assert code == 2 and needle in err and err.count("\n") == 1, err


def test_missing_weights_are_a_message(shards, tmp_path):
    missing = tmp_path / "nowhere" / "weights.pth"
    r = run_cli(
        "train", "--set", f"data.shards={shards}", f"train.out={tmp_path / 'run'}", *TINY, f"model.weights={missing}"
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"mapdet train: error: model.weights: weights file '{missing}' does not exist" in r.stderr
    with pytest.raises(FileNotFoundError, match=f"{missing.with_suffix('.safetensors')} does not exist"):
        run_weights.load_weights(tmp_path / "run", str(missing.with_suffix(".safetensors")))


def test_results_with_a_category_the_ground_truth_lacks_exit_2(tmp_path, capsys):
    gt = {
        "images": [{"id": 1, "width": 10, "height": 10}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0}],
    }
    dets = [{"image_id": 1, "category_id": 7, "bbox": [0, 0, 5, 5], "score": 0.9}]
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    code, out, err = mapdet(
        capsys,
        "cocoeval",
        "--gt",
        str(tmp_path / "gt.json"),
        "--results",
        str(tmp_path / "dt.json"),
        "--out",
        str(tmp_path / "m.json"),
    )
    assert code == 2 and "category ids not in the ground truth: [7]" in err and "AP" not in out
    assert not (tmp_path / "m.json").exists()


# -- security ------------------------------------------------------------------------------------


class _Payload:
    """Pickles as a call of os.system: loading it with plain pickle would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    return path, marker


def test_weights_and_checkpoints_never_unpickle_objects(evil, tmp_path):
    path, marker = evil
    with pytest.raises(Exception, match="GLOBAL posix.system"):
        load_weights_file(path)
    with pytest.raises(ValueError, match="evil.pth: refused to load: it holds pickled objects.*posix.system"):
        run_weights.load_weights(tmp_path, str(path))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = checkpoint.save(
        tmp_path / "run",
        1,
        model,
        opt,
        torch.optim.lr_scheduler.StepLR(opt, 1),
        None,
        {"batches": 1, "counters": {}},
        keep_last=1,
    )
    shutil.copy(path, ckpt / "optimizer.pt")
    with pytest.raises(ValueError, match="optimizer.pt: refused to load"):
        checkpoint.load(ckpt, model, opt)
    assert not marker.exists()


def test_model_weights_with_pickled_objects_are_a_value_error(evil):
    with pytest.raises(ValueError, match="model.weights"):
        build_model(ModelConfig(arch="small", weights=str(evil[0])), 3)


def test_yaml_python_tags_are_refused(tmp_path):
    marker = tmp_path / "PWNED"
    (tmp_path / "unsafe.yaml").write_text(f"optim: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(Exception, match="python/object/apply"):
        load_config(tmp_path / "unsafe.yaml")
    assert not marker.exists()


def test_yaml_python_tags_are_a_config_error(tmp_path):
    (tmp_path / "unsafe.yaml").write_text("optim: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="unsafe.yaml"):
        load_config(tmp_path / "unsafe.yaml")


def test_shard_member_names_outside_the_folder_are_never_written_or_used(shards, tmp_path, capsys):
    out = tmp_path / "deep" / "shards"
    shutil.copytree(shards, out)
    outside = tmp_path / "abs" / "evil"
    for tar in ("training-000000.tar", "validation-000000.tar"):
        good = next(read_shard(out / tar))
        evil = [{**good, "__key__": "../evil"}, {**good, "__key__": str(outside)}]
        rewrite(out / tar, {}, extra=evil, at=1)
    files = sorted(p for p in tmp_path.rglob("*"))

    code, stdout, _ = mapdet(capsys, "verify", str(out))
    assert code == 1 and "PROBLEM training-000000.tar: holds 6 samples, manifest lists 4 (keys differ)" in stdout
    keys, bad = load_manifest(out, "training")["shards"][0]["keys"], []
    assert [s["__key__"] for s in checked_samples(shard_source(out), "training-000000.tar", keys, bad)] == keys
    assert [b["key"] for b in bad] == ["../evil", str(outside)]  # the training reader skips and counts them
    with pytest.raises(CorruptSample, match="validation-000000.tar: sample 1 is '../evil', manifest says"):
        list(eval_loader(out, load_manifest(out, "validation"), 2, 0, rank=0, world=1))

    assert sorted(p for p in tmp_path.rglob("*")) == files  # nothing written anywhere
    assert not (REPO.parent / "evil.jpg").exists() and not outside.parent.exists()
    sources = "\n".join(p.read_text() for p in (REPO / "mapdet").glob("*.py"))
    assert ".extract(" not in sources and "extractall" not in sources  # mapdet never extracts a tar
