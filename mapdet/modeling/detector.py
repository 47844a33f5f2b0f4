"""Faster R-CNN detectors built from a ``ModelConfig``; class-weighted RoI classification loss.

Input/output (torchvision's detection convention, unchanged):
    images   list of float tensors (3, H, W) in [0, 1], sizes may differ; the model resizes each
             to ``min_size``/``max_size`` itself and maps its outputs back.
    targets  (training) list of dicts: ``boxes`` float32 (N, 4) xyxy pixel-edge in the frame of the
             input image (a one-pixel object at column c spans [c, c+1]), every box with positive
             width and height; ``labels`` int64 (N,) in 1..K (0 is background). An image without
             objects has boxes (0, 4) and labels (0,).
    output   training: dict of losses (loss_classifier, loss_box_reg, loss_objectness,
             loss_rpn_box_reg); eval: per image a dict of boxes (M, 4) in input coordinates,
             labels (M,), scores (M,), M <= ``detections_per_img``.

Archs (``model.arch``):
    resnet50_fpn_v2         torchvision ``fasterrcnn_resnet50_fpn_v2``: 5 FPN levels, strides 4..64;
                            the GPU default.
    mobilenet_v3_large_fpn  torchvision ``fasterrcnn_mobilenet_v3_large_fpn``: 3 levels, strides 16..64.
    small                   CPU preset: MobileNetV3-Large trunk at width 0.5 cut at stride 32, a
                            64-channel FPN on strides 8/16/32 (+ max-pool level 64, 4 levels),
                            a 256-d two-layer box head, 128 sampled RoIs, 500 proposals. About
                            0.2-0.3 s per training step (2 images at 512 px, 1-2 threads).
Start weights: random initialisation unless ``model.weights`` (full detector) or
``model.backbone_weights`` names a local file or a torchvision weight name
(``torchvision:FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1``, ``torchvision:ResNet50_Weights.IMAGENET1K_V2``,
...; see ``mapdet.modeling.pretrained``). Names are read from torch's cache; nothing is ever downloaded here
(``mapdet weights fetch`` does that).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mapdet.modeling import pretrained as named_weights
from mapdet.config import CHOICES, ModelConfig

_STOCK_BUILDERS = {
    "resnet50_fpn_v2": torchvision.models.detection.fasterrcnn_resnet50_fpn_v2,
    "mobilenet_v3_large_fpn": torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn,
}
# Values taken by ModelConfig keys left at None. anchor_sizes/aspect_ratios None on a stock arch
# keep torchvision's own anchor generator, so exported weights load into the plain builder.
ARCH_DEFAULTS = {
    "resnet50_fpn_v2": dict(min_size=1024, max_size=2048, roi_batch_size_per_image=512,
                            rpn_post_nms_top_n_train=2000, rpn_post_nms_top_n_test=1000),
    "mobilenet_v3_large_fpn": dict(min_size=1024, max_size=2048, roi_batch_size_per_image=512,
                                   rpn_post_nms_top_n_train=2000, rpn_post_nms_top_n_test=1000),
    "small": dict(min_size=512, max_size=1024, roi_batch_size_per_image=128,
                  rpn_post_nms_top_n_train=500, rpn_post_nms_top_n_test=300,
                  anchor_sizes=[16, 32, 64, 128], aspect_ratios=[0.5, 1.0, 2.0]),
}
_STOCK_ASPECT_RATIOS = (0.5, 1.0, 2.0)
# MobileNetV3-Large feature indices ending the stride-8, -16 and -32 stages (the 1x1 960-channel
# head conv after them is left out: it is a large share of the trunk's cost).
_SMALL_RETURN_LAYERS = {"6": "0", "12": "1", "15": "2"}
_SMALL_WIDTH, _SMALL_FPN_CHANNELS, _SMALL_REPRESENTATION = 0.5, 64, 256
_DEFAULT_TRAINABLE_PRETRAINED = 3  # torchvision's default when starting from pretrained weights


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """A copy of ``cfg`` with every None key replaced by the arch's default."""
    if cfg.arch not in ARCH_DEFAULTS:
        raise ValueError(f"model.arch={cfg.arch!r} is unknown; choose one of {' | '.join(CHOICES['model.arch'])}")
    filled = {k: v for k, v in ARCH_DEFAULTS[cfg.arch].items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **filled)


