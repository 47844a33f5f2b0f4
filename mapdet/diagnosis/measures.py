"""Measurements that explain a low mAP, from COCO ground truth and detections alone.

``diagnose(gt, dets, ...)`` returns one JSON-ready dict (the body of ``diagnosis.json``); every
number comes from ``mapdet.evaluation.coco`` (COCO AP) or ``mapdet.diagnosis.tide`` (error decomposition).
Sections: ``summary`` (COCO AP/AP50/...), ``errors``/``counts`` (TIDE dAP and counts),
``per_class`` (AP vs training frequency), ``iou_curve``, ``max_dets`` (with the per-image cap the
results show, see ``infer_cap``, and the cap's estimate from the misses), ``miss_breakdown`` (TIDE's
missed objects split over the causes that explain them), ``size``, then ``causes`` (ranked by
``mapdet.diagnosis.causes``). Boxes are xyxy pixel-edge in the frame of the ground-truth image;
sizes are ``sqrt(area)`` in pixels, also rescaled to the model's input frame (torchvision's
resize: shorter side to ``min_size`` unless the longer would exceed ``max_size``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mapdet.diagnosis import tide
from mapdet.config import ModelConfig
from mapdet.evaluation.coco import Detections, evaluate_coco
from mapdet.shards.manifest import class_image_fractions, class_instance_counts

CAPS = (1, 10, 100, 300, 1000)  # detections per image (and COCO maxDets) on the curves
SMALL, MEDIUM = 32.0**2, 96.0**2  # COCO area ranges
ZERO_AP = 1.0  # AP50 below this many points counts as "never detected"
# A per-image cap shows in the results as a pile of images holding exactly the same, largest number of
# detections. Without a cap the count has a long tail whose maximum one or a few images reach, so
# "many" images at the maximum is the cap's signature: at least CAP_PILE_SHARE of the images with
# detections (on Vistas val, 200 of 2000: far beyond chance) AND at least CAP_PILE_MIN_IMAGES of
# them (one image is always "at the maximum", and two tie at it by chance in small sets with a
# narrow range of counts: 2 of 12 images did in a test set). Only images whose count differs from
# their own number of ground-truth objects count as evidence (a detector that finds exactly every
# object of uniform scenes is not capped), and the maximum must be at least MIN_INFERRED_CAP: caps
# are set in the tens to thousands (torchvision's default is 100), while identical counts below 10
# come from small uniform scenes.
CAP_PILE_SHARE = 0.10
CAP_PILE_MIN_IMAGES = 3
MIN_INFERRED_CAP = 10


@dataclass
class DiagnoseSettings:
    """What the diagnosis needs besides the data; ``cap`` None = ``model.detections_per_img``.

    ``cap_from`` names where the cap comes from (``--detections-per-img``, the config); None with
    ``cap`` None means nobody gave one (the config default stands in): the cap the results show,
    when they show one, is then used without a note.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    cap: int | None = None
    cap_from: str | None = None
    repeat_threshold: float = 0.1  # t of r(c) = max(1, sqrt(t / f(c))); also the "rare" cut-off
    pos_thr: float = 0.5
    bkg_thr: float = 0.1
    tide_max_dets: int = 100
    progress: bool = False


def diagnose(gt: dict, dets: Detections, train_manifest: dict | None = None,
             settings: DiagnoseSettings | None = None) -> dict:
    """All measurements as one dict (causes included); see the module docstring."""
    from mapdet.diagnosis.causes import rank_causes

    s = settings or DiagnoseSettings()
    result = evaluate_coco(gt, dets, max_dets=CAPS)
    g = tide.GroundTruth.from_coco(gt)
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
    """Per class id: the repeat factor data.repeat_threshold=t gives (``mapdet.data.loaders.repeat_factors``)
    and the loss weight model.class_weights=inv_sqrt gives (``mapdet.modeling.detector.class_weights``)."""
    from mapdet.data.loaders import repeat_factors
    from mapdet.modeling.detector import class_weights

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


def max_dets_curves(gt: dict, g: tide.GroundTruth, dets: Detections, result, cap: int, extra_caps=()) -> dict:
    """AP and AP50 against COCO maxDets (per image AND class) and against a per-image cap.

    The per-image curve truncates the results and re-evaluates at maxDets 1000, so the COCO
    per-class cap never interferes; caps at or above the largest per-image count reuse ``result``.
    """
    ids = np.asarray(dets.image_id)
    per_image = np.unique(ids, return_counts=True)[1] if len(ids) else np.zeros(0, int)
    most = int(per_image.max(initial=0))
    caps = sorted(set(CAPS) | {cap} | {int(k) for k in extra_caps})
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


