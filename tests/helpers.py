"""What many tests share: running mapdet in subprocesses (one process, or 2 CPU processes through
``accelerate launch``), packing the tiny synthetic set (from its Vistas layout or as COCO JSON), a
tiny training experiment, and a run folder with random weights."""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mapdet.datasets.coco import CocoReader
from mapdet.shards.merge import merge
from mapdet.shards.writer import PackOptions, pack, pack_from

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


def pack_coco(annotations: Path, images: Path, out: Path, split: str, categories=None, **kw) -> dict:
    """``mapdet pack --coco annotations --images images out --split split`` in process, 4 per shard."""
    opts = PackOptions(**{"samples_per_shard": 4, **kw})
    pack_from(CocoReader(annotations, images, categories), out, split, opts)
    return merge(out, split, root=str(annotations)) if opts.num_jobs == 1 else None


# Random weights: scores near 1 / (K + 1); a low model threshold keeps detections to compare.
RANDOM_MODEL = [
    "model.arch=small",
    "model.min_size=128",
    "model.max_size=160",
    "model.score_thresh=0.01",
    "model.detections_per_img=20",
]


def random_run(run: Path, shards: Path, *settings: str) -> Path:
    """A run folder as `mapdet train` leaves it (config.yaml, checkpoints/step_0000007, export/) for
    the training split of ``shards``, with seeded random weights, ``RANDOM_MODEL`` and ``settings``."""
    import json

    import torch
    from safetensors.torch import save_file

    from mapdet.config import load_config, to_yaml
    from mapdet.modeling import trained
    from mapdet.modeling.build import build_inference_model
    from mapdet.shards.manifest import load_manifest

    cfg = load_config(None, [f"data.shards={shards}", f"train.out={run}", *RANDOM_MODEL, *settings])
    classes = load_manifest(shards, "training")["classes"]
    torch.manual_seed(0)
    model = build_inference_model(cfg.model, len(classes) + 1)
    step = run / "checkpoints" / "step_0000007"
    step.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(step / "model.safetensors"))
    (step / "meta.json").write_text(json.dumps({"step": 7}))
    trained.write_export(run / "export", model, cfg.model, classes)
    return run


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
