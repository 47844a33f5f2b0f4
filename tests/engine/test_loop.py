"""mapdet.engine.loop: the decisions every rank must take alike (stop, peer lost), the state
written to checkpoints, 0 = off for checkpoints and logs, and running out of CUDA memory."""

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
    OutOfMemory,
    SanitizedTally,
    rank_failure,
    stop_reason,
    train_loop,
)
from mapdet.modeling import run_weights
from tests.engine.toy import Toy, toy_batches, toy_parts


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
    return [int(p.name.split("_")[1]) for p in run_weights.list_checkpoints(run)]


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


class _OutOfMemoryAt(Toy):
    """A ``Toy`` whose ``n``-th forward runs out of CUDA memory (as torch raises it, on any device)."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, images, targets):
        self.calls += 1
        if self.calls == self.n:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(images, targets)


@pytest.mark.parametrize("global_batch", [None, 4])
def test_out_of_memory_names_the_settings_to_lower_and_keeps_the_last_checkpoint(accelerator, tmp_path, global_batch):
    cfg = _loop_config(ckpt_every=2, max_steps=8)
    cfg.data.global_batch, cfg.model.max_size = global_batch, 800
    parts = toy_parts(accelerator, _OutOfMemoryAt(5))
    with pytest.raises(OutOfMemory) as e:
        train_loop(parts, SanitizedTally(toy_batches()), cfg, LoopState(), tmp_path, {}, None)
    line = str(e.value)
    assert "\n" not in line and line.startswith("[rank 0] CUDA out of memory in training step 5 with ")
    assert (
        ("data.global_batch=4" in line and "optim.grad_accum=1" in line)
        if global_batch
        else "data.batch_size=2" in line
    )
    assert "model.max_size=800" in line and "the last checkpoint (step_0000004) is intact" in line
    assert _steps_saved(tmp_path) == [2, 4] and not list(run_weights.checkpoints_dir(tmp_path).glob("*.tmp"))
    meta = checkpoint.load(run_weights.latest(tmp_path), Toy())  # whole and loadable
    assert meta["step"] == 4 and meta["batches"] == 4


def test_out_of_memory_in_validation_names_the_eval_batch(accelerator, tmp_path):
    def validate(step):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    cfg = _loop_config(eval_every=2, ckpt_every=2)
    with pytest.raises(
        OutOfMemory,
        match=r"in validation after step 2 with eval.batch_size=2 images per GPU.*: lower eval.batch_size"
        r".*the last checkpoint \(step_0000002\) is intact",
    ):
        train_loop(toy_parts(accelerator), SanitizedTally(toy_batches()), cfg, LoopState(), tmp_path, {}, validate)
