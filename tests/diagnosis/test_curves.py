"""The run's training curves and the under-training estimate drawn from them."""

from __future__ import annotations

import math

import pytest

from mapdet.diagnosis import curves
from mapdet.diagnosis.curves import RunEvidence, RunMeta, TrainingCurves


def test_training_curves_read_tensorboard_and_name_missing_tags(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(tmp_path / "tensorboard" / "run"))
    for step in range(0, 30, 10):
        w.add_scalar("train/loss", 1.0 / (step + 1), step)
    w.add_scalar("val/AP", 0.25, 20)
    w.close()
    tc = curves.training_curves(tmp_path)
    assert tc.series["train/loss"] == [[0, 1.0], [10, pytest.approx(1 / 11)], [20, pytest.approx(1 / 21)]]
    assert tc.series["val/AP"] == [[20, 0.25]]
    assert tc.missing == ["val/loss", "val/AP50", "train/lr"]
    assert curves.training_curves(tmp_path / "nothing") == TrainingCurves({}, list(curves.TAGS), [])


def evidence(ap, ap50=None, meta=None, train_images=None, loss=None) -> RunEvidence:
    series = {"val/AP": ap}
    if ap50 is not None:
        series["val/AP50"] = ap50
    if loss is not None:
        series["train/loss"] = loss
    return RunEvidence(TrainingCurves(series, [], []), meta, train_images)


def test_under_training_extrapolates_the_last_interval_per_doubling_of_the_steps():
    run = evidence(
        ap=[[360, 0.05], [720, 0.12], [1080, 0.20]],
        ap50=[[360, 0.10], [720, 0.18], [1080, 0.30]],
        meta=RunMeta(step=1080, global_batch=4, processes=1),
        train_images=240,
        loss=[[s, 3.0 / (1 + s)] for s in range(0, 1090, 10)],
    )
    gain, text = curves.under_training(run)
    per_doubling = math.log(2) / math.log(1080 / 720)  # 1.71: the last interval was half a doubling
    assert gain.ap == pytest.approx(8.0 * per_doubling) and gain.ap50 == pytest.approx(12.0 * per_doubling)
    assert "from 12.0 at step 720 to 20.0 at step 1080 (AP50 18.0 to 30.0)" in text
    assert f"2x the steps adds about {8.0 * per_doubling:.1f} AP" in text
    assert "4320 images in 1080 steps (4 per step: 1 process(es)), 18.0 epochs of 240" in text
    assert "training loss 3 at the start" in text


def test_under_training_reads_the_trend_before_an_lr_drop():
    # multistep schedule: the LR drops 10x at step 756, inside the last interval; its one-time lift is
    # not a trend a longer run keeps (it gets one drop too), so the interval before it is read
    lr = [[s, 0.003 if s < 756 else 0.0003] for s in range(0, 1090, 10)]
    run = evidence(ap=[[360, 0.08], [720, 0.22], [1080, 0.37]], ap50=[[360, 0.2], [720, 0.54], [1080, 0.77]])
    run.curves.series["train/lr"] = lr
    gain, text = curves.under_training(run)
    assert gain.ap == pytest.approx(14.0) and gain.ap50 == pytest.approx(34.0)  # 360 -> 720 is one doubling
    assert "(the trend before the LR drop; AP 37.0 at the last validation, step 1080)" in text
    run = evidence(ap=[[135, 0.15], [270, 0.2]])  # the only interval holds the drop: used, and said
    run.curves.series["train/lr"] = [[s, 0.003 if s < 189 else 0.0003] for s in range(0, 280, 10)]
    gain, text = curves.under_training(run)
    assert gain.ap == pytest.approx(5.0) and "an LR drop lies in this interval" in text


def test_under_training_at_the_start_reads_ap_linear_in_steps():
    # the demo stopped at a quarter of its steps (bench_diagnose_planted's `quarter`, seed 0): AP 1.1 -> 7.2
    # over its last 56 steps; 2x the steps measured 35.2 (+28.0). Per doubling in log(steps) says +6.1
    run = evidence(ap=[[56, 0.011], [112, 0.072]], ap50=[[56, 0.038], [112, 0.2]], meta=RunMeta(step=112))
    run.curves.series["train/lr"] = [[s, 0.02 if s < 78 else 0.002] for s in range(0, 113, 2)]
    gain, text = curves.under_training(run)
    assert gain.ap == pytest.approx(6.1 / 56 * 112) and gain.ap50 == pytest.approx(16.2 / 56 * 112)  # 12.2, 32.4
    assert "AP multiplied 7x, so training is still starting up" in text
    assert "the 112 more steps of a run 2x as long add about 12.2 AP" in text
    # a 4x rise is the edge: still read per doubling
    gain, text = curves.under_training(evidence(ap=[[56, 0.02], [112, 0.08]], meta=RunMeta(step=112)))
    assert gain.ap == pytest.approx(6.0) and "linear in log(steps)" in text
    # from AP 0 any rise multiplies without bound: linear in steps (the steps from the last validation's)
    gain, text = curves.under_training(evidence(ap=[[50, 0.0], [100, 0.01]]))
    assert gain.ap == pytest.approx(2.0) and "AP rose from 0, so training is still starting up" in text


def test_under_training_needs_two_validations_after_step_0_and_may_go_negative():
    gain, text = curves.under_training(evidence([[0, 0.0], [720, 0.5]]))
    assert gain.ap == 0.0 and "1 validation point(s)" in text and "not measurable (set train.eval_every)" in text
    assert "images" not in text  # no meta: nothing invented
    gain, text = curves.under_training(evidence([[360, 0.5], [720, 0.4]]))
    assert gain.ap == pytest.approx(-10.0) and "no longer rising" in text  # the ranking clips it to 0


def test_run_meta_reads_old_and_new_checkpoints(tmp_path):
    (tmp_path / "meta.json").write_text('{"step": 90, "global_batch": 8, "processes": 2}')
    assert curves.run_meta(tmp_path) == RunMeta(90, 8, 2)
    (tmp_path / "meta.json").write_text('{"step": 90}')
    assert curves.run_meta(tmp_path) == RunMeta(90) and curves.run_meta(None) is None


def test_under_training_after_an_lr_drop_reads_the_steps_since_the_drop():
    # the demo at 1800 steps (seed 0; LR 10x lower from step 1260): AP 67.5 -> 71.6 over its last two
    # validations; 3600 steps measured 70.3. On the total steps that read +15.6 per doubling
    ap = [[300, 0.293], [600, 0.519], [900, 0.45], [1200, 0.547], [1500, 0.675], [1800, 0.716]]
    run = evidence(ap=ap, meta=RunMeta(step=1800))
    run.curves.series["train/lr"] = [[s, 0.02 if s < 1260 else 0.002] for s in range(0, 1801, 10)]
    assert curves.last_drop(run.curves.series["train/lr"], 1500) == 1255
    gain, text = curves.under_training(run)
    since = math.log(2) / math.log((1800 - 1255) / (1500 - 1255))
    assert gain.ap == pytest.approx(4.1 * since) and 3 < gain.ap < 4  # not 15.6
    assert "after the LR drop at step 1255 AP follows the steps since it" in text
    # a drop after the interval read changes nothing; no LR logged: no drop known
    assert curves.last_drop(run.curves.series["train/lr"], 1200) is None and curves.last_drop([], 1e9) is None
