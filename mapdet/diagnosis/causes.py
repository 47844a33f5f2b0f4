"""Rank the causes of a low mAP by measured impact, each with the overrides that address it.

``rank_causes(d, settings, run)`` turns the measurements of ``mapdet.diagnosis.measures`` into
``records.Cause`` rows, largest impact first. Every impact is one unit (``records.UNIT``): the
COCO AP (IoU 0.5:0.95) at the headline maxDets (100 per image and class) that fixing that cause
alone is estimated to add, with the AP50 of the same fix beside it (``impact_ap50``). ``METHODS``
says how each is measured; the report prints it. ``set`` comes from ``mapdet.diagnosis.advice``.
"""

from __future__ import annotations

import numpy as np

from mapdet.diagnosis import advice
from mapdet.diagnosis.curves import EXTEND, START_UP_RATIO, RunEvidence, under_training
from mapdet.diagnosis.postprocess import LeverBest
from mapdet.diagnosis.records import Cause, Diagnosis, Gain
from mapdet.diagnosis.settings import DiagnoseSettings

_AP = "COCO AP at maxDets 100"
# What a well-configured detector keeps, read off torchvision's fasterrcnn_resnet50_fpn_v2 COCO weights
# (AP small 30.3 / medium 50.6; AP75 51.1 / AP50 67.3): a gap every detector has is not a cause.
SMALL_REFERENCE = 0.6  # AP small / AP medium
LOC_REFERENCE = 0.76  # AP75 / AP50
METHODS = {
    "detection_cap": f"{_AP}. With --checkpoint: the post-processing sweep's gain from model.detections_per_img "
    "alone (nms and score threshold as in force). Else the larger of: the measured gain of the results truncated "
    "to the top k per image (k at or above the cap) over the cap itself, when the results hold more than the "
    "cap; and, since results cannot show what lies beyond their own cap (given, or inferred from many images "
    "holding exactly the same largest number of detections), the missed objects of the images that reach that "
    "cap and hold more objects than it, removed from the ground truth and the results scored again (an upper "
    "bound: found objects would also bring false positives)",
    "class_imbalance": f"{_AP}. The mAP gained if rare classes (in fewer than t of the training images, t = the "
    "repeat threshold) reached the frequent classes' AP as far as frequency explains AP: the slope of a "
    "least-squares line of per-class AP against log(training frequency) times each rare class's distance in "
    "log frequency to the frequent classes' mean, averaged over all classes; at most (mean AP of frequent - mean AP "
    "of rare classes) x share of rare classes, and 0 where AP does not rise with frequency (a gap frequency does "
    "not explain is not fixed by rebalancing)",
    "localization": f"{_AP}. Every box that overlaps its object at IoU 0.1 up to its reference IoU (true "
    "positives below it, and the best loc error per object) moved to that IoU, and the results scored again. The "
    "reference is 0.75 (COCO's strict threshold), less for a box so small at the model's input that one pixel off "
    "on every edge costs more. AP lost above the reference (most of AP50 - AP on any detector) is the metric's "
    "strictness, not a fixable error, and is not counted. Even a well-localizing detector has boxes below 0.75 "
    "(AP75 = LOC_REFERENCE 0.76 x AP50 for torchvision's R50-FPN v2 on COCO), so the gain is the share of the way "
    "from this run's AP75 / AP50 to 1 that reaching 0.76 covers: (0.76 - r) / (1 - r) of the moved boxes' gain, 0 "
    "at r >= 0.76",
    "classification": f"{_AP}. TIDE's cls errors (boxes on an object of another class) relabelled, the best one "
    "per object, the others removed, and the results scored again",
    "duplicates": f"{_AP}. The larger of: TIDE's duplicates (second detections of an already matched object) "
    "removed and the results scored again; with --checkpoint, the sweep's gain from a lower model.nms_thresh "
    "alone",
    "background": f"{_AP}. The larger of: TIDE's background detections (IoU < 0.1 with every object) removed and "
    "the results scored again; with --checkpoint, the sweep's gain from a higher model.score_thresh alone",
    "missed": f"{_AP}. The larger of: the misses no other cause explains (the 'unexplained' group of the miss "
    "breakdown: not in an image over the per-image cap, not of a rare class, not small) removed from the ground "
    "truth and the results scored again; with --checkpoint, the sweep's gain from a lower model.score_thresh or "
    "a higher model.nms_thresh alone",
    "small_objects": f"{_AP}. The larger of: with --checkpoint, AP small scaled by the proposals' recall of medium "
    "objects over that of small ones (at IoU 0.5; at most AP medium), less AP small, x share of small ground truth: "
    "the AP if the RPN reached small objects as often as medium ones (anchors or input size that do not fit leave "
    "them unreached); and (SMALL_REFERENCE x AP medium - AP small) x share of small ground truth (area < 32^2), "
    "SMALL_REFERENCE = 0.6: the mAP gained if small objects were found as well, next to medium ones, as a "
    "well-configured detector finds them. Small objects are harder for any detector (torchvision's R50-FPN v2 on "
    "COCO: AP small 30.3 vs medium 50.6); the gap beyond that ratio is a fixable error, the rest is not counted",
    "under_training": f"(with --run) {_AP} from the run's validation (val/AP), read from the last two "
    f"validations with no LR drop between them: their gain per doubling of the steps (AP taken as linear in "
    f"log(steps), as it is late in training; after an LR drop, of the steps since the drop, which a run twice as "
    f"long also doubles), or, where AP multiplied more than "
    f"{START_UP_RATIO}x between them (training still starting up, where AP grows about linearly in steps), their "
    f"gain per step times the steps a longer run adds: what training {EXTEND}x as long is expected to add; 0 "
    f"without two validations (set train.eval_every)",
}
# post-processing settings the sweep measures, the causes they fix, and which direction fixes which
_SWEPT = {
    "detection_cap": [("detections_per_img", lambda v, cur: v != cur)],
    "duplicates": [("nms_thresh", lambda v, cur: v < cur)],
    "background": [("score_thresh", lambda v, cur: v > cur)],
    "missed": [("score_thresh", lambda v, cur: v < cur), ("nms_thresh", lambda v, cur: v > cur)],
}


