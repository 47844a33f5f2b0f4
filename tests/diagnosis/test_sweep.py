"""Model checks on a tiny untrained torchvision Faster R-CNN: the sweep equals full model runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_320_fpn

from mapdet.diagnosis import sweep


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=4,
        min_size=96,
        max_size=128,
        rpn_pre_nms_top_n_test=60,
        rpn_post_nms_top_n_test=40,
    )
    return m.eval()


def batches(n_batches: int = 2, per_batch: int = 2):
    rng = np.random.default_rng(0)
    out, image_id = [], 1
    for _ in range(n_batches):
        images, targets = [], []
        for _ in range(per_batch):
            h, w = int(rng.integers(110, 130)), int(rng.integers(120, 160))
            images.append(torch.from_numpy(rng.integers(0, 255, (3, h, w), dtype=np.uint8)))
            boxes = torch.tensor([[0.0, 0.0, 110.0, 100.0], [70.0, 20.0, 95.0, 80.0], [10.0, 60.0, 16.0, 66.0]])
            targets.append(
                {
                    "boxes": boxes,
                    "labels": torch.tensor([1, 2, 3]),
                    "iscrowd": torch.tensor([0, 0, 1]),
                    "image_id": image_id,
                }
            )
            image_id += 1
        out.append((images, targets, []))
    return out


def test_postprocess_equals_a_full_model_run(model):
    images, _, _ = batches(1)[0]
    out = sweep.head_outputs(model, images)
    for nms, score, cap in [(0.3, 0.0, 7), (0.7, 0.26, 50)]:
        mine = sweep.postprocess(model, out, nms, score, cap)
        model.roi_heads.nms_thresh, model.roi_heads.score_thresh, model.roi_heads.detections_per_img = nms, score, cap
        with torch.no_grad():
            full = model([im.float() / 255 for im in images])
        for a, b in zip(mine, full):
            assert len(a["boxes"]) == len(b["boxes"]) and len(a["boxes"]) <= cap
            assert torch.allclose(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    assert (model.roi_heads.nms_thresh, model.roi_heads.detections_per_img) == (0.7, 50)


def test_sweep_runs_the_network_once_per_image(model):
    calls = []
    hook = model.backbone.register_forward_hook(lambda _mod, inp, out: calls.append(inp[0].shape[0]))
    try:
        sw, pr = sweep.run_model_checks(
            model,
            batches(),
            cat_ids=[1, 2, 3],
            nms_thresh=(0.3, 0.6),
            score_thresh=(0.0, 0.3),
            detections_per_img=(5, 20),
            current=(0.5, 0.05, 20),
        )
    finally:
        hook.remove()
    assert sum(calls) == 4  # 4 images, one backbone pass each, for a 3 x 3 x 2 grid
    ap = np.array(sw.ap)
    assert ap.shape == (3, 3, 2) and sw.nms_thresh == [0.3, 0.5, 0.6] and sw.score_thresh == [0.0, 0.05, 0.3]
    assert ((ap >= 0) & (ap <= 100)).all() and sw.num_images == 4 and sw.max_dets == 100
    assert sw.best.ap == pytest.approx(ap.max()) and sw.current_ap == pytest.approx(ap[1, 1, 1])
    assert pr.num_gt == {"all": 8, "small": 0, "medium": 4, "large": 4}  # the crowd box is left out
    assert all(0.0 <= v <= 1.0 for k, v in pr.recall.items() if v is not None) and pr.recall["small"] is None
    assert pr.proposals_per_image <= 40


def test_max_images_and_empty_loader(model):
    sw, _ = sweep.run_model_checks(model, batches(), [1, 2, 3], (0.5,), (0.05,), (10,), max_images=3)
    assert sw.num_images == 3
    with pytest.raises(ValueError, match="saw no image"):
        sweep.run_model_checks(model, [], [1, 2, 3])


def test_proposal_recall_is_one_when_proposals_are_the_boxes(model):
    images, targets, _ = batches(1, 1)[0]
    out = sweep.head_outputs(model, images, targets)
    out.proposals = [out.targets[0]["boxes"].clone()]
    hits, areas = sweep.proposal_hits(out, targets, 0.5)
    assert hits.tolist() == [True, True] and areas.tolist() == pytest.approx([110 * 100, 25 * 60])


def test_lever_reads_one_setting_with_the_others_in_force_and_prefers_the_nearest_of_equals():
    from mapdet.diagnosis.postprocess import Postprocess, Sweep, SweepBest

    ap = np.zeros((3, 2, 3))  # nms (0.3, 0.5, 0.9) x score (0.05, 0.6) x dets (2, 100, 300)
    ap[:, 1, 0] = [10.0, 12.0, 8.0]  # in force: nms 0.9, score 0.6, dets 2
    ap[2, 1, 1] = ap[2, 1, 2] = 30.0  # more detections per image: 100 and 300 tie
    ap[2, 0, 0] = 20.0
    sw = Sweep(
        [0.3, 0.5, 0.9],
        [0.05, 0.6],
        [2, 100, 300],
        ap.tolist(),
        ap.tolist(),
        SweepBest(0.9, 0.6, 100, 30.0),
        8.0,
        Postprocess(0.9, 0.6, 2),
        4,
    )
    cap = sw.lever("detections_per_img")
    assert (cap.key, cap.value, cap.current, cap.ap, cap.current_ap) == ("model.detections_per_img", 100, 2, 30.0, 8.0)
    nms = sw.lever("nms_thresh")
    assert (nms.value, nms.ap) == (0.5, 12.0)
    score = sw.lever("score_thresh")
    assert (score.value, score.ap) == (0.05, 20.0)
    ap[:, 1, 0] = 8.0  # every NMS value as good as the one in force: the lever stays where it is
    sw.ap = ap.tolist()
    assert sw.lever("nms_thresh").value == 0.9
    sw.current = None
    assert sw.lever("nms_thresh") is None