def _counts_per_image(g: tide.GroundTruth, dets: Detections) -> tuple[np.ndarray, np.ndarray]:
    """(N,) detections and (N,) non-crowd ground-truth objects per image (json order)."""
    img = tide._image_index(g.image_ids, np.asarray(dets.image_id, dtype=np.int64))
    n = len(g.image_ids)
    return np.bincount(img[img >= 0], minlength=n), np.bincount(g.image[~g.crowd], minlength=n)


def infer_cap(g: tide.GroundTruth, dets: Detections) -> dict | None:
    """The per-image cap the results show, or None (see CAP_PILE_SHARE for the rule).

    Returns ``cap`` (the largest count), ``images_at_cap`` (images holding exactly that many),
    ``evidence`` (those of them whose count is not their own number of objects), ``images_with_dets``.
    """
    dets_n, gt_n = _counts_per_image(g, dets)
    most = int(dets_n.max(initial=0))
    if most < MIN_INFERRED_CAP:
        return None
    at = dets_n == most
    evidence = int((at & (gt_n != most)).sum())
    with_dets = int((dets_n > 0).sum())
    if evidence < max(CAP_PILE_MIN_IMAGES, math.ceil(CAP_PILE_SHARE * with_dets)):
        return None
    return {"cap": most, "images_at_cap": int(at.sum()), "evidence": evidence, "images_with_dets": with_dets}


def _inferred_text(inf: dict) -> str:
    return (f"{inf['images_at_cap']} of {inf['images_with_dets']} images with detections hold exactly "
            f"{inf['cap']} detections, none more")


def resolve_cap(g: tide.GroundTruth, dets: Detections, s: DiagnoseSettings) -> dict:
    """The cap the diagnosis uses, reconciled with what the results show.

    ``model_cap``: the cap whose cost the per-image curve measures; ``results_cap``: the cap the
    results were produced with (inferred; the model cap when they hold no more than it, None when
    they exceed it and show no cap); ``cap_source``: how the cap was chosen; ``cap_note``: None, or
    how a given cap disagrees with the results; ``inferred``: ``infer_cap``'s answer.

    - nothing given, the results show a cap: it is used;
    - a cap given (``--detections-per-img`` or the config), the results show a smaller one (many
      images at a smaller maximum, none above): results from cap C hold no more than C, so the
      results' cap is used, with a note;
    - the results hold more than a given cap (shown or not): they were produced with a larger cap,
      which is how the cost of the given one is measured (truncating them to its top C per image, as
      the cap's evidence advises), so the given cap stays the measured one and the note says so;
      what lies beyond the results' own cap is estimated from the misses (``cap_estimate``).
    """
    given = s.cap if s.cap is not None else s.model.detections_per_img
    given_from = s.cap_from or ("settings.cap" if s.cap is not None else None)
    inf = infer_cap(g, dets)
    most = int(_counts_per_image(g, dets)[0].max(initial=0))
    out = {"given_cap": given if given_from else None, "given_from": given_from, "inferred": inf}
    if given_from is None:  # nobody gave a cap: the config default is only an assumption
        if inf:
            return out | {"model_cap": inf["cap"], "results_cap": inf["cap"], "cap_note": None,
                          "cap_source": f"inferred: {_inferred_text(inf)} (no cap given; model.detections_per_img "
                                        f"defaults to {given})"}
        source = f"assumed: model.detections_per_img defaults to {given} (no cap given and none shown by the results)"
        return out | {"model_cap": given, "results_cap": given if most <= given else None, "cap_note": None,
                      "cap_source": source}
    named = f"{given_from} = {given}"
    if inf and inf["cap"] == given:
        return out | {"model_cap": given, "results_cap": given, "cap_note": None,
                      "cap_source": f"given: {named}, confirmed by the results ({_inferred_text(inf)})"}
    if inf and inf["cap"] < given:
        note = (f"the given cap ({named}) disagrees with the results: {_inferred_text(inf)}; a cap of {given} "
                f"does not stop that many images at exactly {inf['cap']}, so the diagnosis uses {inf['cap']}")
        return out | {"model_cap": inf["cap"], "results_cap": inf["cap"], "cap_note": note,
                      "cap_source": f"inferred: {_inferred_text(inf)}"}
    if most > given:
        shown = (f"they show a cap of {inf['cap']}: {_inferred_text(inf)}" if inf else "or none: they show no cap")
        note = (f"the results hold up to {most} detections per image, more than the given cap ({named}): they were "
                f"produced with a larger cap ({shown}); the cost of {given} is measured by truncating them to the "
                f"top {given} per image")
        return out | {"model_cap": given, "results_cap": inf["cap"] if inf else None, "cap_note": note,
                      "cap_source": f"given: {named}; results' own cap: "
                                    + (f"inferred {inf['cap']}" if inf else "none")}
    return out | {"model_cap": given, "results_cap": given, "cap_note": None, "cap_source": f"given: {named}"}