def rank_causes(d: Diagnosis, settings: DiagnoseSettings, run: RunEvidence | None = None) -> list[Cause]:
    """All causes in ``METHODS`` (``under_training`` only with ``run``), largest impact first (ties keep
    METHODS order); impacts clipped at 0."""
    found = {
        "detection_cap": _detection_cap(d),
        "class_imbalance": _with_misses(_class_imbalance(d), d, "rare_class"),
        "localization": _localization(d),
        "classification": _fix_cause(d, d.fixes.cls, "cls", "errors on an object of another class"),
        "duplicates": _fix_cause(d, d.fixes.dupe, "dupe", "second detections of an already matched object"),
        "background": _fix_cause(d, d.fixes.bkg, "bkg", "detections on no object"),
        "missed": _missed(d),
        "small_objects": _with_misses(_small_objects(d), d, "small"),
    }
    if run is not None:
        found["under_training"] = under_training(run)
    causes = []
    for name, (gain, evidence) in found.items():
        gain, evidence = _with_sweep(d, name, gain, evidence)
        impact = round(max(float(gain.ap), 0.0), 3)
        tip = advice.advise(name, d, settings.config, impact)
        causes.append(Cause(name, impact, round(float(gain.ap50), 3), evidence, tip.text, tip.set, METHODS[name]))
    return sorted(causes, key=lambda c: -c.impact)


def _with_sweep(d: Diagnosis, name: str, gain: Gain, evidence: str) -> tuple[Gain, str]:
    """``gain`` raised to what the sweep measured for this cause's post-processing settings, if more."""
    for setting, fixes in _SWEPT.get(name, []):
        best = d.sweep.lever(setting) if d.sweep is not None else None
        if best is None or not fixes(best.value, best.current):
            continue
        measured = Gain(best.ap - best.current_ap, best.ap50 - best.current_ap50)
        evidence += f"; {_lever_text(best)}, on the sweep's {d.sweep.num_images} images"
        if measured.ap > gain.ap:
            gain = measured
    return gain, evidence


def _lever_text(b: LeverBest) -> str:
    return f"the sweep measures AP {b.ap:.1f} at {b.key}={b.value:g} against {b.current_ap:.1f} at {b.current:g}"


def _with_misses(found: tuple[Gain, str], d: Diagnosis, group: str) -> tuple[Gain, str]:
    """The cause's evidence with its share of the missed objects (its group of the miss breakdown)."""
    gain, evidence = found
    g = d.miss_breakdown.group(group)
    if g.count:
        evidence += f"; {g.count} missed objects are {g.definition}: AP +{g.gain.ap:.1f} if found (miss breakdown)"
    return gain, evidence


