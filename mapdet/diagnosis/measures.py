"""Measurements that explain a low mAP, from COCO ground truth and detections alone.

``diagnose(gt, dets, ...)`` returns a ``records.Diagnosis`` (``to_json()`` is ``diagnosis.json``);
every number comes from ``mapdet.evaluation.coco`` (COCO AP) or ``mapdet.diagnosis.tide`` (error
decomposition). Sections: ``summary`` (COCO AP/AP50/...), ``tide`` (TIDE's dAP50 and counts),
``per_class`` (AP vs training frequency), ``iou_curve``, ``max_dets`` (with the per-image cap the
results show and the cap's estimate from the misses: ``mapdet.diagnosis.caps``),
``miss_breakdown`` (TIDE's missed objects split over the causes that explain them), ``size``
(``mapdet.diagnosis.sizes``), ``fixes`` (COCO AP of TIDE's fixes: ``mapdet.diagnosis.fixes``),
then ``causes`` (ranked by ``mapdet.diagnosis.causes``, with what the run's curves and the
post-processing sweep add when given). Boxes are xyxy pixel-edge in the frame of the
ground-truth image.
"""

from __future__ import annotations

import numpy as np

from mapdet.config import ModelConfig
from mapdet.diagnosis import tide
from mapdet.diagnosis.caps import CAPS, cap_estimate, max_dets_curves, resolve_cap
from mapdet.diagnosis.causes import rank_causes
from mapdet.diagnosis.curves import RunEvidence
from mapdet.diagnosis.fixes import Fixer, reference_ious
from mapdet.diagnosis.postprocess import ProposalRecall, Sweep
from mapdet.diagnosis.records import (
    ClassRow,
    Diagnosis,
    Fixes,
    Gain,
    IouCurve,
    MaxDets,
    MissBreakdown,
    MissGroup,
    PerClass,
    Summary,
    TideSummary,
)
from mapdet.diagnosis.settings import DiagnoseSettings
from mapdet.diagnosis.sizes import input_scale, model_geometry, size_stats
from mapdet.diagnosis.stats import points, spearman
from mapdet.diagnosis.tide_matching import ImageTruth, Matching
from mapdet.evaluation.coco import evaluate_coco
from mapdet.evaluation.matching import SMALL
from mapdet.shards.manifest import by_category_id, class_image_fractions, class_instance_counts
from mapdet.structures import Detections

ZERO_AP = 1.0  # AP50 below this many points counts as "never detected"
# Without a repeat threshold in force, t is the class frequency this share of the classes falls
# below: LVIS's t = 0.001 sits there on LVIS v1, where 798 of the 1203 classes (rare 337, common
# 461; Detic#29's count) are in fewer than 0.1 % of the training images. A fixed 0.1 would repeat
# nearly nothing on a dataset of a dozen classes and everything on one of a thousand.
TAIL_QUANTILE = 2 / 3


def diagnose(
    gt: dict,
    dets: Detections,
    train_manifest: dict | None = None,
    settings: DiagnoseSettings | None = None,
    run: RunEvidence | None = None,
    sweep: Sweep | None = None,
    proposal_recall: ProposalRecall | None = None,
) -> Diagnosis:
    """All measurements and the ranked causes; see the module docstring. ``run`` (``--run``) adds
    the training curves and ``under_training``; ``sweep`` and ``proposal_recall`` (``--checkpoint``,
    ``mapdet.diagnosis.sweep``) add the measured post-processing levers."""
    s = settings or DiagnoseSettings()
    result = evaluate_coco(gt, dets, max_dets=CAPS)
    g = ImageTruth.from_coco(gt)
    td = tide.decompose(g, dets, s.pos_thr, s.bkg_thr, s.tide_max_dets, s.progress)
    summary = _summary(result, gt, dets)
    scale = input_scale(gt, model_geometry(s.model))
    base = Gain(summary.AP or 0.0, summary.AP50 or 0.0)
    fixer = Fixer(gt, dets, td.matching, base, reference_ious(g, scale, s.loc_reference_iou))
    choice = resolve_cap(g, dets, s)
    pc = per_class(gt, result, train_manifest, s.repeat_threshold)
    curves = max_dets_curves(gt, g, dets, result, choice.model_cap, extra_caps=[choice.results_cap or choice.model_cap])
    d = Diagnosis(
        summary=summary,
        tide=TideSummary(**td.to_dict(), pos_thr=s.pos_thr, bkg_thr=s.bkg_thr, max_dets=s.tide_max_dets),
        per_class=pc,
        iou_curve=iou_curve(result),
        max_dets=MaxDets(curves, choice, cap_estimate(g, dets, td, choice.results_cap, s, fixer)),
        miss_breakdown=miss_breakdown(td, pc.rare, choice.results_cap or choice.model_cap, s.tide_max_dets, fixer),
        size=size_stats(gt, g, result, s.model),
        fixes=fixes(fixer, s.loc_reference_iou),
        training_curves=run.curves if run is not None else None,
        sweep=sweep,
        proposal_recall=proposal_recall,
    )
    d.causes = rank_causes(d, s, run)
    return d


