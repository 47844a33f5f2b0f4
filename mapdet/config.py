"""Typed experiment configuration: dataclass sections, YAML files, dotted overrides.

OmegaConf structured configs do the merging and type checking: an unknown key or a value of the
wrong type raises ``ConfigError`` naming the full dotted key. Each section is handed only to the
code that owns it (``cfg.model`` to ``mapdet.modeling.detector``, ``cfg.augment`` to ``mapdet.data.augment``, ...),
so the class a key configures is the dataclass it is written in.

A string key gets the text the user typed (``train.mixed_precision: no`` is ``"no"``, not False), and
a key with a fixed set of values (``CHOICES``) is checked when the config loads.

    cfg = load_config("launch/configs/demo.yaml", ["optim.lr=0.01", "train.max_steps=200"])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file or override the user must fix; the message names the key."""


# Keys that take one of a fixed set of values, checked by load_config. This is the one home of these
# lists: mapdet.modeling.detector (ARCH_DEFAULTS is keyed by the archs) and mapdet.engine.optim read them from here.
# (OmegaConf structured configs do not support typing.Literal, hence a table beside the dataclasses.)
CHOICES: dict[str, tuple[str, ...]] = {
    "model.arch": ("resnet50_fpn_v2", "mobilenet_v3_large_fpn", "small"),
    "model.class_weights": ("none", "inv_sqrt", "explicit"),
    "optim.name": ("sgd", "adamw"),
    "optim.schedule": ("multistep", "cosine"),
    # accelerate.utils.PrecisionType (fp8 also needs an fp8 backend: TransformerEngine, MS-AMP or torchao)
    "train.mixed_precision": ("no", "bf16", "fp16", "fp8"),
}


@dataclass
class DataConfig:
    # A folder written by `mapdet pack`, an http(s):// base URL, or a pipe: command with {name}, e.g.
    # "pipe:aws s3 cp s3://bucket/vistas/{name} -" (mapdet.shards.source, shards/README.md)
    shards: str = "shards"
    train_split: str = "training"
    val_split: str = "validation"
    batch_size: int = 2  # images per rank per step (derived from global_batch when that is set)
    # Images per optimizer step over all ranks and accumulation steps. When set, each rank takes
    # global_batch / (processes x optim.grad_accum) images per micro-batch, so a config learns the
    # same on 1 GPU, 2 CPU processes or 8 GPUs (optim.lr and train.max_steps mean the same thing).
    # None: data.batch_size per rank, and the global batch changes with the number of processes.
    global_batch: Optional[int] = None
    workers: int = 2  # DataLoader workers per rank
    shuffle_buffer: int = 256  # samples held for shuffling in each worker
    samples_per_epoch: Optional[int] = None  # per rank; None = train split size / world size
    repeat_threshold: Optional[float] = None  # repeat-factor sampling t; None = off (Vistas: 0.1)
    # Remote shards only. A read that fails (a dropped connection, a stall, HTTP 5xx, a pipe: command
    # exiting non-zero) is retried this many times, going on from the byte reached, with 0.5-8 s waits;
    # then the shard counts as a corrupt one (training skips and counts its samples, evaluation stops
    # or, with eval.skip_corrupt, leaves its images out). 3 rides out a blip without hiding an outage.
    stream_retries: int = 3
    read_timeout_s: float = 60.0  # no byte for this long is a stall (then retried): no rank ever hangs


