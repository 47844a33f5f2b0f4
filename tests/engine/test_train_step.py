"""mapdet.engine.step.train_step on the CPU: a non-finite loss skips the update (after the backward every
rank runs), and the numbers the step sums over ranks come back from its one all-reduce."""

from __future__ import annotations

import math

import pytest
import torch

from mapdet.config import OptimConfig
from mapdet.engine.step import PHASES, train_step
from tests.engine.toy import toy_batches, toy_parts


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_a_non_finite_loss_skips_the_update_and_still_counts_the_images(accelerator, grad_accum):
    parts = toy_parts(accelerator)
    model, scheduler = parts.model, parts.scheduler
    batches = toy_batches()
    res = train_step(parts, batches, OptimConfig(grad_accum=grad_accum, clip_norm=1.0))
    assert not res.skipped and math.isfinite(res.grad_norm) and res.images == 2 * grad_accum
    weights, lr = model.w.detach().clone(), scheduler.get_last_lr()
    model.poison = True
    res = train_step(parts, batches, OptimConfig(grad_accum=grad_accum, clip_norm=1.0))
    assert res.skipped and math.isnan(res.grad_norm)
    assert torch.equal(model.w.detach(), weights) and scheduler.get_last_lr() == lr  # no update, no schedule step
    assert model.w.grad is None  # the poisoned gradients are gone
    assert math.isnan(res.losses["loss_b"]) and math.isfinite(res.losses["loss_a"])
    assert res.images == res.all_images == 2 * grad_accum  # every micro-batch was drawn and trained on
    model.poison = False
    res = train_step(parts, batches, OptimConfig(grad_accum=grad_accum, clip_norm=1.0))
    assert not res.skipped and not torch.equal(model.w.detach(), weights)


def test_losses_counts_and_shared_values_come_back_from_the_one_reduction(accelerator):
    parts = toy_parts(accelerator)
    batches = toy_batches(bad_every=2)
    calls = []

    def shared():
        calls.append(1)
        return (3, True)

    res = train_step(parts, batches, OptimConfig(grad_accum=2, clip_norm=None), shared=shared)
    assert calls == [1] and res.shared == [3.0, 1.0]
    assert res.all_bad == len(res.bad) == 1 and res.all_images == 4
    x = (0.5 + 0.25) / 2
    assert res.losses["loss_a"] == pytest.approx(1.0 * x) and res.losses["loss_b"] == pytest.approx(2.0 * x)
    assert res.losses["loss"] == pytest.approx(3.0 * x)
    assert math.isnan(res.grad_norm)  # no clipping: no norm
    res = train_step(parts, batches, OptimConfig(grad_accum=1, clip_norm=None))
    assert res.shared == []


def test_a_profiled_step_splits_into_its_phases_in_order(accelerator):
    """bench/profile_step.py reads these ranges: every phase once per micro-batch (data, augment,
    forward, backward) or per step (sync, optimizer), in the order they run."""
    parts = toy_parts(accelerator)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train_step(parts, toy_batches(), OptimConfig(grad_accum=2, clip_norm=1.0))
    ranges = sorted((e.time_range.start, e.name) for e in prof.events() if e.name in PHASES)
    data, augment, forward, backward, sync, optimizer = PHASES
    assert [name for _, name in ranges] == [data, augment, forward, backward] * 2 + [sync, optimizer]
