"""Typed experiment configuration: dataclass sections, YAML files, dotted overrides.

OmegaConf structured configs do the merging and type checking: an unknown key or a value of the
wrong type raises ``ConfigError`` naming the full dotted key. Each section is handed only to the
code that owns it (``cfg.model`` to ``mapdet.modeling.build``, ``cfg.augment`` to ``mapdet.data.augment``, ...),
so the class a key configures is the dataclass it is written in.

A string key gets the text the user typed (``train.mixed_precision: no`` is ``"no"``, not False).
Every key has what it allows declared here, checked when the config loads (from YAML and ``--set``
alike, before anything else runs): a fixed set of values (``CHOICES``) or a range (``RANGES``: one
line per key), then the checks across keys (``CROSS_CHECKS``). A value outside raises
``ConfigError`` with one line naming the key, the value and what is allowed (the CLI: exit 2).
A new key needs its line in ``RANGES`` (or ``CHOICES``) and its row in the README's reference
(``reference_row``); tests/test_config_ranges.py fails until both are there.

    cfg = load_config("launch/configs/demo.yaml", ["optim.lr=0.01", "train.max_steps=200"])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Union, get_args, get_origin, get_type_hints

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A configuration file or override the user must fix; the message names the key."""


# Keys that take one of a fixed set of values, checked by load_config. This is the one home of these
# lists: mapdet.modeling.build (ARCH_DEFAULTS is keyed by the archs) and mapdet.engine.optim read them from here.
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
    # Keys set to None take the arch's default (mapdet.modeling.build.ARCH_DEFAULTS; "small" is a CPU preset).
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
    log_every: int = 20  # steps between logged losses; 0 = off
    image_log_every: int = 1000  # augmented training images drawn to TensorBoard; 0 = off
    ckpt_every: int = 1000  # 0 = off (still one at the end, on a stop and on preemption)
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
    num_images_logged: int = 4  # validation images drawn with predictions (mapdet evaluate); 0 = none
    skip_corrupt: bool = False  # True: leave undecodable samples out and count them


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass(frozen=True)
class Range:
    """What a number key allows: ``lo <= value <= hi``, a bound left out when None and strict where
    ``open`` says ("lo", "hi" or "both"); always finite. ``each``: every item of a list key (which
    needs ``min_items``). ``means``: what 0 or null stand for, shown with the range."""

    lo: float | None = None
    hi: float | None = None
    open: str = ""
    each: bool = False
    min_items: int = 0
    means: str = ""

    def admits(self, value) -> bool:
        items = value if self.each else [value]
        return len(items) >= self.min_items and all(self._number(x) for x in items)

    def _number(self, x) -> bool:
        if not math.isfinite(x):
            return False
        above = self.lo is None or (x > self.lo if self.open in ("lo", "both") else x >= self.lo)
        below = self.hi is None or (x < self.hi if self.open in ("hi", "both") else x <= self.hi)
        return above and below

    def describe(self, tp) -> str:
        noun = "an integer" if int in (tp, *get_args(tp), *_item_types(tp)) else "a number"
        lo, hi = (_num(b) for b in (self.lo, self.hi))
        if lo is not None and hi is not None:
            left, right = "(" if self.open in ("lo", "both") else "[", ")" if self.open in ("hi", "both") else "]"
            bounds = f"in {left}{lo}, {hi}{right}"
        elif lo is not None:
            bounds = f"{'>' if self.open else '>='} {lo}"
        else:
            bounds = f"{'<' if self.open else '<='} {hi}"
        text = f"a list of {noun[noun.index(' ') + 1 :]}s, each {bounds}" if self.each else f"{noun} {bounds}"
        if self.min_items:
            text += f" (at least {self.min_items})"
        return _with_meaning(text, tp, self.means)


@dataclass(frozen=True)
class Text:
    """A text key: anything but the empty string."""

    means: str = ""

    def admits(self, value) -> bool:
        return value != ""

    def describe(self, tp) -> str:
        return _with_meaning("any text but empty", tp, self.means)


