"""Report files: Markdown readable as is, JSON with the promised keys, valid PNG figures, TensorBoard."""

from __future__ import annotations

import dataclasses
import json

import pytest
from PIL import Image

from mapdet.diagnosis import report
from mapdet.diagnosis.curves import TrainingCurves
from mapdet.diagnosis.measures import diagnose
from mapdet.diagnosis.postprocess import Postprocess, ProposalRecall, Sweep, SweepBest
from mapdet.diagnosis.tide import ALL_TYPES
from tests.diagnosis.scenes import detect, scene

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def diag():
    gt, objs = scene(3, lambda i: [1, 2, 3] * 4)
    d = diagnose(gt, detect(objs, dx=9))
    d.training_curves = TrainingCurves(
        series={"train/loss": [[0, 2.0], [10, 1.0]], "val/AP": [[10, 0.2]]},
        missing=["val/loss", "val/AP50"],
        files=["events"],
    )
    d.sweep = Sweep(
        nms_thresh=[0.3, 0.5],
        score_thresh=[0.0, 0.05],
        detections_per_img=[100, 300],
        ap=[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]],
        ap50=[[[1.0] * 2] * 2] * 2,
        best=SweepBest(0.5, 0.05, 300, 8.0),
        current_ap=7.0,
        current=Postprocess(0.5, 0.05, 100),
        num_images=3,
    )
    d.proposal_recall = ProposalRecall(
        0.5, 1000.0, {"all": 0.5, "small": None, "medium": 0.5, "large": None}, {"all": 3}
    )
    return d


def test_report_json_and_figures(tmp_path, diag):
    paths = report.write_report(diag, tmp_path)
    text = paths["report"].read_text()
    assert text.startswith("# Why is the mAP low?")
    assert "1. **localization**" in text  # the planted cause leads the summary
    for section in (
        "## 1. Error decomposition",
        "## 2. Per-class",
        "## 3. AP vs IoU",
        "## 4. Object size",
        "## 5. Post-processing sweep",
        "## 6. Loss vs mAP",
        "## How each impact is measured",
    ):
        assert section in text
    assert "Not logged in 1 event files: val/loss, val/AP50" in text
    assert "| model.detections_per_img | 100 | 7.0 | 300 | 8.0 |" in text  # each sweep setting alone
    assert "One unit for every impact: the COCO AP" in text
    saved = json.loads(paths["json"].read_text())
    assert saved == json.loads(json.dumps(diag.to_json()))
    assert saved["impact_unit"]["metric"] == "COCO AP" and saved["impact_unit"]["max_dets"] == 100
    assert saved["sweep"]["current"] == {"nms_thresh": 0.5, "score_thresh": 0.05, "detections_per_img": 100}
    assert saved["max_dets"]["model_cap"] == diag.max_dets.model_cap and "estimate" in saved["max_dets"]
    for c in saved["causes"]:
        assert set(c) == {"cause", "impact", "impact_ap50", "evidence", "advice", "set", "method"}
        assert c["set"] == []  # no --config: nothing is known to be in force
    assert set(saved["errors"]) == set(saved["counts"]) == set(ALL_TYPES)
    impacts = [c["impact"] for c in saved["causes"]]
    assert impacts == sorted(impacts, reverse=True)
    assert {c["cause"] for c in saved["causes"]} == {
        "detection_cap",
        "class_imbalance",
        "localization",
        "classification",
        "duplicates",
        "background",
        "missed",
        "small_objects",
    }
    figures = {k: p for k, p in paths.items() if k not in ("report", "json")}
    assert set(figures) == {
        "tide_errors",
        "per_class_vs_frequency",
        "ap_vs_iou",
        "ap_vs_max_dets",
        "box_sizes",
        "loss_vs_map",
        "postprocess_sweep",
        "proposal_recall",
    }
    for name, path in figures.items():
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        with Image.open(path) as im:
            assert im.size[0] > 100 and im.size[1] > 100
        assert f"]({path.name})" in text  # every figure is linked from the report


def test_optional_sections_say_what_is_missing(tmp_path, diag):
    bare = dataclasses.replace(diag, training_curves=None, sweep=None, proposal_recall=None)
    paths = report.write_report(bare, tmp_path)
    text = paths["report"].read_text()
    assert "Not run: pass --checkpoint" in text and "pass --run RUN_DIR" in text
    assert "Proposal recall by size: not measured" in text
    assert not (tmp_path / "loss_vs_map.png").exists() and not (tmp_path / "postprocess_sweep.png").exists()
    saved = json.loads(paths["json"].read_text())
    assert not {"training_curves", "sweep", "proposal_recall"} & set(saved)


def test_tensorboard_gets_scalars_text_and_images(tmp_path, diag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    paths = report.write_report(diag, tmp_path / "out")
    figures = {k: p for k, p in paths.items() if k not in ("report", "json")}
    report.log_tensorboard(diag, paths["report"].read_text(), figures, tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "diagnose/dAP/loc" in tags["scalars"] and "diagnose/cause/localization" in tags["scalars"]
    assert acc.Scalars("diagnose/count/fp")[0].value == diag.tide.counts["fp"]
    assert "diagnose/box_sizes" in tags["images"]
    assert any(t.startswith("diagnose/report") for t in tags["tensors"])