def build_model(cfg: ModelConfig, num_classes: int, class_counts: Optional[Sequence[int]] = None) -> FasterRCNN:
    """A Faster R-CNN for ``num_classes`` = K + 1 (index 0 = background).

    ``class_counts`` (length K, training instances per class from the shard manifest) is needed by
    ``model.class_weights: inv_sqrt``. Start weights are loaded after the anchors are set.

    ``model.weights`` as a LOCAL FILE loads strictly: such a file is a mapdet checkpoint or export
    of this very network (same arch, anchors and class count), so a missing or mis-shaped tensor
    means the wrong file or config, and an error says so instead of silently training half the
    network from scratch. As a TORCHVISION NAME (``torchvision:FasterRCNN_..._Weights.COCO_V1``) it
    is by construction a COCO detector of another class set, so it loads leniently
    (``load_detector_partially``): every tensor whose name and shape match is loaded, the
    class-dependent predictor starts fresh, other mismatches (e.g. an RPN head for another anchor
    count) are skipped, and stderr says how many of each and why. ``model.backbone_weights`` (file
    or name, classification or detector weights) loads the trunk ``model.backbone.body`` only,
    ignoring classifier tensors (ResNet ``fc.*``, MobileNetV3 ``classifier.*``). Either kind of start
    weights makes the backbone "pretrained": the first stages are frozen (torchvision's default of
    3 trainable stages unless ``model.trainable_backbone_layers`` says otherwise), their BatchNorm
    replaced by FrozenBatchNorm2d. Named weights that are not in torch's cache stop before anything
    is built, with the ``mapdet weights fetch`` command to run (FileNotFoundError: exit 2).
    """
    cfg = resolve_config(cfg)
    if num_classes < 2:
        raise ValueError(f"num_classes={num_classes}: need background + at least one class")
    _check_named_weights(cfg)
    kwargs = dict(
        min_size=cfg.min_size, max_size=cfg.max_size, box_detections_per_img=cfg.detections_per_img,
        box_score_thresh=cfg.score_thresh, box_nms_thresh=cfg.nms_thresh,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=cfg.roi_batch_size_per_image,
        rpn_pre_nms_top_n_train=cfg.rpn_post_nms_top_n_train, rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_post_nms_top_n_test, rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
    )
    if cfg.arch == "small":
        model = _build_small(num_classes, kwargs)
    else:
        model = _STOCK_BUILDERS[cfg.arch](weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    _set_anchors(model, cfg)
    weights = class_weights(cfg, num_classes, class_counts)
    if weights is not None:
        model.roi_heads = ClassWeightedRoIHeads(model.roi_heads, weights)
    if cfg.backbone_weights:
        key = "model.backbone_weights"
        if named_weights.is_name(cfg.backbone_weights):
            state = named_weights.load_named(cfg.backbone_weights, key)[0]
        else:
            state = load_weights_file(cfg.backbone_weights, key)
        _load_backbone(model.backbone.body, state)
    if cfg.weights and named_weights.is_name(cfg.weights):
        state = named_weights.load_named(cfg.weights, "model.weights")[0]
        load_detector_partially(model, state, f"model.weights {cfg.weights}")
    elif cfg.weights:
        model.load_state_dict(load_weights_file(cfg.weights, "model.weights"))
    pretrained = bool(cfg.weights or cfg.backbone_weights)
    trainable = cfg.trainable_backbone_layers
    if trainable is None and pretrained:
        trainable = _DEFAULT_TRAINABLE_PRETRAINED
    if trainable is not None:
        _freeze_stages(model.backbone.body, trainable)
    return model


def _check_named_weights(cfg: ModelConfig) -> None:
    """Every torchvision name in the config resolves, fits ``cfg.arch`` and the key, and is cached."""
    for key, spec in (("model.weights", cfg.weights), ("model.backbone_weights", cfg.backbone_weights)):
        if not named_weights.is_name(spec):
            continue
        kind, arch = named_weights.kind_and_arch(named_weights.resolve(spec, key))
        if arch != cfg.arch:
            raise ValueError(f"{key}: {spec} is for model.arch={arch}, not {cfg.arch}"
                             + (" (the small preset has no torchvision weights: its trunk is MobileNetV3 at width "
                                "0.5)" if cfg.arch == "small" else ""))
        if key == "model.weights" and kind != "detector":
            raise ValueError(f"model.weights: {spec} holds classification weights, not a detector: "
                             f"set model.backbone_weights={spec} instead")
    named_weights.check_cached(cfg.weights, cfg.backbone_weights)


_CLASS_DEPENDENT = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.")


def load_detector_partially(model: nn.Module, state: dict[str, Tensor], source: str) -> dict:
    """Load a detector's weights trained on another class set (torchvision's COCO detectors).

    Every tensor of ``model`` whose name and shape are in ``state`` is loaded; the class-dependent
    predictor tensors (``roi_heads.box_predictor.cls_score.*``, ``.bbox_pred.*``) keep their fresh
    initialisation even when the shapes happen to match (the file's classes are not ours); every
    other tensor the file lacks or holds in another shape is skipped (left fresh), grouped by module
    with the reason. BatchNorm's ``num_batches_tracked`` counters are not counted. Prints one summary
    line (plus one per skipped group) to stderr on rank 0 and returns
    ``{"loaded": [...], "fresh": [...], "skipped": {module: (count, reason)}, "unused": [...]}``.
    """
    own = model.state_dict()
    take, fresh, skipped = {}, [], {}
    for name, mine in own.items():
        if name.endswith("num_batches_tracked"):
            continue
        if name.startswith(_CLASS_DEPENDENT):
            fresh.append(name)
            continue
        theirs = state.get(name)
        if theirs is not None and theirs.shape == mine.shape:
            take[name] = theirs
            continue
        group = name.rsplit(".", 1)[0]
        if theirs is None:
            reason = "not in the file"
        else:
            reason = f"shape {tuple(theirs.shape)} in the file, {tuple(mine.shape)} here"
            if group.startswith("rpn.head."):
                reason += " (another anchor count per location: model.aspect_ratios)"
        count, first = skipped.get(group, (0, reason))
        skipped[group] = (count + 1, first)
    unused = [k for k in state if k not in own and not k.endswith("num_batches_tracked")]
    model.load_state_dict(take, strict=False)
    if os.environ.get("RANK", "0") == "0":  # once per job under a launcher, not once per process
        file_classes = state.get("roi_heads.box_predictor.cls_score.weight")
        classes = "" if file_classes is None else (
            f" (class-dependent predictor: {file_classes.shape[0]} classes in the file, "
            f"{own['roi_heads.box_predictor.cls_score.weight'].shape[0]} here)")
        n_skipped = sum(c for c, _ in skipped.values())
        print(f"{source}: {len(take)} tensors loaded, {len(fresh)} kept fresh{classes}, {n_skipped} skipped",
              file=sys.stderr)
        for group, (count, reason) in skipped.items():
            print(f"  skipped {group} ({count} tensor{'s' * (count != 1)}): {reason}", file=sys.stderr)
        if unused:
            print(f"  {len(unused)} tensors of the file have no place in this model (first: {unused[:3]})",
                  file=sys.stderr)
    return {"loaded": sorted(take), "fresh": fresh, "skipped": skipped, "unused": unused}


def build_inference_model(cfg: ModelConfig, num_classes: int) -> FasterRCNN:
    """The same network for evaluation: no class weights (a training-loss setting that needs the
    training manifest) and no start weights (the caller loads trained ones)."""
    return build_model(dataclasses.replace(cfg, class_weights="none", weights=None, backbone_weights=None), num_classes)


def _build_small(num_classes: int, kwargs: dict) -> FasterRCNN:
    # torchvision's MobileNetV3 defaults to BatchNorm momentum 0.01: trained from scratch for a few
    # hundred steps, its running statistics are still near their initial values and eval mode
    # predicts nothing (train loss low, mAP 0). 0.1 is the usual from-scratch momentum.
    norm = functools.partial(nn.BatchNorm2d, eps=0.001, momentum=0.1)
    trunk = torchvision.models.mobilenet_v3_large(weights=None, width_mult=_SMALL_WIDTH, norm_layer=norm).features
    channels = [trunk[int(i)].out_channels for i in _SMALL_RETURN_LAYERS]
    backbone = BackboneWithFPN(trunk, _SMALL_RETURN_LAYERS, channels, _SMALL_FPN_CHANNELS,
                               extra_blocks=LastLevelMaxPool())
    levels = list(_SMALL_RETURN_LAYERS.values())  # RoIs pool from the real levels, not the max-pool one
    box_head = TwoMLPHead(_SMALL_FPN_CHANNELS * 7 * 7, _SMALL_REPRESENTATION)
    return FasterRCNN(
        backbone, num_classes=None, box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        box_head=box_head, box_predictor=FastRCNNPredictor(_SMALL_REPRESENTATION, num_classes), **kwargs,
    )


def _num_feature_maps(backbone: nn.Module) -> int:
    was_training = backbone.training
    backbone.eval()  # keeps BatchNorm running statistics untouched by the probe
    with torch.no_grad():
        n = len(backbone(torch.zeros(1, 3, 64, 64)))
    backbone.train(was_training)
    return n


def _set_anchors(model: FasterRCNN, cfg: ModelConfig) -> None:
    """Replace the RPN's anchors when the config sets them; validate one size per feature map."""
    if cfg.anchor_sizes is None and cfg.aspect_ratios is None:
        return  # stock arch: torchvision's own generator and head
    n_maps = _num_feature_maps(model.backbone)
    if cfg.anchor_sizes is None:
        sizes = model.rpn.anchor_generator.sizes
    elif len(cfg.anchor_sizes) != n_maps:
        raise ValueError(
            f"model.anchor_sizes has {len(cfg.anchor_sizes)} values but arch {cfg.arch!r} has {n_maps} "
            f"feature maps: give one anchor size per FPN level"
        )
    else:
        sizes = tuple((int(s),) for s in cfg.anchor_sizes)
    ratios = tuple(cfg.aspect_ratios) if cfg.aspect_ratios is not None else _STOCK_ASPECT_RATIOS
    if not ratios or min(ratios) <= 0:
        raise ValueError(f"model.aspect_ratios={list(ratios)}: need at least one positive h/w ratio")
    generator = AnchorGenerator(sizes, (ratios,) * len(sizes))
    per_location = generator.num_anchors_per_location()[0]
    head = model.rpn.head
    if per_location != head.cls_logits.out_channels:  # the head predicts per anchor: new shape
        head = RPNHead(head.cls_logits.in_channels, per_location, conv_depth=len(head.conv))
    model.rpn.anchor_generator, model.rpn.head = generator, head


def class_weights(cfg: ModelConfig, num_classes: int, class_counts: Optional[Sequence[int]] = None) -> Optional[Tensor]:
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
            raise ValueError(f"model.class_weights_list: expected {num_classes} values (background + "
                             f"{num_classes - 1} classes), got {got}")
        weights = torch.tensor(values, dtype=torch.float32)
        if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"model.class_weights_list={values}: weights must be finite, >= 0, not all 0")
        return weights
    if mode != "inv_sqrt":
        raise ValueError(f"model.class_weights={mode!r} is unknown; "
                         f"choose one of {' | '.join(CHOICES['model.class_weights'])}")
    if class_counts is None or len(class_counts) != num_classes - 1:
        got = "none" if class_counts is None else f"{len(class_counts)}"
        raise ValueError(f"model.class_weights=inv_sqrt needs {num_classes - 1} per-class instance counts "
                         f"from the training manifest, got {got}")
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


