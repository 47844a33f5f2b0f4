"""mapdet.engine.loop: the decisions every rank must take alike (stop, peer lost) and the state
written to checkpoints."""

from __future__ import annotations

import pytest
import torch

from mapdet.config import Config
from mapdet.engine.loop import Counters, LoopState, rank_failure, stop_reason


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
