"""`mapdet pack --coco` from the command line, and the input's own ids in every COCO file the later
commands write: evaluate's detections.json and metrics, predict's results (in the original images'
pixels), diagnose's per-class statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mapdet.shards.manifest import load_manifest
from tests.helpers import mapdet, pack_coco, random_run, run_cli, train_args

EVAL = ["eval.val_loss=false", "eval.num_images_logged=0", "eval.workers=0", "eval.batch_size=1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, coco_shards) -> Path:
    # Random weights score one class highest everywhere: 1000 detections per image reach five classes.
    return random_run(tmp_path_factory.mktemp("coco_run") / "run", coco_shards, "model.detections_per_img=1000")


def _pack_args(coco_files, synth_root, out, *extra) -> list:
    json_file, images = coco_files / "validation.json", synth_root / "validation" / "images"
    return [
        "pack",
        "--coco",
        json_file,
        "--images",
        images,
        out,
        "--split",
        "validation",
        "--samples-per-shard",
        4,
        *extra,
    ]


def test_cli_packs_the_same_files_and_they_verify(tmp_path, synth_root, coco_files, coco_shards, capsys):
    code, out, err = mapdet(capsys, *_pack_args(coco_files, synth_root, tmp_path))
    assert code == 0, err
    assert "validation: 6 images" in out and "(COCO JSON validation.json)" in out
    for name in ("validation.coco.json", "validation-000000.tar", "validation-000001.tar"):
        assert (tmp_path / name).read_bytes() == (coco_shards / name).read_bytes()
    assert mapdet(capsys, "verify", tmp_path)[0] == 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"json": "{not json"}, "is not valid JSON"),
        ({"json": "[]"}, "is a JSON list (a COCO results file?), not COCO detection ground truth"),
        ({"json": None}, "COCO annotations file not found"),
        ({"extra": ["--categories", "7,truck"]}, "--categories '7' matches no category id or name"),
        ({"extra": ["--version", "v2.0"]}, "--version: only for a Vistas download, not with --coco"),
        ({"extra": ["--split", "val.2017"]}, "--split 'val.2017': use letters, digits"),
        ({"root": True}, "with --coco give only the output folder, got 2 paths"),
        ({"images": None}, "--coco needs --images DIR"),
    ],
)
def test_cli_mistakes_exit_2_with_one_line(tmp_path, synth_root, coco_files, capsys, change, message):
    args = _pack_args(coco_files, synth_root, tmp_path / "out", *change.get("extra", []))
    if "json" in change:
        bad = tmp_path / "bad.json"
        if change["json"] is not None:
            bad.write_text(change["json"])
        args[2] = bad
    if change.get("root"):
        args.insert(5, synth_root)
    if "images" in change:
        del args[3:5]
    code, _, err = mapdet(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out" / "validation.manifest.json").exists()


def test_vistas_pack_refuses_coco_options(tmp_path, synth_root, capsys):
    code, _, err = mapdet(capsys, "pack", synth_root, tmp_path, "--split", "validation", "--categories", "1")
    assert code == 2 and "--images and --categories go with --coco" in err


def _canonical(results: list[dict]) -> list[dict]:
    return sorted(results, key=lambda r: (r["image_id"], -r["score"], r["category_id"], r["bbox"]))


def _by_file(gt: Path, results: list[dict], category=lambda k: k) -> list[tuple]:
    """(file name, score, bbox, category(category_id)) of each detection, sorted."""
    files = {im["id"]: im["file_name"] for im in json.loads(gt.read_text())["images"]}
    return sorted((files[r["image_id"]], r["score"], r["bbox"], category(r["category_id"])) for r in results)


def _evaluate(capsys, run: Path, out: Path, shards: Path | None = None) -> list[dict]:
    """`mapdet evaluate` of the run (on ``shards`` instead of the run's own), one image per batch:
    its detections.json."""
    where = [f"data.shards={shards}"] if shards else []
    code, _, err = mapdet(capsys, "evaluate", "--config", run / "config.yaml", "--out", out, "--set", *where, *EVAL)
    assert code == 0, err
    return json.loads((out / "detections.json").read_text())


def _predict(capsys, out: Path, *args) -> list[dict]:
    """`mapdet predict ARGS`, one image per batch: its results."""
    code, _, err = mapdet(capsys, "predict", *args, "--out", out, "--workers", 0, "--batch-size", 1)
    assert code == 0, err
    return json.loads(out.read_text())


def test_evaluate_predict_and_diagnose_write_the_files_ids(
    run, coco_files, coco_shards, shards, synth_root, tmp_path, capsys
):
    original = json.loads((coco_files / "validation.json").read_text())
    cats = {c["id"]: c["name"] for c in original["categories"]}
    detections = _evaluate(capsys, run, tmp_path / "eval")
    assert {d["image_id"] for d in detections} == {im["id"] for im in original["images"]}
    assert len({d["category_id"] for d in detections}) > 3
    # The same weights on the Vistas pack of the same images give the model's own labels (a Vistas
    # pack's category ids): label k must come out as the k-th smallest category id of the file.
    labels = _evaluate(capsys, run, tmp_path / "labels", shards)
    assert _by_file(coco_shards / "validation.coco.json", detections) == _by_file(
        shards / "validation.coco.json", labels, lambda k: sorted(cats)[k - 1]
    )
    per_class = json.loads((tmp_path / "eval" / "metrics.json").read_text())["bbox"]["per_class"]
    train = load_manifest(coco_shards, "training")
    trained = {c["category_id"]: train["class_stats"][str(c["id"])]["instances"] for c in train["classes"]}
    assert [(r["category_id"], r["name"], r["num_train"]) for r in per_class] == [
        (k, cats[k], trained[k]) for k in sorted(cats)
    ]
    assert sum(r["num_train"] for r in per_class) == train["num_instances"] > 0

    predicted = _predict(capsys, tmp_path / "p.json", "--checkpoint", run, "--shards", coco_shards)
    assert _canonical(predicted) == _canonical(detections)  # no resize: the same boxes, the file's ids
    # ... so any COCO tool scores them against the user's own file
    code, _, err = mapdet(capsys, "cocoeval", "--gt", coco_files / "validation.json", "--results", tmp_path / "p.json")
    assert code == 0, err
    folder = _predict(
        capsys,
        tmp_path / "f.json",
        "--weights",
        run / "export" / "model.safetensors",
        "--images",
        synth_root / "validation" / "images",
    )
    assert len({r["category_id"] for r in folder}) > 3 and {r["category_id"] for r in folder} <= set(cats)

    code, _, err = mapdet(
        capsys,
        "diagnose",
        "--gt",
        coco_shards / "validation.coco.json",
        "--results",
        tmp_path / "eval" / "detections.json",
        "--train-manifest",
        coco_shards / "training.manifest.json",
        "--out",
        tmp_path / "diag",
    )
    assert code == 0, err
    rows = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())["per_class"]["rows"]
    assert rows and all(r["name"] == cats[r["id"]] and r["train_instances"] == trained[r["id"]] for r in rows)
    assert sum(r["train_instances"] for r in rows) > 0


def test_predict_on_a_resized_coco_pack_writes_original_pixels(run, coco_files, synth_root, tmp_path, capsys):
    small = tmp_path / "small"
    pack_coco(coco_files / "validation.json", synth_root / "validation" / "images", small, "validation", max_side=80)
    stored = _canonical(_evaluate(capsys, run, tmp_path / "eval", small))  # 80x60 images
    original = _canonical(_predict(capsys, tmp_path / "p.json", "--checkpoint", run, "--shards", small))  # 160x120
    assert len(stored) == len(original) > 0
    for s, o in zip(stored, original):
        assert (s["image_id"], s["category_id"], s["score"]) == (o["image_id"], o["category_id"], o["score"])
        np.testing.assert_array_equal(np.asarray(o["bbox"]), 2 * np.asarray(s["bbox"]))
    assert max(o["bbox"][0] + o["bbox"][2] for o in original) > 80  # beyond the stored image: really scaled


def test_training_on_a_coco_pack_exports_and_validates_in_the_files_ids(coco_files, coco_shards, tmp_path):
    r = run_cli(*train_args(coco_shards, tmp_path / "run", "train.max_steps=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    classes = load_manifest(coco_shards, "training")["classes"]
    exported = json.loads((tmp_path / "run" / "export" / "classes.json").read_text())["classes"]
    assert exported == [{k: c[k] for k in ("id", "name", "category_id")} for c in classes]
    metrics = json.loads((tmp_path / "run" / "metrics_step_0000002.json").read_text())
    cats = sorted(c["id"] for c in json.loads((coco_files / "validation.json").read_text())["categories"])
    assert [row["category_id"] for row in metrics["bbox"]["per_class"]] == cats
