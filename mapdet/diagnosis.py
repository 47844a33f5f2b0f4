"""Measurements that explain a low mAP, from COCO ground truth and detections alone.

``diagnose(gt, dets, ...)`` returns one JSON-ready dict (the body of ``diagnosis.json``); every
number comes from ``mapdet.evaluator`` (COCO AP) or ``mapdet.tide`` (error decomposition).
Sections: ``summary`` (COCO AP/AP50/...), ``errors``/``counts`` (TIDE dAP and counts),
``per_class`` (AP vs training frequency), ``iou_curve``, ``max_dets``, ``size``, then ``causes``
(ranked by ``mapdet.causes``). Boxes are xyxy pixel-edge in the frame of the ground-truth image;
sizes are ``sqrt(area)`` in pixels, also rescaled to the model's input frame (torchvision's
resize: shorter side to ``min_size`` unless the longer would exceed ``max_size``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mapdet import tide
from mapdet.config import ModelConfig
from mapdet.evaluator import Detections, evaluate_coco
from mapdet.manifest import class_image_fractions, class_instance_counts

CAPS = (1, 10, 100, 300, 1000)  # detections per image (and COCO maxDets) on the curves
SMALL, MEDIUM = 32.0**2, 96.0**2  # COCO area ranges
ZERO_AP = 1.0  # AP50 below this many points counts as "never detected"


@dataclass
class DiagnoseSettings:
    """What the diagnosis needs besides the data; ``cap`` None = ``model.detections_per_img``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cap: int | None = None
    repeat_threshold: float = 0.1  # t of r(c) = max(1, sqrt(t / f(c))); also the "rare" cut-off
    pos_thr: float = 0.5
    bkg_thr: float = 0.1
    tide_max_dets: int = 100
    progress: bool = False


def diagnose(gt: dict, dets: Detections, train_manifest: dict | None = None,
             settings: DiagnoseSettings | None = None) -> dict:
    """All measurements as one dict (causes included); see the module docstring."""
    from mapdet.causes import rank_causes

    s = settings or DiagnoseSettings()
    result = evaluate_coco(gt, dets, max_dets=CAPS)
    g = tide.GroundTruth.from_coco(gt)
    td = tide.decompose(g, dets, s.pos_thr, s.bkg_thr, s.tide_max_dets, s.progress)
    out = {
        "summary": _summary(result, gt, dets),
        "tide": td.to_dict() | {"pos_thr": s.pos_thr, "bkg_thr": s.bkg_thr, "max_dets": s.tide_max_dets},
        "errors": td.errors,
        "counts": td.counts,
        "per_class": per_class(gt, result, train_manifest, s.repeat_threshold),
        "iou_curve": iou_curve(result),
        "max_dets": max_dets_curves(gt, g, dets, result, s.cap or s.model.detections_per_img),
        "size": size_stats(gt, g, result, s.model),
    }
    out["causes"] = rank_causes(out, td, s)
    return out


def points(x: float) -> float | None:
    """An evaluator AP (0-1, -1 = undefined) as AP points (0-100) or None."""
    return None if x < 0 else 100.0 * float(x)


def _summary(result, gt: dict, dets: Detections) -> dict:
    """Headline COCO numbers in AP points (maxDets 100 per image and class, as COCO reports)."""
    return {
        "AP": points(result.ap()), "AP50": points(result.ap(iou=0.5)), "AP75": points(result.ap(iou=0.75)),
        **{f"AP{k[0]}": points(result.ap(area=k)) for k in ("small", "medium", "large")},
        "AR100": points(result.ar(100)),
        "num_images": len(gt["images"]),
        "num_gt": int(sum(not a.get("iscrowd", 0) for a in gt.get("annotations", []))),
        "num_dets": int(len(dets.scores)),
    }


