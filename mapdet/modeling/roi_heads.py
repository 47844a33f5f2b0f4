"""The RoI box heads: RoI sampling with one host sync per batch, the classification loss
class-weighted for the long tail, the box-regression loss weighted, and the one unweighted loss
that every validation loss uses.

``SampledRoIHeads`` is torchvision's ``RoIHeads`` whose ``subsample`` uses
``mapdet.modeling.sampling.BatchedSampler``: the same sampled RoIs (same random draws), found with
one read-back per batch instead of three ``nonzero`` per image; in training its ``loss_box_reg``
is multiplied by ``box_loss_weight`` (``model.box_loss_weight``, 1 = torchvision's). Every
detector uses it.
``ClassWeightedRoIHeads`` is torchvision's ``RoIHeads`` with ``loss_classifier`` computed as a
weighted cross-entropy over the sampled RoIs: logits (R, K+1), labels (R,) in 0..K (0 background),
weights (K+1,) from ``class_weights``. Box regression and inference are torchvision's, unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss

from mapdet.config import CHOICES, ModelConfig
from mapdet.host_syncs import true_indices
from mapdet.modeling.sampling import BatchedSampler


def class_weights(cfg: ModelConfig, num_classes: int, class_counts: Sequence[int] | None = None) -> Tensor | None:
    """Per-class weights (K+1,) for the RoI classification loss (index 0 = background, weight 1).

    ``inv_sqrt``: w_c proportional to 1/sqrt(instances_c), scaled so that the foreground weights
    average 1; a class with no training instances never appears as a target and gets 1.
    ``explicit``: ``model.class_weights_list`` as given. ``none``: None (torchvision's loss).
    """
    mode = cfg.class_weights
    if mode == "none":
        return None
    if mode == "explicit":
        values = cfg.class_weights_list
        if values is None or len(values) != num_classes:
            got = "nothing" if values is None else f"{len(values)} values"
            raise ValueError(
                f"model.class_weights_list: expected {num_classes} values (background + "
                f"{num_classes - 1} classes), got {got}"
            )
        weights = torch.tensor(values, dtype=torch.float32)
        if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"model.class_weights_list={values}: weights must be finite, >= 0, not all 0")
        return weights
    if mode != "inv_sqrt":
        raise ValueError(
            f"model.class_weights={mode!r} is unknown; choose one of {' | '.join(CHOICES['model.class_weights'])}"
        )
    if class_counts is None or len(class_counts) != num_classes - 1:
        got = "none" if class_counts is None else f"{len(class_counts)}"
        raise ValueError(
            f"model.class_weights=inv_sqrt needs {num_classes - 1} per-class instance counts "
            f"from the training manifest, got {got}"
        )
    counts = torch.tensor([float(c) for c in class_counts])
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError(f"model.class_weights=inv_sqrt: bad class counts {list(class_counts)}")
    seen = counts > 0
    fg = torch.ones_like(counts)
    fg[seen] = counts[seen].rsqrt()
    fg[seen] /= fg[seen].mean()
    return torch.cat([torch.ones(1), fg])


def weighted_classification_loss(class_logits: Tensor, labels: Tensor, weight: Tensor) -> Tensor:
    """Cross-entropy over sampled RoIs, each weighted by its target class, normalised by the weight sum."""
    return F.cross_entropy(class_logits, labels, weight=weight)


class SampledRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` (same arguments, plus ``box_loss_weight``) with the sampler and
    the box-loss weight described above."""

    def __init__(self, *args, box_loss_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        if self.has_mask() or self.has_keypoint():
            raise ValueError("mapdet's RoI heads support box detection only (no masks/keypoints)")
        self.fg_bg_sampler = BatchedSampler(
            self.fg_bg_sampler.batch_size_per_image, self.fg_bg_sampler.positive_fraction
        )
        self.box_loss_weight = float(box_loss_weight)
        self.weighted = True  # off inside ``unweighted_loss``

    def forward(self, features, proposals, image_shapes, targets=None):
        result, losses = super().forward(features, proposals, image_shapes, targets)
        return result, self.weigh_box_loss(losses)

    def weigh_box_loss(self, losses: dict) -> dict:
        """``losses`` with ``loss_box_reg`` times ``box_loss_weight`` (training, weighted, weight != 1)."""
        if self.training and self.weighted and self.box_loss_weight != 1.0 and "loss_box_reg" in losses:
            losses = {**losses, "loss_box_reg": losses["loss_box_reg"] * self.box_loss_weight}
        return losses

    def subsample(self, labels: list[Tensor]) -> list[Tensor]:
        """Per image the indices of its sampled RoIs (positives and negatives), ascending."""
        pos, neg, taken = self.fg_bg_sampler.sample(labels)
        return [true_indices((p | n).bool(), a + b) for p, n, (a, b) in zip(pos, neg, taken)]


def heads_like(heads: RoIHeads, cls: type[RoIHeads] = SampledRoIHeads, **kwargs) -> RoIHeads:
    """A ``cls`` with ``heads``' pooler, box head and predictor (so the same weights), settings and
    mode: ``SampledRoIHeads``/``ClassWeightedRoIHeads`` for training, ``RoIHeads`` for torchvision's
    own (tests and benchmarks compare them). ``kwargs`` go to ``cls`` (``weight=``,
    ``box_loss_weight=``; a ``SampledRoIHeads`` keeps the box-loss weight of ``heads`` otherwise)."""
    if issubclass(cls, SampledRoIHeads):
        kwargs.setdefault("box_loss_weight", getattr(heads, "box_loss_weight", 1.0))
    new = cls(
        heads.box_roi_pool,
        heads.box_head,
        heads.box_predictor,
        heads.proposal_matcher.high_threshold,
        heads.proposal_matcher.low_threshold,
        heads.fg_bg_sampler.batch_size_per_image,
        heads.fg_bg_sampler.positive_fraction,
        heads.box_coder.weights,
        heads.score_thresh,
        heads.nms_thresh,
        heads.detections_per_img,
        **kwargs,
    )
    return new.train(heads.training)


class ClassWeightedRoIHeads(SampledRoIHeads):
    """torchvision's box RoIHeads with a class-weighted classification loss (box loss unchanged).

    Training composes RoIHeads' own sampling, pooling, head and predictor and torchvision's
    ``fastrcnn_loss`` (its box term); only the classification term is replaced. The weights are a
    non-persistent buffer: they follow ``.to(device)`` and stay out of the state dict, so weights
    trained with it load into a plain torchvision model. No global state is touched.
    """

    def __init__(self, *args, weight: Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("class_weight", weight.float(), persistent=False)

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training or not self.weighted:
            return super().forward(features, proposals, image_shapes, targets)
        for t in targets or []:  # the dtype checks RoIHeads.forward would have made
            if not t["boxes"].is_floating_point() or t["labels"].dtype != torch.int64:
                raise TypeError("targets need float boxes and int64 labels")
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        _, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)
        loss_classifier = weighted_classification_loss(class_logits, torch.cat(labels), self.class_weight)
        return [], self.weigh_box_loss({"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg})


@contextlib.contextmanager
def unweighted_loss(model: nn.Module):
    """Inside the block every ``SampledRoIHeads`` computes torchvision's plain loss (no class
    weights, box-loss weight 1).

    The validation loss has one definition everywhere (training's validation, ``mapdet evaluate``,
    TensorBoard, metrics.json): torchvision's four losses, unweighted. ``evaluate`` has no training
    manifest to weight with, and a weighted number would change whenever the weights do.
    """
    heads = [m for m in model.modules() if isinstance(m, SampledRoIHeads)]
    for h in heads:
        h.weighted = False
    try:
        yield
    finally:
        for h in heads:
            h.weighted = True
