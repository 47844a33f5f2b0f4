"""Rank the causes of a low mAP by measured impact, each with the setting that addresses it.

``rank_causes(diagnosis, tide_result, settings)`` turns the measurements of ``mapdet.diagnosis.measures``
into ``[{cause, impact, evidence, advice, method}]``, largest impact first. Impacts are AP50
points (0-100, TIDE's metric, so the causes compare with each other), except the strict-IoU part
of ``localization``, which is COCO AP points. ``METHODS`` documents how each one is measured; the
report prints it.
"""

from __future__ import annotations

import numpy as np

from mapdet.diagnosis import tide

METHODS = {
    "detection_cap": "the larger of two AP50 gains. Measured: best AP50 with a larger per-image cap (results "
    "truncated to the top k per image over all classes, k in 1..1000) minus AP50 at the model's cap, "
    "when the results hold more detections than that cap. Estimated: the results cannot show what "
    "lies beyond their own cap (given, or inferred from many images holding exactly the same "
    "largest number of detections), so TIDE's miss fix restricted to the missed objects in images "
    "whose results reach that cap and that hold more objects than it: the AP50 gained if those "
    "objects were found (an upper bound: found objects would also bring false positives)",
    "class_imbalance": "(mean AP50 of frequent classes - mean AP50 of rare classes) x share of rare classes, "
    "rare = in fewer than t of the training images (t = the repeat threshold): the mAP "
    "gained if rare classes reached the frequent classes' AP",
    "localization": "TIDE Loc dAP (AP50 gained by fixing boxes with IoU 0.1-0.5) + (AP50 - AP): the COCO AP "
    "gained if every box already correct at IoU 0.5 were exact",
    "classification": "TIDE Cls dAP (AP50 gained by relabelling boxes on a box of another class)",
    "duplicates": "TIDE Dupe dAP (AP50 gained by removing second detections of an already matched box)",
    "background": "TIDE Bkg dAP (AP50 gained by removing detections on no object, IoU < 0.1)",
    "missed": "TIDE Miss dAP restricted to misses no other cause explains (the 'unexplained' group of the miss "
    "breakdown): ground truth that is not in an image over the per-image cap, not of a rare class and not "
    "small; the other groups are the detection cap's, class imbalance's and small objects'",
    "small_objects": "(AP50 medium - AP50 small) x share of small ground truth (area < 32^2): the mAP "
    "gained if small objects were found as well as medium ones",
    "under_training": "(with --run) validation AP50 at the last validation minus at the one before, from the "
    "run's TensorBoard: what the last interval of training still added; 0 without two "
    "validations (set train.eval_every)",
}


def rank_causes(d: dict, td: tide.TideResult, settings) -> list[dict]:
    """All causes in ``METHODS``, sorted by impact (largest first; ties keep METHODS order)."""
    causes = [
        _detection_cap(d["max_dets"]),
        _with_misses(_class_imbalance(d["per_class"]), d, "rare_class"),
        _localization(d, td),
        _tide_cause(
            td,
            "cls",
            "classification",
            "model.class_weights=inv_sqrt, data.repeat_threshold "
            "(confusions often involve rare classes), or longer training",
        ),
        _tide_cause(
            td,
            "dupe",
            "duplicates",
            f"lower model.nms_thresh (now {settings.model.nms_thresh}); "
            "the post-processing sweep (--checkpoint) measures the best value",
        ),
        _tide_cause(
            td,
            "bkg",
            "background",
            f"raise model.score_thresh (now {settings.model.score_thresh}); "
            "check the ground truth for unlabelled objects",
        ),
        _missed(d, td, settings),
        _with_misses(_small_objects(d["size"]), d, "small"),
    ]
    for c in causes:
        c["impact"] = round(max(float(c["impact"]), 0.0), 3)
        c["method"] = METHODS[c["cause"]]
    return sorted(causes, key=lambda c: -c["impact"])


def _with_misses(c: dict, d: dict, group: str) -> dict:
    """``c`` with its share of the missed objects (its group of the miss breakdown) in the evidence."""
    g = next((g for g in d.get("miss_breakdown", {}).get("groups", []) if g["group"] == group), None)
    if g and g["count"]:
        c["evidence"] += (
            f"; {g['count']} missed objects are {g['definition']}: dAP {g['dAP']:.1f} if found (miss breakdown)"
        )
    return c


def _cause(cause: str, impact: float, evidence: str, advice: str) -> dict:
    return {"cause": cause, "impact": impact, "evidence": evidence, "advice": advice}