@dataclass(frozen=True)
class Flag:
    """A true/false key (OmegaConf refuses other words, ``_read_as_typed`` any number: OmegaConf reads 3 as true)."""

    def admits(self, value) -> bool:
        return isinstance(value, bool)

    def describe(self, tp) -> str:
        return "true | false"


def _num(x: float | None) -> str | None:
    return None if x is None else str(int(x)) if float(x).is_integer() else str(x)


def _item_types(tp) -> tuple:
    """The item type of ``list[X]`` / ``Optional[list[X]]`` as a 1-tuple, else ()."""
    for t in (tp, *get_args(tp)):
        if get_origin(t) is list:
            return get_args(t)
    return ()


def _with_meaning(text: str, tp, means: str) -> str:
    nullable = type(None) in get_args(tp)
    return f"{text}{', or null' if nullable else ''}{f' ({means})' if means else ''}"


SHARE = Range(0, 1)  # probabilities and shares
# What every key not in CHOICES allows: one line per key, checked by load_config. tests/test_config_ranges.py
# fails on a dataclass field that has no line here (or in CHOICES) and tries a value outside each.
RANGES: dict[str, Range | Text | Flag] = {
    "data.shards": Text(),
    "data.train_split": Text(),
    "data.val_split": Text(),
    "data.batch_size": Range(1, means="per process; derived from data.global_batch when that is set"),
    "data.global_batch": Range(1, means="null = data.batch_size per process, whatever their number"),
    "data.workers": Range(0, means="0 = read in the training process"),
    "data.shuffle_buffer": Range(0, means="0 = no shuffle"),
    "data.samples_per_epoch": Range(1, means="null = the training split's size / processes"),
    "data.repeat_threshold": Range(0, 1, open="lo", means="null = no repeat-factor sampling"),
    "data.stream_retries": Range(0, means="failures in a row on a remote shard before it counts as lost"),
    "data.read_timeout_s": Range(0, open="lo", means="seconds without a byte before a remote read is a stall"),
    "model.min_size": Range(32, means="null = the arch's default"),
    "model.max_size": Range(32, means=">= model.min_size; null = the arch's default"),
    "model.anchor_sizes": Range(1, each=True, means="one per FPN level of model.arch; null = the arch's"),
    "model.aspect_ratios": Range(0, each=True, open="lo", min_items=1, means="h/w; null = the arch's"),
    "model.detections_per_img": Range(1),
    "model.score_thresh": SHARE,
    "model.nms_thresh": Range(0, 1, means="IoU above which a box is suppressed; 1 = no suppression"),
    "model.rpn_batch_size_per_image": Range(1),
    "model.roi_batch_size_per_image": Range(1, means="null = the arch's default"),
    "model.rpn_post_nms_top_n_train": Range(1, means="null = the arch's default"),
    "model.rpn_post_nms_top_n_test": Range(1, means="null = the arch's default"),
    "model.weights": Text(means="a file or a torchvision: name"),
    "model.backbone_weights": Text(means="a file or a torchvision: name"),
    "model.trainable_backbone_layers": Range(0, 6, means="at most the arch's stages; null = torchvision's default"),
    "model.class_weights_list": Range(0, each=True, means="only with model.class_weights: explicit"),
    "model.box_loss_weight": Range(0, means="multiplies the RoI box-regression loss; 0 = boxes never learned"),
    "augment.hflip": SHARE,
    "augment.vflip": SHARE,
    "augment.rot90": SHARE,
    "augment.color_jitter": SHARE,
    "augment.brightness": SHARE,
    "augment.contrast": SHARE,
    "augment.saturation": SHARE,
    "augment.hue": Range(0, 0.5),
    "augment.scale_jitter": SHARE,
    "augment.scale_min": Range(0, 1, open="lo"),
    "augment.min_visible": SHARE,
    "augment.min_box_size": Range(0, open="lo", means="pixels"),
    "optim.lr": Range(0, open="lo"),
    "optim.momentum": Range(0, 1, open="hi"),
    "optim.weight_decay": Range(0),
    "optim.warmup_steps": Range(0, means="0 = no warmup"),
    "optim.warmup_factor": Range(0, 1, open="lo"),
    "optim.milestones": Range(0, 1, open="both", each=True, means="shares of train.max_steps"),
    "optim.gamma": Range(0, 1, open="lo"),
    "optim.grad_accum": Range(1),
    "optim.clip_norm": Range(0, open="lo", means="null = no clipping"),
    "train.out": Text(),
    "train.max_steps": Range(1),
    "train.seed": Range(0, 2**31 - 1),
    "train.log_every": Range(0, means="0 = off"),
    "train.image_log_every": Range(0, means="0 = off"),
    "train.ckpt_every": Range(0, means="0 = off: checkpoints only at the end, on a stop and on preemption"),
    "train.keep_last": Range(1),
    "train.eval_every": Range(0, means="0 = only at the end"),
    "train.max_nonfinite": Range(1),
    "train.max_bad_samples": SHARE,
    "train.timeout_s": Range(1),
    "eval.batch_size": Range(1),
    "eval.workers": Range(0, means="0 = read in the evaluating process"),
    "eval.max_dets": Range(1, each=True, means="1, 10 and 100 are always added"),
    "eval.val_loss": Flag(),
    "eval.num_images_logged": Range(0, means="0 = none"),
    "eval.skip_corrupt": Flag(),
}

