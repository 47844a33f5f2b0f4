"""evaluate_coco in 3 real processes (gloo): each rank brings its own detections, they are routed
by category, and every rank's result equals one process and pycocotools bitwise.

One spawn runs every scenario (process start-up is most of the cost); each test reads the
results the ranks saved.
"""

from __future__ import annotations

import numpy as np
import pytest

from mapdet import comm
from mapdet.evaluation.coco import evaluate_coco
from mapdet.evaluation.inputs import detections_from_results
from mapdet.structures import Detections
from tests.evaluation.cocodata import pycocotools_eval, random_coco
from tests.helpers import run_in_ranks

WORLD = 3
MAX_DETS = (1, 10, 100, 300)
FIELDS = ("precision", "recall", "scores", "num_gt")


def _thirds(items, cuts=(0.0, 0.4)):
    """Three contiguous pieces (the first empty by default) whose concatenation is ``items``."""
    a, b = (int(c * len(items)) for c in cuts)
    return [items[:a], items[a:b], items[b:]]


def _noisy_packed(seed: int):
    """GT and Detections with non-integer float32 boxes, split by image over the ranks."""
    gt, dets = random_coco(seed)
    packed = detections_from_results(dets)
    packed.boxes += np.random.default_rng(seed).uniform(0, 1, packed.boxes.shape).astype(np.float32)
    parts = [packed.take(packed.image_id % WORLD == r) for r in range(WORLD)]
    return gt, parts


def _two_categories():
    """Only categories 1 and 2: one of the three ranks scores nothing."""
    gt, dets = random_coco(1)
    gt = {
        **gt,
        "categories": gt["categories"][:2],
        "annotations": [a for a in gt["annotations"] if a["category_id"] in (1, 2)],
    }
    return gt, _thirds([d for d in dets if d["category_id"] in (1, 2)], (0.3, 0.6))


def scenarios() -> dict:
    """name -> (gt, one detections input per rank); identical in every process."""
    gt0, dets0 = random_coco(0)
    no_cat3 = [d for d in dets0 if d["category_id"] != 3]  # a category with GT but no detection
    gt5, packed = _noisy_packed(5)
    gt2, dets2 = random_coco(2)
    nan = [{**d, "score": float("nan")} for d in dets2[:3]]
    return {
        "dicts": (gt0, _thirds(no_cat3)),
        "packed": (gt5, packed),
        "two_categories": _two_categories(),
        "no_detections": (gt0, [[], [], Detections.empty()]),
        "mixed": (gt5, [packed[0].to_coco_results(), packed[1], Detections.empty()]),
        "nan_on_rank_2": (gt2, [dets2[:10], dets2[10:20], nan]),
    }


def whole(parts) -> list[dict]:
    """What one process scores: every rank's detections in rank order, as COCO results."""
    out = []
    for p in parts:
        out += p if isinstance(p, list) else p.to_coco_results()
    return out


def _rank_main(rank: int) -> dict:
    saved = {}
    for name, (gt, parts) in scenarios().items():
        try:
            r = evaluate_coco(gt, parts[rank], max_dets=MAX_DETS)
            saved[name] = {**{f: getattr(r, f) for f in FIELDS}, "traffic": r.traffic}
        except ValueError as e:
            saved[name] = str(e)
    streamed = []
    comm.stream_to_main(np.full(2 * rank, rank, np.uint8), streamed.append if rank == 0 else None)
    saved["stream"] = [s.tolist() for s in streamed]
    return saved


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_in_ranks(_rank_main, WORLD, tmp_path_factory.mktemp("ranks"))


@pytest.mark.parametrize("name", ["dicts", "packed", "two_categories", "no_detections", "mixed"])
def test_every_rank_equals_one_process_and_pycocotools(ranks, name):
    gt, parts = scenarios()[name]
    one = evaluate_coco(gt, whole(parts), max_dets=MAX_DETS)
    E = pycocotools_eval(gt, whole(parts), MAX_DETS)
    for saved in ranks:
        for f in FIELDS:
            assert np.array_equal(saved[name][f], getattr(one, f)), (name, f)
        for f in ("precision", "recall", "scores"):
            assert np.array_equal(saved[name][f], E.eval[f]), (name, f)


def test_edge_cases_really_occur(ranks):
    cats = [t["scored"] for t in (saved["two_categories"]["traffic"] for saved in ranks)]
    assert sorted(cats)[0] == 0 and sum(cats) > 0  # one rank held no category's detections
    assert ranks[0]["dicts"]["traffic"]["local"] == 0  # rank 0 brought no detections
    gt0 = scenarios()["dicts"][0]
    k3 = [c["id"] for c in gt0["categories"]].index(3)
    assert ranks[0]["dicts"]["num_gt"][k3] > 0 and (ranks[0]["dicts"]["precision"][:, :, k3] == 0).any()
    assert ranks[0]["no_detections"]["recall"].max() == 0


def test_each_rank_holds_and_sends_a_fraction(ranks):
    """Rows are conserved; no rank scores or sends every detection; row sizes are the packed ones."""
    traffic = [saved["dicts"]["traffic"] for saved in ranks]
    total = sum(t["local"] for t in traffic)
    assert sum(t["scored"] for t in traffic) == total > 0
    assert sum(t["sent_bytes"] for t in traffic) == sum(t["received_bytes"] for t in traffic) > 0
    assert max(t["scored"] for t in traffic) < 0.8 * total
    assert max(t["sent_bytes"] for t in traffic) < 48 * total
    assert {t["row_bytes"] for t in traffic} == {48}  # COCO dicts: float64 xywh
    assert {saved["packed"]["traffic"]["row_bytes"] for saved in ranks} == {28}  # float32 xyxy
    assert {saved["mixed"]["traffic"]["row_bytes"] for saved in ranks} == {48}  # one rank has dicts


def test_bad_detections_on_one_rank_fail_every_rank(ranks):
    messages = [saved["nan_on_rank_2"] for saved in ranks]
    assert all("non-finite" in m for m in messages)
    assert "on rank 2" in messages[0] and "on rank 2" in messages[1]


def test_stream_to_main_hands_every_rank_in_order(ranks):
    assert ranks[0]["stream"] == [[], [1, 1], [2, 2, 2, 2]]
    assert ranks[1]["stream"] == ranks[2]["stream"] == []