@dataclass
class ModelConfig:
    # Keys set to None take the arch's default (mapdet.modeling.detector.ARCH_DEFAULTS; "small" is a CPU preset).
    arch: str = "resnet50_fpn_v2"  # CHOICES: resnet50_fpn_v2 | mobilenet_v3_large_fpn | small
    min_size: Optional[int] = None  # torchvision resizes the shorter side to this...
    max_size: Optional[int] = None  # ...unless the longer side would exceed this
    # One anchor size per FPN level (resnet50_fpn_v2: 5, mobilenet_v3_large_fpn: 3, small: 4), e.g.
    # [16, 32, 64, 128, 256] for Vistas' small signs. None = the arch's stock anchors.
    anchor_sizes: Optional[list[int]] = None
    # h/w, used on every level; tall thin poles need ~4.0. Changing the COUNT changes the RPN head's
    # shape, so exported weights then no longer load into the plain torchvision builder.
    aspect_ratios: Optional[list[float]] = None
    detections_per_img: int = 300  # Vistas averages ~94 objects per image; torchvision's 100 bites
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    rpn_batch_size_per_image: int = 256
    roi_batch_size_per_image: Optional[int] = None  # RoIs sampled per image for the box head
    rpn_post_nms_top_n_train: Optional[int] = None  # proposals kept per image (also pre-NMS per level)
    rpn_post_nms_top_n_test: Optional[int] = None
    # Start weights: a local file (.pth or .safetensors) or a torchvision name read from torch's cache,
    # e.g. torchvision:FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1 (`mapdet weights list`; never downloaded here)
    weights: Optional[str] = None  # full detector weights
    backbone_weights: Optional[str] = None  # backbone-only weights, e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2
    trainable_backbone_layers: Optional[int] = None  # None = torchvision's default for the arch
    # Weight of the box head's box-regression loss (torchvision: 1). Near 0 the RoI head stops
    # learning to place boxes (with AdamW only exactly 0 does: Adam rescales a small gradient back
    # up), which bench/bench_diagnose_planted.py uses to plant loose boxes. Validation loss ignores it.
    box_loss_weight: float = 1.0
    class_weights: str = "none"  # CHOICES: none | inv_sqrt | explicit
    class_weights_list: Optional[list[float]] = None  # with "explicit": K+1 values, index 0 = background


@dataclass
class AugmentConfig:
    hflip: float = 0.5  # probability per image
    vflip: float = 0.0  # off by default: street scenes have a sky and a road
    rot90: float = 0.0
    color_jitter: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    scale_jitter: float = 0.5  # probability of a random resized crop
    scale_min: float = 0.5  # smallest crop area as a share of the image
    min_visible: float = 0.3  # boxes with less of their area left inside the crop are dropped
    min_box_size: float = 1.0  # pixels; narrower or shorter boxes are dropped


@dataclass
class OptimConfig:
    name: str = "sgd"  # CHOICES: sgd | adamw
    lr: float = 0.02  # for the global batch (all ranks, after accumulation)
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_steps: int = 500
    warmup_factor: float = 0.001
    schedule: str = "multistep"  # CHOICES: multistep | cosine
    milestones: list[float] = field(default_factory=lambda: [0.67, 0.89])  # shares of max_steps
    gamma: float = 0.1
    grad_accum: int = 1
    clip_norm: Optional[float] = 10.0  # None = no clipping


@dataclass
class TrainConfig:
    out: str = "runs/exp"  # run folder: config, checkpoints, TensorBoard, exports
    max_steps: int = 90000  # optimizer steps
    seed: int = 0
    mixed_precision: str = "no"  # CHOICES: no | bf16 | fp16 | fp8 (passed to accelerate)
    log_every: int = 20
    image_log_every: int = 1000  # augmented training images drawn to TensorBoard
    ckpt_every: int = 1000
    keep_last: int = 3
    eval_every: int = 0  # 0 = only at the end
    max_nonfinite: int = 20  # consecutive non-finite losses before stopping
    max_bad_samples: float = 0.01  # share of corrupt training samples tolerated
    timeout_s: int = 600  # collective timeout: a dead rank ends the others after this


@dataclass
class EvalConfig:
    batch_size: int = 2
    workers: int = 2
    max_dets: list[int] = field(default_factory=lambda: [100, 300])
    val_loss: bool = True
    num_images_logged: int = 4
    skip_corrupt: bool = False  # True: leave undecodable samples out and count them


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Why strings are read with the field's type in hand: YAML 1.1 (PyYAML's SafeLoader, and OmegaConf's
# own loader behind from_dotlist) reads no/yes/on/off/true/false as booleans, null/~ as None and
# 1e-3-like text as numbers, before anyone knows which key the value is for. OmegaConf then turns
# False into "False" for a str key, so `train.mixed_precision: no` reached accelerate as "False".
# Quoting ("no") is a trap users should not have to know about. So the YAML is composed into nodes
# first (the resolver has only tagged them); for a key whose dataclass type is str, a scalar that
# YAML would have turned into a bool/int/float/null/date is retagged as a string, so it is built
# from the text as written. Every other key is built exactly as before (a bool key still reads
# true/false, an int key still rejects `abc` through OmegaConf), an Optional[str] key still reads
# YAML's null (null, Null, NULL, ~, nothing) as None, and tags such as !!python/... are left alone for
# SafeLoader to refuse. Overrides go through the same path: `--set section.key=value` parses `value`
# as YAML for that key, as OmegaConf's from_dotlist did, so a file and --set always agree.
_STR = "tag:yaml.org,2002:str"
_NULL = "tag:yaml.org,2002:null"
_IMPLICIT = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "null", "timestamp")}