def cap_estimate(g: tide.GroundTruth, dets: Detections, td: tide.TideResult, cap: int | None,
                 s: DiagnoseSettings) -> dict:
    """What the objects beyond the results' cap would add: TIDE's miss fix (AP50 with those
    objects no longer counted as missed) restricted to the missed ground truth in images whose
    results reach ``cap`` and that hold more non-crowd objects than ``cap``. The TIDE matching
    counts ``max(cap, tide_max_dets)`` detections per image (a second matching when ``cap`` is the
    larger). ``dAP`` 0 when no image is over the cap or the results show no cap (``cap`` None)."""
    out = {"cap": cap, "images": 0, "missed_gt": 0, "dAP": 0.0, "tide_max_dets": max(cap or 0, s.tide_max_dets)}
    if cap is None:
        return out
    dets_n, gt_n = _counts_per_image(g, dets)
    over = (dets_n >= cap) & (gt_n > cap)
    if not over.any():
        return out
    if cap <= s.tide_max_dets:
        m, base = td.matching, td.ap
    else:
        m = tide.match(g, dets, s.pos_thr, s.bkg_thr, cap)
        base = tide.fixed_ap(m)
    mask = over[g.image]
    return out | {"images": int(over.sum()), "missed_gt": int((m.miss & mask).sum()),
                  "dAP": max(tide.fixed_ap(m, "miss", mask) - base, 0.0)}


# miss breakdown groups in precedence order: (group, cause that owns it, definition)
MISS_GROUPS = (
    ("detection_cap", "detection_cap", "in an image whose detections reach the per-image cap and that holds more "
                                       "objects than it"),
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
    g = m.gt
    gt_n = np.bincount(g.image[~g.crowd], minlength=len(g.image_ids))
    capped = ((m.dets_per_image >= fill) & (gt_n > fill))[g.image]
    rare = np.isin(g.labels, np.asarray(list(rare_ids), dtype=np.int64))
    small = g.area < SMALL
    masks = [capped, rare & ~capped, small & ~rare & ~capped, ~small & ~rare & ~capped]
    groups, done, prev = [], np.zeros(len(g.labels), dtype=bool), td.ap
    for (name, cause, definition), mask in zip(MISS_GROUPS, masks):
        done |= mask
        now = tide.fixed_ap(m, "miss", done)
        if name == "detection_cap":
            definition += f" ({fill} detections per image" + (
                f": TIDE counts at most {tide_max_dets} per image, fewer than the results' cap of {cap}; the "
                "detection_cap cause estimates the model's cap from a matching at that cap instead)"
                if fill < cap else ")")
        groups.append({"group": name, "cause": cause, "definition": definition, "count": int((m.miss & mask).sum()),
                       "dAP": tide.fixed_ap(m, "miss", mask) - td.ap, "dAP_in_order": now - prev})
        prev = now
    return {"cap": fill, "precedence": [x[0] for x in MISS_GROUPS], "count": int(m.miss.sum()),
            "dAP": prev - td.ap, "groups": groups}


def _share(mask: np.ndarray) -> float:
    return float(mask.mean()) if len(mask) else 0.0


# torchvision's anchors for both stock archs when model.anchor_sizes is left None
_STOCK_ANCHORS = [32, 64, 128, 256, 512]


def model_geometry(model: ModelConfig) -> dict:
    """Effective ``min_size``, ``max_size`` and flat ``anchor_sizes`` (arch defaults filled in by
    ``mapdet.modeling.detector.resolve_config``); ``anchors_from`` says whether the config set the anchors."""
    from mapdet.modeling.detector import resolve_config

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
