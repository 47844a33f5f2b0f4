"""mapdet.engine.loop: the decisions every rank must take alike (stop, peer lost), the state
written to checkpoints, and 0 = off for checkpoints and logs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mapdet import tracking
from mapdet.config import Config
from mapdet.engine import checkpoint
from mapdet.engine.loop import (
    Counters,
    LoopState,
    SanitizedTally,
    rank_failure,
    stop_reason,
    train_loop,
)
from tests.engine.toy import toy_batches, toy_parts


@pytest.mark.parametrize(
    "message",
    [
        "Application timeout caused pair closure",  # gloo, in DDP's buffer broadcast
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234",
        "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms",
        "Connection reset by peer",
    ],
)
def test_a_lost_peer_is_recognised_in_every_form_gloo_reports_it(message):
    assert rank_failure(RuntimeError(message))


def test_other_runtime_errors_are_not_mistaken_for_a_lost_peer():
    assert not rank_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert rank_failure(torch.distributed.DistError("anything a c10d backend raises"))


def test_state_round_trips_through_checkpoint_meta():
    state = LoopState(step=12, batches=24, counters=Counters(3, 2, 48, 5, {"train-000001.tar": 2}))
    meta = {"step": 12, **state.meta(global_batch=8, processes=2)}
    assert meta["global_batch"] == 8 and meta["counters"]["bad_by_shard"] == {"train-000001.tar": 2}
    back = LoopState.from_meta(meta)
    assert back == state and back.nonfinite_in_row == 0


def test_stop_reasons():
    cfg = Config()
    cfg.train.max_nonfinite, cfg.train.max_bad_samples = 3, 0.1
    assert stop_reason(cfg, LoopState(nonfinite_in_row=2)) == ""
    assert "3 steps in a row had a non-finite loss" in stop_reason(cfg, LoopState(nonfinite_in_row=3))
    few = LoopState(counters=Counters(bad_samples=5, samples=40))  # 45 seen: too few to judge
    assert stop_reason(cfg, few) == ""
    many = LoopState(counters=Counters(bad_samples=11, samples=89, bad_by_shard={"s.tar": 11}))
    assert "11 of 100 training samples were corrupt" in stop_reason(cfg, many) and "s.tar 11" in stop_reason(cfg, many)


def _loop_config(**train) -> Config:
    cfg = Config()
    cfg.train.max_steps, cfg.train.image_log_every, cfg.train.keep_last = 4, 0, 10
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def _steps_saved(run: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in checkpoint.list_checkpoints(run)]


@pytest.mark.parametrize("ckpt_every, saved", [(0, [4]), (1, [1, 2, 3, 4]), (3, [3, 4])])
@pytest.mark.parametrize("log_every, logged", [(0, []), (2, [1, 2, 4])])
def test_zero_means_off_for_checkpoints_and_logs(
    accelerator, tmp_path, monkeypatch, ckpt_every, saved, log_every, logged
):
    steps = []
    monkeypatch.setattr(tracking, "scalars", lambda acc, values, step: steps.append(step))
    cfg = _loop_config(ckpt_every=ckpt_every, log_every=log_every)
    code = train_loop(toy_parts(accelerator), SanitizedTally(toy_batches()), cfg, LoopState(), tmp_path, {}, None)
    assert code == 0 and _steps_saved(tmp_path) == saved and steps == logged
