"""mapdet.modeling.proposals: torchvision's proposals and matches, with far fewer host syncs."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.rpn import RegionProposalNetwork

from mapdet.host_syncs import count_host_syncs
from mapdet.modeling.build import build_model
from mapdet.modeling.proposals import LowQualityMatcher, rpn_like
from tests.modeling.rectangles import K1, rectangles, small_cfg

LEVELS = [1500, 800, 400, 60]  # anchors per level; pre_nms_top_n (400) cuts the first three: 1260 boxes
# per image, above the 1000 where torchvision's batched_nms loops over the levels on the CPU (5000 on CUDA)


def stock_rpn(rpn: RegionProposalNetwork) -> RegionProposalNetwork:
    return rpn_like(rpn, RegionProposalNetwork)


def candidates(seed: int, images: int = 2):
    """Decoded boxes (N, A, 4) that overlap a lot, with small ones and NaN logits among them."""
    g = torch.Generator().manual_seed(seed)
    a = sum(LEVELS)
    xy = torch.rand(images, a, 2, generator=g) * 90
    wh = torch.rand(images, a, 2, generator=g) * 30
    wh[:, ::17] = 1e-4  # below min_size after clipping
    boxes = torch.cat([xy, xy + wh], dim=2) - 5  # some cross the image border
    logits = torch.randn(images * a, 1, generator=g) * 3
    logits[::23] = float("nan")
    return boxes, logits


def rpn_pair(training: bool, score_thresh: float = 0.0, one_nms: bool | None = None):
    model = build_model(small_cfg(), K1)
    ours = rpn_like(model.rpn, one_nms_per_image=one_nms)
    ours.score_thresh = score_thresh
    ours._pre_nms_top_n = {"training": 400, "testing": 400}
    ours._post_nms_top_n = {"training": 300, "testing": 200}
    ours.train(training)
    return ours, stock_rpn(ours)


@pytest.mark.parametrize("one_nms", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("score_thresh", [0.0, 0.6])
def test_filter_proposals_keeps_torchvisions_boxes_in_its_order(one_nms, training, score_thresh):
    ours, stock = rpn_pair(training, score_thresh, one_nms)
    shapes = [(80, 100), (100, 60)]
    for seed in range(4):
        boxes, logits = candidates(seed)
        got_boxes, got_scores = ours.filter_proposals(boxes, logits, shapes, LEVELS)
        want_boxes, want_scores = stock.filter_proposals(boxes, logits, shapes, LEVELS)
        for gb, gs, wb, ws in zip(got_boxes, got_scores, want_boxes, want_scores):
            assert 0 < len(wb) <= (300 if training else 200)
            assert torch.equal(gb, wb) and torch.equal(gs, ws)


@pytest.mark.parametrize("training", [True, False])
def test_on_the_cpu_tied_scores_keep_torchvisions_order(training):
    """Real images tie often (flat sky, padding give equal logits); the training of the demo follows
    from the proposals' order, so off CUDA it must be torchvision's exactly, ties included."""
    ours, stock = rpn_pair(training, one_nms=False)
    shapes = [(80, 100), (100, 60)]
    for seed in range(4):
        boxes, logits = candidates(seed)
        logits = logits.round()  # a handful of distinct scores: ties everywhere
        got_boxes, got_scores = ours.filter_proposals(boxes, logits, shapes, LEVELS)
        want_boxes, want_scores = stock.filter_proposals(boxes, logits, shapes, LEVELS)
        for gb, gs, wb, ws in zip(got_boxes, got_scores, want_boxes, want_scores):
            assert torch.equal(gb, wb) and torch.equal(gs, ws)


def test_under_bf16_autocast_one_nms_per_image_keeps_the_exact_nms_boxes():
    """Proposals are bf16 under autocast (the RPN head's deltas are): the level shift must not round
    them. Expected: torchvision's filter on float32 copies of the same bf16 values, i.e. NMS with
    float32 IoUs, which torchvision's CUDA NMS computes under autocast (its CPU NMS takes bf16 as is
    and rounds its IoUs: a few boxes differ there). Boxes are compared as sets: bf16 scores tie."""
    ours, stock = rpn_pair(training=True, one_nms=True)
    ours._post_nms_top_n = stock._post_nms_top_n = {"training": 2000, "testing": 2000}  # no cut among ties
    shapes = [(80, 100), (100, 60)]
    for seed in range(3):
        boxes, logits = (x.bfloat16() for x in candidates(seed))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _ = ours.filter_proposals(boxes, logits, shapes, LEVELS)
        want, _ = stock.filter_proposals(boxes.float(), logits.float(), shapes, LEVELS)
        for g, w in zip(got, want):
            assert g.dtype == torch.bfloat16 and len(g) > 100
            assert sorted(g.float().tolist()) == sorted(w.tolist())


def test_filter_proposals_with_nothing_left():
    ours, stock = rpn_pair(training=True, score_thresh=0.99, one_nms=True)
    boxes, logits = candidates(0)
    logits = torch.full_like(logits, -10.0)  # every score far below the threshold
    got, _ = ours.filter_proposals(boxes, logits, [(80, 100)] * 2, LEVELS)
    want, _ = stock.filter_proposals(boxes, logits, [(80, 100)] * 2, LEVELS)
    assert [len(b) for b in got] == [len(b) for b in want] == [0, 0]


@pytest.mark.parametrize("seed", range(5))
def test_low_quality_matches_equal_torchvisions_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    quality = torch.randint(0, 8, (5, 300), generator=g).float() / 10  # IoUs in tenths: many ties
    quality[2] = 0.0  # a ground truth that overlaps nothing: every anchor ties for its best
    ours = LowQualityMatcher(0.7, 0.3, allow_low_quality_matches=True)(quality)
    want = Matcher(0.7, 0.3, allow_low_quality_matches=True)(quality)
    assert torch.equal(ours, want)
    assert (want >= 0).sum() > (Matcher(0.7, 0.3)(quality) >= 0).sum()  # the step changed something


def test_one_nms_per_image_leaves_the_rpn_a_sync_per_image():
    """Counted on the CPU with CUDA's path forced, around the RPN's training forward of 4 images:
    ours makes one NMS per image (its per-batch count read-backs are copies the counter does not
    see: see host_syncs); torchvision per image also the small-box and score filters, the best
    anchors and the sampler's two nonzero, and two more per batch in its loss."""
    torch.manual_seed(0)
    model = build_model(small_cfg(), K1).train()
    images, targets = model.transform(*rectangles(4, seed=1))
    features = model.backbone(images.tensors)
    counts = {}
    for name, rpn in (
        ("ours", rpn_like(model.rpn, one_nms_per_image=True)),
        ("stock", stock_rpn(model.rpn)),
    ):
        with count_host_syncs() as syncs:
            rpn(images, features, targets)
        counts[name] = syncs.by_site()
    ours, stock = counts["ours"], counts["stock"]
    assert sum(n for site, n in ours.items() if site.endswith(" nms")) == 4
    assert sum(ours.values()) == 4, ours
    assert sum(stock.values()) == 4 + 4 * 5 + 2, stock  # few boxes here: one NMS per image for both