class ClassWeightedRoIHeads(RoIHeads):
    """torchvision's box RoIHeads with a class-weighted classification loss (box loss unchanged).

    Training composes RoIHeads' own sampling, pooling, head and predictor and torchvision's
    ``fastrcnn_loss`` (its box term); only the classification term is replaced. The weights are a
    non-persistent buffer: they follow ``.to(device)`` and stay out of the state dict, so weights
    trained with it load into a plain torchvision model. No global state is touched.
    """

    def __init__(self, heads: RoIHeads, weight: Tensor):
        if heads.has_mask() or heads.has_keypoint():
            raise ValueError("class-weighted RoI heads support box detection only (no masks/keypoints)")
        super().__init__(
            heads.box_roi_pool, heads.box_head, heads.box_predictor,
            heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
        )
        self.register_buffer("class_weight", weight.float(), persistent=False)
        self.weighted = True  # off inside ``unweighted_loss``

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
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}


@contextlib.contextmanager
def unweighted_loss(model: nn.Module):
    """Inside the block every ``ClassWeightedRoIHeads`` computes torchvision's plain loss.

    The validation loss has one definition everywhere (training's validation, ``mapdet evaluate``,
    TensorBoard, metrics.json): torchvision's four losses, unweighted. ``evaluate`` has no training
    manifest to weight with, and a weighted number would change whenever the weights do.
    """
    heads = [m for m in model.modules() if isinstance(m, ClassWeightedRoIHeads)]
    for h in heads:
        h.weighted = False
    try:
        yield
    finally:
        for h in heads:
            h.weighted = True


