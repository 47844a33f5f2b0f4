"""Write a diagnosis: ``report.md`` with its PNG figures, ``diagnosis.json``, TensorBoard.

``write_report(d, out_dir)`` renders the ``records.Diagnosis`` of ``mapdet.diagnosis.measures.diagnose``
(with its optional ``training_curves``, ``sweep``, ``proposal_recall``) as Markdown readable as
is, the figures beside it, and ``d.to_json()`` as JSON. ``log_tensorboard(d, figures, log_dir)``
writes the same numbers, the report text and the figures to a TensorBoard event file.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np

from mapdet.diagnosis.causes import METHODS
from mapdet.diagnosis.figures import write_figures
from mapdet.diagnosis.records import UNIT, Cause, Diagnosis
from mapdet.diagnosis.tide import ALL_TYPES
from mapdet.fileio import write_text_atomic

_TIDE_NAMES = {
    "cls": "Cls",
    "loc": "Loc",
    "both": "Both",
    "dupe": "Dupe",
    "bkg": "Bkg",
    "miss": "Miss",
    "fp": "FP (all false positives)",
    "fn": "FN (all false negatives)",
}


def write_report(d: Diagnosis, out_dir: str | Path) -> dict[str, Path]:
    """Write report.md, diagnosis.json and the figures into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    figures = write_figures(d, out_dir)
    text = render_markdown(d, {k: p.name for k, p in figures.items()})
    write_text_atomic(out_dir / "report.md", text)
    write_text_atomic(out_dir / "diagnosis.json", json.dumps(d.to_json(), indent=1) + "\n")
    return {"report": out_dir / "report.md", "json": out_dir / "diagnosis.json", **figures}


def set_line(overrides: list[str]) -> str:
    """``--set k=v ...`` ready for a shell (each override quoted where the shell needs it)."""
    return "--set " + " ".join(shlex.quote(o) for o in overrides)