def spearman(x, y) -> float | None:
    """Spearman rank correlation (ties get their average rank); None when undefined."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    first = np.r_[True, sorted_v[1:] != sorted_v[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(v)]
    ranks = np.empty(len(v))
    ranks[order] = ((starts + ends - 1) / 2.0)[group]
    return ranks


def manifest_from_coco(gt: dict) -> dict:
    """A stand-in training manifest (``classes``, ``num_samples``, ``class_stats``) counted from COCO
    ground truth, for when no training manifest is given (crowd boxes are not counted)."""
    images: dict[int, set] = {int(c["id"]): set() for c in gt.get("categories", [])}
    stats = {k: {"instances": 0, "images": 0} for k in images}
    for a in gt.get("annotations", []):
        if not a.get("iscrowd", 0):
            images.setdefault(a["category_id"], set()).add(a["image_id"])
            stats.setdefault(a["category_id"], {"instances": 0})["instances"] += 1
    for k, ims in images.items():
        stats[k]["images"] = len(ims)
    return {"classes": [{"id": k, "name": str(k)} for k in sorted(images)], "num_samples": len(gt["images"]),
            "class_stats": {str(k): v for k, v in stats.items()}}


def rebalancing(manifest: dict, t: float) -> tuple[dict[int, float], dict[int, float]]:
    """Per class id: the repeat factor data.repeat_threshold=t gives (``mapdet.data.repeat_factors``)
    and the loss weight model.class_weights=inv_sqrt gives (``mapdet.model.class_weights``)."""
    from mapdet.data import repeat_factors
    from mapdet.model import class_weights

    ids = [int(c["id"]) for c in manifest["classes"]]
    w = class_weights(ModelConfig(class_weights="inv_sqrt"), len(ids) + 1, class_instance_counts(manifest))
    return repeat_factors(manifest, t), {k: float(w[i + 1]) for i, k in enumerate(ids)}


def per_class(gt: dict, result, train_manifest: dict | None, t: float) -> dict:
    """Per-class AP/AP50 with training frequency, repeat factor and weight; rank correlation."""
    m = train_manifest if train_manifest is not None else manifest_from_coco(gt)
    freq, inst = class_image_fractions(m), dict(zip([int(c["id"]) for c in m["classes"]], class_instance_counts(m)))
    r, w = rebalancing(m, t)
    names = {int(c["id"]): c.get("name", str(c["id"])) for c in gt.get("categories", [])}
    rows = []
    for k in sorted(names):
        ap = result.ap(cat_id=k)
        if ap < 0:  # no ground truth of this class in the evaluated images
            continue
        rows.append({"id": k, "name": names[k], "ap": points(ap), "ap50": points(result.ap(iou=0.5, cat_id=k)),
                     "train_freq": freq.get(k, 0.0), "train_instances": inst.get(k, 0),
                     "repeat_factor": r.get(k, 1.0), "class_weight": w.get(k, 1.0)})
    f = [row["train_freq"] for row in rows]
    return {
        "source": "training manifest" if train_manifest is not None else
                  "evaluated ground truth (no training manifest given)",
        "repeat_threshold": t,
        "rows": rows,
        "spearman_ap_vs_freq": spearman(f, [row["ap"] for row in rows]),
        "zero_ap": [row for row in rows if row["ap50"] < ZERO_AP],
        "rare": [row["id"] for row in rows if row["train_freq"] < t],
    }


def iou_curve(result) -> dict:
    thrs = [float(x) for x in result.iou_thrs]
    return {"iou": thrs, "ap": [points(result.ap(iou=x)) for x in thrs]}


def cap_per_image(dets: Detections, k: int) -> Detections:
    """The ``k`` highest-scoring detections of each image over all classes: what the model would
    output with ``box_detections_per_img = k`` (torchvision keeps the top k after NMS)."""
    order = np.lexsort((-np.asarray(dets.scores), np.asarray(dets.image_id)))
    img = np.asarray(dets.image_id)[order]
    start = np.searchsorted(img, img, side="left")
    keep = np.sort(order[np.arange(len(order)) - start < k])
    return Detections(image_id=dets.image_id[keep], boxes=dets.boxes[keep], scores=dets.scores[keep],
                      labels=dets.labels[keep])


def max_dets_curves(gt: dict, g: tide.GroundTruth, dets: Detections, result, cap: int) -> dict:
    """AP and AP50 against COCO maxDets (per image AND class) and against a per-image cap.

    The per-image curve truncates the results and re-evaluates at maxDets 1000, so the COCO
    per-class cap never interferes; caps at or above the largest per-image count reuse ``result``.
    """
    ids = np.asarray(dets.image_id)
    per_image = np.unique(ids, return_counts=True)[1] if len(ids) else np.zeros(0, int)
    most = int(per_image.max(initial=0))
    caps = sorted(set(CAPS) | {cap})
    img_ap, img_ap50 = [], []
    for k in caps:
        r = result if k >= most else evaluate_coco(gt, cap_per_image(dets, k), max_dets=(CAPS[-1],))
        img_ap.append(points(r.ap(max_dets=CAPS[-1])) or 0.0)
        img_ap50.append(points(r.ap(iou=0.5, max_dets=CAPS[-1])) or 0.0)
    gt_per_image = np.bincount(g.image[~g.crowd], minlength=len(g.image_ids))
    return {
        "coco": {"max_dets": list(CAPS), "ap": [points(result.ap(max_dets=k)) for k in CAPS],
                 "ap50": [points(result.ap(iou=0.5, max_dets=k)) for k in CAPS]},
        "per_image": {"cap": caps, "ap": img_ap, "ap50": img_ap50},
        "model_cap": cap,
        "most_dets_per_image": most,
        "share_images_at_cap": _share(per_image >= cap),
        "share_images_gt_over_100": _share(gt_per_image > 100),
        "share_images_gt_over_cap": _share(gt_per_image > cap),
        "gt_per_image_mean": float(gt_per_image.mean()) if len(gt_per_image) else 0.0,
        "gt_per_image_max": int(gt_per_image.max(initial=0)),
    }


def _share(mask: np.ndarray) -> float:
    return float(mask.mean()) if len(mask) else 0.0


# torchvision's anchors for both stock archs when model.anchor_sizes is left None
_STOCK_ANCHORS = [32, 64, 128, 256, 512]


def model_geometry(model: ModelConfig) -> dict:
    """Effective ``min_size``, ``max_size`` and flat ``anchor_sizes`` (arch defaults filled in by
    ``mapdet.model.resolve_config``); ``anchors_from`` says whether the config set the anchors."""
    from mapdet.model import resolve_config

    cfg = resolve_config(model)
    sizes = _STOCK_ANCHORS if cfg.anchor_sizes is None else cfg.anchor_sizes
    return {"min_size": cfg.min_size, "max_size": cfg.max_size, "anchor_sizes": sorted({float(a) for a in sizes}),
            "anchors_from": "config" if model.anchor_sizes is not None else
                            "arch default" if cfg.anchor_sizes is not None else "torchvision default"}


def input_scale(gt: dict, geometry: dict) -> np.ndarray:
    """(N,) per image (json order) the factor torchvision's GeneralizedRCNNTransform resizes it by."""
    wh = np.array([[im.get("width", 0), im.get("height", 0)] for im in gt["images"]], float).reshape(-1, 2)
    ok = (wh > 0).all(axis=1)
    safe = np.where(ok[:, None], wh, 1.0)
    scale = np.minimum(geometry["min_size"] / safe.min(axis=1), geometry["max_size"] / safe.max(axis=1))
    return np.where(ok, scale, 1.0)


