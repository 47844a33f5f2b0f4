"""Training end to end through `accelerate launch` with 2 connected CPU processes (gloo DDP)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from mapdet.config import ModelConfig
from mapdet.evaluation.coco import evaluate_coco
from mapdet.modeling.build import build_model
from tests.helpers import (
    TINY_TRAIN,
    accelerate_launch,
    exported_weights,
    launch_background,
    run_cli,
    train_args,
    wait_for_file,
)
from tests.shards.loopback import LoopbackServer


def _scalars(run: Path, tag: str) -> list[float]:
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_two_process_training_learns_logs_checkpoints_and_exports(shards, tmp_path):
    run = tmp_path / "run"
    every_box = "model.score_thresh=0.0"  # a barely trained model's detections, for detections.json below
    r = accelerate_launch(
        *train_args(
            shards,
            run,
            "train.max_steps=16",
            "train.ckpt_every=8",
            "train.keep_last=1",
            "train.eval_every=8",
            every_box,
        )
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "weights identical on all 2 rank(s)" in r.stdout + r.stderr
    losses = _scalars(run, "train/loss")
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # the loss falls
    for tag in (
        "train/lr",
        "train/grad_norm",
        "train/images_per_s",
        "train/data_wait",
        "val/AP",
        "val/loss",
        "val/AP50",
    ):
        assert _scalars(run, tag), tag
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000016"]  # keep_last=1
    assert (run / "config.yaml").exists() and (run / "metrics_step_0000016.json").exists()
    state = load_file(str(run / "export" / "model.safetensors"))
    model = build_model(
        ModelConfig(arch="small", min_size=128, max_size=160),
        num_classes=len(json.loads((run / "export" / "classes.json").read_text())["classes"]) + 1,
    )
    model.load_state_dict(state, strict=True)

    # One validation loss and one AP for one model: training's validation at step 16 (2 ranks, each
    # with its own BatchNorm update until rank 0's are broadcast) = `mapdet evaluate` of checkpoint 16.
    r = accelerate_launch(
        "evaluate",
        "--checkpoint",
        "latest",
        "--out",
        str(tmp_path / "eval"),
        "--set",
        f"data.shards={shards}",
        f"train.out={run}",
        *TINY_TRAIN,
        every_box,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    during = json.loads((run / "metrics_step_0000016.json").read_text())
    after = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert during["val_loss"].keys() == after["val_loss"].keys() and "loss_classifier" in after["val_loss"]
    for key, value in during["val_loss"].items():
        assert after["val_loss"][key] == pytest.approx(value, rel=1e-5), key
    for key in ("AP", "AP50", "AP75"):
        assert after["bbox"][key] == pytest.approx(during["bbox"][key], abs=1e-9), key
    # detections.json, streamed to rank 0 one rank at a time, holds what was scored, in that order
    written = json.loads((tmp_path / "eval" / "detections.json").read_text())
    rescored = evaluate_coco(json.loads((shards / "validation.coco.json").read_text()), written).summary()
    assert len(written) > 0 and [rescored[k] for k in ("AP", "AP50")] == [after["bbox"][k] for k in ("AP", "AP50")]


def _workers(launcher_pid: int) -> list[int]:
    import psutil

    # direct children only: DataLoader workers (grandchildren) share the command line
    return [c.pid for c in psutil.Process(launcher_pid).children() if "mapdet" in " ".join(c.cmdline())]


def test_kill_then_resume_and_sigusr1_preemption_end_at_the_uninterrupted_weights(shards, tmp_path):
    steps = ["train.max_steps=8", "train.ckpt_every=3"]
    straight = tmp_path / "straight"
    r = accelerate_launch(*train_args(shards, straight, *steps))
    assert r.returncode == 0, r.stderr[-3000:]

    # kill -9 of the whole job once step 3's checkpoint exists, then --resume auto
    killed = tmp_path / "killed"
    proc = launch_background(train_args(shards, killed, *steps), tmp_path / "killed.log")
    wait_for_file(killed / "checkpoints" / "step_0000003" / "meta.json", [proc])
    ranks = _workers(proc.pid)
    for group in (proc.pid, *ranks):  # torch starts each rank in a session of its own
        os.killpg(group, signal.SIGKILL)
    proc.wait()
    assert ranks and not (killed / "export").exists()  # really killed before the end
    r = accelerate_launch(*train_args(shards, killed, *steps), "--resume", "auto")
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]

    # SIGUSR1 to ONE rank: both ranks checkpoint the same step, exit 75 (launcher: non-zero) + marker
    pre = tmp_path / "preempted"
    proc = launch_background(train_args(shards, pre, *steps), tmp_path / "pre.log")
    wait_for_file(pre / "checkpoints" / "step_0000003" / "meta.json", [proc])
    os.kill(_workers(proc.pid)[-1], signal.SIGUSR1)
    assert proc.wait(timeout=300) != 0
    log = (tmp_path / "pre.log").read_text()
    assert "exiting 75" in log and (pre / "PREEMPTED").exists(), log[-3000:]
    step = int((pre / "PREEMPTED").read_text().split()[1])
    assert 3 <= step < 8 and (pre / "checkpoints" / f"step_{step:07d}" / "meta.json").exists()
    r = accelerate_launch(*train_args(shards, pre, *steps), "--resume", "auto")
    assert r.returncode == 0 and not (pre / "PREEMPTED").exists(), r.stderr[-3000:]

    ref = exported_weights(straight)
    for run in (killed, pre):
        got = exported_weights(run)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), f"{run.name}: {k} differs from the uninterrupted run"


def test_training_from_http_ends_at_the_weights_of_training_from_the_folder(shards, tmp_path):
    """The same shards served by a real HTTP server on the loopback address, with a connection dropped
    mid-shard once in training and once in validation: retried, so nothing differs."""
    steps = ["train.max_steps=4", "train.ckpt_every=4", "train.image_log_every=0"]
    r = run_cli(*train_args(shards, tmp_path / "local", *steps), timeout=600)  # a loaded CI machine: minutes
    assert r.returncode == 0, r.stderr[-3000:]
    with LoopbackServer(shards) as server:
        server.fault("training-000001.tar", "drop", times=1)
        server.fault("validation-000000.tar", "drop", times=1)
        r = run_cli(*train_args(server.url, tmp_path / "http", *steps, "data.stream_retries=1"), timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped bad sample" not in r.stdout + r.stderr
    assert server.requests["training-000001.tar"] >= 2 and server.requests["validation-000000.tar"] == 2
    ref, got = exported_weights(tmp_path / "local"), exported_weights(tmp_path / "http")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    metrics = [json.loads((tmp_path / run / "metrics_step_0000004.json").read_text()) for run in ("local", "http")]
    assert metrics[0] == metrics[1] and metrics[0]["images"] == 6


def test_single_process_bf16_autocast_runs(shards, tmp_path):
    r = run_cli(*train_args(shards, tmp_path / "bf16", "train.max_steps=2", "train.mixed_precision=bf16"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_scalars(tmp_path / "bf16", "train/loss")) == 2


@pytest.mark.parametrize("override,needle", [("optim.lrr=1", "optim.lrr"), ("train.max_steps=many", "train.max_steps")])
def test_config_errors_name_the_key(tmp_path, override, needle):
    r = run_cli("train", "--set", override)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr
