"""slurm/*.sbatch submitted for real to a private two-node Slurm cluster (tests/slurm_cluster.sh:
two slurmd daemons on this one machine, so `--nodes=2` jobs run one task per node as on a cluster).

The same scripts a GPU cluster runs, with CPU settings: --gpus-per-node=0, TOPOLOGY=cpu2.yaml and
PROCS_PER_NODE=2 (two gloo processes on one node) or 1 (one on each of two nodes). Jobs are polled
with `scontrol show job -o` (sbatch --wait polls every 10 s). Skipped, saying why, only where this
machine cannot run Slurm at all (not root, or Slurm missing and no apt-get); any other failure of
the cluster fails the tests.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from mapdet.shards.manifest import load_manifest
from tests.helpers import REPO, free_port

pytestmark = pytest.mark.slurm

CLUSTER_SCRIPT = REPO / "tests" / "slurm_cluster.sh"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
CPUS = str(min(2, os.cpu_count() or 1))
# A minute-long CPU experiment: the "small" preset on 160x120 images, 2 images per rank per step.
TINY_CONFIG = """\
data: {batch_size: 2, workers: 1, shuffle_buffer: 4}
model: {arch: small, min_size: 128, max_size: 160}
optim: {warmup_steps: 2}
train: {log_every: 1}
eval: {workers: 0}
"""


class Cluster:
    """Client side of the running test cluster: submit, inspect and wait for jobs."""

    def __init__(self, conf: str, out: Path):
        self.env = {**os.environ, "SLURM_CONF": conf}
        self.out = out  # job logs go here, named NAME-JOBID.out

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, cwd=REPO, timeout=60)
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr}"
        return proc

    def options(self, name: str) -> list[str]:
        return [f"--job-name={name}", f"--output={self.out}/%x-%j.out", "--time=15"]

    def sbatch(self, script: str, *options: str, **variables: str) -> int:
        """Submit slurm/SCRIPT with variables passed through --export; returns the job id."""
        assert not any("," in v for v in variables.values()), "--export splits on commas"
        export = ",".join(["ALL", *(f"{k}={v}" for k, v in variables.items())])
        out = self.run("sbatch", "--parsable", f"--export={export}", *options, str(REPO / "slurm" / script))
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """JobState, Restarts, ExitCode and Reason of one job (the first line for an array)."""
        line = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout.splitlines()[0]
        return dict(re.findall(r"\b(JobState|Restarts|ExitCode|Reason)=(\S+)", line))

    def wait(self, job_id: int, timeout: float, until=None) -> dict[str, str]:
        """Poll until the job ended (or ``until()`` is true); cancel it and fail on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in DONE or (until is not None and until()):
                return info
            time.sleep(0.3)
        subprocess.run(["scancel", str(job_id)], env=self.env)
        pytest.fail(f"job {job_id} still {info} after {timeout:.0f} s\n{self.logs(job_id)}")

    def log(self, name: str, job_id: int) -> str:
        path = self.out / f"{name}-{job_id}.out"
        return path.read_text(errors="replace").replace("\r", "\n") if path.exists() else f"(no {path})"

    def logs(self, job_id: int) -> str:
        """Tail of every log of this job id, for failure messages."""
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace").replace("\r", "\n")[-3000:]
            for p in sorted(self.out.glob(f"*-{job_id}.out"))
        )


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    # munged needs every folder above its socket searchable by all users; pytest's tmp is 0700.
    home = Path(tempfile.mkdtemp(prefix="mapdet-slurm.", dir="/tmp"))
    start = subprocess.run(
        ["bash", str(CLUSTER_SCRIPT), "start", str(home), "2"], capture_output=True, text=True, timeout=600
    )
    if start.returncode == 3:
        shutil.rmtree(home, ignore_errors=True)
        pytest.skip(f"this machine cannot run Slurm: {start.stderr.strip()}")
    assert start.returncode == 0, f"tests/slurm_cluster.sh start failed:\n{start.stdout}\n{start.stderr}"
    conf = start.stdout.strip().splitlines()[-1].removeprefix("SLURM_CONF=")
    try:
        yield Cluster(conf, tmp_path_factory.mktemp("slurm-logs"))
    finally:
        stop = subprocess.run(
            ["bash", str(CLUSTER_SCRIPT), "stop", str(home)], capture_output=True, text=True, timeout=120
        )
        assert stop.returncode == 0, f"tests/slurm_cluster.sh stop failed: {stop.stderr}"
        shutil.rmtree(home, ignore_errors=True)


