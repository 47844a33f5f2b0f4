"""The diagnosis figures: one PNG per question, drawn from the diagnosis record alone (matplotlib Agg).

``write_figures(d, out_dir) -> {name: path}`` draws every figure whose data is present in the
``records.Diagnosis`` ``d`` (see ``mapdet.diagnosis.measures``): TIDE dAP bars, per-class AP vs training frequency,
AP vs IoU threshold, AP vs detection cap / maxDets, box-size histogram against the anchor sizes,
loss vs mAP over training, and the post-processing sweep and proposal recall when measured.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mapdet.diagnosis.records import Diagnosis  # noqa: E402
from mapdet.diagnosis.tide import ALL_TYPES  # noqa: E402


def write_figures(d: Diagnosis, out_dir: str | Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawers = {
        "tide_errors": _tide,
        "per_class_vs_frequency": _per_class,
        "ap_vs_iou": _iou,
        "ap_vs_max_dets": _max_dets,
        "box_sizes": _sizes,
        "loss_vs_map": _curves,
        "postprocess_sweep": _sweep,
        "proposal_recall": _proposals,
    }
    paths = {}
    for name, draw in drawers.items():
        fig = draw(d)
        if fig is None:
            continue
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths[name] = path
    return paths


def _tide(d: Diagnosis):
    t = d.tide
    fig, ax = plt.subplots(figsize=(7, 3.2))
    values = [t.errors[k] for k in ALL_TYPES]
    colors = ["tab:red"] * 6 + ["tab:gray"] * 2
    bars = ax.bar([k.upper() if len(k) == 2 else k.capitalize() for k in ALL_TYPES], values, color=colors)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylim(min(0.0, min(values) * 1.15), max(1.0, max(values) * 1.15))
    ax.set_ylabel("dAP50 (AP points)")
    ax.set_title(f"TIDE error decomposition (AP50 {t.ap50:.1f}, IoU {t.pos_thr}/{t.bkg_thr}, {t.max_dets} dets/img)")
    return fig


def _per_class(d: Diagnosis):
    pc = d.per_class
    rows = pc.rows
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    f = np.array([max(r.train_freq, 1e-4) for r in rows])
    ax.scatter(f, [r.ap50 for r in rows], marker="x", color="tab:gray", label="AP50")
    ax.scatter(f, [r.ap for r in rows], color="tab:blue", label="AP")
    for r, x in zip(rows, f):
        if r.ap50 < 1.0 or len(rows) <= 12:
            ax.annotate(r.name, (x, r.ap), fontsize=6, rotation=30)
    ax.axvline(pc.repeat_threshold, color="tab:orange", ls="--", label=f"t = {pc.repeat_threshold}")
    ax.set_xscale("log")
    ax.set_xlabel(f"share of training images with the class ({pc.source})")
    ax.set_ylabel("AP points")
    rho = pc.spearman_ap_vs_freq
    ax.set_title("Per-class AP vs training frequency" + (f" (Spearman {rho:.2f})" if rho is not None else ""))
    ax.legend(fontsize=8)
    return fig


def _iou(d: Diagnosis):
    c = d.iou_curve
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(c.iou, [np.nan if v is None else v for v in c.ap], marker="o")
    ax.set_xlabel("IoU threshold")
    ax.set_ylabel("AP points")
    ax.set_title("AP vs IoU threshold")
    ax.grid(alpha=0.3)
    return fig


def _max_dets(d: Diagnosis):
    m = d.max_dets
    per, coco = m.curves.per_image, m.curves.coco
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(per.cap, per.ap50, marker="o", label="AP50, cap per image (all classes), maxDets 100")
    ax.plot(per.cap, per.ap, marker="o", label="AP, cap per image (all classes), maxDets 100")
    ap = [np.nan if v is None else v for v in coco.ap]
    ax.plot(coco.max_dets, ap, marker="s", ls="--", label="AP, COCO maxDets (per image and class)")
    ax.axvline(m.model_cap, color="tab:red", ls=":", label=f"model cap {m.model_cap}")
    ax.set_xscale("log")
    ax.set_xlabel("detections kept")
    ax.set_ylabel("AP points")
    ax.set_title(f"AP vs detection cap ({m.curves.share_images_gt_over_100:.0%} of images have > 100 objects)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def _sizes(d: Diagnosis):
    s = d.size
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.5), gridspec_kw={"width_ratios": [3, 1]})
    bins = np.array(s.bins)
    ax.stairs(s.hist_model_input, bins, fill=True, alpha=0.6, label="at the model's input size")
    ax.stairs(s.hist_original, bins, color="k", label="in the stored images")
    for i, a in enumerate(s.anchor_sizes):
        ax.axvline(a, color="tab:red", ls="--", label="anchor sizes" if i == 0 else None)
    ax.set_xscale("log")
    ax.set_xlabel("ground-truth box size sqrt(area), px")
    ax.set_ylabel("boxes")
    ax.legend(fontsize=7)
    ax.set_title(f"Box sizes vs anchors (input min_size {s.model_input.min_size})")
    names = ["small", "medium", "large"]
    bx.bar(names, [s.ap[k] or 0.0 for k in names], label="AP")
    bx.bar(names, [s.ap50[k] or 0.0 for k in names], fill=False, edgecolor="k", label="AP50")
    bx.set_title("AP by size")
    bx.legend(fontsize=7)
    return fig


def _curves(d: Diagnosis):
    tc = d.training_curves
    if not tc or not tc.series:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    right = ax.twinx()
    for tag, series in tc.series.items():
        if tag not in _TAG_COLORS:  # the learning rate has its own scale: shown in TensorBoard
            continue
        steps, values = zip(*series)
        target = right if tag.startswith("val/AP") else ax
        target.plot(
            steps,
            values,
            marker="." if len(steps) < 50 else None,
            label=tag,
            ls="--" if target is right else "-",
            color=_TAG_COLORS.get(tag),
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_ylim(bottom=0)
    right.set_ylim(bottom=0)
    right.set_ylabel("AP")
    lines = ax.get_lines() + right.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8)
    ax.set_title("Loss vs mAP over training")
    return fig


_TAG_COLORS = {"train/loss": "tab:blue", "val/loss": "tab:orange", "val/AP": "tab:green", "val/AP50": "tab:olive"}


def _sweep(d: Diagnosis):
    sw = d.sweep
    if not sw:
        return None
    nms, scores, caps = sw.nms_thresh, sw.score_thresh, sw.detections_per_img
    grid = np.array(sw.ap)  # (nms, score, caps), AP at maxDets sw.max_dets
    fig, axes = plt.subplots(1, len(caps), figsize=(3.2 * len(caps), 3), squeeze=False)
    for j, (ax, cap) in enumerate(zip(axes[0], caps)):
        im = ax.imshow(grid[:, :, j], origin="lower", aspect="auto", vmin=np.nanmin(grid), vmax=np.nanmax(grid))
        ax.set_xticks(range(len(scores)), [str(s) for s in scores], fontsize=7)
        ax.set_yticks(range(len(nms)), [str(n) for n in nms], fontsize=7)
        ax.set_xlabel("score threshold")
        if j == 0:
            ax.set_ylabel("NMS IoU threshold")
        ax.set_title(f"AP, {cap} dets/img", fontsize=9)
        for (a, b), v in np.ndenumerate(grid[:, :, j]):
            ax.text(b, a, f"{v:.1f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    return fig


def _proposals(d: Diagnosis):
    pr = d.proposal_recall
    if not pr:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    names = list(pr.recall)
    ax.bar(names, [pr.recall[k] if pr.recall[k] is not None else 0.0 for k in names])
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"recall at IoU {pr.iou}")
    ax.set_title(f"RPN proposal recall by size ({pr.proposals_per_image:.0f} proposals/img)")
    return fig
