"""TIDE decomposition: hand-built cases with known answers, edge cases, agreement with tidecv."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mapdet.diagnosis import tide
from mapdet.diagnosis.tide_matching import box_iou

A = [0, 0, 10, 10]  # xyxy
B = [20, 0, 30, 10]


def coco(boxes_by_image: dict[int, list[tuple[list[float], int]]], crowd: set[int] = frozenset()) -> dict:
    """COCO ground truth from {image_id: [(xyxy, class), ...]}; ``crowd`` holds annotation ids."""
    images, anns = [], []
    for image_id, objs in boxes_by_image.items():
        images.append({"id": image_id, "width": 100, "height": 100, "file_name": f"{image_id}.jpg"})
        for (x1, y1, x2, y2), c in objs:
            aid = len(anns) + 1
            anns.append(
                {
                    "id": aid,
                    "image_id": image_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(aid in crowd),
                    "category_id": c,
                }
            )
    classes = sorted({1, 2, 3} | {a["category_id"] for a in anns})
    return {"images": images, "annotations": anns, "categories": [{"id": k, "name": f"c{k}"} for k in classes]}


def dets(rows: list[tuple[int, list[float], int, float]]):
    """Detections from [(image_id, xyxy, class, score), ...]."""
    return SimpleNamespace(
        image_id=np.array([r[0] for r in rows], dtype=np.int64),
        boxes=np.array([r[1] for r in rows], dtype=np.float32).reshape(-1, 4),
        labels=np.array([r[2] for r in rows], dtype=np.int64),
        scores=np.array([r[3] for r in rows], dtype=np.float32),
    )


def shift(box, dx):
    return [box[0] + dx, box[1], box[2] + dx, box[3]]


def test_perfect_detections_have_no_errors():
    r = tide.decompose(coco({1: [(A, 1), (B, 2)]}), dets([(1, A, 1, 0.9), (1, B, 2, 0.8)]))
    assert r.ap == pytest.approx(100.0)
    assert all(v == 0 for v in r.counts.values())
    assert all(v == pytest.approx(0.0) for v in r.errors.values())


def test_localization_error_fix_gives_full_ap():
    # shift by 6 of 10: IoU = 4*10 / (2*100 - 40) = 0.25, inside [t_b, t_f]
    r = tide.decompose(coco({1: [(A, 1)]}), dets([(1, shift(A, 6), 1, 0.9)]))
    assert r.counts == {"cls": 0, "loc": 1, "both": 0, "dupe": 0, "bkg": 0, "miss": 0, "fp": 1, "fn": 1}
    assert r.ap == 0.0 and r.errors["loc"] == pytest.approx(100.0)
    assert r.errors["miss"] == 0.0  # the box is explained by the loc error, not missed


def test_class_error_is_relabelled_to_the_gt_class():
    r = tide.decompose(coco({1: [(A, 2)]}), dets([(1, A, 1, 0.9)]))
    assert r.counts["cls"] == 1 and r.counts["miss"] == 0
    assert r.ap == 0.0 and r.errors["cls"] == pytest.approx(100.0)


def test_duplicate_costs_precision():
    g = coco({1: [(A, 1), (B, 1)]})
    r = tide.decompose(g, dets([(1, A, 1, 0.9), (1, A, 1, 0.8), (1, B, 1, 0.7)]))
    assert r.counts["dupe"] == 1 and r.counts["fp"] == 1
    # precision 1 up to recall 0.5 (51 points), then 2/3 for the remaining 50 points
    base = (51 * 1.0 + 50 * 2 / 3) / 101 * 100
    assert r.ap == pytest.approx(base)
    assert r.errors["dupe"] == pytest.approx(100.0 - base)
    assert r.errors["fp"] == pytest.approx(100.0 - base)


def test_background_and_both_errors():
    g = coco({1: [(A, 1), (B, 2)]})
    far = [60, 60, 70, 70]
    r = tide.decompose(g, dets([(1, far, 1, 0.95), (1, A, 1, 0.9), (1, shift(B, 6), 1, 0.85)]))
    # far box: IoU 0 with everything -> bkg; class-1 box at IoU 0.25 with a class-2 box -> both
    assert r.counts["bkg"] == 1 and r.counts["both"] == 1
    assert r.counts["miss"] == 1  # B (class 2) has no detection of its class and no cls/loc error
    # class 1: the bkg box outranks its TP (AP 50); class 2: AP 0 -> mean 25
    assert r.ap == pytest.approx(25.0) and r.errors["bkg"] == pytest.approx(25.0)
    assert r.errors["miss"] == pytest.approx(25.0)  # class 2 left without boxes drops out of the mean


def test_missed_box_counts_and_fix():
    r = tide.decompose(coco({1: [(A, 1), (B, 1)]}), dets([(1, A, 1, 0.9)]))
    assert r.counts["miss"] == 1 and r.counts["fn"] == 1 and r.counts["fp"] == 0
    assert r.ap == pytest.approx(51 / 101 * 100)
    assert r.errors["miss"] == pytest.approx(100 - 51 / 101 * 100)
    assert r.errors["fn"] == pytest.approx(r.errors["miss"])


def test_only_the_best_error_per_box_becomes_true_positive():
    g = coco({1: [(A, 1)]})
    r = tide.decompose(g, dets([(1, shift(A, 6), 1, 0.9), (1, shift(A, -6), 1, 0.8)]))
    assert r.counts["loc"] == 2
    m = r.matching
    assert m.best.tolist() == [True, False]  # sorted by score: the 0.9 one is fixed, 0.8 removed
    assert r.errors["loc"] == pytest.approx(100.0)


def test_crowd_box_absorbs_detections_and_never_counts_as_missed():
    g = coco({1: [(A, 1), ([40, 40, 90, 90], 1)]}, crowd={2})
    r = tide.decompose(g, dets([(1, A, 1, 0.9), (1, [50, 50, 60, 60], 1, 0.95)]))
    assert r.counts["fp"] == 0 and r.counts["fn"] == 0 and r.counts["miss"] == 0
    assert r.ap == pytest.approx(100.0)


def test_detection_cap_per_image_drops_lowest_scores():
    boxes = [([x, 0, x + 5, 5], 1) for x in range(0, 600, 6)] + [([x, 10, x + 5, 15], 1) for x in range(0, 300, 6)]
    g = coco({1: boxes})
    d = dets([(1, b, 1, 1.0 - i * 1e-3) for i, (b, _) in enumerate(boxes)])
    r = tide.decompose(g, d, max_dets=100)
    assert len(boxes) == 150 and r.matching.dropped_by_cap == 50
    assert r.counts["miss"] == 50 and r.counts["fp"] == 0
    assert r.ap == pytest.approx(np.ceil(100 / 150 * 100) / 101 * 100)  # recall points 0..0.66 reached
    assert tide.decompose(g, d, max_dets=150).ap == pytest.approx(100.0)


def test_empty_inputs_and_unknown_images():
    g = coco({1: [(A, 1)], 2: []})
    r = tide.decompose(g, dets([]))
    assert r.ap == 0.0 and r.counts["miss"] == 1 and r.errors["miss"] == pytest.approx(0.0)  # class gone: empty
    r = tide.decompose(g, dets([(2, A, 1, 0.5), (7, A, 1, 0.9)]))
    assert r.counts["bkg"] == 1 and r.matching.outside_gt == 1
    r = tide.decompose(coco({}), dets([]))
    assert r.ap == 0.0 and sum(r.counts.values()) == 0


def test_box_iou_edges():
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array([[0, 0, 10, 10], [10, 0, 20, 10], [5, 0, 15, 10], [0, 0, 0, 0]], float)
    assert box_iou(a, b).ravel().tolist() == pytest.approx([1.0, 0.0, 1 / 3, 0.0])
    assert box_iou(b[2:3], np.array([[0, 0, 100, 100]], float), crowd=True).item() == pytest.approx(1.0)
    assert box_iou(a, np.zeros((0, 4))).shape == (1, 0)


def test_unknown_fix_type_fails_loudly():
    r = tide.decompose(coco({1: [(A, 1)]}), dets([(1, A, 1, 0.9)]))
    with pytest.raises(ValueError, match="unknown TIDE fix"):
        tide.fixed_ap(r.matching, "typo")


def _random_set(seed: int, n_img: int = 40, n_cls: int = 4, crowd_dets: int = 0):
    rng = np.random.default_rng(seed)
    gt, rows = {}, []
    for i in range(1, n_img + 1):
        gt[i] = []
        for _ in range(rng.integers(1, 14)):
            x, y, w, h = rng.uniform(0, 400), rng.uniform(0, 300), rng.uniform(5, 120), rng.uniform(5, 90)
            c = int(rng.integers(1, n_cls + 1))
            gt[i].append(([x, y, x + w, y + h], c))
            for _ in range(rng.integers(0, 3)):
                j = rng.normal(0, 7, 4)
                cc = c if rng.random() < 0.8 else int(rng.integers(1, n_cls + 1))
                rows.append((i, [x + j[0], y + j[1], x + w + j[2] + 1, y + h + j[3] + 1], cc, float(rng.random())))
        for _ in range(rng.integers(0, 6) + crowd_dets):
            x, y = rng.uniform(0, 400), rng.uniform(0, 300)
            rows.append(
                (
                    i,
                    [x, y, x + rng.uniform(5, 120), y + rng.uniform(5, 90)],
                    int(rng.integers(1, n_cls + 1)),
                    float(rng.random()),
                )
            )
    return coco(gt), rows


def _tidecv(g: dict, rows):
    tidecv = pytest.importorskip(
        "tidecv", reason="tidecv is not installed (pip install tidecv) - agreement not checked"
    )
    gd, pd = tidecv.Data("gt"), tidecv.Data("dt")
    for im in g["images"]:
        gd.add_image(im["id"], im["file_name"])
    for a in g["annotations"]:
        gd.add_ground_truth(a["image_id"], a["category_id"], a["bbox"])
    for i, (x1, y1, x2, y2), c, s in rows:
        pd.add_detection(i, c, s, [x1, y1, x2 - x1, y2 - y1])
    t = tidecv.TIDE()
    run = t.evaluate(gd, pd, mode=tidecv.TIDE.BOX, name="dt")
    names = dict(zip(("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss", "FalsePos", "FalseNeg"), tide.ALL_TYPES))
    errors = {**t.get_main_errors()["dt"], **t.get_special_errors()["dt"]}
    counts = {names[k.short_name]: v for k, v in run.count_errors().items()}
    return run.ap, {names[k]: v for k, v in errors.items()}, counts


@pytest.mark.parametrize("seed,extra", [(0, 0), (1, 0), (2, 120)])  # extra: >100 detections per image
def test_agrees_with_tidecv(seed, extra):
    g, rows = _random_set(seed, crowd_dets=extra)
    ap, errors, counts = _tidecv(g, rows)
    r = tide.decompose(g, dets(rows))
    assert r.ap == pytest.approx(ap, abs=0.05)
    for k in tide.ALL_TYPES:
        assert r.errors[k] == pytest.approx(errors[k], abs=0.05), k
    for k in tide.ERROR_TYPES:
        assert r.counts[k] == counts[k], k
