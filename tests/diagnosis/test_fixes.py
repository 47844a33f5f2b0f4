"""TIDE's fixes applied to the results and scored by COCO: each planted error, fixed, gives AP 100."""

from __future__ import annotations

import numpy as np
import pytest

from mapdet.diagnosis.fixes import move_to_iou, paired_iou, reference_ious
from mapdet.diagnosis.measures import diagnose
from mapdet.diagnosis.tide_matching import ImageTruth
from mapdet.structures import Detections
from tests.diagnosis.scenes import SIDE, detect, scene


def test_move_to_iou_lands_just_above_the_reference_and_keeps_boxes_already_there():
    rng = np.random.default_rng(0)
    targets = np.concatenate([rng.uniform(0, 100, (50, 2)), np.zeros((50, 2))], axis=1)
    targets[:, 2:] = targets[:, :2] + rng.uniform(3, 60, (50, 2))
    boxes = targets + rng.normal(0, 8, (50, 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    want = rng.uniform(0.3, 0.9, 50)
    moved = move_to_iou(boxes, targets, want)
    before, after = paired_iou(boxes, targets), paired_iou(moved, targets)
    below = before < want
    assert (after[below] >= want[below]).all() and (after[below] <= want[below] + 2e-3).all()
    assert np.array_equal(moved[~below], boxes[~below])


def test_reference_iou_is_075_unless_one_pixel_per_edge_costs_more():
    gt, _ = scene(1, lambda i: [1, 1])
    gt["annotations"][1]["bbox"] = [100, 100, 2, 20]  # a thin pole
    g = ImageTruth.from_coco(gt)
    ref = reference_ious(g, np.ones(1))
    assert ref[0] == pytest.approx(0.75)  # 40 x 40: one pixel per edge leaves 0.91
    assert ref[1] == pytest.approx(2 * 20 / (4 * 22))  # 2 x 20: one pixel per edge leaves 0.45
    assert reference_ious(g, np.full(1, 0.5))[0] == pytest.approx(0.75)  # 20 x 20 at the input: 0.83


def planted(extra: Detections, gt: dict, objs: list):
    return diagnose(gt, Detections.concat([detect(objs), extra]))


@pytest.fixture
def grid():
    return scene(4, lambda i: [1, 2, 3] * 4)


def test_removing_duplicates_and_background_restores_ap(grid):
    gt, objs = grid
    found = detect(objs)
    dupes = Detections(found.image_id, found.boxes + np.float32([2, 0, 2, 0]), found.scores - 0.25, found.labels)
    d = planted(dupes, gt, objs)
    assert d.tide.counts["dupe"] == len(objs) and d.summary.AP < 100
    assert d.fixes.dupe.ap == pytest.approx(100.0 - d.summary.AP) and d.fixes.dupe.ap50 > 0
    assert d.cause("duplicates").impact == pytest.approx(d.fixes.dupe.ap, abs=1e-3)
    assert d.fixes.bkg.ap == 0 and d.fixes.cls.ap == 0

    far = np.tile(np.float32([[900, 700, 940, 740]]), (len(objs), 1))  # no object there
    bkg = Detections(found.image_id, far, found.scores, found.labels)
    d = planted(bkg, gt, objs)
    assert d.tide.counts["bkg"] == len(objs)
    assert d.fixes.bkg.ap == pytest.approx(100.0 - d.summary.AP) and d.fixes.bkg.ap > 5


def test_relabelling_confusions_and_removing_misses_restore_ap(grid):
    gt, objs = grid
    wrong = [(i, b, c % 3 + 1) if j % 4 == 0 else (i, b, c) for j, (i, b, c) in enumerate(objs)]
    d = diagnose(gt, detect(wrong))
    assert d.tide.counts["cls"] == len(objs) // 4
    assert d.fixes.cls.ap == pytest.approx(100.0 - d.summary.AP) and d.fixes.cls.ap > 10

    d = diagnose(gt, detect([o for j, o in enumerate(objs) if j % 3]))
    un = d.miss_breakdown.group("unexplained")
    assert un.count == len(objs) // 3 and un.gain.ap == pytest.approx(100.0 - d.summary.AP)


def test_loose_boxes_are_moved_only_up_to_the_reference(grid):
    gt, objs = grid
    d = diagnose(gt, detect(objs, dx=SIDE / 2))  # 20 px off on a 40 px box: IoU 20/60 = 0.33, loc errors
    assert d.tide.counts["loc"] == len(objs) and d.summary.AP == 0
    # moved to IoU 0.75: true positives at 0.5..0.75 (6 of 10 thresholds), none above
    assert d.fixes.loc.ap == pytest.approx(60.0, abs=1e-6) and d.fixes.loc.ap50 == pytest.approx(100.0)
    assert d.causes[0].cause == "localization" and d.fixes.moved_boxes == len(objs)
