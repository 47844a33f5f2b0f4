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

TAGS = ("train/loss", "val/loss", "val/AP", "val/AP50", "train/lr")
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


def trend_interval(ap: list, lr: list) -> tuple[tuple, tuple, bool] | None:
    """The two validations ((step, AP), (step, AP)) the trend is read from, and whether an LR drop lies
    between them: the last interval without one when there is one (a drop lifts AP once, which a
    longer run also gets once, at its own milestone), else the last. None with fewer than two
    validations after step 0."""
    pts = [(s, v) for s, v in ap if s > 0]
    if len(pts) < 2:
        return None
    pairs = list(zip(pts[:-1], pts[1:]))
    calm = [(a, b) for a, b in pairs if not _lr_dropped(lr, a[0], b[0])]
    a, b = calm[-1] if calm else pairs[-1]
    return a, b, not calm


def _lr_dropped(lr: list, s0: int, s1: int) -> bool:
    """The logged LR fell below 70 % of its value at ``s0`` somewhere in (s0, s1] (warmup only rises)."""
    before = [v for s, v in lr if s <= s0]
    inside = [v for s, v in lr if s0 < s <= s1]
    return bool(before and inside) and min(inside) < 0.7 * before[-1]


def per_doubling(a: tuple, b: tuple) -> float:
    """AP points (values on the 0-1 scale) doubling the steps adds at the rate from validation ``a``
    to ``b`` ((step, AP) each), AP taken as linear in log(steps)."""
    return 100.0 * (b[1] - a[1]) * math.log(EXTEND) / math.log(b[0] / a[0])


def under_training(run: RunEvidence) -> tuple[Gain, str]:
    """What training ``EXTEND`` times as long would add (COCO AP and AP50 points), and the evidence.

    Late in training AP grows about linearly in log(steps), so a validation interval's gain per
    doubling of the steps is what one more doubling is expected to add: the last interval, or the
    last one before an LR drop (``trend_interval``). A low training loss does not mean a converged
    detector: the loss is averaged over sampled anchors and RoIs, mostly easy background, while AP
    needs the few foreground scores ranked and the boxes placed.
    """
    series = run.curves.series
    ap, ap50, lr = series.get("val/AP", []), series.get("val/AP50", []), series.get("train/lr", [])
    seen = _images_seen(run.meta, run.train_images)
    found = trend_interval(ap, lr)
    if found is None:
        n = len([p for p in ap if p[0] > 0])
        return Gain(), (
            f"{n} validation point(s) of val/AP in the run: whether AP was still rising is not measurable "
            f"(set train.eval_every){seen}"
        )
    a, b, dropped = found
    gain = Gain(per_doubling(a, b))
    evidence = f"validation AP went from {100 * a[1]:.1f} at step {a[0]} to {100 * b[1]:.1f} at step {b[0]}"
    at50 = dict((s, v) for s, v in ap50)
    if a[0] in at50 and b[0] in at50:
        gain.ap50 = per_doubling((a[0], at50[a[0]]), (b[0], at50[b[0]]))
        evidence += f" (AP50 {100 * at50[a[0]]:.1f} to {100 * at50[b[0]]:.1f})"
    if b[0] != ap[-1][0]:
        last = ap[-1]
        evidence += f" (the trend before the LR drop; AP {100 * last[1]:.1f} at the last validation, step {last[0]})"
    elif dropped:
        evidence += " (an LR drop lies in this interval: its one-time lift makes the estimate high)"
    evidence += (
        f": at that rate, AP linear in log(steps), {EXTEND}x the steps adds about {gain.ap:.1f} AP{seen}"
        if gain.ap > 0
        else f": no longer rising{seen}"
    )
    loss = series.get("train/loss", [])
    if len(loss) >= 10:
        tail = [v for s, v in loss if s >= a[0]]
        if tail:
            evidence += f"; training loss {loss[0][1]:.3g} at the start, {tail[-1]:.3g} at the end"
    return gain, evidence


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
