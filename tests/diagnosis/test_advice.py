"""Advice that fits the run: each cause's ``set`` follows the evidence and the config in force."""

from __future__ import annotations

import pytest

from mapdet.config import load_config
from mapdet.diagnosis import advice
from mapdet.diagnosis.curves import RunEvidence, TrainingCurves
from mapdet.diagnosis.measures import diagnose
from mapdet.diagnosis.settings import DiagnoseSettings
from mapdet.modeling.build import resolve_config
from tests.diagnosis.scenes import capped_scene, detect, manifest, scene, small_scene
from tests.helpers import REPO

DEMO = REPO / "launch" / "configs" / "demo.yaml"


def run_diagnosis(gt, dets, overrides=(), path=None, train_manifest=None, run=None):
    cfg = load_config(path, list(overrides))
    # as `mapdet diagnose` takes it from the config: None (off) lets the diagnosis derive t
    settings = DiagnoseSettings(model=cfg.model, repeat_threshold=cfg.data.repeat_threshold, config=cfg)
    d = diagnose(gt, dets, train_manifest, settings, run=run)
    assert_nothing_repeats_the_config(d, cfg)
    return d


def assert_nothing_repeats_the_config(d, cfg):
    model = resolve_config(cfg.model)
    for c in d.causes:
        assert bool(c.set) == (c.impact > 0 and "no lever left" not in c.advice), c
        for override in c.set:
            key, value = override.split("=", 1)
            section, name = key.split(".")
            in_force = getattr(model if section == "model" else getattr(cfg, section), name)
            assert load_config(None, [override]) != load_config(None, [f"{key}={advice._fmt(in_force)}"]), override
            assert value != advice._fmt(in_force)


@pytest.fixture
def long_tail():
    gt, objs = scene(20, lambda i: [1, 2, 3] * 3 + ([4, 5] if i == 1 else []))
    return gt, detect(objs, keep=lambda c: c <= 3), manifest({1: 20, 2: 20, 3: 20, 4: 1, 5: 1}, 20)


def test_class_imbalance_turns_on_what_is_off(long_tail):
    gt, dets, m = long_tail
    d = run_diagnosis(gt, dets, ["model.class_weights=none"], train_manifest=m)
    c = d.causes[0]
    # t = 1.0, the frequency 2/3 of the 5 classes are below (3 are in every image): both rare classes repeated 4.5x
    assert c.cause == "class_imbalance" and c.set == ["data.repeat_threshold=1", "model.class_weights=inv_sqrt"]
    assert "2 of the 5 classes are below t, the rarest repeated 4.5x" in c.advice
    d = run_diagnosis(gt, dets, ["data.repeat_threshold=0.1", "model.class_weights=none"], train_manifest=m)
    assert d.causes[0].set == ["model.class_weights=inv_sqrt"]


def test_class_imbalance_with_the_demos_rebalancing_already_on_advises_the_next_lever(long_tail):
    gt, dets, m = long_tail
    d = run_diagnosis(gt, dets, path=DEMO, train_manifest=m)  # data.repeat_threshold 0.3, inv_sqrt
    c = d.causes[0]
    assert c.cause == "class_imbalance" and c.set == ["data.repeat_threshold=0.6"]
    assert "data.repeat_threshold=0.3) and class weights (model.class_weights=inv_sqrt) are already on" in c.advice
    assert "at t=0.6 the rarest class is repeated 3.5x per epoch instead of 2.4x" in c.advice
    d = run_diagnosis(gt, dets, ["data.repeat_threshold=1.0", "train.max_steps=500"], path=DEMO, train_manifest=m)
    c = d.causes[0]
    assert c.set == ["train.max_steps=1000"] and "already reaches the most frequent class" in c.advice


@pytest.fixture
def small_boxes():
    return small_scene()  # every other box 10 x 10 and never found