def test_above_a_thousand_boxes_torchvision_pays_two_syncs_per_level():
    ours, stock = rpn_pair(training=True, one_nms=True)  # CUDA's path
    boxes, logits = candidates(0)
    counts = []
    for rpn in (ours, stock):
        with count_host_syncs() as syncs:
            rpn.filter_proposals(boxes, logits, [(80, 100)] * 2, LEVELS)
        counts.append(syncs.total)
    # ours: one NMS per image. torchvision: the two filters per image, and per level a nonzero and
    # an NMS for an image left with more than 1000 boxes (the CPU's threshold; CUDA's is 5000)
    assert counts[0] == 2
    assert counts[1] >= 2 * 2 + 2 * len(LEVELS)


@pytest.mark.parametrize("training", [True, False])
def test_one_nms_per_image_still_suppresses_with_a_nan_box(training):
    """A NaN coordinate (a diverging regression) must cost that box only: CUDA's one-NMS path
    shifted every level by the largest coordinate of ALL boxes, NaN then, which made every IoU NaN
    and switched suppression off for the whole image. Forced onto that path here, on the CPU."""
    ours, stock = rpn_pair(training, one_nms=True)
    ours._post_nms_top_n = stock._post_nms_top_n = {"training": 2000, "testing": 2000}  # every box NMS keeps
    shapes = [(80, 100), (100, 60)]
    for seed in range(3):
        boxes, logits = candidates(seed)
        boxes[0, 7, 2] = float("nan")  # one coordinate of one box of the first image
        boxes[1, 5:9] = float("nan")  # a few whole boxes of the second
        got_boxes, got_scores = ours.filter_proposals(boxes, logits, shapes, LEVELS)
        want_boxes, want_scores = stock.filter_proposals(boxes, logits, shapes, LEVELS)
        for gb, gs, wb, ws in zip(got_boxes, got_scores, want_boxes, want_scores):
            assert torch.isfinite(gb).all() and torch.equal(gb, wb) and torch.equal(gs, ws)
