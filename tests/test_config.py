"""Typed config: YAML + dotted overrides, errors that name the key, and every shipped config builds."""

from __future__ import annotations

from pathlib import Path

import pytest

from mapdet.config import CHOICES, Config, ConfigError, load_config, to_yaml
from mapdet.modeling.build import ARCH_DEFAULTS, build_model

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


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["optim.lrr=1"], "optim.lrr"),
        (["optim.lr=fast"], "optim.lr"),
        (["train.max_steps=1.5"], "train.max_steps"),
        (["nosection.x=1"], "nosection"),
        (["optim.lr"], "section.key=value"),
    ],
)
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
    with pytest.raises(ConfigError, match="python/object"):  # safe_load refuses to construct Python objects
        load_config(tmp_path / "unsafe.yaml")


def _plant(name: str, home: Path) -> None:
    """A random-weights stand-in for a torchvision weights file, where `mapdet weights fetch` puts it."""
    import torch
    import torchvision

    from mapdet.modeling import pretrained as weights

    w = weights.resolve(name)
    kind, arch = weights.kind_and_arch(w)
    builders = {
        ("detector", "resnet50_fpn_v2"): torchvision.models.detection.fasterrcnn_resnet50_fpn_v2,
        ("detector", "mobilenet_v3_large_fpn"): torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn,
    }
    model = builders[kind, arch](weights=None, weights_backbone=None, num_classes=len(w.meta["categories"]))
    path = weights.cache_path(w)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_builds(path, tmp_path, monkeypatch, capfd):
    cfg = load_config(path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # never the user's cache, never the network
    if cfg.model.weights:  # the Vistas configs fine-tune torchvision's COCO detectors
        assert cfg.model.weights.startswith("torchvision:") and cfg.model.weights.endswith("COCO_V1")
        _plant(cfg.model.weights, tmp_path)
    model = build_model(cfg.model, num_classes=13, class_counts=[10] * 12)
    assert model.roi_heads.detections_per_img == cfg.model.detections_per_img
    if cfg.model.weights:  # everything but the class-dependent predictor came from the file
        err = capfd.readouterr().err
        assert "4 kept fresh" in err and "0 skipped" in err, err


# YAML 1.1 reads these as bool/null/number; a str key must get them as typed.
YAML_WORDS = ["no", "yes", "off", "on", "true", "False", "n", "null", "~", "1e-3", "10", "0x1f", "2024-01-01"]


@pytest.mark.parametrize("word", YAML_WORDS)
def test_str_keys_get_the_text_typed_in_overrides_and_files(tmp_path, word):
    assert load_config(None, [f"train.out={word}"]).train.out == word
    path = tmp_path / "x.yaml"
    path.write_text(f"train:\n  out: {word}\ndata:\n  shards: {word}\n")
    cfg = load_config(path)
    assert cfg.train.out == word and cfg.data.shards == word


def test_mixed_precision_no_is_the_string_no(tmp_path):
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    assert load_config(path, ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    assert load_config(None, ['train.mixed_precision="no"']).train.mixed_precision == "no"  # quotes still work


def test_mixed_precision_choices_are_what_accelerate_takes():
    from accelerate.utils import PrecisionType

    assert set(CHOICES["train.mixed_precision"]) == {p.value for p in PrecisionType}


def test_arch_choices_are_the_archs_model_py_builds():
    assert tuple(ARCH_DEFAULTS) == CHOICES["model.arch"]


# what a choice needs beside it (the checks across keys)
COMPANIONS = {("model.class_weights", "explicit"): ("model.class_weights_list", "[1, 1]")}


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_loads_and_a_bad_one_is_a_config_error_naming_key_and_choices(tmp_path, key):
    section, name = key.split(".")
    for choice in CHOICES[key]:
        other = COMPANIONS.get((key, choice))
        extra = [f"{other[0]}={other[1]}"] if other else []
        assert getattr(getattr(load_config(None, [f"{key}={choice}", *extra]), section), name) == choice
        path = tmp_path / "x.yaml"
        path.write_text(
            f"{section}:\n  {name}: {choice}\n" + (f"  {other[0].split('.')[1]}: {other[1]}\n" if other else "")
        )
        assert getattr(getattr(load_config(path), section), name) == choice
    for bad in ["off", "bogus"]:
        with pytest.raises(ConfigError) as e:
            load_config(None, [f"{key}={bad}"])
        assert key in str(e.value) and repr(bad) in str(e.value)
        assert all(choice in str(e.value) for choice in CHOICES[key])


def test_bad_choice_in_a_file_is_a_config_error(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("optim:\n  name: adam\n")
    with pytest.raises(ConfigError, match=r"optim\.name.*'adam'.*sgd \| adamw"):
        load_config(path)


def test_non_string_keys_keep_their_types(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "eval:\n  val_loss: no\n  skip_corrupt: yes\noptim:\n  lr: 1e-3\n  clip_norm: null\n"
        "model:\n  min_size: 800\n  aspect_ratios: [0.5, 1, 4.0]\n"
    )
    cfg = load_config(path)
    assert cfg.eval.val_loss is False and cfg.eval.skip_corrupt is True
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.clip_norm is None
    assert cfg.model.min_size == 800 and cfg.model.aspect_ratios == [0.5, 1.0, 4.0]
    cfg = load_config(None, ["eval.val_loss=false", "eval.skip_corrupt=true", "optim.lr=1e-3"])
    assert cfg.eval.val_loss is False and cfg.eval.skip_corrupt is True and cfg.optim.lr == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(None, ["train.max_steps=abc"])
    path.write_text("train:\n  max_steps: abc\n")
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(path)


def test_optional_str_reads_null_as_none_and_keeps_other_text(tmp_path):
    for null in ["null", "~", ""]:
        assert load_config(None, ["model.arch=small", f"model.weights={null}"]).model.weights is None
    assert load_config(None, ["model.weights=no"]).model.weights == "no"
    assert load_config(None, ["model.weights=/m/w.pth"]).model.weights == "/m/w.pth"
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  weights: null\n  backbone_weights: off\n")
    cfg = load_config(path)
    assert cfg.model.weights is None and cfg.model.backbone_weights == "off"
    path.write_text("model:\n  weights: 'null'\n")
    assert load_config(path).model.weights == "null"  # quoted: the text, as in any YAML


def test_resolved_config_round_trips_yaml_words(tmp_path):
    cfg = load_config(None, ["train.out=no", "data.shards=on", "train.mixed_precision=no"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_python_tags_on_a_str_key_are_still_refused(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  out: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="python/object/apply"):
        load_config(path)
    with pytest.raises(ConfigError, match="python/object/apply"):
        load_config(None, ["train.out=!!python/object/apply:os.system ['true']"])


@pytest.mark.parametrize(
    "global_batch, processes, accum, expected",
    [
        (None, 3, 1, 2),  # unset: data.batch_size (2) per rank, whatever the world size
        (8, 1, 1, 8),
        (8, 2, 1, 4),
        (8, 8, 1, 1),
        (8, 2, 2, 2),
    ],
)
def test_per_rank_batch_keeps_the_global_batch(global_batch, processes, accum, expected):
    from mapdet.config import DataConfig, per_rank_batch

    assert per_rank_batch(DataConfig(global_batch=global_batch), processes, accum) == expected


@pytest.mark.parametrize("processes, accum", [(3, 1), (16, 1), (2, 3)])
def test_global_batch_that_does_not_split_names_the_fix(processes, accum):
    from mapdet.config import DataConfig, per_rank_batch

    with pytest.raises(ConfigError, match=r"data.global_batch=8 does not split over .* choose a multiple of"):
        per_rank_batch(DataConfig(global_batch=8), processes, accum)