def _detection_cap(md: dict) -> dict:
    caps, ap50 = md["per_image"]["cap"], md["per_image"]["ap50"]
    cap = md["model_cap"]
    at_cap = ap50[caps.index(cap)]
    best_k, best = max(((k, a) for k, a in zip(caps, ap50) if k >= cap), key=lambda ka: ka[1])
    measured = best - at_cap
    evidence = (
        f"cap {cap} ({md['cap_source']}); AP50 {at_cap:.1f} at {cap} detections per image, {best:.1f} at "
        f"{best_k}; {md['share_images_gt_over_cap']:.0%} of images have more than {cap} objects "
        f"({md['share_images_gt_over_100']:.0%} more than 100), "
        f"{md['share_images_at_cap']:.0%} of images fill the cap"
    )
    if md.get("cap_note"):
        evidence += f"; note: {md['cap_note']}"
    est = md["estimate"]
    if est["images"]:
        evidence += (
            f"; the results cannot show what lies beyond their cap of {est['cap']}: {est['missed_gt']} "
            f"objects are missed in the {est['images']} images that reach it and hold more objects than it, "
            f"worth {est['dAP']:.1f} AP50 if found (TIDE's miss fix on them, at {est['tide_max_dets']} "
            "detections per image)"
        )
        evidence += (
            f"; impact = this estimate (the measured gain is {measured:.1f})"
            if est["dAP"] > measured
            else f"; impact = the measured gain (the estimate is {est['dAP']:.1f})"
        )
        evidence += "; to measure it, evaluate with model.detections_per_img=1000 or pass --checkpoint"
    return _cause(
        "detection_cap",
        max(measured, est["dAP"]),
        evidence,
        f"raise model.detections_per_img (now {cap}; e.g. 300-1000) and evaluate at that maxDets",
    )


def _class_imbalance(pc: dict) -> dict:
    rows, t = pc["rows"], pc["repeat_threshold"]
    rare = [r for r in rows if r["id"] in set(pc["rare"])]
    common = [r for r in rows if r["id"] not in set(pc["rare"])]
    advice = f"repeat-factor sampling data.repeat_threshold={t} or model.class_weights=inv_sqrt"
    if not rare or not common:
        which = "no" if not rare else "every"
        return _cause(
            "class_imbalance",
            0.0,
            f"{which} evaluated class is rare (in < {t:.0%} of training "
            f"images; frequencies from the {pc['source']}), so no rare/frequent gap is measurable",
            advice,
        )
    ap_rare = float(np.mean([r["ap50"] for r in rare]))
    ap_common = float(np.mean([r["ap50"] for r in common]))
    rho = pc["spearman_ap_vs_freq"]
    evidence = (
        f"{len(rare)} of {len(rows)} classes are in fewer than {t:.0%} of training images "
        f"(frequencies from the {pc['source']}); their mean AP50 is {ap_rare:.1f} against "
        f"{ap_common:.1f}; {len(pc['zero_ap'])} classes have AP50 ~ 0; Spearman(AP, frequency) = "
        + (f"{rho:.2f}" if rho is not None else "undefined")
    )
    top = max(r["repeat_factor"] for r in rare)
    advice += f" (rare classes would be repeated up to {top:.1f}x per epoch)"
    return _cause("class_imbalance", (ap_common - ap_rare) * len(rare) / len(rows), evidence, advice)


def _localization(d: dict, td: tide.TideResult) -> dict:
    s = d["summary"]
    strict = max(s["AP50"] - s["AP"], 0.0) if s["AP"] is not None and s["AP50"] is not None else 0.0
    evidence = (
        f"{td.counts['loc']} detections overlap their object at IoU 0.1-0.5 (dAP {td.errors['loc']:.1f}); "
        f"AP50 {_fmt(s['AP50'])}, AP75 {_fmt(s['AP75'])}, AP {_fmt(s['AP'])}: boxes correct at 0.5 lose "
        f"{strict:.1f} AP at stricter IoU"
    )
    return _cause(
        "localization",
        td.errors["loc"] + strict,
        evidence,
        "anchor shapes that fit the boxes (model.anchor_sizes, model.aspect_ratios), a larger input "
        "(model.min_size/max_size), longer training",
    )


def _tide_cause(td: tide.TideResult, kind: str, cause: str, advice: str) -> dict:
    return _cause(cause, td.errors[kind], f"{td.counts[kind]} {kind} errors cost {td.errors[kind]:.1f} AP50", advice)