def _f(x, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def render_markdown(d: Diagnosis, fig: dict[str, str]) -> str:
    s = d.summary
    parts = [
        "# Why is the mAP low? Diagnosis",
        f"COCO AP **{_f(s.AP)}**, AP50 {_f(s.AP50)}, AP75 {_f(s.AP75)} (AP points, maxDets 100) on "
        f"{s.num_images} images with {s.num_gt} ground-truth boxes and {s.num_dets} detections.",
        "## Summary: causes ranked by measured impact",
        *_causes(d.causes),
        f"One unit for every impact: the {UNIT['metric']} (IoU 0.5:0.95, at most {UNIT['max_dets']} detections "
        f"per image and class: the headline AP above) that fixing that cause alone is estimated to add, with the "
        f"AP50 of the same fix in brackets. Why AP: {UNIT['why']}. Each method is listed at the end.",
        *_tide_section(d, fig),
        *_class_section(d, fig),
        *_thresholds_section(d, fig),
        *_size_section(d, fig),
        *_sweep_section(d, fig),
        *_curves_section(d, fig),
        "## How each impact is measured",
        "\n".join(f"- **{k}**: {v}." for k, v in METHODS.items()),
    ]
    return "\n\n".join(parts) + "\n"


def _img(fig: dict[str, str], name: str) -> list[str]:
    return [f"![{name}]({fig[name]})"] if name in fig else []


def _causes(causes: list[Cause]) -> list[str]:
    lines = [
        f"{i}. **{c.cause}**: AP +{c.impact:.1f} (AP50 {c.impact_ap50:+.1f}). {c.evidence}. *Fix:* {c.advice}."
        + (f" Try: `{set_line(c.set)}`" if c.set else "")
        for i, c in enumerate(causes, 1)
        if c.impact > 0
    ]
    zero = [c.cause for c in causes if c.impact <= 0]
    if zero:
        lines.append(f"No measurable impact: {', '.join(zero)}.")
    return ["\n".join(lines)]


def _table(head: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _tide_section(d: Diagnosis, fig) -> list[str]:
    t, fx = d.tide, d.fixes
    coco = {"loc": fx.loc, "cls": fx.cls, "dupe": fx.dupe, "bkg": fx.bkg}
    rows = [
        [_TIDE_NAMES[k], _f(t.errors[k], 2), t.counts[k], _f(coco[k].ap, 2) if k in coco else ""] for k in ALL_TYPES
    ]
    notes = (
        f"TIDE (Bolya et al. 2020): AP50 {t.ap50:.1f} with at most {t.max_dets} detections per "
        f"image, foreground IoU {t.pos_thr}, background IoU {t.bkg_thr}. dAP50 = AP50 after fixing "
        "only that error type minus the baseline. AP gained: the same fix applied to the results and scored "
        f"again by COCO (IoU 0.5:0.95, maxDets 100); for Loc, boxes are moved only up to their reference IoU "
        f"(at most {fx.reference_iou:g}; {fx.moved_boxes} boxes moved), not made exact."
    )
    if t.dropped_by_cap:
        notes += f" {t.dropped_by_cap} detections beyond {t.max_dets} per image were not counted."
    return [
        "## 1. Error decomposition",
        notes,
        _table(["error", "dAP50", "count", "AP gained"], rows),
        *_img(fig, "tide_errors"),
        *_miss_section(d),
    ]


def _miss_section(d: Diagnosis) -> list[str]:
    mb = d.miss_breakdown
    total = max(mb.count, 1)
    rows = [
        [
            g.group,
            g.cause,
            g.definition,
            g.count,
            f"{g.count / total:.1%}",
            _f(g.dAP, 2),
            _f(g.dAP_in_order, 2),
            _f(g.gain.ap, 2),
        ]
        for g in mb.groups
    ]
    rows.append(
        ["all misses", "", "TIDE Miss", mb.count, "100.0%" if mb.count else "0.0%", _f(d.tide.errors["miss"], 2)]
        + [_f(mb.dAP, 2), ""]
    )
    text = (
        f"Missed objects by cause: every missed ground-truth box falls in exactly one group, the first that "
        f"applies in this order: {', '.join(mb.precedence)} (the cap in force in TIDE's matching is "
        f"{mb.cap} detections per image). dAP50 alone: TIDE's miss fix on that group only; in order: what "
        "it adds after the groups above it, so that column sums to the Miss dAP (dAPs are not additive); AP "
        "alone: the group removed from the ground truth and the results scored again by COCO. The "
        "'unexplained' group is the **missed** cause."
    )
    head = ["group", "cause", "which missed objects", "count", "share", "dAP50 alone", "dAP50 in order", "AP alone"]
    return [text, _table(head, rows)]


def _threshold_source(pc) -> str:
    if pc.threshold_derived:
        return "no data.repeat_threshold in force: the frequency two thirds of the classes are below"
    return "data.repeat_threshold"


def _class_section(d: Diagnosis, fig) -> list[str]:
    pc = d.per_class
    text = (
        f"Training frequency from the {pc.source}. Spearman rank correlation of AP with frequency: "
        f"{_f(pc.spearman_ap_vs_freq, 2)}. Repeat factor r(c) = max(1, sqrt(t / f(c))) with t = {pc.repeat_threshold} "
        f"({_threshold_source(pc)}); class weight = inverse square root of the instance count, mean 1 "
        "(model.class_weights=inv_sqrt)."
    )
    zero = pc.zero_ap
    zero_text = f"{len(zero)} classes have AP50 below 1 point:" if zero else "No class has AP50 below 1 point."
    head = ["id", "class", "AP", "AP50", "train freq", "train boxes", "repeat factor", "class weight"]
    out = ["## 2. Per-class AP vs training frequency", text, *_img(fig, "per_class_vs_frequency"), zero_text]
    if zero:
        out.append(_table(head, [_class_row(r) for r in zero]))
    out += ["All classes:", _table(head, [_class_row(r) for r in pc.rows])]
    return out


def _class_row(r) -> list:
    return [
        r.id,
        r.name,
        _f(r.ap),
        _f(r.ap50),
        f"{r.train_freq:.4f}",
        r.train_instances,
        f"{r.repeat_factor:.2f}",
        f"{r.class_weight:.2f}",
    ]


def _thresholds_section(d: Diagnosis, fig) -> list[str]:
    c, m = d.iou_curve, d.max_dets
    cv, per = m.curves, m.curves.per_image
    iou = _table(["IoU"] + [f"{x:.2f}" for x in c.iou], [["AP"] + [_f(v) for v in c.ap]])
    caps = _table(
        ["detections kept"] + [str(k) for k in per.cap],
        [["AP50, per image"] + [_f(v) for v in per.ap50], ["AP, per image"] + [_f(v) for v in per.ap]],
    )
    coco = _table(["COCO maxDets"] + [str(k) for k in cv.coco.max_dets], [["AP"] + [_f(v) for v in cv.coco.ap]])
    text = (
        f"{cv.share_images_gt_over_100:.1%} of images have more than 100 ground-truth objects "
        f"(mean {cv.gt_per_image_mean:.1f}, max {cv.gt_per_image_max}); the model's cap is "
        f"{m.model_cap} detections per image, the results hold up to {cv.most_dets_per_image} and "
        f"{cv.share_images_at_cap:.1%} of images fill the cap. COCO's maxDets caps each image AND class, "
        "the model's cap (model.detections_per_img) each image over all classes: both curves are shown; the "
        "per-image curve keeps the top k detections of every image and reads AP at maxDets 100, where the "
        f"headline AP is. Cap: {m.choice.cap_source}."
    )
    if m.choice.cap_note:
        text += f" **Note:** {m.choice.cap_note}."
    return [
        "## 3. AP vs IoU threshold and detection cap",
        iou,
        *_img(fig, "ap_vs_iou"),
        text,
        caps,
        coco,
        *_img(fig, "ap_vs_max_dets"),
    ]


def _size_section(d: Diagnosis, fig) -> list[str]:
    s = d.size
    rows = [[k, f"{s.share_gt[k]:.1%}", _f(s.ap[k]), _f(s.ap50[k])] for k in ("small", "medium", "large")]
    mi = s.model_input
    text = (
        f"Anchor sizes {[round(a) for a in s.anchor_sizes]} px ({s.anchors_from}) at the model's "
        f"input size (arch {mi.arch}: min_size {mi.min_size}, max_size {mi.max_size}); "
        f"median box side there {s.median_side_model_input:.1f} px (10th percentile {s.side_p10_model_input:.1f}); "
        f"{s.share_below_smallest_anchor_half:.1%} of boxes are smaller than half the smallest anchor."
    )
    out = ["## 4. Object size", _table(["size", "share of GT", "AP", "AP50"], rows), text, *_img(fig, "box_sizes")]
    pr = d.proposal_recall
    if pr:
        out += [
            f"RPN proposal recall at IoU {pr.iou} ({pr.proposals_per_image:.0f} proposals per image): "
            + ", ".join(f"{k} {_f(v, 3)}" for k, v in pr.recall.items())
            + ".",
            *_img(fig, "proposal_recall"),
        ]
    else:
        out.append("Proposal recall by size: not measured (pass --checkpoint and --config).")
    return out


def _sweep_section(d: Diagnosis, fig) -> list[str]:
    sw = d.sweep
    if not sw:
        return [
            "## 5. Post-processing sweep",
            "Not run: pass --checkpoint and --config to sweep NMS IoU "
            "threshold x score threshold x detections per image (the network runs once per image).",
        ]
    b = sw.best
    text = (
        f"{sw.num_images} images; the backbone, RPN and box head ran once per image, only torchvision's "
        f"postprocess reran per grid point, each scored at maxDets {sw.max_dets} (the headline AP's). Best AP "
        f"{b.ap:.1f} at model.nms_thresh={b.nms_thresh}, model.score_thresh={b.score_thresh}, "
        f"model.detections_per_img={b.detections_per_img} (current settings: AP {_f(sw.current_ap)})."
    )
    levers = [sw.lever(name) for name in ("nms_thresh", "score_thresh", "detections_per_img")]
    rows = [[lb.key, f"{lb.current:g}", _f(lb.current_ap), f"{lb.value:g}", _f(lb.ap)] for lb in levers if lb]
    table = [_table(["setting", "in force", "AP", "best alone", "AP there"], rows)] if rows else []
    return ["## 5. Post-processing sweep", text, *table, *_img(fig, "postprocess_sweep")]


def _curves_section(d: Diagnosis, fig) -> list[str]:
    tc = d.training_curves
    if tc is None:
        return ["## 6. Loss vs mAP over training", "Not shown: pass --run RUN_DIR (the training run folder)."]
    out = ["## 6. Loss vs mAP over training"]
    if tc.missing:
        out.append(f"Not logged in {len(tc.files)} event files: {', '.join(tc.missing)}.")
    if not tc.series:
        return out
    out.append(
        "\n".join(
            f"- {tag}: {len(series)} points, first {series[0][1]:.4g} (step {series[0][0]}), "
            f"last {series[-1][1]:.4g} (step {series[-1][0]})"
            for tag, series in tc.series.items()
        )
    )
    return out + _img(fig, "loss_vs_map")


def log_tensorboard(
    d: Diagnosis, report_text: str, figures: dict[str, Path], log_dir: str | Path, step: int = 0
) -> None:
    """Scalars under ``diagnose/``, the report as text and each figure as an image."""
    from PIL import Image
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(log_dir))
    try:
        for key, value in vars(d.summary).items():
            if isinstance(value, float):
                writer.add_scalar(f"diagnose/summary/{key}", value, step)
        for kind in ALL_TYPES:
            writer.add_scalar(f"diagnose/dAP/{kind}", d.tide.errors[kind], step)
            writer.add_scalar(f"diagnose/count/{kind}", d.tide.counts[kind], step)
        for c in d.causes:
            writer.add_scalar(f"diagnose/cause/{c.cause}", c.impact, step)
        for g in d.miss_breakdown.groups:
            writer.add_scalar(f"diagnose/miss/{g.group}", g.dAP, step)
        writer.add_text("diagnose/report", report_text, step)
        for name, path in figures.items():
            with Image.open(path) as im:
                writer.add_image(f"diagnose/{name}", np.asarray(im.convert("RGB")), step, dataformats="HWC")
    finally:
        writer.close()