def fixes(fixer: Fixer, reference_iou: float) -> Fixes:
    """COCO AP gained by each of TIDE's detection fixes (``mapdet.diagnosis.fixes``)."""
    gains = {kind: fixer.gain(kind) for kind in ("loc", "cls", "dupe", "bkg")}
    return Fixes(reference_iou=reference_iou, **gains, moved_boxes=fixer.moved)


def _summary(result, gt: dict, dets: Detections) -> Summary:
    """Headline COCO numbers in AP points (maxDets 100 per image and class, as COCO reports)."""
    return Summary(
        AP=points(result.ap()),
        AP50=points(result.ap(iou=0.5)),
        AP75=points(result.ap(iou=0.75)),
        **{f"AP{k[0]}": points(result.ap(area=k)) for k in ("small", "medium", "large")},
        AR100=points(result.ar(100)),
        num_images=len(gt["images"]),
        num_gt=int(sum(not a.get("iscrowd", 0) for a in gt.get("annotations", []))),
        num_dets=int(len(dets.scores)),
    )


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


def tail_threshold(freq: dict[int, float]) -> float:
    """The repeat threshold t that ``TAIL_QUANTILE`` of the classes (those in any training image) fall
    below, to two significant digits; 0.1 when no class is in any image."""
    seen = sorted(f for f in freq.values() if f > 0)
    if not seen:
        return 0.1
    t = float(np.quantile(seen, TAIL_QUANTILE))
    return float(f"{t:.2g}")


def per_class(gt: dict, result, train_manifest: dict | None, t: float | None) -> PerClass:
    """Per-class AP/AP50 with training frequency, repeat factor and weight; rank correlation. Classes
    are the ground truth's categories; the training manifest's are matched by COCO category id.
    ``t`` None: the repeat threshold in force is none, and ``tail_threshold`` gives the one studied."""
    m = by_category_id(train_manifest) if train_manifest is not None else manifest_from_coco(gt)
    freq, inst = class_image_fractions(m), dict(zip([int(c["id"]) for c in m["classes"]], class_instance_counts(m)))
    derived = t is None
    if derived:
        t = tail_threshold(freq)
    r, w = rebalancing(m, t)
    names = {int(c["id"]): c.get("name", str(c["id"])) for c in gt.get("categories", [])}
    rows = []
    for k in sorted(names):
        ap = result.ap(cat_id=k)
        if ap < 0:  # no ground truth of this class in the evaluated images
            continue
        rows.append(
            ClassRow(
                id=k,
                name=names[k],
                ap=points(ap),
                ap50=points(result.ap(iou=0.5, cat_id=k)),
                train_freq=freq.get(k, 0.0),
                train_instances=inst.get(k, 0),
                repeat_factor=r.get(k, 1.0),
                class_weight=w.get(k, 1.0),
            )
        )
    return PerClass(
        source="training manifest" if train_manifest is not None else "evaluated ground truth (no training manifest)",
        repeat_threshold=t,
        threshold_derived=derived,
        rows=rows,
        spearman_ap_vs_freq=spearman([row.train_freq for row in rows], [row.ap for row in rows]),
        zero_ap=[row for row in rows if row.ap50 < ZERO_AP],
        rare=[row.id for row in rows if row.train_freq < t],
    )


def iou_curve(result) -> IouCurve:
    thrs = [float(x) for x in result.iou_thrs]
    return IouCurve(thrs, [points(result.ap(iou=x)) for x in thrs])


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


def miss_breakdown(td: tide.TideResult, rare_ids, cap: int, tide_max_dets: int, fixer: Fixer) -> MissBreakdown:
    """TIDE's missed ground truth split into disjoint groups (``MISS_GROUPS``, first match wins:
    a missed object of an image over the cap is the cap's whatever its class or size, since no
    model with that cap could detect every object there; then rare class, then small).

    Per group: ``count`` of missed boxes (the counts partition TIDE's miss count), ``dAP`` = TIDE's
    miss fix restricted to the group alone, and ``dAP_in_order`` = what fixing the group adds after
    fixing the groups before it (AP50). dAPs are not additive, so the ``dAP`` column need not sum to
    the total; ``dAP_in_order`` sums exactly to TIDE's Miss dAP. Every dAP is >= 0 (fewer positives
    never lower AP). ``gain``: the group alone removed from the ground truth and scored by COCO
    (``fixer``). The cap in force in TIDE's matching (``cap`` of the result) is min(``cap``, the
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
            MissGroup(
                group=name,
                cause=cause,
                definition=definition,
                count=int((m.miss & mask).sum()),
                dAP=tide.fixed_ap(m, "miss", mask) - td.ap,
                dAP_in_order=now - prev,
                gain=fixer.gain("miss", mask),
            )
        )
        prev = now
    return MissBreakdown(fill, [x[0] for x in MISS_GROUPS], int(m.miss.sum()), prev - td.ap, groups)


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