def _detection_cap(d: Diagnosis) -> tuple[Gain, str]:
    md = d.max_dets
    curves, cap, est = md.curves, md.model_cap, md.estimate
    curve = curves.per_image
    at_cap = curve.at(cap)
    best_k, best = max(((k, curve.at(k)) for k in curve.cap if k >= cap), key=lambda kb: kb[1].ap)
    measured = Gain(best.ap - at_cap.ap, best.ap50 - at_cap.ap50)
    evidence = (
        f"cap {cap} ({md.choice.cap_source}); AP {at_cap.ap:.1f} at {cap} detections per image, {best.ap:.1f} at "
        f"{best_k}; {curves.share_images_gt_over_cap:.0%} of images have more than {cap} objects "
        f"({curves.share_images_gt_over_100:.0%} more than 100), {curves.share_images_at_cap:.0%} of images fill "
        "the cap"
    )
    if md.choice.cap_note:
        evidence += f"; note: {md.choice.cap_note}"
    if est.images and d.sweep is None:
        evidence += (
            f"; the results cannot show what lies beyond their cap of {est.cap}: {est.missed_gt} objects are "
            f"missed in the {est.images} images that reach it and hold more objects than it, worth AP "
            f"+{est.gain.ap:.1f} (AP50 +{est.gain.ap50:.1f}) if found, at {est.tide_max_dets} detections per image"
        )
        use_estimate = est.gain.ap > measured.ap
        evidence += (
            f"; impact = this estimate (the measured gain is {measured.ap:.1f})"
            if use_estimate
            else f"; impact = the measured gain (the estimate is {est.gain.ap:.1f})"
        )
        evidence += "; to measure it, evaluate with a larger model.detections_per_img or pass --checkpoint"
        return (est.gain if use_estimate else measured), evidence
    return measured, evidence


def _class_imbalance(d: Diagnosis) -> tuple[Gain, str]:
    pc = d.per_class
    rows, t, rare_ids = pc.rows, pc.repeat_threshold, set(pc.rare)
    rare = [r for r in rows if r.id in rare_ids]
    common = [r for r in rows if r.id not in rare_ids]
    if not rare or not common:
        which = "no" if not rare else "every"
        return Gain(), (
            f"{which} evaluated class is rare (in < {t:.0%} of training images; frequencies from the "
            f"{pc.source}), so no rare/frequent gap is measurable"
        )
    gap = Gain(_frequency_gap(rows, rare, common, "ap"), _frequency_gap(rows, rare, common, "ap50"))
    rho = pc.spearman_ap_vs_freq
    top = max(r.repeat_factor for r in rare)
    evidence = (
        f"{len(rare)} of {len(rows)} classes are in fewer than {t:.0%} of training images (frequencies from the "
        f"{pc.source}); their mean AP is {np.mean([r.ap for r in rare]):.1f} against "
        f"{np.mean([r.ap for r in common]):.1f} (AP50 {np.mean([r.ap50 for r in rare]):.1f} against "
        f"{np.mean([r.ap50 for r in common]):.1f}); {len(pc.zero_ap)} classes have AP50 ~ 0; Spearman(AP, "
        f"frequency) = {'undefined' if rho is None else f'{rho:.2f}'}; at t = {t:g} rare classes are repeated up "
        f"to {top:.1f}x per epoch; as far as frequency explains AP (a least-squares line against log frequency), "
        f"rare classes reaching the frequent ones add AP {gap.ap:.1f}"
    )
    return gap, evidence


def _frequency_gap(rows: list, rare: list, common: list, metric: str) -> float:
    """The mAP rare classes would add at the frequent classes' mean log frequency along the least-squares
    line of ``metric`` against log(training frequency), within [0, the raw rare/frequent gap x share]."""
    logf = {r.id: np.log(max(r.train_freq, 1e-6)) for r in rows}
    y = np.array([getattr(r, metric) for r in rows], dtype=float)
    x = np.array([logf[r.id] for r in rows])
    raw = (np.mean([getattr(r, metric) for r in common]) - np.mean([getattr(r, metric) for r in rare])) * len(rare)
    if len(rows) < 3 or np.ptp(x) == 0:
        return max(float(raw) / len(rows), 0.0)
    slope = np.polyfit(x, y, 1)[0]
    target = np.mean([logf[r.id] for r in common])
    fit = slope * sum(max(target - logf[r.id], 0.0) for r in rare)
    return float(np.clip(min(fit, raw), 0.0, None)) / len(rows)


