"""Two nodes on one machine, launched exactly as Slurm launches them: two `slurm/node_launch.sh`
invocations (SLURM_NNODES=2, SLURM_NODEID 0 and 1, one CPU process each, the same rank-0 address and
port), each running `accelerate launch --num_machines 2 --machine_rank R`. Training on them equals
training on one node with two processes, a node that dies costs nothing beyond the last
checkpoint, and evaluation across the two nodes equals a single process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch

from tests.helpers import (
    REPO,
    TINY_TRAIN,
    accelerate_launch,
    exported_weights,
    free_port,
    run_cli,
    train_args,
    wait_for_file,
)

STEPS = ["train.max_steps=8", "train.ckpt_every=2", "train.timeout_s=20", "train.image_log_every=0"]


class TwoNodes:
    """Node 0 and node 1 of one job, each a `node_launch.sh` in a session of its own."""

    def __init__(self, args: list[str], log_dir: Path, name: str):
        port, accelerate = str(free_port()), str(Path(sys.executable).with_name("accelerate"))
        self.logs = [log_dir / f"{name}-node{n}.log" for n in (0, 1)]
        self.procs = []
        for node, log in enumerate(self.logs):
            # torch's launcher gives each process 1 thread only when it starts several on a node; one
            # process per node would get 2, and another thread count sums conv gradients in another
            # order (not bit-equal to one node of two processes).
            env = {
                **os.environ,
                "SLURM_NNODES": "2",
                "SLURM_NODEID": str(node),
                "PROCS_PER_NODE": "1",
                "TOPOLOGY": "launch/accelerate/cpu2.yaml",
                "MAIN_ADDR": "127.0.0.1",
                "PORT": port,
                "ACCELERATE": accelerate,
                "OMP_NUM_THREADS": "1",
            }
            self.procs.append(
                subprocess.Popen(
                    ["bash", "slurm/node_launch.sh", "-m", "mapdet", *args],
                    cwd=REPO,
                    env=env,
                    stdout=open(log, "w"),
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    def text(self, node: int) -> str:
        return self.logs[node].read_text(errors="replace")

    def wait(self, timeout: float = 300) -> list[int]:
        try:
            return [p.wait(timeout=timeout) for p in self.procs]
        except subprocess.TimeoutExpired:
            self.kill(0), self.kill(1)
            raise AssertionError(
                f"the nodes did not finish in {timeout} s:\n{self.text(0)[-3000:]}\n{self.text(1)[-3000:]}"
            ) from None

    def kill(self, node: int) -> None:
        """kill -9 of everything on one node: the launcher and its rank (torch puts each rank in a
        session of its own), as a node that loses power."""
        launcher = self.procs[node]
        try:
            groups = {launcher.pid, *(c.pid for c in psutil.Process(launcher.pid).children(recursive=True))}
        except psutil.NoSuchProcess:
            groups = {launcher.pid}
        for pid in groups:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        launcher.wait()


def test_two_nodes_train_like_one_node_survive_a_node_loss_and_evaluate_together(shards, tmp_path):
    # 1. uninterrupted on two nodes = uninterrupted on one node with two processes (same world size)
    straight = TwoNodes(train_args(shards, tmp_path / "straight", *STEPS), tmp_path, "straight")
    assert straight.wait() == [0, 0], straight.text(0)[-3000:] + straight.text(1)[-3000:]
    assert "2 process(es) x data.batch_size 2 x optim.grad_accum 1; 2 node(s)" in straight.text(0)
    assert "weights identical on all 2 rank(s)" in straight.text(0)
    one_node = tmp_path / "one_node"
    r = accelerate_launch(*train_args(shards, one_node, *STEPS))
    assert r.returncode == 0 and "; 1 node(s)" in r.stdout + r.stderr, r.stderr[-3000:]
    expected = exported_weights(tmp_path / "straight")
    for key, value in exported_weights(one_node).items():
        assert torch.equal(value, expected[key]), f"{key}: two nodes differ from one node of two processes"

    # 2. node 1 dies after checkpoint 4: node 0 fails its next collective and exits non-zero
    run = tmp_path / "run"
    job = TwoNodes(train_args(shards, run, *STEPS), tmp_path, "killed")
    wait_for_file(run / "checkpoints" / "step_0000004" / "meta.json", job.procs)
    job.kill(1)
    assert job.wait(timeout=120)[0] != 0 and "a collective failed" in job.text(0), job.text(0)[-3000:]
    assert not (run / "export").exists()

    # 3. both nodes again with --resume auto: the uninterrupted weights, bit for bit
    resumed = TwoNodes(train_args(shards, run, *STEPS, "--resume", "auto"), tmp_path, "resumed")
    assert resumed.wait() == [0, 0], resumed.text(0)[-3000:] + resumed.text(1)[-3000:]
    assert "resumed from" in resumed.text(0)
    got = exported_weights(run)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), f"{key} differs from the uninterrupted run"

    # 4. evaluation across both nodes = one process
    evaluate = ["evaluate", "--checkpoint", "latest", "--set", f"data.shards={shards}", f"train.out={run}", *TINY_TRAIN]
    both = TwoNodes([*evaluate, "--out", str(tmp_path / "eval2")], tmp_path, "eval")
    assert both.wait() == [0, 0], both.text(0)[-3000:] + both.text(1)[-3000:]
    single = run_cli(*evaluate, "--out", str(tmp_path / "eval1"))
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("eval2", "eval1"))
    assert two["images"] == one["images"] == 6 and two["images_left_out"] == 0
    for key in ("AP", "AP50", "AP75", "AR100"):
        assert two["bbox"][key] == pytest.approx(one["bbox"][key], abs=1e-9), key
    for key, value in one["val_loss"].items():
        assert two["val_loss"][key] == pytest.approx(value, rel=1e-5), key