# (FPN feature maps: values of model.anchor_sizes, backbone stages: most model.trainable_backbone_layers)
# of each arch; tests/test_config_ranges.py measures them on the built models (mapdet.modeling.build).
ARCH_LAYOUT: dict[str, tuple[int, int]] = {"resnet50_fpn_v2": (5, 5), "mobilenet_v3_large_fpn": (3, 6), "small": (4, 5)}


def _sizes(cfg: Config, processes: int | None) -> str | None:
    m = cfg.model
    if m.min_size is not None and m.max_size is not None and m.max_size < m.min_size:
        return f"model.max_size={m.max_size} is below model.min_size={m.min_size}: it must be >= model.min_size"
    return None


def _anchors_and_stages(cfg: Config, processes: int | None) -> str | None:
    m = cfg.model
    maps, stages = ARCH_LAYOUT[m.arch]
    if m.anchor_sizes is not None and len(m.anchor_sizes) != maps:
        return f"model.anchor_sizes={m.anchor_sizes} has {len(m.anchor_sizes)} values: model.arch={m.arch} needs {maps}"
    if m.trainable_backbone_layers is not None and m.trainable_backbone_layers > stages:
        return f"model.trainable_backbone_layers={m.trainable_backbone_layers}: model.arch={m.arch} has 0..{stages}"
    return None


def _class_weights(cfg: Config, processes: int | None) -> str | None:
    m = cfg.model
    if (m.class_weights == "explicit") != (m.class_weights_list is not None):
        return (
            f"model.class_weights_list={m.class_weights_list} with model.class_weights={m.class_weights}: "
            "a list goes with explicit, and explicit needs the list"
        )
    return None


def _global_batch(cfg: Config, processes: int | None) -> str | None:
    per_rank_batch(cfg.data, processes or 1, cfg.optim.grad_accum)  # raises ConfigError naming the fix
    return None


# Checks across keys, after each key's own: (config, processes launched or None) -> what is wrong, or None.
CROSS_CHECKS: list[Callable[[Config, int | None], str | None]] = [
    _sizes,
    _anchors_and_stages,
    _class_weights,
    _global_batch,
]


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
_NUMBER = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}


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


