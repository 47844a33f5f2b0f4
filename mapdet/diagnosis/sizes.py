"""Object sizes against what the model sees: AP by COCO size, box sizes at the model's input
size (torchvision's resize: shorter side to ``min_size`` unless the longer would exceed
``max_size``) and the anchor sizes. Sizes are ``sqrt(area)`` in pixels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mapdet.config import ModelConfig
from mapdet.diagnosis.records import ModelInput, SizeStats
from mapdet.diagnosis.stats import points, share
from mapdet.diagnosis.tide_matching import ImageTruth
from mapdet.evaluation.matching import MEDIUM, SMALL


@dataclass
class Geometry:
    """The model's effective input size and anchors (arch defaults filled in)."""

    min_size: int
    max_size: int
    anchor_sizes: list[float]  # flat, sorted
    anchors_from: str  # config | arch default | torchvision default


def model_geometry(model: ModelConfig) -> Geometry:
    """Effective ``min_size``, ``max_size`` and flat ``anchor_sizes`` (arch defaults filled in by
    ``mapdet.modeling.build.resolve_config``); ``anchors_from`` says whether the config set the anchors."""
    from mapdet.modeling.build import STOCK_ANCHOR_SIZES, resolve_config

    cfg = resolve_config(model)
    sizes = STOCK_ANCHOR_SIZES[cfg.arch] if cfg.anchor_sizes is None else cfg.anchor_sizes
    source = "config" if model.anchor_sizes is not None else "arch default" if cfg.anchor_sizes is not None else None
    return Geometry(cfg.min_size, cfg.max_size, sorted({float(a) for a in sizes}), source or "torchvision default")


def input_scale(gt: dict, geometry: Geometry) -> np.ndarray:
    """(N,) per image (json order) the factor torchvision's GeneralizedRCNNTransform resizes it by."""
    wh = np.array([[im.get("width", 0), im.get("height", 0)] for im in gt["images"]], float).reshape(-1, 2)
    ok = (wh > 0).all(axis=1)
    safe = np.where(ok[:, None], wh, 1.0)
    scale = np.minimum(geometry.min_size / safe.min(axis=1), geometry.max_size / safe.max(axis=1))
    return np.where(ok, scale, 1.0)


def size_stats(gt: dict, g: ImageTruth, result, model: ModelConfig) -> SizeStats:
    """AP by COCO size, share of GT per size, sqrt(area) histograms vs the anchor sizes."""
    geo = model_geometry(model)
    real = ~g.crowd
    area = g.area[real]
    side = np.sqrt(np.clip(area, 0, None))
    scale = input_scale(gt, geo)
    side_in = side * scale[g.image[real]]
    top = max(float(side.max(initial=1.0)), float(side_in.max(initial=1.0)), max(geo.anchor_sizes) * 2.0)
    bins = np.geomspace(1.0, top * 1.01, 41)
    return SizeStats(
        ap={k: points(result.ap(area=k)) for k in ("small", "medium", "large")},
        ap50={k: points(result.ap(iou=0.5, area=k)) for k in ("small", "medium", "large")},
        share_gt={
            "small": share(area < SMALL),
            "medium": share((area >= SMALL) & (area < MEDIUM)),
            "large": share(area >= MEDIUM),
        },
        bins=bins.tolist(),
        hist_original=np.histogram(side, bins)[0].tolist(),
        hist_model_input=np.histogram(side_in, bins)[0].tolist(),
        anchor_sizes=geo.anchor_sizes,
        model_input=ModelInput(geo.min_size, geo.max_size, model.arch),
        anchors_from=geo.anchors_from,
        share_below_smallest_anchor_half=share(side_in < min(geo.anchor_sizes) / 2),
        median_side_model_input=float(np.median(side_in)) if len(side_in) else 0.0,
        side_p10_model_input=float(np.percentile(side_in, 10)) if len(side_in) else 0.0,
        input_scale_median=float(np.median(scale)) if len(scale) else 1.0,
    )
