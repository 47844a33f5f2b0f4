"""The per-image detection cap: what the results show of it, the cap in force, and its cost.

A model keeps at most ``model.detections_per_img`` detections per image over all classes; COCO's
maxDets caps each image AND class. ``max_dets_curves`` measures AP against both; ``infer_cap``
reads the cap from the results alone, ``resolve_cap`` reconciles it with a cap given by the
user or the config, and ``cap_estimate`` estimates what lies beyond the results' own cap from
TIDE's missed objects. Every AP here is read at the headline maxDets (``records.HEADLINE_MAX_DETS``),
where the causes' impacts are: a larger cap is worth only what it adds to the AP that is reported.
"""

from __future__ import annotations

import math

import numpy as np

from mapdet.diagnosis import tide
from mapdet.diagnosis.fixes import Fixer
from mapdet.diagnosis.records import (
    HEADLINE_MAX_DETS,
    CapChoice,
    CapCurves,
    CapEstimate,
    CocoCurve,
    InferredCap,
    PerImageCurve,
)
from mapdet.diagnosis.settings import DiagnoseSettings
from mapdet.diagnosis.stats import points, share
from mapdet.diagnosis.tide_matching import ImageTruth, match
from mapdet.evaluation.coco import evaluate_coco
from mapdet.structures import Detections

CAPS = (1, 10, 100, 300, 1000)  # detections per image (and COCO maxDets) on the curves
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


def cap_per_image(dets: Detections, k: int) -> Detections:
    """The ``k`` highest-scoring detections of each image over all classes: what the model would
    output with ``box_detections_per_img = k`` (torchvision keeps the top k after NMS)."""
    order = np.lexsort((-np.asarray(dets.scores), np.asarray(dets.image_id)))
    img = np.asarray(dets.image_id)[order]
    start = np.searchsorted(img, img, side="left")
    keep = np.sort(order[np.arange(len(order)) - start < k])
    return dets.take(keep)


def max_dets_curves(gt: dict, g: ImageTruth, dets: Detections, result, cap: int, extra_caps=()) -> CapCurves:
    """AP and AP50 against COCO maxDets (per image AND class) and against a per-image cap.

    The per-image curve truncates the results to the top k per image and reads AP at the headline
    maxDets (100 per image and class), where the AP is reported; caps at or above the largest
    per-image count reuse ``result``.
    """
    ids = np.asarray(dets.image_id)
    per_image = np.unique(ids, return_counts=True)[1] if len(ids) else np.zeros(0, int)
    most = int(per_image.max(initial=0))
    caps = sorted(set(CAPS) | {cap} | {int(k) for k in extra_caps})
    img_ap, img_ap50 = [], []
    for k in caps:
        r = result if k >= most else evaluate_coco(gt, cap_per_image(dets, k), max_dets=(HEADLINE_MAX_DETS,))
        img_ap.append(points(r.ap(max_dets=HEADLINE_MAX_DETS)) or 0.0)
        img_ap50.append(points(r.ap(iou=0.5, max_dets=HEADLINE_MAX_DETS)) or 0.0)
    gt_per_image = np.bincount(g.image[~g.crowd], minlength=len(g.image_ids))
    return CapCurves(
        coco=CocoCurve(
            list(CAPS),
            [points(result.ap(max_dets=k)) for k in CAPS],
            [points(result.ap(iou=0.5, max_dets=k)) for k in CAPS],
        ),
        per_image=PerImageCurve(caps, img_ap, img_ap50),
        most_dets_per_image=most,
        share_images_at_cap=share(per_image >= cap),
        share_images_gt_over_100=share(gt_per_image > 100),
        share_images_gt_over_cap=share(gt_per_image > cap),
        gt_per_image_mean=float(gt_per_image.mean()) if len(gt_per_image) else 0.0,
        gt_per_image_max=int(gt_per_image.max(initial=0)),
    )


def counts_per_image(g: ImageTruth, dets: Detections) -> tuple[np.ndarray, np.ndarray]:
    """(N,) detections and (N,) non-crowd ground-truth objects per image (json order)."""
    img = g.image_index(np.asarray(dets.image_id, dtype=np.int64))
    n = len(g.image_ids)
    return np.bincount(img[img >= 0], minlength=n), np.bincount(g.image[~g.crowd], minlength=n)