def _missed(d: dict, td: tide.TideResult, settings) -> dict:
    mb = d["miss_breakdown"]
    groups = {g["group"]: g for g in mb["groups"]}
    un = groups["unexplained"]
    split = ", ".join(f"{g['group']} {g['count']} (dAP {g['dAP']:.1f})" for g in mb["groups"])
    evidence = (
        f"{td.counts['miss']} ground-truth boxes have no detection near them (all: dAP "
        f"{td.errors['miss']:.1f}); by cause, in precedence order: {split}; {un['count']} of them are not "
        f"in an image over the cap of {mb['cap']}, not of a rare class and not small (dAP {un['dAP']:.1f})"
    )
    return _cause(
        "missed",
        un["dAP"],
        evidence,
        "more proposals (model.rpn_post_nms_top_n_test), a lower "
        f"model.score_thresh (now {settings.model.score_thresh}), a larger input (model.min_size)",
    )


def _small_objects(size: dict) -> dict:
    ap50, share = size["ap50"], size["share_gt"]["small"]
    advice = "a larger input (model.min_size/max_size) or a smaller first anchor (model.anchor_sizes)"
    if ap50["small"] is None or ap50["medium"] is None:
        return _cause("small_objects", 0.0, "no small or no medium ground truth: the gap is not measurable", advice)
    evidence = (
        f"{share:.0%} of boxes are small (area < 32^2); AP50 small {ap50['small']:.1f} vs medium "
        f"{ap50['medium']:.1f}; {size['share_below_smallest_anchor_half']:.0%} of boxes are smaller than half "
        f"the smallest anchor ({min(size['anchor_sizes'])} px) at the model's input size"
    )
    return _cause("small_objects", (ap50["medium"] - ap50["small"]) * share, evidence, advice)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"


def under_training(curves: dict, meta: dict | None, train_images: int | None) -> dict:
    """Whether training stopped while validation AP50 was still rising, from the run's curves.

    ``curves``: ``measures.training_curves`` (val/AP50 on the 0-1 scale, train/loss); ``meta``: the
    last checkpoint's meta.json (``step``, ``global_batch`` and ``processes`` from runs that record
    them); ``train_images``: size of the training split. A low training loss does not mean a
    converged detector: the loss is averaged over sampled anchors and RoIs, mostly easy background,
    while AP needs the few foreground scores ranked and the boxes placed.
    """
    ap = curves.get("series", {}).get("val/AP50", [])
    seen = _images_seen(meta, train_images)
    advice = (
        "train longer (train.max_steps) or at a larger global batch; a run on fewer processes than its "
        "config was tuned for takes fewer images per step unless the config sets data.global_batch"
    )
    if len(ap) < 2:
        return _cause(
            "under_training",
            0.0,
            f"{len(ap)} validation point(s) in the run: whether AP50 was still "
            f"rising is not measurable (set train.eval_every){seen}",
            advice,
        )
    (s0, a0), (s1, a1) = ap[-2], ap[-1]
    gain = 100.0 * (a1 - a0)
    evidence = f"validation AP50 went from {100 * a0:.1f} at step {s0} to {100 * a1:.1f} at step {s1}{seen}"
    loss = curves.get("series", {}).get("train/loss", [])
    if len(loss) >= 10:
        tail = [v for s, v in loss if s >= s0]
        if tail:
            evidence += f"; training loss {loss[0][1]:.3g} at the start, {tail[-1]:.3g} at the end"
    return _cause("under_training", gain, evidence, advice)


def _images_seen(meta: dict | None, train_images: int | None) -> str:
    if not meta or "global_batch" not in meta:
        return ""
    images = meta["step"] * meta["global_batch"]
    text = (
        f"; the model saw {images} images in {meta['step']} steps ({meta['global_batch']} per step: "
        f"{meta['processes']} process(es))"
    )
    if train_images:
        text += f", {images / train_images:.1f} epochs of {train_images}"
    return text


def add_cause(causes: list[dict], cause: dict) -> list[dict]:
    """``causes`` with ``cause`` added (impact clipped at 0, method attached), re-ranked."""
    cause = {**cause, "impact": round(max(float(cause["impact"]), 0.0), 3), "method": METHODS[cause["cause"]]}
    return sorted([c for c in causes if c["cause"] != cause["cause"]] + [cause], key=lambda c: -c["impact"])
