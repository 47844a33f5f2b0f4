"""mapdet.evaluation.coco against pycocotools' COCOeval on small generated data with every edge case."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from mapdet import comm
from mapdet.evaluation.coco import assemble, evaluate_coco, format_table, score_categories, write_metrics
from mapdet.evaluation.inputs import GroundTruth, detection_rows, detections_from_results, rows_to_boxes
from mapdet.evaluation.matching import IOU_THRS
from mapdet.evaluation.routing import share_categories
from mapdet.structures import Detections
from tests.evaluation.cocodata import CATS, STATS, assert_same_as_pycocotools, pycocotools_eval, random_coco


def per_class_ap(precision: np.ndarray, k: int, m: int, t=slice(None)) -> float:
    s = precision[t, :, k, 0, m]
    return float(np.mean(s[s > -1])) if (s > -1).any() else -1.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_arrays_summary_and_per_class_equal_pycocotools(seed):
    gt, dets = random_coco(seed)
    result = evaluate_coco(gt, dets, max_dets=(1, 10, 100, 300))
    E300 = pycocotools_eval(gt, dets, (1, 10, 100, 300))
    assert_same_as_pycocotools(result, E300)
    # the standard summary is pycocotools' default run (maxDets 1, 10, 100), even with 300 added
    E = pycocotools_eval(gt, dets)
    summary = result.summary()
    assert [summary[k] for k in STATS] == E.stats.tolist()
    for max_det in E300.params.maxDets:
        assert summary["AP_at_maxdets"][str(max_det)] == result.ap(max_dets=max_det)
    rows = {r["category_id"]: r for r in result.per_class({c: f"class{c}" for c in CATS})}
    for k, cat in enumerate(CATS):
        assert rows[cat]["AP"] == per_class_ap(E.eval["precision"], k, 2)
        assert rows[cat]["AP50"] == per_class_ap(E.eval["precision"], k, 2, t=[0])
        assert rows[cat]["AP_max"] == per_class_ap(E300.eval["precision"], k, 3)


def test_edge_cases_are_present_and_scored_as_pycocotools():
    gt, dets = random_coco(0)
    result = evaluate_coco(gt, dets, max_dets=(100, 300))
    rows = {r["category_id"]: r for r in result.per_class({})}
    assert rows[7]["AP"] == -1 and rows[7]["num_gt"] == 0  # detections but no GT: excluded
    assert rows[5]["AP"] == -1  # crowd GT only: nothing to find, detections on it ignored
    assert rows[1]["AP_max"] != rows[1]["AP"]  # the 150 detections in one image: 300 > 100
    assert (result.precision[:, :, CATS.index(7)] == -1).all()
    summary = result.summary()
    assert summary["AP_at_maxdets"]["300"] != summary["AP_at_maxdets"]["100"] == summary["AP"]
    assert result.max_dets == [1, 10, 100, 300]


def test_empty_results_and_images_without_detections():
    gt, _ = random_coco(1)
    for empty in ([], Detections.empty()):
        result = evaluate_coco(gt, empty)
        assert_same_as_pycocotools(result, pycocotools_eval(gt, [], (1, 10, 100, 300)))
        assert result.summary()["AP"] == 0.0  # GT exists, nothing found
    no_gt = {**gt, "annotations": []}
    assert evaluate_coco(no_gt, []).summary()["AP"] == -1.0


def test_detections_score_as_their_coco_results_file():
    rng = np.random.default_rng(5)
    gt, dets = random_coco(5)
    packed = detections_from_results(dets)
    packed.boxes += rng.uniform(0, 1, packed.boxes.shape).astype(np.float32)  # non-integer boxes
    results = json.loads(json.dumps(packed.to_coco_results()))  # as written to detections.json
    assert_same_as_pycocotools(evaluate_coco(gt, packed), pycocotools_eval(gt, results, (1, 10, 100, 300)))
    back = detections_from_results(results)
    assert np.array_equal(back.boxes, packed.boxes) and np.array_equal(back.scores, packed.scores)
    assert back.boxes.dtype == np.float32 and back.labels.dtype == np.int64


def test_detections_pack_and_concat():
    d = Detections([3, 3], [[0, 0, 2, 4], [1, 1, 3, 3]], [0.5, 0.25], [1, 2])
    assert d.to_coco_results()[0] == {"image_id": 3, "category_id": 1, "bbox": [0.0, 0.0, 2.0, 4.0], "score": 0.5}
    both = Detections.concat([d, Detections.empty(), d])
    assert len(both) == 4 and both.boxes.shape == (4, 4)
    assert len(Detections.concat([])) == 0
    with pytest.raises(ValueError, match="length"):
        Detections([1], np.zeros((2, 4)), [0.1], [1])


@pytest.mark.parametrize("world", [2, 3, 9])
def test_category_split_over_ranks_concatenates_to_the_whole(world):
    """What every rank of a `world`-process run computes and gathers (9 > 5 categories: idle
    ranks), with the routing done in memory (tests/evaluation/test_evaluator_ranks.py runs real processes)."""
    gt, dets = random_coco(2)
    truth = GroundTruth.parse(gt)
    rows = detection_rows(dets, truth)
    counts = np.bincount(rows["cat"], minlength=len(CATS))[None]
    owner = share_categories(truth.counts(), counts, world)
    assert len(owner) == len(CATS) and len(set(owner.tolist())) == min(world, len(CATS))
    max_dets = [1, 10, 100, 300]
    parts = []
    for rank in range(world):  # each rank parses only its categories' GT boxes
        cats = np.flatnonzero(owner == rank)
        found = rows_to_boxes(rows[owner[rows["cat"]] == rank])
        parts.append(score_categories("numpy", gt, truth, found, cats, IOU_THRS, max_dets))
    assert_same_as_pycocotools(assemble(parts, truth, IOU_THRS, max_dets), pycocotools_eval(gt, dets, max_dets))


def test_an_error_on_one_rank_is_raised_on_every_rank(monkeypatch):
    """Rank 0 sees good data; rank 1's detections hold a NaN: rank 0 must raise, not wait."""
    gt, dets = random_coco(0)
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "get_rank", lambda: 0)
    monkeypatch.setattr(
        comm, "all_gather_object", lambda own: [own, own._replace(wide=False, error=ValueError("rank 1: NaN"))]
    )
    with pytest.raises(ValueError, match="rank 1: NaN"):
        evaluate_coco(gt, dets)


