"""The region proposal network with fewer host syncs, giving torchvision's proposals and matches.

A host sync (``mapdet.host_syncs``) stops the host until the GPU has drained its queue, and
the GPU then idles while Python prepares the next ops. torchvision's ``RegionProposalNetwork`` makes
about 12 per image per forward:

- ``filter_proposals`` drops small boxes (``nonzero``), low-scoring ones (``nonzero``), then runs
  ``batched_nms``, which above 5000 boxes on CUDA (every FPN detector here: up to
  ``pre_nms_top_n`` per level x 5 levels) loops over the levels with one ``nonzero`` and one ``nms``
  each;
- the anchor matcher's low-quality step finds each ground truth's best anchors with ``nonzero``;
- the sampler and the loss find positives and negatives with ``nonzero`` (``mapdet.modeling.sampling``).

On CUDA ``ProposalNetwork.filter_proposals`` removes nothing before NMS: a small or low-scoring
(or NaN) box gets the score -inf, so it ranks below every real box and NMS, which lets a box
suppress only lower-ranked ones, never lets it suppress one. Each image gets ONE ``nms`` over all
its levels (the coordinate trick: each level's boxes are shifted by ``level x (largest finite coordinate
+ 1)`` so that boxes of different levels never overlap). How many real boxes each image kept is
read back once per batch, and the -inf boxes are cut off the end of each list. Elsewhere it takes
torchvision's own steps (on the CPU there is no sync to save, and five small NMS are cheaper than
one large one), so tied scores keep torchvision's order there too. Result on CUDA: one sync per
image (its NMS) plus one per batch. ``LowQualityMatcher`` finds the best anchors with a mask instead
of ``nonzero``: none. ``BatchedSampler`` and ``compute_loss``: one per batch.

Same results: proposals (xyxy, in the resized image's pixels, clipped to it) and scores per image,
in descending score order, equal torchvision's box for box on any device, except that boxes with
exactly equal scores may come out in another order on CUDA (torchvision's own two NMS paths differ
the same way); on the CPU they are torchvision's exactly, ties included. The matches, samples and
losses are equal exactly. Weights and state-dict keys are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import boxes as box_ops

from mapdet.host_syncs import true_indices
from mapdet.modeling.sampling import BatchedSampler


class LowQualityMatcher(Matcher):
    """torchvision's ``Matcher`` whose low-quality step reads nothing back to the host."""

    def set_low_quality_matches_(self, matches: Tensor, all_matches: Tensor, match_quality_matrix: Tensor) -> None:
        # An anchor that is some ground truth's best (ties included) takes its own best match, as
        # torchvision's nonzero-based version does, whatever the thresholds said.
        best_for_some_gt = (match_quality_matrix == match_quality_matrix.max(dim=1).values[:, None]).any(dim=0)
        matches.copy_(torch.where(best_for_some_gt, all_matches, matches))


