"""Shared fixtures: a tiny synthetic Vistas download, the same as COCO detection JSON, and both
packed into shards, made once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mapdet.datasets.synthetic.writer import SynthConfig, synthesize
from tests.datasets.coco_files import vistas_as_coco
from tests.helpers import pack_all, pack_coco

TINY = SynthConfig(size=(160, 120))


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """v2.0 download: 12 training and 6 validation images of 160x120."""
    return Path(synthesize(tmp_path_factory.mktemp("vistas") / "raw", "v2.0", n_train=12, n_val=6, seed=0, cfg=TINY))


@pytest.fixture(scope="session")
def shards(tmp_path_factory, synth_root) -> Path:
    """Both splits packed 4 samples per shard (3 training shards, 2 validation shards)."""
    out = tmp_path_factory.mktemp("shards")
    pack_all(synth_root, out, "training")
    pack_all(synth_root, out, "validation")
    return out


@pytest.fixture(scope="session")
def coco_files(tmp_path_factory, synth_root) -> Path:
    """Both splits of ``synth_root`` as COCO detection JSON, ``{split}.json``: sparse, shuffled ids."""
    out = tmp_path_factory.mktemp("coco")
    for seed, split in enumerate(("training", "validation")):
        vistas_as_coco(synth_root, split, out / f"{split}.json", seed=seed)
    return out


@pytest.fixture(scope="session")
def coco_shards(tmp_path_factory, synth_root, coco_files) -> Path:
    """``coco_files`` packed like ``shards`` (`mapdet pack --coco`, 4 samples per shard)."""
    out = tmp_path_factory.mktemp("coco_shards")
    for split in ("training", "validation"):
        pack_coco(coco_files / f"{split}.json", synth_root / split / "images", out, split)
    return out


@pytest.fixture
def copy_root(tmp_path, synth_root) -> Path:
    """A private copy of the synthetic download that a test may damage."""
    dst = tmp_path / "raw"
    shutil.copytree(synth_root, dst)
    return dst