def _load_backbone(body: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a classification/backbone checkpoint into the backbone trunk, whatever its key prefix."""
    own = body.state_dict()
    prefixes = ("", "features.", "backbone.body.", "body.", "module.")
    prefix = max(prefixes, key=lambda p: sum(k[len(p):] in own for k in state if k.startswith(p)))
    picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix):] in own}
    missing = [k for k in own if k not in picked and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"model.backbone_weights: {len(missing)} of {len(own)} backbone tensors are not "
                         f"in the file (first: {missing[:3]}); is it a checkpoint of this arch's trunk?")
    body.load_state_dict(picked, strict=False)  # shape mismatches still raise


def _stage_starts(body: nn.Module) -> list[int]:
    """Indices of the body's children that begin each stage torchvision counts as a layer."""
    names = [n for n, _ in body.named_children()]
    if "layer1" in names:  # ResNet: stem, layer1..layer4
        return [0] + [names.index(f"layer{i}") for i in range(1, 5)]
    blocks = list(body.children())  # MobileNetV3: stem, the blocks that reduce resolution, last
    return [0] + [i for i, b in enumerate(blocks) if getattr(b, "_is_cn", False)] + [len(blocks) - 1]


def _freeze_stages(body: nn.Module, trainable: int) -> None:
    """Keep only the last ``trainable`` stages trainable; frozen stages get FrozenBatchNorm2d."""
    starts = _stage_starts(body)
    if not 0 <= trainable <= len(starts):
        raise ValueError(f"model.trainable_backbone_layers={trainable}: must be 0..{len(starts)} for this arch")
    stop = len(starts) if trainable == 0 else starts[len(starts) - trainable]
    for name, child in list(body.named_children())[:stop]:
        child.requires_grad_(False)
        setattr(body, name, _frozen_batchnorm(child))


def _frozen_batchnorm(module: nn.Module) -> nn.Module:
    # A frozen stage in train mode would still update BatchNorm running statistics.
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for key in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, key).copy_(getattr(module, key).detach())
        return frozen
    for name, child in module.named_children():
        setattr(module, name, _frozen_batchnorm(child))
    return module


def load_weights_file(path: str | Path, key: str = "model.weights") -> dict[str, Tensor]:
    """A state dict from ``.safetensors`` or a ``.pth`` read with ``weights_only=True`` (no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{key}: weights file {str(path)!r} does not exist (weights are never "
                                f"downloaded; copy the file there or fix {key})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from mapdet.engine.checkpoint import refuse_pickled_objects

    with refuse_pickled_objects(f"{key}: {path}"):  # weights_only refuses code that would run on load
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):  # training checkpoints nest the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{key}: {path} does not hold a state dict of tensors")
    return state


def export_weights(model: nn.Module) -> dict[str, Tensor]:
    """Plain CPU state dict: loads (strict) into ``torchvision.models.detection.<builder>(weights=None,
    num_classes=K+1)`` for a stock arch with stock anchor count, else into ``build_model``."""
    model = getattr(model, "module", model)  # DistributedDataParallel wrapper
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