def _read_as_typed(node: yaml.Node, tp, key: str = "") -> None:
    """Retag, in place, the scalars under ``node`` that fill str keys of ``tp`` so they stay text;
    refuse a number for a bool key ``key`` (OmegaConf would read 3 as true)."""
    if isinstance(node, yaml.MappingNode) and hasattr(tp, "__dataclass_fields__"):
        hints = get_type_hints(tp)
        for name, value in node.value:
            if isinstance(name, yaml.ScalarNode) and name.value in hints:
                _read_as_typed(value, hints[name.value], f"{key}.{name.value}".lstrip("."))
        return
    if tp is bool and isinstance(node, yaml.ScalarNode) and node.tag in _NUMBER:
        raise ConfigError(f"config key {key!r}: {node.value} is not allowed: {Flag().describe(bool)}")
    kind = _string_kind(tp)
    if kind and isinstance(node, yaml.ScalarNode) and node.tag in _IMPLICIT:
        if not (kind == "optional" and node.tag == _NULL):
            node.tag = _STR  # node.value is the scalar's text as written


def _load_yaml(text: str, tp, key: str = ""):
    """``yaml.safe_load(text)`` with the str keys of ``tp`` (the type of ``key``) kept as the text written."""
    loader = yaml.SafeLoader(text)  # safe: a config never constructs Python objects
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _read_as_typed(node, tp, key)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _value(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


@functools.cache
def key_types() -> dict[str, object]:
    """Every config key, ``"section.key"``, in the dataclasses' order -> its type hint."""
    return {
        f"{section.name}.{key.name}": get_type_hints(get_type_hints(Config)[section.name])[key.name]
        for section in fields(Config)
        for key in fields(get_type_hints(Config)[section.name])
    }


def check(cfg: Config, processes: int | None = None) -> None:
    """Raise ``ConfigError`` (one line: key, value, what is allowed) for the first key outside its
    choices or range, then for the first failed check across keys. ``processes``: how many were
    launched, when known (``data.global_batch`` must split over them)."""
    hints = key_types()
    for dotted, choices in CHOICES.items():
        value = _value(cfg, dotted)
        if value not in choices:
            raise ConfigError(f"config key {dotted!r}: {value!r} is not one of {' | '.join(choices)}")
    for dotted, rule in RANGES.items():
        value = _value(cfg, dotted)
        if value is not None and not rule.admits(value):
            raise ConfigError(f"config key {dotted!r}: {value!r} is not allowed: {rule.describe(hints[dotted])}")
    for cross in CROSS_CHECKS:
        if problem := cross(cfg, processes):
            raise ConfigError(problem)


def reference_row(dotted: str) -> str:
    """The README's configuration reference row of a key: ``| key | default | allowed |``."""
    hint = key_types()[dotted]
    default = _value(Config(), dotted)
    shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else str(default)
    allowed = " | ".join(CHOICES[dotted]) if dotted in CHOICES else RANGES[dotted].describe(hint)
    allowed = allowed.replace("|", "\\|")  # a table cell
    return f"| `{dotted}` | `{shown}` | {allowed} |"


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, processes: int | None = None
) -> Config:
    """Defaults <- YAML file <- ``section.key=value`` overrides, type-checked and ``check``-ed (with
    ``processes``, the number launched, when known); returns a ``Config``."""
    schema = OmegaConf.structured(Config)
    try:
        merged = schema
        if path is not None:
            text = _read_text(path)
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
                value = _load_yaml(text, _field_type(dotted), dotted)
            except yaml.YAMLError as e:
                raise ConfigError(f"override {item!r}: the value is not YAML: {str(e).splitlines()[0]}") from e
            for part in reversed(dotted.split(".")):
                value = {part: value}
            merged = OmegaConf.merge(merged, OmegaConf.create(value))
        cfg = OmegaConf.to_object(merged)
    except yaml.YAMLError as e:  # also a !!python tag, which safe_load refuses to construct
        raise ConfigError(f"{path}: not a plain YAML mapping: {str(e).splitlines()[0]}") from e
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {msg}" if key else msg) from e
    check(cfg, processes)
    return cfg


def _read_text(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as e:  # a folder, no permission
        raise ConfigError(f"config file {path} cannot be read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not text: {e.reason} at byte {e.start}") from None


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
