"""`mapdet demo --quick`: every stage runs as a user would run it and leaves every artefact."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tests.helpers import run_cli


def test_quick_demo_leaves_every_artefact(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--quick", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for n in range(1, 7):  # each stage says what it expects before it runs and what it took after
        assert f"[{n}/6]" in r.stdout and f"[{n}/6] " in r.stdout
    assert r.stdout.count("(a few seconds): ") == 7 and r.stdout.count(" done in ") == 7  # pack: 2 splits
    assert f"tensorboard --logdir {out / 'run'}" in r.stdout
    assert "AP50" in r.stdout and "top cause" in r.stdout
    for path in [
        "raw/config_v2.0.json",
        "shards/training.manifest.json",
        "shards/validation.coco.json",
        "run/config.yaml",
        "run/export/model.safetensors",
        "run/export/classes.json",
        "run/checkpoints/step_0000006/meta.json",
        "run/eval/final/metrics.json",
        "run/eval/final/detections.json",
        "report/report.md",
        "report/diagnosis.json",
        "summary.json",
    ]:
        assert (out / path).stat().st_size > 0, path
    assert list((out / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    metrics = json.loads((out / "run/eval/final/metrics.json").read_text())
    assert metrics["images"] == 8 and metrics["images_left_out"] == 0
    assert 0 <= metrics["bbox"]["AP50"] <= 1 and "loss" in metrics["val_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["AP50"] == metrics["bbox"]["AP50"]
    assert set(summary["stage_seconds"]) >= {"synthesize", "train", "evaluate", "diagnose"}
    assert "global batch 8 images per step = 2 process(es) x data.batch_size 4" in r.stdout + r.stderr
    meta = json.loads((out / "run/checkpoints/step_0000006/meta.json").read_text())
    assert (meta["global_batch"], meta["processes"]) == (8, 2)
    causes = {c["cause"]: c for c in json.loads((out / "report/diagnosis.json").read_text())["causes"]}
    # one validation in 6 steps: whether AP still rose is not measurable, and the report says why
    assert "not measurable (set train.eval_every)" in causes["under_training"]["evidence"]
    assert "48 images in 6 steps" in causes["under_training"]["evidence"]
    figures = list((out / "report").glob("*.png"))
    assert figures and all(Image.open(f).format == "PNG" for f in figures)


@pytest.mark.parametrize(
    "requested, gpus, expected",
    [
        (None, 0, (2, 8)),  # a CPU machine: 2 processes x 4 images
        (None, 1, (1, 8)),  # one GPU: one process (the shipped demo started 2 there and failed)
        (None, 8, (8, 8)),
        (None, 3, (3, 9)),  # 8 does not split over 3: the nearest global batch that does
        (1, 0, (1, 8)),  # --processes 1 on a CPU: same 8 images per step, so it learns the same
        (16, 1, (16, 16)),
    ],
)
def test_demo_topology_keeps_the_global_batch(requested, gpus, expected):
    from mapdet.commands.demo import topology

    assert topology(requested, gpus, 8) == expected


def test_expected_stage_times_scale_with_the_run():
    from mapdet.commands.demo import STAGE_S, TRAIN_S_PER_STEP, TRAIN_START_S, Expected

    two, one = Expected(300, 540, 2, quick=False), Expected(300, 540, 1, quick=False)
    assert two("train") == f"about {TRAIN_START_S + 540 * TRAIN_S_PER_STEP[2]:.0f} s on 2 CPU cores"
    assert one("train") != two("train") and Expected(600, 1080, 2, quick=False)("train") != two("train")
    assert two("pack validation") == f"about {STAGE_S['pack']:.0f} s on 2 CPU cores"
    assert Expected(600, 540, 2, quick=False)("synthesize") == f"about {2 * STAGE_S['synthesize']:.0f} s on 2 CPU cores"
    assert Expected(32, 6, 2, quick=True)("train") == "a few seconds"


def test_demo_rejects_zero_processes():
    from mapdet.commands.demo import topology

    with pytest.raises(ValueError, match="at least 1"):
        topology(-1, 0, 8)
