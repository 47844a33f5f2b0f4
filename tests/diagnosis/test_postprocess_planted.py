"""The planted post-processing causes of bench/bench_diagnose_planted.py, small: one synthetic "network".

The network's output before post-processing is a fixed set of scored candidate boxes per image
(a well-placed box per object, weaker near-duplicates of it, low-scoring background); torchvision's
post-processing (score threshold, per-class NMS, top k per image) turns it into results for any
(``model.nms_thresh``, ``model.score_thresh``, ``model.detections_per_img``). Each planted setting
must rank its cause first, and its advised ``set``, applied in a separate post-processing run (not
read back from the sweep that chose it), must recover at least 90 % of the AP at the defaults.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import batched_nms

from mapdet.config import load_config
from mapdet.diagnosis import fixes
from mapdet.diagnosis.measures import diagnose
from mapdet.diagnosis.postprocess import Postprocess
from mapdet.diagnosis.settings import DiagnoseSettings
from mapdet.diagnosis.sweep import evaluate_grid
from mapdet.structures import Detections
from tests.diagnosis.scenes import scene

IMAGES, OBJECTS = 8, 12  # objects per image
GRID = {"nms_thresh": [0.3, 0.5, 0.7], "score_thresh": [0.0, 0.05, 0.3], "detections_per_img": [10, 100]}


@pytest.fixture(scope="module")
def network():
    """Ground truth and the candidates (image_id, xyxy, score, label) before post-processing: with
    causes of its own (one object in eight never found, boxes a few pixels off), smaller than the plants."""
    gt, objs = scene(IMAGES, lambda i: [1, 2, 3] * (OBJECTS // 3))
    rng = np.random.default_rng(0)
    rows = []
    for image, box, label in objs:
        if rng.uniform() < 1 / 8:
            continue
        box = np.asarray(box, float)
        score = rng.uniform(0.15, 0.95)  # about half the objects score below 0.6
        rows.append((image, box + rng.uniform(-3, 3, 4), score, label))  # IoU ~0.75-0.9
        for k, shift in enumerate((6.0, 9.0), 1):  # near-duplicates: IoU ~0.74 and ~0.63 with the object
            rows.append((image, box + np.array([shift, 0, shift, 0]), score * (0.9 - 0.1 * k), label))
    for image in range(1, IMAGES + 1):
        for _ in range(5):  # background: nothing there, low scores
            x, y = rng.uniform(0, 900), rng.uniform(650, 750)
            rows.append((image, np.array([x, y, x + 30, y + 30]), rng.uniform(0.01, 0.1), int(rng.integers(1, 4))))
    image, boxes, scores, labels = map(np.array, zip(*rows))
    return gt, Detections(image, boxes, scores, labels)


def postprocess(raw: Detections, p: Postprocess) -> Detections:
    """torchvision's RoIHeads.postprocess_detections on the candidates: score > threshold, NMS per
    image and class, the top ``detections_per_img`` per image by score."""
    keep = np.flatnonzero(raw.scores > p.score_thresh)
    boxes, scores = torch.from_numpy(raw.boxes[keep]), torch.from_numpy(raw.scores[keep])
    groups = torch.from_numpy(raw.image_id[keep] * 1000 + raw.labels[keep])
    kept = keep[batched_nms(boxes, scores, groups, p.nms_thresh).numpy()]  # by descending score
    out = []
    for image in np.unique(raw.image_id[kept]):
        out.append(kept[raw.image_id[kept] == image][: p.detections_per_img])
    return raw.take(np.concatenate(out) if out else np.zeros(0, int))


def settings_of(overrides: list[str]) -> tuple[Postprocess, object]:
    cfg = load_config(None, overrides)
    m = cfg.model
    return Postprocess(m.nms_thresh, m.score_thresh, m.detections_per_img), cfg


def sweep(gt, raw: Detections, current: Postprocess):
    """What `mapdet diagnose --checkpoint` measures: the grid with the settings in force added."""
    values = [sorted(set(GRID[k]) | {getattr(current, k)}) for k in Postprocess._fields]
    found = {(n, s): postprocess(raw, Postprocess(n, s, values[2][-1])) for n in values[0] for s in values[1]}
    return evaluate_grid(gt, found, *values, current)


@pytest.mark.parametrize(
    "planted, cause",
    [
        (["model.detections_per_img=2"], "detection_cap"),  # 12 objects per image
        (["model.nms_thresh=0.9"], "duplicates"),
        (["model.score_thresh=0.6"], "missed"),
    ],
)
def test_planted_post_processing_ranks_first_and_its_set_recovers_the_ap(network, planted, cause):
    gt, raw = network
    default, _ = settings_of([])
    ap_default = fixes.score(gt, postprocess(raw, default)).ap
    current, cfg = settings_of(planted)
    results = postprocess(raw, current)
    ap_planted = fixes.score(gt, results).ap
    assert ap_planted < 0.85 * ap_default  # the plant costs AP
    settings = DiagnoseSettings(model=cfg.model, cap_from="the config's model.detections_per_img", config=cfg)
    d = diagnose(gt, results, settings=settings, sweep=sweep(gt, raw, current))
    top = d.causes[0]
    assert top.cause == cause, [(c.cause, c.impact) for c in d.causes]
    assert top.set and all(
        s.split("=")[0] in ("model.detections_per_img", "model.nms_thresh", "model.score_thresh") for s in top.set
    )
    assert "post-processing sweep's best" in top.advice
    fixed, _ = settings_of(planted + top.set)  # a separate post-processing run with the advice applied
    ap_fixed = fixes.score(gt, postprocess(raw, fixed)).ap
    assert ap_fixed >= 0.9 * ap_default, (top.set, ap_planted, ap_fixed, ap_default)