def infer_cap(g: ImageTruth, dets: Detections) -> InferredCap | None:
    """The per-image cap the results show, or None (see CAP_PILE_SHARE for the rule): ``cap`` (the
    largest count), ``images_at_cap`` (images holding exactly that many), ``evidence`` (those of
    them whose count is not their own number of objects), ``images_with_dets``."""
    dets_n, gt_n = counts_per_image(g, dets)
    most = int(dets_n.max(initial=0))
    if most < MIN_INFERRED_CAP:
        return None
    at = dets_n == most
    evidence = int((at & (gt_n != most)).sum())
    with_dets = int((dets_n > 0).sum())
    if evidence < max(CAP_PILE_MIN_IMAGES, math.ceil(CAP_PILE_SHARE * with_dets)):
        return None
    return InferredCap(most, int(at.sum()), evidence, with_dets)


def _inferred_text(inf: InferredCap) -> str:
    return (
        f"{inf.images_at_cap} of {inf.images_with_dets} images with detections hold exactly {inf.cap} detections, "
        "none more"
    )


def resolve_cap(g: ImageTruth, dets: Detections, s: DiagnoseSettings) -> CapChoice:
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
    most = int(counts_per_image(g, dets)[0].max(initial=0))
    chosen = (
        _assumed_cap(inf, given, most)  # nobody gave a cap: the config default is only an assumption
        if given_from is None
        else _given_cap(inf, given, f"{given_from} = {given}", most)
    )
    model_cap, results_cap, source, note = chosen
    return CapChoice(given if given_from else None, given_from, inf, model_cap, results_cap, note, source)


def _chosen(model_cap: int, results_cap: int | None, source: str, note: str | None = None) -> tuple:
    return model_cap, results_cap, source, note


def _assumed_cap(inf: InferredCap | None, default: int, most: int) -> tuple:
    """No cap given: the one the results show, else the config's default."""
    if inf:
        source = f"inferred: {_inferred_text(inf)} (no cap given; model.detections_per_img defaults to {default})"
        return _chosen(inf.cap, inf.cap, source)
    source = f"assumed: model.detections_per_img defaults to {default} (no cap given and none shown by the results)"
    return _chosen(default, default if most <= default else None, source)


def _given_cap(inf: InferredCap | None, given: int, named: str, most: int) -> tuple:
    """A cap given: confirmed by the results, replaced by a smaller one they show, or measured by
    truncating results that hold more than it."""
    if inf and inf.cap == given:
        return _chosen(given, given, f"given: {named}, confirmed by the results ({_inferred_text(inf)})")
    if inf and inf.cap < given:
        note = (
            f"the given cap ({named}) disagrees with the results: {_inferred_text(inf)}; a cap of {given} "
            f"does not stop that many images at exactly {inf.cap}, so the diagnosis uses {inf.cap}"
        )
        return _chosen(inf.cap, inf.cap, f"inferred: {_inferred_text(inf)}", note)
    if most > given:
        shown = f"they show a cap of {inf.cap}: {_inferred_text(inf)}" if inf else "or none: they show no cap"
        note = (
            f"the results hold up to {most} detections per image, more than the given cap ({named}): they were "
            f"produced with a larger cap ({shown}); the cost of {given} is measured by truncating them to the "
            f"top {given} per image"
        )
        own = f"inferred {inf.cap}" if inf else "none"
        return _chosen(given, inf.cap if inf else None, f"given: {named}; results' own cap: {own}", note)
    return _chosen(given, given, f"given: {named}")


def cap_estimate(
    g: ImageTruth, dets: Detections, td: tide.TideResult, cap: int | None, s: DiagnoseSettings, fixer: Fixer
) -> CapEstimate:
    """What the objects beyond the results' cap would add: the missed ground truth in images whose
    results reach ``cap`` and that hold more non-crowd objects than ``cap``, no longer counted as
    missed: ``dAP`` by TIDE's miss fix (AP50), ``gain`` by the same objects removed from the ground
    truth and the results scored again (COCO AP, ``fixer``). The matching counts
    ``max(cap, tide_max_dets)`` detections per image (a second matching when ``cap`` is the
    larger). Zero when no image is over the cap or the results show no cap (``cap`` None)."""
    out = CapEstimate(cap, tide_max_dets=max(cap or 0, s.tide_max_dets))
    if cap is None:
        return out
    dets_n, gt_n = counts_per_image(g, dets)
    over = (dets_n >= cap) & (gt_n > cap)
    if not over.any():
        return out
    if cap <= s.tide_max_dets:
        m, base = td.matching, td.ap
    else:
        m = match(g, dets, s.pos_thr, s.bkg_thr, cap)
        base, fixer = tide.fixed_ap(m), fixer.with_matching(m)
    mask = over[g.image]
    out.images, out.missed_gt = int(over.sum()), int((m.miss & mask).sum())
    out.dAP = max(tide.fixed_ap(m, "miss", mask) - base, 0.0)
    out.gain = fixer.gain("miss", mask)
    return out
