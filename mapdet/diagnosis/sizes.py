"""Object sizes against what the model sees: AP by COCO size, box sizes at the model's input
size (torchvision's resize: shorter side to ``min_size`` unless the longer would exceed
``max_size``) and the anchor sizes. Sizes are ``sqrt(area)`` in pixels."""

from __future__ import annotations

import numpy as np

from mapdet.config import ModelConfig
from mapdet.diagnosis.stats import points, share
from mapdet.diagnosis.tide_matching import ImageTruth
from mapdet.evaluation.matching import MEDIUM, SMALL

# torchvision's anchors for both stock archs when model.anchor_sizes is left None
_STOCK_ANCHORS = [32, 64, 128, 256, 512]


def model_geometry(model: ModelConfig) -> dict:
    """Effective ``min_size``, ``max_size`` and flat ``anchor_sizes`` (arch defaults filled in by
    ``mapdet.modeling.detector.resolve_config``); ``anchors_from`` says whether the config set the anchors."""
    from mapdet.modeling.detector import resolve_config

    cfg = resolve_config(model)
    sizes = _STOCK_ANCHORS if cfg.anchor_sizes is None else cfg.anchor_sizes
    return {
        "min_size": cfg.min_size,
        "max_size": cfg.max_size,
        "anchor_sizes": sorted({float(a) for a in sizes}),
        "anchors_from": "config"
        if model.anchor_sizes is not None
        else "arch default"
        if cfg.anchor_sizes is not None
        else "torchvision default",
    }


def input_scale(gt: dict, geometry: dict) -> np.ndarray:
    """(N,) per image (json order) the factor torchvision's GeneralizedRCNNTransform resizes it by."""
    wh = np.array([[im.get("width", 0), im.get("height", 0)] for im in gt["images"]], float).reshape(-1, 2)
    ok = (wh > 0).all(axis=1)
    safe = np.where(ok[:, None], wh, 1.0)
    scale = np.minimum(geometry["min_size"] / safe.min(axis=1), geometry["max_size"] / safe.max(axis=1))
    return np.where(ok, scale, 1.0)


def size_stats(gt: dict, g: ImageTruth, result, model: ModelConfig) -> dict:
    """AP by COCO size, share of GT per size, sqrt(area) histograms vs the anchor sizes."""
    geo = model_geometry(model)
    real = ~g.crowd
    area = g.area[real]
    side = np.sqrt(np.clip(area, 0, None))
    side_in = side * input_scale(gt, geo)[g.image[real]]
    top = max(float(side.max(initial=1.0)), float(side_in.max(initial=1.0)), max(geo["anchor_sizes"]) * 2.0)
    bins = np.geomspace(1.0, top * 1.01, 41)
    return {
        "ap": {k: points(result.ap(area=k)) for k in ("small", "medium", "large")},
        "ap50": {k: points(result.ap(iou=0.5, area=k)) for k in ("small", "medium", "large")},
        "share_gt": {
            "small": share(area < SMALL),
            "medium": share((area >= SMALL) & (area < MEDIUM)),
            "large": share(area >= MEDIUM),
        },
        "bins": bins.tolist(),
        "hist_original": np.histogram(side, bins)[0].tolist(),
        "hist_model_input": np.histogram(side_in, bins)[0].tolist(),
        "anchor_sizes": geo["anchor_sizes"],
        "model_input": {"min_size": geo["min_size"], "max_size": geo["max_size"], "arch": model.arch},
        "anchors_from": geo["anchors_from"],
        "share_below_smallest_anchor_half": share(side_in < min(geo["anchor_sizes"]) / 2),
        "median_side_model_input": float(np.median(side_in)) if len(side_in) else 0.0,
    }