def size_stats(gt: dict, g: tide.GroundTruth, result, model: ModelConfig) -> dict:
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
        "share_gt": {"small": _share(area < SMALL), "medium": _share((area >= SMALL) & (area < MEDIUM)),
                     "large": _share(area >= MEDIUM)},
        "bins": bins.tolist(),
        "hist_original": np.histogram(side, bins)[0].tolist(),
        "hist_model_input": np.histogram(side_in, bins)[0].tolist(),
        "anchor_sizes": geo["anchor_sizes"],
        "model_input": {"min_size": geo["min_size"], "max_size": geo["max_size"], "arch": model.arch},
        "anchors_from": geo["anchors_from"],
        "share_below_smallest_anchor_half": _share(side_in < min(geo["anchor_sizes"]) / 2),
        "median_side_model_input": float(np.median(side_in)) if len(side_in) else 0.0,
    }


def training_curves(run_dir: str | Path, tags=("train/loss", "val/loss", "val/AP", "val/AP50")) -> dict:
    """Scalars of ``tags`` from every TensorBoard event file under ``run_dir``: {tag: [[step, value]]}
    plus ``missing`` (tags found nowhere) and ``files`` (event files read)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(Path(run_dir).rglob("events.out.tfevents.*"))
    found: dict[str, dict[int, float]] = {}
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in set(tags) & set(acc.Tags().get("scalars", [])):
            found.setdefault(tag, {}).update({int(e.step): float(e.value) for e in acc.Scalars(tag)})
    return {
        "series": {tag: sorted([s, v] for s, v in found[tag].items()) for tag in tags if tag in found},
        "missing": [tag for tag in tags if tag not in found],
        "files": [str(p) for p in files],
    }