def wait_ok(cluster: Cluster, job_id: int, name: str, timeout: float) -> str:
    """Wait for a job that must succeed; returns its log."""
    info = cluster.wait(job_id, timeout)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (
        f"{name} job {job_id}: {info}\n{cluster.logs(job_id)}"
    )
    return cluster.log(name, job_id)


# ---------------------------------------------------------------- packing: array + dependent merge


def submit_pack(cluster: Cluster, root: Path, out: Path, jobs: int) -> tuple[int, int]:
    env = {
        **cluster.env,
        "ROOT": str(root),
        "OUT": str(out),
        "SPLIT": "training",
        "SAMPLES_PER_SHARD": "2",
        "MAPDET_ENV": sys.prefix,
    }
    proc = subprocess.run(
        [
            "bash",
            str(REPO / "slurm/submit_pack.sh"),
            str(jobs),
            "--cpus-per-task=1",
            f"--output={cluster.out}/%x-%j.out",
            "--time=15",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    array, merge = map(int, proc.stdout.split())
    return array, merge


def test_pack_array_then_merge_and_verify(cluster, synth_root, tmp_path):
    out = tmp_path / "shards"
    array, merge = submit_pack(cluster, synth_root, out, jobs=3)
    merge_log = wait_ok(cluster, merge, "mapdet-merge", timeout=180)
    assert cluster.job(array)["JobState"] == "COMPLETED"

    task_logs = [t for t in (p.read_text() for p in cluster.out.glob("mapdet-pack-*.out")) if f"into {out}\n" in t]
    assert sorted(re.search(r"slice (\d/\d)", t).group(1) for t in task_logs) == ["1/3", "2/3", "3/3"]
    assert all("packed 2 shard(s)" in t for t in task_logs), task_logs
    manifest = load_manifest(out, "training")
    assert manifest["num_samples"] == 12 and len(manifest["shards"]) == 6
    keys = [k for s in manifest["shards"] for k in s["keys"]]
    assert len(keys) == len(set(keys)) == 12
    assert "1 split(s), 0 problem(s)" in merge_log
    verify = subprocess.run([sys.executable, "-m", "mapdet", "verify", str(out)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout


def test_merge_never_runs_after_a_failed_pack(cluster, tmp_path):
    out = tmp_path / "shards"
    array, merge = submit_pack(cluster, tmp_path / "no-such-download", out, jobs=2)
    info = cluster.wait(merge, timeout=120)
    assert info["JobState"] == "CANCELLED", info  # afterok unsatisfiable + --kill-on-invalid-dep
    assert cluster.job(array)["JobState"] == "FAILED"
    assert not (out / "training.manifest.json").exists()


# ---------------------------------------------------------------- training, requeue, evaluation


def submit_accelerate(
    cluster: Cluster, name: str, script: str, shards: Path, run: Path, sets: str = "", nodes: int = 1, **variables
) -> int:
    """train.sbatch or evaluate.sbatch with the tiny experiment on 2 CPU processes: both on one node,
    or one on each of ``nodes=2``."""
    config = run.parent / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    return cluster.sbatch(
        script,
        *cluster.options(name),
        f"--nodes={nodes}",
        "--gpus-per-node=0",
        f"--cpus-per-task={CPUS}",
        MAPDET_ENV=sys.prefix,
        CONFIG=str(config),
        SETS=f"data.shards={shards} {sets}".strip(),
        RUN_DIR=str(run),
        TOPOLOGY="launch/accelerate/cpu2.yaml",
        PROCS_PER_NODE=str(2 // nodes),
        PORT=str(free_port()),
        **variables,
    )


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*") if (p / "meta.json").exists())


@pytest.fixture(scope="module")
def trained(cluster, shards, tmp_path_factory):
    """A finished 4-step, 2-process training job: (job id, run folder, log)."""
    run = tmp_path_factory.mktemp("train") / "run"
    job = submit_accelerate(cluster, "train", "train.sbatch", shards, run, "train.max_steps=4 train.ckpt_every=2")
    return job, run, wait_ok(cluster, job, "train", timeout=300)


def test_train_two_processes_finish_without_requeue(cluster, trained):
    job, run, log = trained
    assert cluster.job(job)["Restarts"] == "0"
    assert "weights identical on all 2 rank(s)" in log  # two processes, joined in one DDP group
    assert checkpoint_steps(run)[-1] == 4
    assert json.loads((run / "checkpoints/step_0000004/meta.json").read_text())["step"] == 4
    assert (run / "export" / "model.safetensors").exists()
    assert not (run / "PREEMPTED").exists() and "requeue" not in log


def test_usr1_checkpoints_requeues_and_resumes(cluster, shards, tmp_path):
    run = tmp_path / "run"
    job = submit_accelerate(cluster, "requeue", "train.sbatch", shards, run, "train.max_steps=24 train.ckpt_every=3")
    info = cluster.wait(job, timeout=300, until=lambda: bool(checkpoint_steps(run)))
    assert info["JobState"] == "RUNNING", f"training ended before its first checkpoint: {info}\n{cluster.logs(job)}"
    cluster.run("scancel", "--signal=USR1", "--batch", str(job))  # what --signal=B:USR1@N sends

    log = wait_ok(cluster, job, "requeue", timeout=300)
    assert cluster.job(job)["Restarts"] == "1", log
    assert "restart 0," in log and "restart 1," in log, log
    stopped = re.search(r"preempted \(SIGUSR1\): checkpoint at step (\d+) written", log)
    assert stopped, f"training did not checkpoint on SIGUSR1:\n{log}"
    step = int(stopped.group(1))
    assert 3 <= step < 24, log
    assert re.search(rf"resumed from \S+/step_{step:07d} at step {step}\b", log), log  # not from step 0
    assert log.count("resumed from") == 1
    assert checkpoint_steps(run)[-1] == 24
    assert json.loads((run / "checkpoints/step_0000024/meta.json").read_text())["step"] == 24
    assert not (run / "PREEMPTED").exists()


def test_evaluate_writes_metrics(cluster, trained, shards, tmp_path):
    _, run, _ = trained
    out = tmp_path / "eval"
    job = submit_accelerate(cluster, "eval", "evaluate.sbatch", shards, run, EVAL_OUT=str(out))
    wait_ok(cluster, job, "eval", timeout=300)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 6 and metrics["images_left_out"] == 0
    assert 0.0 <= metrics["bbox"]["AP50"] <= 1.0
    assert isinstance(json.loads((out / "detections.json").read_text()), list)


def test_train_and_evaluate_on_two_nodes(cluster, shards, tmp_path):
    run = tmp_path / "run"
    job = submit_accelerate(
        cluster, "train2", "train.sbatch", shards, run, "train.max_steps=4 train.ckpt_every=2", nodes=2
    )
    log = wait_ok(cluster, job, "train2", timeout=300)
    assert re.search(r"training on 2 node\(s\) \(\S+-\[0-1\]\)", log), log
    assert "2 process(es) x data.batch_size 2 x optim.grad_accum 1; 2 node(s)" in log, log
    assert "weights identical on all 2 rank(s)" in log  # one DDP group across the two nodes
    assert checkpoint_steps(run)[-1] == 4 and (run / "export" / "model.safetensors").exists()

    out = tmp_path / "eval"
    job = submit_accelerate(cluster, "eval2", "evaluate.sbatch", shards, run, nodes=2, EVAL_OUT=str(out))
    log = wait_ok(cluster, job, "eval2", timeout=300)
    assert "on 2 node(s)" in log, log
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == 6 and metrics["images_left_out"] == 0
