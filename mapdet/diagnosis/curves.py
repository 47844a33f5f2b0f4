"""The run's training curves and what they say about training longer (``mapdet diagnose --run``).

``training_curves(run_dir)`` reads the scalars of every TensorBoard event file of a run
(``TrainingCurves``); ``run_meta`` the last checkpoint's meta.json (``RunMeta``); together with the
training split's size they are the ``RunEvidence`` ``under_training`` reads to estimate what a
longer run would add by extrapolating the validation AP curve.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from mapdet.diagnosis.records import Gain

TAGS = ("train/loss", "val/loss", "val/AP", "val/AP50")
EXTEND = 2  # the longer run estimated: this many times the steps


@dataclass
class TrainingCurves:
    series: dict[str, list[list[float]]]  # tag -> [[step, value]], values as logged (0-1 for AP)
    missing: list[str]
    files: list[str]


@dataclass
class RunMeta:
    """What the run's last checkpoint records (meta.json); batch fields absent in older runs."""

    step: int
    global_batch: int | None = None
    processes: int | None = None


@dataclass
class RunEvidence:
    """What ``--run`` gives the diagnosis: the curves, the last checkpoint, the training split's size."""

    curves: TrainingCurves
    meta: RunMeta | None
    train_images: int | None


def training_curves(run_dir: str | Path, tags=TAGS) -> TrainingCurves:
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
    return TrainingCurves(
        series={tag: sorted([s, v] for s, v in found[tag].items()) for tag in tags if tag in found},
        missing=[tag for tag in tags if tag not in found],
        files=[str(p) for p in files],
    )


def run_meta(checkpoint_dir: Path | None) -> RunMeta | None:
    """The meta.json of a checkpoint folder (step, images per step), or None."""
    if checkpoint_dir is None:
        return None
    meta = json.loads((Path(checkpoint_dir) / "meta.json").read_text())
    return RunMeta(int(meta["step"]), meta.get("global_batch"), meta.get("processes"))


def per_doubling(series: list) -> float | None:
    """AP points (series on the 0-1 scale) that doubling the steps adds at the rate of the last two
    validations, AP taken as linear in log(steps); None with fewer than two validations after step 0."""
    pts = [(s, v) for s, v in series if s > 0]
    if len(pts) < 2:
        return None
    (s0, a0), (s1, a1) = pts[-2], pts[-1]
    return 100.0 * (a1 - a0) * math.log(EXTEND) / math.log(s1 / s0)


def under_training(run: RunEvidence) -> tuple[Gain, str]:
    """What training ``EXTEND`` times as long would add (COCO AP and AP50 points), and the evidence.

    Late in training AP grows about linearly in log(steps), so the last validation interval's gain
    per doubling of the steps is what one more doubling is expected to add. A low training loss
    does not mean a converged detector: the loss is averaged over sampled anchors and RoIs, mostly
    easy background, while AP needs the few foreground scores ranked and the boxes placed.
    """
    series = run.curves.series
    ap, ap50 = series.get("val/AP", []), series.get("val/AP50", [])
    seen = _images_seen(run.meta, run.train_images)
    g_ap, g_ap50 = per_doubling(ap), per_doubling(ap50)
    if g_ap is None:
        n = len([p for p in ap if p[0] > 0])
        return Gain(), (
            f"{n} validation point(s) of val/AP in the run: whether AP was still rising is not measurable "
            f"(set train.eval_every){seen}"
        )
    (s0, a0), (s1, a1) = [p for p in ap if p[0] > 0][-2:]
    evidence = f"validation AP went from {100 * a0:.1f} at step {s0} to {100 * a1:.1f} at step {s1}"
    if g_ap50 is not None:
        (_, b0), (_, b1) = [p for p in ap50 if p[0] > 0][-2:]
        evidence += f" (AP50 {100 * b0:.1f} to {100 * b1:.1f})"
    evidence += (
        f": at that rate, AP linear in log(steps), {EXTEND}x the steps adds about {g_ap:.1f} AP{seen}"
        if g_ap > 0
        else f": no longer rising{seen}"
    )
    loss = series.get("train/loss", [])
    if len(loss) >= 10:
        tail = [v for s, v in loss if s >= s0]
        if tail:
            evidence += f"; training loss {loss[0][1]:.3g} at the start, {tail[-1]:.3g} at the end"
    return Gain(g_ap, g_ap50 or 0.0), evidence


def _images_seen(meta: RunMeta | None, train_images: int | None) -> str:
    if meta is None or meta.global_batch is None:
        return ""
    images = meta.step * meta.global_batch
    text = (
        f"; the model saw {images} images in {meta.step} steps ({meta.global_batch} per step: "
        f"{meta.processes} process(es))"
    )
    if train_images:
        text += f", {images / train_images:.1f} epochs of {train_images}"
    return text
