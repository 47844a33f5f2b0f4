"""Fault injection, processes: kill -9 of one rank or of the whole job at random steps, a stuck
rank (SIGSTOP), a kill while a checkpoint is written, CUDA out of memory on one rank. The survivors
stop within train.timeout_s (at once where the failed rank is gone), the launcher exits non-zero,
and ``--resume auto`` ends at the weights of an uninterrupted run (or goes on from the last
checkpoint, which nothing touched).

Random steps come from MAPDET_FAULT_SEED (printed with every failure; set it to replay a run).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from mapdet.engine import checkpoint
from mapdet.modeling import run_weights
from tests.helpers import REPO, accelerate_launch, exported_weights, launch_background, run_cli, train_args

TIMEOUT_S = 20
STEPS = ["train.max_steps=16", "train.ckpt_every=2", f"train.timeout_s={TIMEOUT_S}", "train.image_log_every=0"]
SEED = int(os.environ.get("MAPDET_FAULT_SEED", time.time_ns() % 100_000))
REPLAY = f"(replay with MAPDET_FAULT_SEED={SEED})"


class Job:
    """A background 2-process training launch, always SIGKILLed whole at exit.

    torch's elastic agent starts each rank in a session of its own, so killing the launcher's
    process group leaves the ranks running: ``kill_all`` also kills every rank's group (the rank
    and its DataLoader workers), as a scheduler's cancel would.
    """

    def __init__(self, shards: Path, run: Path, log: Path, resume: bool):
        self.run, self.log, self.ranks = run, log, set()
        self.proc = launch_background(train_args(shards, run, *STEPS) + (["--resume", "auto"] if resume else []), log)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill_all()  # whatever happened: nothing of this job survives
        self.proc.wait()

    def kill_all(self) -> None:
        self._track()
        for group in (self.proc.pid, *self.ranks):
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _track(self) -> None:
        try:
            self.ranks |= {c.pid for c in psutil.Process(self.proc.pid).children()}
        except psutil.NoSuchProcess:
            pass

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_checkpoint_after(self, step: int, skip: int, timeout: float = 300) -> int:
        """Block until the (skip+1)-th complete checkpoint after ``step`` exists; returns its step."""
        target = step + 2 * (skip + 1)
        end = time.time() + timeout
        while run_weights.latest(self.run) is None or _step(run_weights.latest(self.run)) < target:
            self._track()
            assert self.proc.poll() is None, f"training ended before step {target} {REPLAY}:\n{self.text()[-3000:]}"
            assert time.time() < end, f"no checkpoint {target} {REPLAY}"
            time.sleep(0.05)
        return target

    def rank_pid(self, rank: int) -> int:
        for child in psutil.Process(self.proc.pid).children():
            if child.environ().get("RANK") == str(rank):
                return child.pid
        raise AssertionError(f"no rank {rank} under the launcher {REPLAY}")

    def wait(self, timeout: float) -> tuple[int, float]:
        start = time.time()
        try:
            return self.proc.wait(timeout=timeout), time.time() - start
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the launcher did not exit within {timeout} s {REPLAY}:\n{self.text()[-3000:]}"
            ) from None

    def wait_for_text(self, needle: str, timeout: float) -> float:
        start = time.time()
        while needle not in self.text():
            self._track()
            assert time.time() - start < timeout, (
                f"{needle!r} not in the log after {timeout} s {REPLAY}:\n{self.text()[-3000:]}"
            )
            time.sleep(0.1)
        return time.time() - start


def _step(path: Path) -> int:
    return int(path.name.split("_")[1])


def _plant_partial_checkpoint(run: Path) -> Path:
    """What a kill between writing meta.json and the rename leaves: a .tmp folder of a later step
    with a meta.json but truncated weights. ``latest`` must ignore it."""
    last = run_weights.latest(run)
    tmp = last.with_name(f"step_{_step(last) + 1:07d}.tmp")
    shutil.copytree(last, tmp)
    weights = tmp / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return tmp


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shards) -> dict:
    run = tmp_path_factory.mktemp("straight") / "run"
    r = accelerate_launch(*train_args(shards, run, *STEPS))
    assert r.returncode == 0, r.stderr[-3000:]
    return exported_weights(run)


def test_kills_and_a_stuck_rank_at_random_steps_resume_to_the_uninterrupted_weights(shards, straight, tmp_path):
    rng, run, timings = random.Random(SEED), tmp_path / "run", {}

    # 1. kill -9 of ONE rank: the other fails its next collective at once, the launcher exits non-zero
    with Job(shards, run, tmp_path / "1.log", resume=False) as job:
        job.wait_for_checkpoint_after(0, skip=rng.randrange(2))
        time.sleep(rng.uniform(0, 0.5))  # anywhere in the next steps, a checkpoint write included
        victim = rng.randrange(2)
        os.kill(job.rank_pid(victim), signal.SIGKILL)
        rc, timings["launcher exit after kill -9 of one rank"] = job.wait(timeout=TIMEOUT_S + 30)
        assert rc != 0 and f"[rank {1 - victim}] stopping at step" in job.text(), REPLAY
        assert "a collective failed" in job.text() and timings["launcher exit after kill -9 of one rank"] < TIMEOUT_S

    # 2. a later checkpoint that was being written when the job died: resume must not use it
    resume_at = run_weights.latest(run)
    planted = _plant_partial_checkpoint(run)
    assert run_weights.latest(run) == resume_at

    # 3. a stuck rank (SIGSTOP): the other times out after train.timeout_s, the launcher exits non-zero
    with Job(shards, run, tmp_path / "3.log", resume=True) as job:
        job.wait_for_checkpoint_after(_step(resume_at), skip=rng.randrange(2) if _step(resume_at) <= 4 else 0)
        assert f"resumed from {resume_at}" in job.text()
        time.sleep(rng.uniform(0, 0.5))
        victim = rng.randrange(2)
        os.kill(job.rank_pid(victim), signal.SIGSTOP)
        timings["survivor's error after SIGSTOP of one rank"] = job.wait_for_text(
            f"[rank {1 - victim}] stopping at step", timeout=TIMEOUT_S + 30
        )
        rc, rest = job.wait(timeout=60)  # torch elastic gives the stopped rank 30 s to obey SIGTERM
        timings["launcher exit after SIGSTOP of one rank"] = (
            timings["survivor's error after SIGSTOP of one rank"] + rest
        )
        assert rc != 0 and f"train.timeout_s={TIMEOUT_S}" in job.text(), REPLAY
        # the survivor may have been waiting on the stopped rank a little before the stop
        assert TIMEOUT_S / 2 < timings["survivor's error after SIGSTOP of one rank"] < TIMEOUT_S + 15, (timings, REPLAY)
    assert not planted.exists()  # the first save after resuming removed the stale folder

    # 4. kill -9 of the whole job: launcher, ranks, DataLoader workers
    with Job(shards, run, tmp_path / "4.log", resume=True) as job:
        job.wait_for_text("resumed from", timeout=120)
        job.wait_for_checkpoint_after(_step(run_weights.latest(run)), skip=0)
        time.sleep(rng.uniform(0, 0.5))
        job.kill_all()
        time.sleep(0.5)
        alive = [p.pid for p in psutil.process_iter(["cmdline"]) if str(run) in " ".join(p.info["cmdline"] or [])]
        assert not alive, f"processes of the killed job still run: {alive}"

    # 5. resume to the end: the same weights as the uninterrupted run
    r = accelerate_launch(*train_args(shards, run, *STEPS), "--resume", "auto")
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
    got = exported_weights(run)
    assert got.keys() == straight.keys()
    for k in straight:
        assert torch.equal(got[k], straight[k]), f"{k} differs from the uninterrupted run {REPLAY}"
    assert not list((run / "checkpoints").glob("*.tmp"))
    print(f"\nfault timings {REPLAY}: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


class _Killed(BaseException):
    """Stands for SIGKILL: nothing catches it."""


def test_a_kill_while_a_checkpoint_is_written_leaves_the_previous_one_in_use(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)

    def train_step():
        model(torch.randn(4, 3)).square().sum().backward()
        opt.step()
        sched.step()

    train_step()
    checkpoint.save(tmp_path, 1, model, opt, sched, None, {"batches": 1, "counters": {}}, keep_last=3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    train_step()
    calls = []

    def dying_save(obj, f):  # the rank's RNG file goes through; the optimizer's is cut short
        calls.append(f)
        if len(calls) == 2:
            Path(f).write_bytes(b"\x80\x02partial")
            raise _Killed
        return torch_save(obj, f)

    torch_save = torch.save
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(_Killed):
        checkpoint.save(tmp_path, 2, model, opt, sched, None, {"batches": 2, "counters": {}}, keep_last=3)
    monkeypatch.undo()
    root = run_weights.checkpoints_dir(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000002.tmp"]
    (root / "step_0000002.tmp" / "meta.json").write_text('{"step": 2}')  # even one that got as far as meta.json
    assert run_weights.latest(tmp_path) == run_weights.resolve(tmp_path, "auto") == root / "step_0000001"

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)
    meta = checkpoint.load(
        run_weights.latest(tmp_path), fresh, fresh_opt, torch.optim.lr_scheduler.StepLR(fresh_opt, 1)
    )
    assert meta["step"] == 1 and all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    checkpoint.save(tmp_path, 2, model, opt, sched, None, {"batches": 2, "counters": {}}, keep_last=3)
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000002"]


def test_out_of_memory_on_one_rank_stops_every_rank_at_once_and_keeps_the_last_checkpoint(shards, tmp_path):
    """torch.cuda.OutOfMemoryError in rank 1's forward of step 3 (tests/faults/inject_oom.py), with
    train.timeout_s at its default of 600 s: rank 1 says what to lower in one line and leaves the
    group, rank 0 (waiting for it in DDP's gradient all-reduce) fails at once, the launcher exits."""
    run, log = tmp_path / "run", tmp_path / "oom.log"
    args = train_args(shards, run, "train.max_steps=8", "train.ckpt_every=2", "train.image_log_every=0")
    env = {"MAPDET_OOM_STEP": "3", "MAPDET_OOM_RANK": "1"}
    proc = launch_background(args, log, script=REPO / "tests" / "faults" / "inject_oom.py", env=env)
    seen: dict[str, float] = {}
    try:
        start = time.time()
        while proc.poll() is None and time.time() - start < 600:
            text = log.read_text(errors="replace")
            for name, needle in (("oom", "CUDA out of memory"), ("survivor", "[rank 0] stopping at step")):
                if name not in seen and needle in text:
                    seen[name] = time.time()
            time.sleep(0.05)
        seen["exit"] = time.time()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    lines = re.findall(r"\[rank \d\] CUDA out of memory[^\r\n]*", text)  # after a progress bar, maybe
    assert len(lines) == 1 and lines[0].startswith(
        "[rank 1] CUDA out of memory in training step 3 with data.batch_size=2 "
    ), text[-3000:]
    assert "optim.grad_accum" in lines[0] and "model.max_size=160" in lines[0]
    assert "the last checkpoint (step_0000002) is intact" in lines[0]
    assert "OutOfMemoryError" not in text and "[rank1]:" not in text  # no traceback from the rank
    survivor = re.search(r"\[rank 0\] stopping at step 2[^\r\n]*", text).group()
    assert "a collective failed" in survivor and "timed out" not in survivor.lower(), survivor
    told, ended = seen["survivor"] - seen["oom"], seen["exit"] - seen["oom"]
    assert proc.returncode not in (0, None) and told < 60, (proc.returncode, told)  # not the 600 s timeout
    assert [p.name for p in run_weights.list_checkpoints(run)] == ["step_0000002"]
    assert not list((run / "checkpoints").glob("*.tmp"))
    print(
        f"\nafter the out-of-memory line: the other rank failed {told:.1f} s later, the launcher exited {ended:.1f} s"
    )

    r = run_cli(*train_args(shards, run, "train.max_steps=4", "train.image_log_every=0"), "--resume", "auto")
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr, r.stderr[-3000:]
    assert [p.name for p in run_weights.list_checkpoints(run)][-1] == "step_0000004"