def _string_kind(tp) -> Optional[str]:
    """'str' for a str field, 'optional' for Optional[str], None for any other type."""
    if tp is str:
        return "str"
    if get_origin(tp) is Union and set(get_args(tp)) == {str, type(None)}:
        return "optional"
    return None


def _field_type(dotted: str):
    """The type hint of a dotted key in ``Config`` (a dataclass for a section), None if unknown."""
    tp = Config
    for part in dotted.split("."):
        hints = get_type_hints(tp) if isinstance(tp, type) and hasattr(tp, "__dataclass_fields__") else {}
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _keep_string_text(node: yaml.Node, tp) -> None:
    """Retag, in place, the scalars under ``node`` that fill str keys of ``tp`` so they stay text."""
    if isinstance(node, yaml.MappingNode) and hasattr(tp, "__dataclass_fields__"):
        hints = get_type_hints(tp)
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value in hints:
                _keep_string_text(value, hints[key.value])
        return
    kind = _string_kind(tp)
    if kind and isinstance(node, yaml.ScalarNode) and node.tag in _IMPLICIT:
        if not (kind == "optional" and node.tag == _NULL):
            node.tag = _STR  # node.value is the scalar's text as written


def _load_yaml(text: str, tp):
    """``yaml.safe_load(text)`` with the str keys of ``tp`` kept as the text written."""
    loader = yaml.SafeLoader(text)  # safe: a config never constructs Python objects
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _keep_string_text(node, tp)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_choices(cfg: Config) -> None:
    for dotted, choices in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"config key {dotted!r}: {value!r} is not one of {' | '.join(choices)}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- ``section.key=value`` overrides, type-checked; returns a ``Config``."""
    schema = OmegaConf.structured(Config)
    try:
        merged = schema
        if path is not None:
            text = Path(path).read_text()
            data = _load_yaml(text, Config) or {}
            if not isinstance(data, dict):
                raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
            merged = OmegaConf.merge(merged, OmegaConf.create(data))
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form section.key=value")
            dotted, text = item.split("=", 1)
            dotted = dotted.strip()
            try:
                value = _load_yaml(text, _field_type(dotted))
            except yaml.YAMLError as e:
                raise ConfigError(f"override {item!r}: the value is not YAML: {str(e).splitlines()[0]}") from e
            for part in reversed(dotted.split(".")):
                value = {part: value}
            merged = OmegaConf.merge(merged, OmegaConf.create(value))
        cfg = OmegaConf.to_object(merged)
    except FileNotFoundError as e:
        raise ConfigError(f"config file not found: {path}") from e
    except yaml.YAMLError as e:  # also a !!python tag, which safe_load refuses to construct
        raise ConfigError(f"{path}: not a plain YAML mapping: {str(e).splitlines()[0]}") from e
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {msg}" if key else msg) from e
    _check_choices(cfg)
    return cfg


def per_rank_batch(data: DataConfig, processes: int, grad_accum: int) -> int:
    """Images per rank per micro-batch: ``data.global_batch / (processes x grad_accum)`` when the
    global batch is set (it must divide evenly), else ``data.batch_size``."""
    if data.global_batch is None:
        return data.batch_size
    share = processes * grad_accum
    if data.global_batch < share or data.global_batch % share:
        raise ConfigError(
            f"data.global_batch={data.global_batch} does not split over {processes} process(es) x "
            f"optim.grad_accum={grad_accum}: choose a multiple of {share}, or set "
            "data.global_batch=null and data.batch_size (images per process)"
        )
    return data.global_batch // share


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (saved in the run folder, shown in TensorBoard)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))
