"""What many tests share: running mapdet in subprocesses (one process, or 2 CPU processes through
``accelerate launch``), packing the tiny synthetic set, and a tiny training experiment."""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from mapdet.shards.merge import merge
from mapdet.shards.writer import PackOptions, pack

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

# The small preset on 160x120 images: about a second per step on one core.
TINY = [
    "model.arch=small",
    "model.min_size=128",
    "model.max_size=160",
    "data.batch_size=2",
    "data.workers=1",
    "data.shuffle_buffer=4",
    "optim.warmup_steps=2",
    "train.log_every=1",
    "eval.workers=0",
    "eval.batch_size=3",
]
TINY_TRAIN = [*TINY, "optim.lr=0.01", "train.image_log_every=2"]


def train_args(shards, out, *extra: str) -> list[str]:
    """``mapdet train`` arguments for the tiny experiment on ``shards``, run folder ``out``."""
    return ["train", "--set", f"data.shards={shards}", f"train.out={out}", *TINY_TRAIN, *extra]


def pack_all(root: Path, out: Path, split: str, **kw) -> dict:
    opts = PackOptions(**{"samples_per_shard": 4, **kw})
    pack(root, out, split, opts)
    return merge(out, split) if opts.num_jobs == 1 else None


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m mapdet ARGS`` in a subprocess; returns the completed process (never raises)."""
    return subprocess.run(
        [sys.executable, "-m", "mapdet", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        cwd=REPO,
    )


def mapdet(capsys, *argv) -> tuple[int, str, str]:
    """``mapdet ARGV`` in this process: (exit code, stdout, stderr). Any exception other than the
    CLI's own exit is a stack trace a user would see, and fails the test."""
    import pytest

    from mapdet import cli

    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def free_port() -> int:
    """A free TCP port on 127.0.0.1, so parallel launches never fight over the default."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_command(args, script: Path | None = None) -> list[str]:
    return [
        ACCELERATE,
        "launch",
        "--config_file",
        str(REPO / "launch/accelerate/cpu2.yaml"),
        "--main_process_port",
        str(free_port()),
        *([str(script)] if script else ["-m", "mapdet"]),
        *args,
    ]


def accelerate_launch(
    *args: str, env: dict | None = None, timeout: float = 600, script: Path | None = None
) -> subprocess.CompletedProcess:
    """``accelerate launch`` with the 2-CPU-process topology, running ``-m mapdet ARGS`` (or
    ``script ARGS``: a test's stand-in for ``mapdet`` that injects a fault)."""
    return subprocess.run(
        _launch_command(args, script),
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        cwd=REPO,
    )


def launch_background(args, log: Path, script: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    """``accelerate_launch`` without waiting, output to ``log``, in a session of its own."""
    return subprocess.Popen(
        _launch_command(args, script),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def wait_for_file(path: Path, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    """Block until ``path`` exists; fail if any of ``procs`` ends first or ``timeout`` passes."""
    end = time.time() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs), f"the run ended before {path} appeared"
        assert time.time() < end, f"{path} did not appear within {timeout} s"
        time.sleep(0.1)


def exported_weights(run: Path) -> dict:
    return load_file(str(run / "export" / "model.safetensors"))


def run_in_ranks(fn, world: int, out: Path) -> list:
    """``fn(rank)`` in ``world`` processes of one gloo group on this machine; what each returned,
    in rank order. ``fn`` must be a module-level function (the processes are spawned, not forked)."""
    import torch.multiprocessing as mp

    mp.spawn(_rank_entry, args=(fn, world, free_port(), str(out)), nprocs=world)
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(world)]


def _rank_entry(rank: int, fn, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a rank left waiting in a collective fails the test in a minute instead of hanging it
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    saved = fn(rank)
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(saved, f)
    dist.destroy_process_group()