def _localization(d: Diagnosis) -> tuple[Gain, str]:
    s, f, t = d.summary, d.fixes, d.tide
    evidence = (
        f"{f.moved_boxes} boxes overlap their object below their reference IoU (at most {f.reference_iou:g}; "
        f"{t.counts['loc']} of them at IoU 0.1-0.5, TIDE Loc dAP50 {t.errors['loc']:.1f}): moved there, AP "
        f"+{f.loc.ap:.1f} (AP50 +{f.loc.ap50:.1f}); AP50 {_fmt(s.AP50)}, AP75 {_fmt(s.AP75)}, AP {_fmt(s.AP)}: "
        "what is lost above the reference is the metric's strictness, not counted"
    )
    r = s.AP75 / s.AP50 if s.AP50 and s.AP75 is not None else 0.0
    share = max(LOC_REFERENCE - r, 0.0) / (1.0 - r) if r < 1.0 else 0.0
    evidence += (
        f"; AP75 / AP50 = {r:.2f} against {LOC_REFERENCE:g} for a well-localizing detector: reaching it is "
        f"{share:.0%} of that gain"
    )
    return Gain(f.loc.ap * share, f.loc.ap50 * share), evidence


def _fix_cause(d: Diagnosis, gain: Gain, kind: str, what: str) -> tuple[Gain, str]:
    t = d.tide
    return gain, (
        f"{t.counts[kind]} {kind} errors ({what}): fixed, AP +{gain.ap:.1f} (AP50 +{gain.ap50:.1f}; TIDE "
        f"dAP50 {t.errors[kind]:.1f})"
    )


def _missed(d: Diagnosis) -> tuple[Gain, str]:
    mb, t = d.miss_breakdown, d.tide
    un = mb.group("unexplained")
    split = ", ".join(f"{g.group} {g.count} (AP +{g.gain.ap:.1f})" for g in mb.groups)
    evidence = (
        f"{t.counts['miss']} ground-truth boxes have no detection near them (TIDE Miss dAP50 "
        f"{t.errors['miss']:.1f}); by cause, in precedence order: {split}; {un.count} of them are not in an image "
        f"over the cap of {mb.cap}, not of a rare class and not small: AP +{un.gain.ap:.1f} if found"
    )
    return un.gain, evidence


def _small_objects(d: Diagnosis) -> tuple[Gain, str]:
    size = d.size
    ap, ap50, share = size.ap, size.ap50, size.share_gt["small"]
    if ap["small"] is None or ap["medium"] is None:
        return Gain(), "no small or no medium ground truth: the gap is not measurable"
    evidence = (
        f"{share:.0%} of boxes are small (area < 32^2); AP small {ap['small']:.1f} vs medium {ap['medium']:.1f} "
        f"(AP50 {_fmt(ap50['small'])} vs {_fmt(ap50['medium'])}); {size.share_below_smallest_anchor_half:.0%} of "
        f"boxes are smaller than half the smallest anchor ({min(size.anchor_sizes):g} px) at the model's input size"
    )
    evidence += f"; a well-configured detector keeps AP small at {SMALL_REFERENCE:g}x AP medium"
    gain = Gain(
        max(SMALL_REFERENCE * ap["medium"] - ap["small"], 0.0) * share,
        max(SMALL_REFERENCE * (ap50["medium"] or 0.0) - (ap50["small"] or 0.0), 0.0) * share,
    )
    unreached = _unreached_small(d)
    if unreached is not None:
        more, text = unreached
        evidence += text
        gain = Gain(max(gain.ap, more.ap), max(gain.ap50, more.ap50))
    return gain, evidence


def _unreached_small(d: Diagnosis) -> tuple[Gain, str] | None:
    """With --checkpoint: small objects no proposal reaches cannot be detected. The gain if they were reached
    as often as medium ones and then found at the rate of the small ones reached now (AP small scaled by the
    recall ratio, at most AP medium), x the share of small ground truth."""
    pr, size = d.proposal_recall, d.size
    if pr is None or not pr.recall.get("small") or not pr.recall.get("medium"):
        return None
    small, medium, share = pr.recall["small"], pr.recall["medium"], size.share_gt["small"]
    if small >= medium:
        return Gain(), f"; the RPN reaches {small:.0%} of small objects at IoU {pr.iou:g} ({medium:.0%} of medium)"

    def reached(ap_s, ap_m):
        return max(min(ap_s * medium / small, ap_m) - ap_s, 0.0) * share

    ap, ap50 = size.ap, size.ap50
    gain = Gain(reached(ap["small"], ap["medium"]), reached(ap50["small"] or 0.0, ap50["medium"] or 0.0))
    return gain, (
        f"; the RPN's proposals reach {small:.0%} of small objects at IoU {pr.iou:g} against {medium:.0%} of medium "
        f"ones: reached as often, AP +{gain.ap:.1f}"
    )


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.1f}"