class ProposalNetwork(RegionProposalNetwork):
    """torchvision's RPN with ``filter_proposals`` and the anchor matcher described above.

    ``one_nms_per_image``: None (default) = one NMS per image on CUDA, torchvision's
    ``batched_nms`` elsewhere; True/False force either (tests compare both on the CPU).
    """

    def __init__(self, *args, one_nms_per_image: bool | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.proposal_matcher = LowQualityMatcher(
            self.proposal_matcher.high_threshold, self.proposal_matcher.low_threshold, allow_low_quality_matches=True
        )
        self.fg_bg_sampler = BatchedSampler(
            self.fg_bg_sampler.batch_size_per_image, self.fg_bg_sampler.positive_fraction
        )
        self.one_nms_per_image = one_nms_per_image

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        """proposals (N, A, 4) decoded boxes, objectness (N*A, 1) logits -> per image the kept boxes
        (K_i, 4) and their probabilities (K_i,), at most ``post_nms_top_n`` each."""
        n = proposals.shape[0]
        objectness = objectness.detach().reshape(n, -1)  # no gradient through the selection
        level = torch.cat(
            [
                torch.full((k,), i, dtype=torch.int64, device=proposals.device)
                for i, k in enumerate(num_anchors_per_level)
            ]
        )
        top = self._get_top_n_idx(objectness, num_anchors_per_level)  # (N, T): the best per level
        rows = torch.arange(n, device=proposals.device)[:, None]
        boxes, scores, levels = proposals[rows, top], torch.sigmoid(objectness[rows, top]), level[top]
        kept, real = [], []
        for b, s, lvl, shape in zip(boxes, scores, levels, image_shapes):
            b = box_ops.clip_boxes_to_image(b, shape)
            ok = (b[:, 2] - b[:, 0] >= self.min_size) & (b[:, 3] - b[:, 1] >= self.min_size) & (s >= self.score_thresh)
            keep, count = self._nms(b, s, lvl, ok)
            kept.append((b, s, keep))
            real.append(count)
        counts = torch.stack(real).tolist() if real else []  # the batch's one read-back
        limit = self.post_nms_top_n()
        final = [(b[keep[: min(c, limit)]], s[keep[: min(c, limit)]]) for (b, s, keep), c in zip(kept, counts)]
        return [b for b, _ in final], [s for _, s in final]

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """torchvision's two RPN losses over the sampled anchors (objectness: BCE over positives and
        negatives; boxes: smooth L1 over positives, beta 1/9, summed and divided by the sample count),
        with the samples found from the sampler's counts instead of ``nonzero``: the same gathers,
        so the same numbers."""
        pos, neg, taken = self.fg_bg_sampler.sample(labels)
        pos = true_indices(torch.cat(pos).bool(), sum(t[0] for t in taken))
        neg = true_indices(torch.cat(neg).bool(), sum(t[1] for t in taken))
        sampled = torch.cat([pos, neg])
        labels, regression_targets = torch.cat(labels), torch.cat(regression_targets)
        box_loss = F.smooth_l1_loss(pred_bbox_deltas[pos], regression_targets[pos], beta=1 / 9, reduction="sum")
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss / sampled.numel()

    def _nms(self, boxes: Tensor, scores: Tensor, levels: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
        """(indices kept by NMS within each level, the boxes ``ok`` first in descending score order;
        how many of them are ``ok``, a 0-dim tensor)."""
        one_call = boxes.is_cuda if self.one_nms_per_image is None else self.one_nms_per_image
        if not one_call:  # torchvision's own steps: no sync to save here, and ties keep its order
            real = torch.where(ok)[0]
            keep = real[box_ops.batched_nms(boxes[real], scores[real], levels[real], self.nms_thresh)]
            return keep, torch.tensor(len(keep))
        if boxes.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=boxes.device), ok.sum()
        # float32: under bf16 autocast the proposals are bf16, whose spacing at a shift of thousands of
        # pixels is tens of pixels; in float32 a whole-number shift moves a box by exactly that (up to
        # ~1e-3 px for coordinates below 1), so the IoUs are the unshifted ones.
        boxes = boxes.float()
        # Levels apart: no box overlaps another level's. From the finite coordinates only: one NaN
        # box (never ok, so ranked last) would make every shift NaN, every IoU NaN, and suppress nothing.
        largest = torch.where(boxes.isfinite(), boxes, 0.0).max()
        shift = levels.to(boxes) * (largest.ceil() + 1)
        ranked = torch.where(ok, scores, float("-inf")).float()  # not-ok boxes last: they suppress nothing
        keep = torchvision.ops.nms(boxes + shift[:, None], ranked, self.nms_thresh)
        return keep, ok[keep].sum()


def rpn_like(rpn: RegionProposalNetwork, cls: type[RegionProposalNetwork] = ProposalNetwork, **kwargs):
    """A ``cls`` with ``rpn``'s anchor generator and head (so the same weights), settings and mode:
    ``ProposalNetwork`` for training, ``RegionProposalNetwork`` for torchvision's own (tests and
    benchmarks compare the two). ``kwargs`` go to ``cls`` (``one_nms_per_image=``)."""
    new = cls(
        rpn.anchor_generator,
        rpn.head,
        rpn.proposal_matcher.high_threshold,
        rpn.proposal_matcher.low_threshold,
        rpn.fg_bg_sampler.batch_size_per_image,
        rpn.fg_bg_sampler.positive_fraction,
        dict(rpn._pre_nms_top_n),
        dict(rpn._post_nms_top_n),
        rpn.nms_thresh,
        rpn.score_thresh,
        **kwargs,
    )
    new.min_size = rpn.min_size
    return new.train(rpn.training)
