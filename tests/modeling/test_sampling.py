"""mapdet.modeling.sampling and the detector built on it: torchvision's samples, losses and training,
bit for bit, with one read-back per batch."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from mapdet.host_syncs import count_host_syncs
from mapdet.modeling.build import build_model
from mapdet.modeling.detector import Detector, torchvision_twin
from mapdet.modeling.proposals import LowQualityMatcher, ProposalNetwork
from mapdet.modeling.roi_heads import SampledRoIHeads
from mapdet.modeling.sampling import BatchedSampler
from tests.modeling.rectangles import K1, rectangles, small_cfg


def matched(seed: int, sizes=(300, 50, 2000, 0)):
    """Match indices per image: -1 ignored, 0 background, >= 1 an object; few positives in one image
    and few negatives in another, so both 'not enough' branches run."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        m = torch.randint(-1, 4, (n,), generator=g)
        if i == 1:
            m[m >= 1] = torch.where(torch.rand(int((m >= 1).sum()), generator=g) < 0.1, 1, -1)
        if i == 2:
            m[m == 0] = -1
            m[:5] = 0
        out.append(m)
    return out


@pytest.mark.parametrize("seed", range(3))
def test_sampler_draws_torchvisions_masks(seed):
    labels = matched(seed)
    ours, theirs = BatchedSampler(256, 0.25), BalancedPositiveNegativeSampler(256, 0.25)
    torch.manual_seed(seed)
    pos, neg, taken = ours.sample(labels)
    torch.manual_seed(seed)
    want_pos, want_neg = theirs(labels)
    for p, n, wp, wn, (a, b) in zip(pos, neg, want_pos, want_neg, taken):
        assert torch.equal(p, wp) and torch.equal(n, wn)
        assert (int(p.sum()), int(n.sum())) == (a, b)
    assert taken[3] == (0, 0) and taken[2][1] == 5 and taken[1][0] < 64


def test_training_equals_torchvisions_detector_bit_for_bit():
    """The small preset trained 3 SGD steps with mapdet's RPN and RoI heads and with torchvision's:
    the same losses and weights, then the same detections in eval mode."""
    torch.manual_seed(0)
    ours = build_model(small_cfg(), K1)
    assert isinstance(ours.rpn, ProposalNetwork) and isinstance(ours.rpn.proposal_matcher, LowQualityMatcher)
    assert isinstance(ours.roi_heads, SampledRoIHeads) and isinstance(ours, Detector)
    stock = torchvision_twin(ours)
    images, targets = rectangles(4, seed=3)
    losses = {}
    for name, model in (("ours", ours), ("stock", stock)):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        torch.manual_seed(1)  # the samplers draw from the global generator
        model.train()
        losses[name] = []
        for _ in range(3):
            step = model(images, targets)
            optimizer.zero_grad()
            sum(step.values()).backward()
            optimizer.step()
            losses[name].append({k: v.item() for k, v in step.items()})
    assert losses["ours"] == losses["stock"]
    for (name, a), b in zip(ours.state_dict().items(), stock.state_dict().values()):
        assert torch.equal(a, b), name
    ours.eval(), stock.eval()
    with torch.no_grad():
        for a, b in zip(ours(images), stock(images)):
            assert all(torch.equal(a[k], b[k]) for k in ("boxes", "scores", "labels"))


def test_a_training_forward_reads_back_a_few_times_per_image_not_dozens():
    """Counted on the CPU with CUDA's NMS path forced, a forward of 4 images, nonzero and nms only
    (the ``.item()`` reads here are of CPU tensors under CUDA too: the pooler's scales, the
    transform's size choice), plus the degenerate-box check (torchvision: one per image).
    What is left of ours: NMS once per image, the RoI pooler once per level, the box loss once,
    the degenerate-box check once per batch."""
    torch.manual_seed(0)
    ours = build_model(small_cfg(), K1)
    ours.rpn.one_nms_per_image = True
    stock = torchvision_twin(ours)
    images, targets = rectangles(4, seed=1)
    found = {}
    for name, model in (("ours", ours), ("stock", stock)):
        model.train()
        with count_host_syncs() as syncs:
            model(images, targets)
        found[name] = {
            site: n
            for site, n in syncs.by_site().items()
            # the degenerate-box check: mapdet's Detector once per batch, torchvision's per image
            if site.endswith((" nonzero", " nms"))
            or any(f in site for f in ("modeling/detector.py", "generalized_rcnn.py"))
        }
    ours_total, stock_total = sum(found["ours"].values()), sum(found["stock"].values())
    assert ours_total <= 4 + 4 + 1 + 1, found["ours"]  # the small preset's pooler has 4 levels
    assert stock_total >= ours_total + 4 * 7 + 1, found["stock"]
