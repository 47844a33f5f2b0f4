"""Shared fixtures: a tiny synthetic Vistas download and its packed shards, made once per session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mapdet.shards.writer import PackOptions, merge, pack
from mapdet.datasets.synthetic.writer import SynthConfig, synthesize

REPO = Path(__file__).resolve().parents[1]
TINY = SynthConfig(size=(160, 120))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """v2.0 download: 12 training and 6 validation images of 160x120."""
    return Path(synthesize(tmp_path_factory.mktemp("vistas") / "raw", "v2.0", n_train=12, n_val=6, seed=0, cfg=TINY))


def pack_all(root: Path, out: Path, split: str, **kw) -> dict:
    opts = PackOptions(**{"samples_per_shard": 4, **kw})
    pack(root, out, split, opts)
    return merge(out, split) if opts.num_jobs == 1 else None


@pytest.fixture(scope="session")
def shards(tmp_path_factory, synth_root) -> Path:
    """Both splits packed 4 samples per shard (3 training shards, 2 validation shards)."""
    out = tmp_path_factory.mktemp("shards")
    pack_all(synth_root, out, "training")
    pack_all(synth_root, out, "validation")
    return out


@pytest.fixture
def copy_root(tmp_path, synth_root) -> Path:
    """A private copy of the synthetic download that a test may damage."""
    dst = tmp_path / "raw"
    shutil.copytree(synth_root, dst)
    return dst


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m mapdet ARGS`` in a subprocess; returns the completed process (never raises)."""
    return subprocess.run([sys.executable, "-m", "mapdet", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=REPO)


def free_port() -> int:
    """A free TCP port on 127.0.0.1, so parallel launches never fight over the default."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``accelerate launch`` with the 2-CPU-process topology, running ``-m mapdet ARGS``."""
    exe = Path(sys.executable).with_name("accelerate")
    cmd = [str(exe), "launch", "--config_file", str(REPO / "launch/accelerate/cpu2.yaml"),
           "--main_process_port", str(free_port()), "-m", "mapdet", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout, cwd=REPO)
