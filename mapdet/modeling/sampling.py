"""Sampling anchors and RoIs for the losses with one host sync per batch, drawing what torchvision draws.

torchvision's ``BalancedPositiveNegativeSampler`` finds each image's positives (match index >= 1)
and negatives (== 0) with two ``nonzero`` calls, and the RPN loss and the RoI heads find the sampled
ones again with ``nonzero``: on CUDA each is a host sync (``mapdet.host_syncs``), three to
four per image per sampler. ``BatchedSampler.sample`` counts every image's positives and negatives
on the device and reads the counts back ONCE for the batch; with the counts known,
``mapdet.host_syncs.true_indices`` finds the candidates without a sync, and the sampler draws the same
``torch.randperm`` of the same sizes, in the same order, from the same generator as torchvision. The
masks it returns are torchvision's, bit for bit, and so is everything trained from them.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from mapdet.host_syncs import true_indices


class BatchedSampler(BalancedPositiveNegativeSampler):
    """torchvision's sampler (same arguments, same result) with one read-back per batch."""

    def sample(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[tuple[int, int]]]:
        """Per image: the sampled positives and negatives as uint8 masks shaped like its
        ``matched_idxs`` (N_i,), and how many of each were sampled (host ints)."""
        positive = [m >= 1 for m in matched_idxs]
        negative = [m == 0 for m in matched_idxs]
        if not matched_idxs:
            return [], [], []
        available = torch.stack([torch.stack([p.sum(), n.sum()]) for p, n in zip(positive, negative)]).tolist()
        pos_masks, neg_masks, taken = [], [], []
        for m, p, n, (n_pos, n_neg) in zip(matched_idxs, positive, negative, available):
            num_pos = min(n_pos, int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(n_neg, self.batch_size_per_image - num_pos)
            # torchvision's draws in torchvision's order: same sizes, same generator, same numbers
            pick_pos = true_indices(p, n_pos)[torch.randperm(n_pos, device=m.device)[:num_pos]]
            pick_neg = true_indices(n, n_neg)[torch.randperm(n_neg, device=m.device)[:num_neg]]
            pos_masks.append(_mask_of(m, pick_pos))
            neg_masks.append(_mask_of(m, pick_neg))
            taken.append((num_pos, num_neg))
        return pos_masks, neg_masks, taken

    def __call__(self, matched_idxs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        pos, neg, _ = self.sample(matched_idxs)
        return pos, neg


def _mask_of(like: Tensor, picked: Tensor) -> Tensor:
    mask = torch.zeros_like(like, dtype=torch.uint8)
    mask[picked] = 1
    return mask