@pytest.mark.parametrize("engine", ["pycocotools", "faster-coco-eval"])
def test_reference_engines_agree_and_leave_inputs_alone(engine):
    gt, dets = random_coco(3)
    before = copy.deepcopy((gt, dets))
    mine, other = evaluate_coco(gt, dets), evaluate_coco(gt, dets, engine=engine)
    for key in ("precision", "recall", "scores"):
        assert np.abs(getattr(mine, key) - getattr(other, key)).max() <= 1e-12
    assert (gt, dets) == before  # both tools write into the dicts they are given


def test_custom_iou_thresholds():
    gt, dets = random_coco(4)
    E = pycocotools_eval(gt, dets)
    result = evaluate_coco(gt, dets, iou_thrs=[0.5, 0.75], max_dets=(100,))
    s = E.eval["precision"][[5], :, :, 0, 2]  # IoU 0.75 is evaluated alone, identically
    assert result.ap(iou=0.75) == float(np.mean(s[s > -1]))
    assert result.summary()["AP50"] == E.stats[1]
    assert result.summary()["AP"] != E.stats[0]  # the mean over the two thresholds only


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda gt, d: d.append({**d[0], "category_id": 99}), "category ids not in the ground truth: \\[99\\]"),
        (lambda gt, d: d.append({**d[0], "image_id": 4242}), "image ids not in the ground truth: \\[4242\\]"),
        (lambda gt, d: d.append({**d[0], "score": float("nan")}), "non-finite"),
        (lambda gt, d: d.append({"image_id": d[0]["image_id"], "bbox": [1, 2, 3, 4]}), "malformed detection"),
        (lambda gt, d: d.append({**d[0], "bbox": [1, 2, 3]}), "malformed detection"),
        (lambda gt, d: gt["annotations"][0].update(id=0), "ids must be unique and >= 1"),
        (lambda gt, d: gt["annotations"][1].update(id=gt["annotations"][0]["id"]), "unique"),
        (lambda gt, d: gt["annotations"][0].update(category_id=99), "ground-truth annotations refer to category"),
        (lambda gt, d: gt.pop("images"), "no list 'images'"),
    ],
)
def test_bad_input_raises_a_clear_error(change, message):
    gt, dets = random_coco(0)
    change(gt, dets)
    with pytest.raises(ValueError, match=message):
        evaluate_coco(gt, dets)


def test_missing_iscrowd_means_not_crowd():
    gt, dets = random_coco(1)
    plain = copy.deepcopy(gt)
    for a in plain["annotations"]:
        a["iscrowd"] = 0
    without = copy.deepcopy(plain)
    for a in without["annotations"]:
        del a["iscrowd"]
    assert np.array_equal(evaluate_coco(without, dets).precision, evaluate_coco(plain, dets).precision)


def test_metrics_file_and_table(tmp_path):
    gt, dets = random_coco(0)
    result = evaluate_coco(gt, dets)
    names = {c: f"class{c}" for c in CATS}
    metrics = write_metrics(result, tmp_path / "sub" / "metrics.json", names, num_train={1: 40, 2: 7})
    assert json.loads((tmp_path / "sub" / "metrics.json").read_text()) == metrics
    bbox = metrics["bbox"]
    assert set(STATS) <= set(bbox) and set(bbox["AP_at_maxdets"]) == {"1", "10", "100", "300"}
    rows = {r["category_id"]: r for r in bbox["per_class"]}
    assert rows[1]["num_train"] == 40 and rows[3]["num_train"] == 0 and rows[7]["num_gt"] == 0
    assert rows[1]["num_gt"] == sum(a["category_id"] == 1 and not a["iscrowd"] for a in gt["annotations"])
    assert result.ar(100) == bbox["AR100"] and result.ap(area="small") == bbox["APs"]
    table = format_table(bbox["per_class"]).splitlines()
    assert len(table) == 2 + len(CATS) and "class7" in table[-1] and " - " in table[-1]
    with pytest.raises(ValueError, match="area"):
        result.ap(area="tiny")
    with pytest.raises(ValueError, match="category 4 was not evaluated"):
        result.ap(cat_id=4)
    assert result.ap(max_dets=50) == -1  # not evaluated at 50, like pycocotools' summarize
