"""`mapdet demo --quick`: every stage runs as a user would run it and leaves every artefact."""

from __future__ import annotations

import json

from PIL import Image

from tests.conftest import run_cli


def test_quick_demo_leaves_every_artefact(tmp_path):
    out = tmp_path / "demo"
    r = run_cli("demo", "--quick", "--out", str(out), timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for n in range(1, 7):
        assert f"[{n}/6]" in r.stdout
    assert f"tensorboard --logdir {out / 'run'}" in r.stdout
    assert "AP50" in r.stdout and "top cause" in r.stdout
    for path in ["raw/config_v2.0.json", "shards/training.manifest.json", "shards/validation.coco.json",
                 "run/config.yaml", "run/export/model.safetensors", "run/export/classes.json",
                 "run/checkpoints/step_0000006/meta.json", "run/eval/final/metrics.json",
                 "run/eval/final/detections.json", "report/report.md", "report/diagnosis.json", "summary.json"]:
        assert (out / path).stat().st_size > 0, path
    assert list((out / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    metrics = json.loads((out / "run/eval/final/metrics.json").read_text())
    assert metrics["images"] == 8 and metrics["images_left_out"] == 0
    assert 0 <= metrics["bbox"]["AP50"] <= 1 and "loss" in metrics["val_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["AP50"] == metrics["bbox"]["AP50"]
    assert set(summary["stage_seconds"]) >= {"synthesize", "train", "evaluate", "diagnose"}
    figures = list((out / "report").glob("*.png"))
    assert figures and all(Image.open(f).format == "PNG" for f in figures)