def test_small_objects_advise_anchors_from_the_box_sizes(small_boxes):
    gt, dets = small_boxes
    base = ["model.min_size=400", "model.max_size=1000"]
    d = run_diagnosis(gt, dets, [*base, "model.anchor_sizes=[32,64,128,256,512]"])
    c = d.causes[0]
    # 10 px boxes are 5 px at the model's input: anchors 4x smaller put the first at 8 (<= 2 x 5)
    assert c.cause == "small_objects" and c.set == ["model.anchor_sizes=[8,16,32,64,128]"]
    assert "50% of boxes are smaller than half of it" in c.advice


def test_small_objects_with_anchors_that_fit_say_so_and_advise_a_larger_input(small_boxes):
    gt, dets = small_boxes
    d = run_diagnosis(gt, dets, ["model.min_size=400", "model.max_size=1000", "model.anchor_sizes=[4,8,16,32,64]"])
    c = d.causes[0]
    assert c.cause == "small_objects" and c.set == ["model.min_size=608", "model.max_size=1504"]
    assert "the smallest anchor (4 px) already fits the small boxes: 0% of boxes are smaller than half" in c.advice


def test_localization_restores_the_box_loss_before_anything_else():
    gt, objs = scene(6, lambda i: [1, 2, 3] * 5)
    dets = detect(objs, dx=9)
    d = run_diagnosis(gt, dets, ["model.box_loss_weight=0"])
    assert d.causes[0].cause == "localization" and d.causes[0].set == ["model.box_loss_weight=1"]
    d = run_diagnosis(gt, dets)  # torchvision's weight: the next lever, a larger input (scale 1.28 < 2)
    assert d.causes[0].set == ["model.min_size=1536", "model.max_size=3072"]


def test_under_training_advises_more_steps_than_in_force():
    gt, objs = scene(4, lambda i: [1, 2, 3] * 4)
    run = RunEvidence(TrainingCurves({"val/AP": [[270, 0.1], [540, 0.3]]}, [], []), None, None)
    d = run_diagnosis(gt, detect(objs), ["train.max_steps=540"], run=run)
    c = d.cause("under_training")
    assert c.impact == pytest.approx(20.0) and c.set == ["train.max_steps=1080"]
    assert d.causes[0] is c


def test_without_a_config_no_cause_carries_a_set(long_tail):
    gt, dets, m = long_tail
    d = diagnose(gt, dets, m)
    assert all(c.set == [] for c in d.causes)
    assert "(pass --config for overrides that fit the run)" in d.causes[0].advice


def test_value_formatting_reads_back_as_yaml():
    assert [advice._fmt(v) for v in (None, True, 0.05, 1.0, 300, [8, 16], "inv_sqrt")] == [
        "null",
        "true",
        "0.05",
        "1",
        "300",
        "[8,16]",
        "inv_sqrt",
    ]
    cfg = load_config(
        None,
        [
            "model.score_thresh=0.05",
            "model.arch=small",
            "model.anchor_sizes=[8,16,32,64]",
            "data.repeat_threshold=null",
        ],
    )
    assert cfg.model.score_thresh == 0.05 and cfg.model.anchor_sizes == [8, 16, 32, 64]
    assert cfg.data.repeat_threshold is None


def test_detection_cap_without_a_sweep_reads_the_results_or_the_objects_per_image():
    gt, objs = scene(4, lambda i: [1, 2, 3] * 40)  # 120 objects per image, results hold them all
    d = run_diagnosis(gt, detect(objs), ["model.detections_per_img=100"])
    c = d.causes[0]
    assert c.cause == "detection_cap" and c.set == ["model.detections_per_img=300"]
    assert "the results truncated to 300 per image give AP 100.0" in c.advice
    gt, dets = capped_scene()  # 150 objects per image, results capped at 100: beyond it is unmeasured
    d = run_diagnosis(gt, dets, ["model.detections_per_img=100"])
    c = d.causes[0]
    assert c.cause == "detection_cap" and c.set == ["model.detections_per_img=300"]
    assert "300 covers the most objects in an image (150); unmeasured: pass --checkpoint" in c.advice
