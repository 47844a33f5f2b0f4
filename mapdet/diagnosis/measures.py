"""Measurements that explain a low mAP, from COCO ground truth and detections alone.

``diagnose(gt, dets, ...)`` returns one JSON-ready dict (the body of ``diagnosis.json``); every
number comes from ``mapdet.evaluation.coco`` (COCO AP) or ``mapdet.diagnosis.tide`` (error
decomposition). Sections: ``summary`` (COCO AP/AP50/...), ``errors``/``counts`` (TIDE dAP and
counts), ``per_class`` (AP vs training frequency), ``iou_curve``, ``max_dets`` (with the per-image
cap the results show and the cap's estimate from the misses: ``mapdet.diagnosis.caps``),
``miss_breakdown`` (TIDE's missed objects split over the causes that explain them), ``size``
(``mapdet.diagnosis.sizes``), then ``causes`` (ranked by ``mapdet.diagnosis.causes``). Boxes are
xyxy pixel-edge in the frame of the ground-truth image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mapdet.config import ModelConfig
from mapdet.diagnosis import tide
from mapdet.diagnosis.caps import CAPS, cap_estimate, max_dets_curves, resolve_cap
from mapdet.diagnosis.causes import rank_causes
from mapdet.diagnosis.settings import DiagnoseSettings
from mapdet.diagnosis.sizes import size_stats
from mapdet.diagnosis.stats import points, spearman
from mapdet.diagnosis.tide_matching import ImageTruth, Matching
from mapdet.evaluation.coco import evaluate_coco
from mapdet.evaluation.matching import SMALL
from mapdet.shards.manifest import by_category_id, class_image_fractions, class_instance_counts
from mapdet.structures import Detections

ZERO_AP = 1.0  # AP50 below this many points counts as "never detected"


def diagnose(
    gt: dict, dets: Detections, train_manifest: dict | None = None, settings: DiagnoseSettings | None = None
) -> dict:
    """All measurements as one dict (causes included); see the module docstring."""
    s = settings or DiagnoseSettings()
    result = evaluate_coco(gt, dets, max_dets=CAPS)
    g = ImageTruth.from_coco(gt)
    td = tide.decompose(g, dets, s.pos_thr, s.bkg_thr, s.tide_max_dets, s.progress)
    cap = resolve_cap(g, dets, s)
    pc = per_class(gt, result, train_manifest, s.repeat_threshold)
    md = max_dets_curves(gt, g, dets, result, cap["model_cap"], extra_caps=[cap["results_cap"] or cap["model_cap"]])
    md.update(cap)
    md["estimate"] = cap_estimate(g, dets, td, cap["results_cap"], s)
    out = {
        "summary": _summary(result, gt, dets),
        "tide": td.to_dict() | {"pos_thr": s.pos_thr, "bkg_thr": s.bkg_thr, "max_dets": s.tide_max_dets},
        "errors": td.errors,
        "counts": td.counts,
        "per_class": pc,
        "iou_curve": iou_curve(result),
        "max_dets": md,
        "miss_breakdown": miss_breakdown(td, pc["rare"], cap["results_cap"] or cap["model_cap"], s.tide_max_dets),
        "size": size_stats(gt, g, result, s.model),
    }
    out["causes"] = rank_causes(out, td, s)
    return out


def _summary(result, gt: dict, dets: Detections) -> dict:
    """Headline COCO numbers in AP points (maxDets 100 per image and class, as COCO reports)."""
    return {
        "AP": points(result.ap()),
        "AP50": points(result.ap(iou=0.5)),
        "AP75": points(result.ap(iou=0.75)),
        **{f"AP{k[0]}": points(result.ap(area=k)) for k in ("small", "medium", "large")},
        "AR100": points(result.ar(100)),
        "num_images": len(gt["images"]),
        "num_gt": int(sum(not a.get("iscrowd", 0) for a in gt.get("annotations", []))),
        "num_dets": int(len(dets.scores)),
    }


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
    return {
        "classes": [{"id": k, "name": str(k)} for k in sorted(images)],
        "num_samples": len(gt["images"]),
        "class_stats": {str(k): v for k, v in stats.items()},
    }


def rebalancing(manifest: dict, t: float) -> tuple[dict[int, float], dict[int, float]]:
    """Per class id: the repeat factor data.repeat_threshold=t gives (``mapdet.data.loaders.repeat_factors``)
    and the loss weight model.class_weights=inv_sqrt gives (``mapdet.modeling.roi_heads.class_weights``)."""
    from mapdet.data.loaders import repeat_factors
    from mapdet.modeling.roi_heads import class_weights

    ids = [int(c["id"]) for c in manifest["classes"]]
    w = class_weights(ModelConfig(class_weights="inv_sqrt"), len(ids) + 1, class_instance_counts(manifest))
    return repeat_factors(manifest, t), {k: float(w[i + 1]) for i, k in enumerate(ids)}


def per_class(gt: dict, result, train_manifest: dict | None, t: float) -> dict:
    """Per-class AP/AP50 with training frequency, repeat factor and weight; rank correlation. Classes
    are the ground truth's categories; the training manifest's are matched by COCO category id."""
    m = by_category_id(train_manifest) if train_manifest is not None else manifest_from_coco(gt)
    freq, inst = class_image_fractions(m), dict(zip([int(c["id"]) for c in m["classes"]], class_instance_counts(m)))
    r, w = rebalancing(m, t)
    names = {int(c["id"]): c.get("name", str(c["id"])) for c in gt.get("categories", [])}
    rows = []
    for k in sorted(names):
        ap = result.ap(cat_id=k)
        if ap < 0:  # no ground truth of this class in the evaluated images
            continue
        rows.append(
            {
                "id": k,
                "name": names[k],
                "ap": points(ap),
                "ap50": points(result.ap(iou=0.5, cat_id=k)),
                "train_freq": freq.get(k, 0.0),
                "train_instances": inst.get(k, 0),
                "repeat_factor": r.get(k, 1.0),
                "class_weight": w.get(k, 1.0),
            }
        )
    f = [row["train_freq"] for row in rows]
    return {
        "source": "training manifest"
        if train_manifest is not None
        else "evaluated ground truth (no training manifest given)",
        "repeat_threshold": t,
        "rows": rows,
        "spearman_ap_vs_freq": spearman(f, [row["ap"] for row in rows]),
        "zero_ap": [row for row in rows if row["ap50"] < ZERO_AP],
        "rare": [row["id"] for row in rows if row["train_freq"] < t],
    }


def iou_curve(result) -> dict:
    thrs = [float(x) for x in result.iou_thrs]
    return {"iou": thrs, "ap": [points(result.ap(iou=x)) for x in thrs]}


# miss breakdown groups in precedence order: (group, cause that owns it, definition)
MISS_GROUPS = (
    (
        "detection_cap",
        "detection_cap",
        "in an image whose detections reach the per-image cap and that holds more objects than it",
    ),
    ("rare_class", "class_imbalance", "of a rare class (in fewer than t of the training images)"),
    ("small", "small_objects", "small (area < 32^2)"),
    ("unexplained", "missed", "none of the above"),
)


def miss_breakdown(td: tide.TideResult, rare_ids, cap: int, tide_max_dets: int) -> dict:
    """TIDE's missed ground truth split into disjoint groups (``MISS_GROUPS``, first match wins:
    a missed object of an image over the cap is the cap's whatever its class or size, since no
    model with that cap could detect every object there; then rare class, then small).

    Per group: ``count`` of missed boxes (the counts partition TIDE's miss count), ``dAP`` = TIDE's
    miss fix restricted to the group alone, and ``dAP_in_order`` = what fixing the group adds after
    fixing the groups before it. dAPs are not additive, so the ``dAP`` column need not sum to the
    total; ``dAP_in_order`` sums exactly to TIDE's Miss dAP. Every dAP is >= 0 (fewer positives
    never lower AP). The cap in force in TIDE's matching (``cap`` of the result) is min(``cap``, the
    results' or model's, ``tide_max_dets``); when TIDE's is the smaller, the group says so.
    """
    fill = min(cap, tide_max_dets)
    m = td.matching
    groups, done, prev = [], np.zeros(len(m.gt.labels), dtype=bool), td.ap
    for (name, cause, definition), mask in zip(MISS_GROUPS, _miss_masks(m, rare_ids, fill)):
        done |= mask
        now = tide.fixed_ap(m, "miss", done)
        if name == "detection_cap":
            definition += _cap_in_force(fill, cap, tide_max_dets)
        groups.append(
            {
                "group": name,
                "cause": cause,
                "definition": definition,
                "count": int((m.miss & mask).sum()),
                "dAP": tide.fixed_ap(m, "miss", mask) - td.ap,
                "dAP_in_order": now - prev,
            }
        )
        prev = now
    return {
        "cap": fill,
        "precedence": [x[0] for x in MISS_GROUPS],
        "count": int(m.miss.sum()),
        "dAP": prev - td.ap,
        "groups": groups,
    }


def _miss_masks(m: Matching, rare_ids, fill: int) -> list[np.ndarray]:
    """(G,) masks of the ground truth in each group of ``MISS_GROUPS``: disjoint, first wins."""
    g = m.gt
    gt_n = np.bincount(g.image[~g.crowd], minlength=len(g.image_ids))
    capped = ((m.dets_per_image >= fill) & (gt_n > fill))[g.image]
    rare = np.isin(g.labels, np.asarray(list(rare_ids), dtype=np.int64))
    small = g.area < SMALL
    return [capped, rare & ~capped, small & ~rare & ~capped, ~small & ~rare & ~capped]


def _cap_in_force(fill: int, cap: int, tide_max_dets: int) -> str:
    if fill >= cap:
        return f" ({fill} detections per image)"
    return (
        f" ({fill} detections per image: TIDE counts at most {tide_max_dets} per image, fewer than the results' "
        f"cap of {cap}; the detection_cap cause estimates the model's cap from a matching at that cap instead)"
    )


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
