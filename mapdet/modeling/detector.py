"""The detector module: torchvision's ``GeneralizedRCNN`` pipeline with one target check per batch.

``Detector(backbone, rpn, roi_heads, transform)`` runs what torchvision's Faster R-CNN runs, part
for part: ``transform`` (resize to min_size/max_size, normalise, pad into one batch tensor; boxes
scaled with the images), ``backbone`` (FPN features), ``rpn`` (proposals, its losses when training),
``roi_heads`` (detections, their losses), then ``transform.postprocess`` (boxes back to each input
image's pixels). Inputs and outputs are torchvision's (``mapdet.modeling.build``'s docstring).

The one difference: torchvision checks every training image's boxes for zero or negative width or
height with ``if degenerate.any()`` per image, a host sync per image on CUDA
(``mapdet.host_syncs``); here the whole batch is checked with one read-back, and a bad box
still stops training with torchvision's message naming the image and the box. Submodule names are
torchvision's, so state dicts, checkpoints and exports are unchanged.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import Tensor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

from mapdet.modeling.proposals import rpn_like
from mapdet.modeling.roi_heads import heads_like


class Detector(GeneralizedRCNN):
    """torchvision's Faster R-CNN pipeline, one target check per batch (see the module docstring)."""

    @classmethod
    def of(cls, model: GeneralizedRCNN) -> Detector:
        """The same parts (and so the same weights) as a torchvision detector."""
        return cls(model.backbone, model.rpn, model.roi_heads, model.transform).train(model.training)

    def forward(self, images: list[Tensor], targets: list[dict] | None = None):
        """Training: dict of losses. Eval: per image a dict of boxes (M, 4) xyxy in the input
        image's pixels, labels (M,), scores (M,)."""
        if self.training:
            _check_shapes(targets)
        original_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch, targets = self.transform(images, targets)
        if self.training:
            _check_positive(targets)
        features = self.backbone(batch.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, proposal_losses = self.rpn(batch, features, targets)
        detections, detector_losses = self.roi_heads(features, proposals, batch.image_sizes, targets)
        if self.training:
            return {**detector_losses, **proposal_losses}
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)


def _check_shapes(targets: list[dict] | None) -> None:
    if targets is None:
        raise ValueError("targets are needed in training mode")
    for target in targets:
        boxes = target["boxes"]
        if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"target boxes must be a tensor of shape [N, 4], got {getattr(boxes, 'shape', boxes)}")


def _check_positive(targets: list[dict]) -> None:
    """Every box (already resized with its image) has positive width and height: one read-back."""
    if not targets:
        return
    boxes = torch.cat([t["boxes"] for t in targets])
    bad = (boxes[:, 2:] <= boxes[:, :2]).any(dim=1)
    if not bool(bad.any()):
        return
    image = torch.cat([torch.full((len(t["boxes"]),), i) for i, t in enumerate(targets)])
    first = int(torch.where(bad.cpu())[0][0])
    raise ValueError(
        "All bounding boxes should have positive height and width."
        f" Found invalid box {boxes[first].tolist()} for target at index {int(image[first])}."
    )


def torchvision_twin(model: Detector) -> GeneralizedRCNN:
    """A copy of ``model`` (same weights) in torchvision's own pipeline: its ``GeneralizedRCNN``
    forward, ``RegionProposalNetwork`` and ``RoIHeads`` (plain classification loss). What mapdet's
    detector is measured and tested against."""
    twin = copy.deepcopy(model)
    rpn, heads = rpn_like(twin.rpn, RegionProposalNetwork), heads_like(twin.roi_heads, RoIHeads)
    return GeneralizedRCNN(twin.backbone, rpn, heads, twin.transform).train(model.training)
