"""Diagnosis measurements and cause ranking on generated sets with one planted cause each."""

from __future__ import annotations

import numpy as np
import pytest

from mapdet import diagnosis
from mapdet.config import ModelConfig
from mapdet.diagnosis import DiagnoseSettings
from mapdet.evaluator import Detections

PITCH, SIDE = 50, 40  # boxes on a grid: never overlapping, all medium (40 x 40 = 1600 px)


def scene(n_img: int, classes_per_image, width: int = 1000, height: int = 800) -> tuple[dict, list]:
    """GT on a grid; ``classes_per_image(i)`` lists the classes of image i's boxes, in grid order."""
    cols = width // PITCH
    images, anns, objs = [], [], []
    for i in range(1, n_img + 1):
        images.append({"id": i, "width": width, "height": height, "file_name": f"{i}.jpg"})
        for j, c in enumerate(classes_per_image(i)):
            x, y = (j % cols) * PITCH, (j // cols) * PITCH
            anns.append({"id": len(anns) + 1, "image_id": i, "bbox": [x, y, SIDE, SIDE], "area": SIDE * SIDE,
                         "iscrowd": 0, "category_id": c})
            objs.append((i, [x, y, x + SIDE, y + SIDE], c))
    cats = sorted({a["category_id"] for a in anns} | {1, 2, 3})
    return {"images": images, "annotations": anns, "categories": [{"id": k, "name": f"class{k}"} for k in cats]}, objs


def detect(objs: list, dx: float = 0.0, seed: int = 0, keep=lambda c: True) -> Detections:
    rng = np.random.default_rng(seed)
    rows = [o for o in objs if keep(o[2])]
    boxes = np.array([[b[0] + dx, b[1], b[2] + dx, b[3]] for _, b, _ in rows], dtype=np.float32).reshape(-1, 4)
    return Detections(np.array([o[0] for o in rows]), boxes, rng.uniform(0.3, 1.0, len(rows)),
                      np.array([o[2] for o in rows]))


def manifest(freq_images: dict[int, int], num_samples: int) -> dict:
    return {"classes": [{"id": k, "name": f"class{k}"} for k in sorted(freq_images)], "num_samples": num_samples,
            "class_stats": {str(k): {"images": n, "instances": 3 * n} for k, n in freq_images.items()}}


def causes(d: dict) -> list[str]:
    return [c["cause"] for c in d["causes"]]


def test_perfect_detections_have_no_cause():
    gt, objs = scene(4, lambda i: [1, 2, 3] * 4)
    d = diagnosis.diagnose(gt, detect(objs))
    assert d["summary"]["AP"] == pytest.approx(100.0)
    assert all(c["impact"] == 0 for c in d["causes"])
    assert set(d["errors"]) == set(d["counts"]) == {"cls", "loc", "both", "dupe", "bkg", "miss", "fp", "fn"}


def test_detection_cap_ranks_first_when_images_hold_more_objects_than_the_cap():
    gt, objs = scene(4, lambda i: [1, 2, 3] * 40)  # 120 objects per image
    d = diagnosis.diagnose(gt, detect(objs), settings=DiagnoseSettings(cap=100))
    top = d["causes"][0]
    assert top["cause"] == "detection_cap" and top["impact"] > 10
    md = d["max_dets"]
    assert md["share_images_gt_over_100"] == 1.0 and md["share_images_at_cap"] == 1.0
    caps = md["per_image"]["cap"]
    assert md["per_image"]["ap50"][caps.index(300)] == pytest.approx(100.0)
    # the misses past the cap are the cap's, not "missed"
    assert next(c for c in d["causes"] if c["cause"] == "missed")["impact"] == 0


def test_unmeasurable_cap_says_so():
    gt, objs = scene(2, lambda i: [1, 2, 3] * 40)
    d = diagnosis.diagnose(gt, diagnosis.cap_per_image(detect(objs), 100), settings=DiagnoseSettings(cap=100))
    cap = next(c for c in d["causes"] if c["cause"] == "detection_cap")
    assert cap["impact"] == 0 and "not measurable" in cap["evidence"]


def test_rare_classes_never_detected_rank_class_imbalance_first():
    gt, objs = scene(20, lambda i: [1, 2, 3] * 3 + ([4, 5] if i == 1 else []))
    m = manifest({1: 20, 2: 20, 3: 20, 4: 1, 5: 1}, 20)
    d = diagnosis.diagnose(gt, detect(objs, keep=lambda c: c <= 3), m)
    top = d["causes"][0]
    assert top["cause"] == "class_imbalance"
    assert top["impact"] == pytest.approx(100.0 * 2 / 5)  # (100 - 0) x 2 of 5 classes
    pc = d["per_class"]
    assert [r["id"] for r in pc["zero_ap"]] == [4, 5] and pc["rare"] == [4, 5]
    assert pc["zero_ap"][0]["repeat_factor"] == pytest.approx(np.sqrt(0.1 / 0.05))
    assert pc["spearman_ap_vs_freq"] == pytest.approx(1.0)
    assert next(c for c in d["causes"] if c["cause"] == "missed")["impact"] == 0


def test_jittered_boxes_rank_localization_first():
    gt, objs = scene(6, lambda i: [1, 2, 3] * 5)
    d = diagnosis.diagnose(gt, detect(objs, dx=9))  # IoU = 31/49 = 0.63
    assert d["summary"]["AP50"] == pytest.approx(100.0) and d["summary"]["AP75"] == pytest.approx(0.0)
    assert causes(d)[0] == "localization"
    assert d["causes"][0]["impact"] == pytest.approx(100.0 - d["summary"]["AP"])
    ious = d["iou_curve"]
    assert ious["ap"][0] == pytest.approx(100.0) and ious["ap"][-1] == pytest.approx(0.0)


def test_small_objects_gap_and_anchor_comparison():
    gt, objs = scene(4, lambda i: [1, 2] * 6)
    for a in gt["annotations"][::2]:  # every other box shrinks to 10 x 10 and is never found
        a["bbox"][2:] = [10, 10]
        a["area"] = 100
    small = {(a["image_id"], a["bbox"][0], a["bbox"][1]) for a in gt["annotations"] if a["area"] == 100}
    objs = [o for o in objs if (o[0], o[1][0], o[1][1]) not in small]
    model = ModelConfig(min_size=400, max_size=1000, anchor_sizes=[32, 64, 128, 256, 512])
    d = diagnosis.diagnose(gt, detect(objs), settings=DiagnoseSettings(model=model))
    size = d["size"]
    assert size["share_gt"]["small"] == pytest.approx(0.5)
    assert size["ap50"]["small"] == pytest.approx(0.0) and size["ap50"]["medium"] == pytest.approx(100.0)
    assert size["share_below_smallest_anchor_half"] == pytest.approx(0.5)  # 10 px x 0.5 scale < 16
    assert sum(size["hist_model_input"]) == len(gt["annotations"])
    assert causes(d)[0] == "small_objects" and d["causes"][0]["impact"] == pytest.approx(50.0)


def test_spearman_and_ranks():
    assert diagnosis.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert diagnosis.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert diagnosis.spearman([1, 2], [1, 2]) is None
    assert diagnosis.spearman([1, 1, 1], [1, 2, 3]) is None
    assert diagnosis._ranks(np.array([5.0, 1.0, 5.0, 3.0])).tolist() == [2.5, 0.0, 2.5, 1.0]


def test_rebalancing_factors_and_weights():
    m = manifest({1: 20, 2: 1, 3: 0}, 40)  # instances = 3 x images: 60, 3, 0
    r, w = diagnosis.rebalancing(m, t=0.1)
    assert r == {1: 1.0, 2: pytest.approx(2.0), 3: 1.0}  # f = 0.5, 0.025, 0 (never seen: not repeated)
    assert w[2] == pytest.approx(w[1] * np.sqrt(20)) and w[1] + w[2] == pytest.approx(2.0) and w[3] == 1.0


def test_manifest_from_coco_counts_images_and_instances():
    gt, _ = scene(4, lambda i: [1, 1, 2] if i == 1 else [1])
    gt["annotations"][0]["iscrowd"] = 1
    m = diagnosis.manifest_from_coco(gt)
    assert m["num_samples"] == 4
    assert m["class_stats"]["1"] == {"instances": 4, "images": 4} and m["class_stats"]["2"] == {"instances": 1, "images": 1}
    assert m["class_stats"]["3"] == {"instances": 0, "images": 0}


def test_cap_per_image_keeps_top_scores_of_each_image():
    d = Detections([1, 1, 1, 2, 2], np.zeros((5, 4)), [0.1, 0.9, 0.5, 0.2, 0.3], [1, 1, 2, 1, 1])
    kept = diagnosis.cap_per_image(d, 2)
    pairs = sorted(zip(kept.image_id.tolist(), kept.scores.tolist()))
    assert [i for i, _ in pairs] == [1, 1, 2, 2]
    assert [s for _, s in pairs] == pytest.approx([0.5, 0.9, 0.2, 0.3])
    assert len(diagnosis.cap_per_image(Detections.empty(), 5)) == 0


def test_empty_results_are_diagnosed():
    gt, _ = scene(2, lambda i: [1, 2, 3])
    d = diagnosis.diagnose(gt, Detections.empty())
    assert d["summary"]["AP"] == pytest.approx(0.0) and d["counts"]["miss"] == 6
    assert len(d["causes"]) == 8


def test_training_curves_read_tensorboard_and_name_missing_tags(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "tensorboard" / "run"))
    for step in range(0, 30, 10):
        w.add_scalar("train/loss", 1.0 / (step + 1), step)
    w.add_scalar("val/AP", 0.25, 20)
    w.close()
    tc = diagnosis.training_curves(tmp_path)
    assert tc["series"]["train/loss"] == [[0, 1.0], [10, pytest.approx(1 / 11)], [20, pytest.approx(1 / 21)]]
    assert tc["series"]["val/AP"] == [[20, 0.25]]
    assert tc["missing"] == ["val/loss", "val/AP50"]
    assert diagnosis.training_curves(tmp_path / "nothing") == {"series": {}, "missing": ["train/loss", "val/loss",
                                                                                          "val/AP", "val/AP50"], "files": []}


