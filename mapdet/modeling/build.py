"""Faster R-CNN detectors built from a ``ModelConfig``: arch, anchors, start weights, frozen stages.

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
    small                   CPU preset, trained from scratch: a plain 3x3-convolution trunk (two
                            strided convolutions, then three ResNet basic blocks; 16..128 channels,
                            strides 2..32), a 64-channel FPN on strides 8/16/32 (+ max-pool level
                            64, 4 levels), a 256-d two-layer box head, 128 sampled RoIs, 500
                            proposals. About 0.1 s per training step of 4 images at 256 px on one
                            CPU thread (bench/profile_demo.py).
The module is ``mapdet.modeling.detector.Detector``, its RPN ``mapdet.modeling.proposals.ProposalNetwork``
and its RoI heads ``mapdet.modeling.roi_heads.SampledRoIHeads``: torchvision's, with the same weights
(and state-dict keys), proposals, samples, losses and detections, and a small fraction of their
host syncs on CUDA.
Start weights: random initialisation unless ``model.weights`` (full detector) or
``model.backbone_weights`` names a local file or a torchvision weight name
(``torchvision:FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1``, ``torchvision:ResNet50_Weights.IMAGENET1K_V2``,
...; see ``mapdet.modeling.pretrained``). Names are read from torch's cache; nothing is ever downloaded here
(``mapdet weights fetch`` does that).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.resnet import BasicBlock
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mapdet.config import CHOICES, ModelConfig
from mapdet.modeling import pretrained
from mapdet.modeling.detector import Detector
from mapdet.modeling.proposals import rpn_like
from mapdet.modeling.roi_heads import ClassWeightedRoIHeads, class_weights, heads_like
from mapdet.modeling.weights_io import load_detector_partially, load_weights_file

_STOCK_BUILDERS = {
    "resnet50_fpn_v2": torchvision.models.detection.fasterrcnn_resnet50_fpn_v2,
    "mobilenet_v3_large_fpn": torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn,
}
# Values taken by ModelConfig keys left at None. anchor_sizes/aspect_ratios None on a stock arch
# keep torchvision's own anchor generator, so exported weights load into the plain builder.
_STOCK_DEFAULTS = dict(
    min_size=1024,
    max_size=2048,
    roi_batch_size_per_image=512,
    rpn_post_nms_top_n_train=2000,
    rpn_post_nms_top_n_test=1000,
)
ARCH_DEFAULTS = {
    "resnet50_fpn_v2": dict(_STOCK_DEFAULTS),
    "mobilenet_v3_large_fpn": dict(_STOCK_DEFAULTS),
    "small": dict(
        min_size=512,
        max_size=1024,
        roi_batch_size_per_image=128,
        rpn_post_nms_top_n_train=500,
        rpn_post_nms_top_n_test=300,
        anchor_sizes=[16, 32, 64, 128],
        aspect_ratios=[0.5, 1.0, 2.0],
    ),
}
# torchvision's own anchor sizes, used when the config leaves model.anchor_sizes None (one per FPN
# level: config.ARCH_LAYOUT holds each arch's level count).
STOCK_ANCHOR_SIZES = {"resnet50_fpn_v2": [32, 64, 128, 256, 512], "mobilenet_v3_large_fpn": [32, 64, 128, 256, 512]}
_STOCK_ASPECT_RATIOS = (0.5, 1.0, 2.0)
# The small trunk's channels at strides 2, 4, 8, 16, 32; the FPN reads the last three stages.
_SMALL_WIDTHS = (16, 32, 64, 96, 128)
_SMALL_RETURN_LAYERS = {"layer2": "0", "layer3": "1", "layer4": "2"}
_SMALL_FPN_CHANNELS, _SMALL_REPRESENTATION = 64, 256
_DEFAULT_TRAINABLE_PRETRAINED = 3  # torchvision's default when starting from pretrained weights


def resolve_config(cfg: ModelConfig) -> ModelConfig:
    """A copy of ``cfg`` with every None key replaced by the arch's default."""
    if cfg.arch not in ARCH_DEFAULTS:
        raise ValueError(f"model.arch={cfg.arch!r} is unknown; choose one of {' | '.join(CHOICES['model.arch'])}")
    filled = {k: v for k, v in ARCH_DEFAULTS[cfg.arch].items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **filled)


