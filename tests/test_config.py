"""Typed config: YAML + dotted overrides, errors that name the key, and every shipped config builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from mapdet.config import Config, ConfigError, load_config, to_yaml
from mapdet.model import build_model

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "launch" / "configs").glob("*.yaml"))


def test_defaults_file_and_overrides_merge_with_types(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("optim:\n  lr: 0.01\nmodel:\n  arch: small\n")
    cfg = load_config(path, ["optim.lr=0.5", "model.anchor_sizes=[8,16,32,64]", "train.mixed_precision=bf16"])
    assert isinstance(cfg, Config)
    assert cfg.optim.lr == 0.5 and cfg.model.arch == "small" and cfg.model.anchor_sizes == [8, 16, 32, 64]
    assert cfg.optim.momentum == 0.9  # untouched default
    again = tmp_path / "resolved.yaml"
    again.write_text(to_yaml(cfg))
    assert load_config(again) == cfg  # the saved run config reproduces the run


@pytest.mark.parametrize("overrides,key", [
    (["optim.lrr=1"], "optim.lrr"),
    (["optim.lr=fast"], "optim.lr"),
    (["train.max_steps=1.5"], "train.max_steps"),
    (["nosection.x=1"], "nosection"),
    (["optim.lr"], "section.key=value"),
])
def test_bad_overrides_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "unsafe.yaml").write_text("optim: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(Exception):  # safe_load refuses to construct Python objects
        load_config(tmp_path / "unsafe.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_builds(path):
    cfg = load_config(path)
    model = build_model(cfg.model, num_classes=13, class_counts=[10] * 12)
    assert model.roi_heads.detections_per_img == cfg.model.detections_per_img