def test_under_training_is_the_ap50_the_last_interval_added():
    from mapdet.causes import add_cause, under_training

    curves = {"series": {"val/AP50": [[360, 0.10], [720, 0.18], [1080, 0.30]],
                         "train/loss": [[s, 3.0 / (1 + s)] for s in range(0, 1090, 10)]}}
    c = under_training(curves, {"step": 1080, "global_batch": 4, "processes": 1}, 240)
    assert c["impact"] == pytest.approx(12.0)
    assert "18.0 at step 720 to 30.0 at step 1080" in c["evidence"]
    assert "4320 images in 1080 steps (4 per step: 1 process(es)), 18.0 epochs of 240" in c["evidence"]
    assert "data.global_batch" in c["advice"]
    ranked = add_cause([{"cause": "localization", "impact": 5.0}, {"cause": "missed", "impact": 20.0}], c)
    assert [r["cause"] for r in ranked] == ["missed", "under_training", "localization"]
    assert ranked[1]["method"].startswith("(with --run)")


def test_under_training_needs_two_validations_and_never_goes_negative():
    from mapdet.causes import under_training

    one = under_training({"series": {"val/AP50": [[720, 0.5]]}}, None, None)
    assert one["impact"] == 0.0 and "not measurable (set train.eval_every)" in one["evidence"]
    assert "images" not in one["evidence"]  # an old run's meta has no global batch: nothing invented
    falling = under_training({"series": {"val/AP50": [[360, 0.5], [720, 0.4]]}}, None, None)
    assert falling["impact"] == pytest.approx(-10.0)  # add_cause clips it to 0 when ranking