def build_model(cfg: ModelConfig, num_classes: int, class_counts: Sequence[int] | None = None) -> Detector:
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
    if not math.isfinite(cfg.box_loss_weight) or cfg.box_loss_weight < 0:
        raise ValueError(f"model.box_loss_weight={cfg.box_loss_weight}: must be finite and >= 0 (1: torchvision's)")
    _check_named_weights(cfg)
    kwargs = dict(
        min_size=cfg.min_size,
        max_size=cfg.max_size,
        box_detections_per_img=cfg.detections_per_img,
        box_score_thresh=cfg.score_thresh,
        box_nms_thresh=cfg.nms_thresh,
        rpn_batch_size_per_image=cfg.rpn_batch_size_per_image,
        box_batch_size_per_image=cfg.roi_batch_size_per_image,
        rpn_pre_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_post_nms_top_n_train=cfg.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
        rpn_post_nms_top_n_test=cfg.rpn_post_nms_top_n_test,
    )
    if cfg.arch == "small":
        model = _build_small(num_classes, kwargs)
    else:
        model = _STOCK_BUILDERS[cfg.arch](weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    _set_anchors(model, cfg)
    model = _with_mapdet_parts(model, class_weights(cfg, num_classes, class_counts), cfg.box_loss_weight)
    if cfg.backbone_weights:
        key = "model.backbone_weights"
        if pretrained.is_name(cfg.backbone_weights):
            state = pretrained.load_named(cfg.backbone_weights, key)[0]
        else:
            state = load_weights_file(cfg.backbone_weights, key)
        _load_backbone(model.backbone.body, state)
    if cfg.weights and pretrained.is_name(cfg.weights):
        state = pretrained.load_named(cfg.weights, "model.weights")[0]
        load_detector_partially(model, state, f"model.weights {cfg.weights}")
    elif cfg.weights:
        model.load_state_dict(load_weights_file(cfg.weights, "model.weights"))
    from_pretrained = bool(cfg.weights or cfg.backbone_weights)
    trainable = cfg.trainable_backbone_layers
    if trainable is None and from_pretrained:
        trainable = _DEFAULT_TRAINABLE_PRETRAINED
    if trainable is not None:
        _freeze_stages(model.backbone.body, trainable)
    return model


def _with_mapdet_parts(model: FasterRCNN, weights: Tensor | None, box_loss_weight: float) -> Detector:
    """torchvision's detector with mapdet's RPN, RoI heads and forward: the same weights and results,
    a small fraction of the host syncs (proposals.py, roi_heads.py, detector.py)."""
    model.rpn = rpn_like(model.rpn)
    if weights is not None:
        model.roi_heads = heads_like(
            model.roi_heads, ClassWeightedRoIHeads, weight=weights, box_loss_weight=box_loss_weight
        )
    else:
        model.roi_heads = heads_like(model.roi_heads, box_loss_weight=box_loss_weight)
    return Detector.of(model)


def _check_named_weights(cfg: ModelConfig) -> None:
    """Every torchvision name in the config resolves, fits ``cfg.arch`` and the key, and is cached."""
    for key, spec in (("model.weights", cfg.weights), ("model.backbone_weights", cfg.backbone_weights)):
        if not pretrained.is_name(spec):
            continue
        kind, arch = pretrained.kind_and_arch(pretrained.resolve(spec, key))
        if arch != cfg.arch:
            raise ValueError(
                f"{key}: {spec} is for model.arch={arch}, not {cfg.arch}"
                + (
                    " (the small preset has no torchvision weights: its trunk is mapdet's own, trained from scratch)"
                    if cfg.arch == "small"
                    else ""
                )
            )
        if key == "model.weights" and kind != "detector":
            raise ValueError(
                f"model.weights: {spec} holds classification weights, not a detector: "
                f"set model.backbone_weights={spec} instead"
            )
    pretrained.check_cached(cfg.weights, cfg.backbone_weights)


def build_inference_model(cfg: ModelConfig, num_classes: int) -> Detector:
    """The same network for evaluation: no class weights (a training-loss setting that needs the
    training manifest) and no start weights (the caller loads trained ones)."""
    return build_model(dataclasses.replace(cfg, class_weights="none", weights=None, backbone_weights=None), num_classes)


def _build_small(num_classes: int, kwargs: dict) -> FasterRCNN:
    trunk = _small_trunk(_SMALL_WIDTHS)
    backbone = BackboneWithFPN(
        trunk, _SMALL_RETURN_LAYERS, list(_SMALL_WIDTHS[2:]), _SMALL_FPN_CHANNELS, extra_blocks=LastLevelMaxPool()
    )
    levels = list(_SMALL_RETURN_LAYERS.values())  # RoIs pool from the real levels, not the max-pool one
    box_head = TwoMLPHead(_SMALL_FPN_CHANNELS * 7 * 7, _SMALL_REPRESENTATION)
    return FasterRCNN(
        backbone,
        num_classes=None,
        box_roi_pool=MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(_SMALL_REPRESENTATION, num_classes),
        **kwargs,
    )


def _small_trunk(widths: tuple[int, ...]) -> nn.Sequential:
    """The small preset's trunk: two strided 3x3 convolutions (stride 4), then three ResNet basic
    blocks that each halve the resolution (strides 8, 16, 32), named as torchvision's ResNet stages
    (``layer1``..``layer4``) so the FPN and stage freezing address them the same way.

    Plain 3x3 convolutions because the trunk trains from scratch on the CPU: oneDNN runs them at
    several times the throughput of MobileNetV3's depthwise ones (bench/RESULTS.md), and BatchNorm
    with ReLU learns from a random start without the warm-up MobileNetV3's hard-swish and
    squeeze-excitation need. BatchNorm momentum 0.1, the from-scratch default (torchvision's
    MobileNetV3 used 0.01: its running statistics lagged and eval mode predicted nothing)."""

    def conv(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def down(cin: int, cout: int) -> BasicBlock:
        skip = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))
        return BasicBlock(cin, cout, stride=2, downsample=skip)

    w = widths
    stages = [("stem", conv(3, w[0])), ("layer1", conv(w[0], w[1]))]
    stages += [(f"layer{i}", down(w[i - 1], w[i])) for i in (2, 3, 4)]
    return nn.Sequential(collections.OrderedDict(stages))


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


def _load_backbone(body: nn.Module, state: dict[str, Tensor]) -> None:
    """Load a classification/backbone checkpoint into the backbone trunk, whatever its key prefix."""
    own = body.state_dict()
    prefixes = ("", "features.", "backbone.body.", "body.", "module.")
    prefix = max(prefixes, key=lambda p: sum(k[len(p) :] in own for k in state if k.startswith(p)))
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :] in own}
    missing = [k for k in own if k not in picked and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(
            f"model.backbone_weights: {len(missing)} of {len(own)} backbone tensors are not "
            f"in the file (first: {missing[:3]}); is it a checkpoint of this arch's trunk?"
        )
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
