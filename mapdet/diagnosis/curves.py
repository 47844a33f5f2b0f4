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
# AP that more than multiplies by this over a validation interval is still starting up: it grows about
# linearly in steps there, not in log(steps) (the demo's validation AP, one run at its first LR: 1.1, 9.0,
# 13.9, 29.3, 41.0, 51.9 at steps 56, 112, 150, 300, 450, 600, i.e. 0.14, 0.13, 0.10, 0.08, 0.07 points
# per step, while the gain per doubling grows 7.9, 15.4, 22.6)
START_UP_RATIO = 4
LR_DROP = 0.7  # the logged LR below this share of an earlier value is a drop (warmup only rises)


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


def last_drop(lr: list, upto: float) -> float | None:
    """The step of the last LR drop (the logged LR below ``LR_DROP`` of the value logged before it) at or
    before ``upto``: the midpoint of the two logged steps around it; None without one."""
    drops = [(s0 + s1) / 2 for (s0, v0), (s1, v1) in zip(lr[:-1], lr[1:]) if v1 < LR_DROP * v0 and s1 <= upto]
    return drops[-1] if drops else None


def _lr_dropped(lr: list, s0: int, s1: int) -> bool:
    """The logged LR fell below ``LR_DROP`` of its value at ``s0`` somewhere in (s0, s1]."""
    before = [v for s, v in lr if s <= s0]
    inside = [v for s, v in lr if s0 < s <= s1]
    return bool(before and inside) and min(inside) < LR_DROP * before[-1]


def per_doubling(a: tuple, b: tuple) -> float:
    """AP points (values on the 0-1 scale) doubling the steps adds at the rate from validation ``a``
    to ``b`` ((step, AP) each), AP taken as linear in log(steps)."""
    return 100.0 * (b[1] - a[1]) * math.log(EXTEND) / math.log(b[0] / a[0])


def per_step(a: tuple, b: tuple, added: int) -> float:
    """AP points ``added`` more steps add at the rate from ``a`` to ``b``, AP taken as linear in steps."""
    return 100.0 * (b[1] - a[1]) / (b[0] - a[0]) * added


def starting_up(a: tuple, b: tuple) -> bool:
    """AP more than multiplied by ``START_UP_RATIO`` from validation ``a`` to ``b``: training is still
    starting up, and AP grows about linearly in steps."""
    return b[1] > 0 and b[1] > START_UP_RATIO * max(a[1], 0.0)


def under_training(run: RunEvidence) -> tuple[Gain, str]:
    """What training ``EXTEND`` times as long would add (COCO AP and AP50 points), and the evidence.

    Read from a validation interval: the last one without an LR drop inside (``trend_interval``).
    Late in training AP grows about linearly in log(steps), so the interval's gain per doubling of the
    steps is what one more doubling is expected to add. After an LR drop the clock is the steps since
    the drop: AP rises fast there and levels off, and a run twice as long spends twice as long there
    (read on the total steps, the demo at 1800 steps claimed +15.6 where 3600 measured -1.3). At the
    start (``starting_up``: AP multiplied more than ``START_UP_RATIO`` times over the interval) AP grows
    about linearly in steps instead, and the log rule would read a run stopped early as nearly done;
    there the interval's gain per step times the steps a longer run adds is the estimate. A low
    training loss does not mean a converged detector: the loss is averaged over sampled anchors and
    RoIs, mostly easy background, while AP needs the few foreground scores ranked and the boxes placed.
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
    steps = run.meta.step if run.meta is not None else int(ap[-1][0])
    early = starting_up(a, b)
    drop = None if early or dropped else last_drop(lr, a[0])

    def rate(p, q) -> float:
        if early:
            return per_step(p, q, (EXTEND - 1) * steps)
        if drop is not None:
            return per_doubling((p[0] - drop, p[1]), (q[0] - drop, q[1]))
        return per_doubling(p, q)

    gain = Gain(rate(a, b))
    evidence = f"validation AP went from {100 * a[1]:.1f} at step {a[0]} to {100 * b[1]:.1f} at step {b[0]}"
    at50 = dict((s, v) for s, v in ap50)
    if a[0] in at50 and b[0] in at50:
        gain.ap50 = rate((a[0], at50[a[0]]), (b[0], at50[b[0]]))
        evidence += f" (AP50 {100 * at50[a[0]]:.1f} to {100 * at50[b[0]]:.1f})"
    if b[0] != ap[-1][0]:
        last = ap[-1]
        evidence += f" (the trend before the LR drop; AP {100 * last[1]:.1f} at the last validation, step {last[0]})"
    elif dropped:
        evidence += " (an LR drop lies in this interval)"
    if gain.ap <= 0:
        evidence += f": no longer rising{seen}"
    elif early:
        rise = f"AP multiplied {b[1] / a[1]:.0f}x" if a[1] > 0 else "AP rose from 0"
        evidence += (
            f": {rise}, so training is still starting up, where AP grows about linearly in steps: at that rate the "
            f"{(EXTEND - 1) * steps} more steps of a run {EXTEND}x as long add about {gain.ap:.1f} AP{seen}"
        )
    elif drop is not None:
        evidence += (
            f": after the LR drop at step {drop:.0f} AP follows the steps since it, and a run {EXTEND}x as long "
            f"spends {EXTEND}x as long there: at that rate, AP linear in log(steps since the drop), about "
            f"{gain.ap:.1f} AP{seen}"
        )
    else:
        evidence += f": at that rate, AP linear in log(steps), {EXTEND}x the steps adds about {gain.ap:.1f} AP{seen}"
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
