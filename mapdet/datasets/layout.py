"""A raw Mapillary Vistas download: where its files are, which version it is, and its classes.

Layout: ``ROOT/config_{v1.2,v2.0}.json`` (the label table) beside ``ROOT/{training,validation,
testing}/``, each with ``images/*.jpg`` and ``{version}/{labels,instances,panoptic}/``: 16-bit
instance PNGs (label << 8 | instance) and the panoptic JSON (``panoptic_2018.json`` in v1.2,
``panoptic_2020.json`` in v2.0) with per-segment boxes and crowd flags. shards/README.md describes
what packing keeps (the class set).

Object classes (``class_set``): by default (``"evaluated"``) the classes Vistas' own instance
benchmark scores, the config labels with ``"instances": true`` *and* ``"evaluate": true`` (70 in
v2.0, 37 in v1.2; a label without an ``"evaluate"`` key counts as evaluated). With
``"all-instances"`` every label with ``"instances": true`` (72 in v2.0: the two ambiguous sign
classes as well). The chosen classes are numbered 1..K in config order (0 = background). Objects
of an instance class outside the set (``not_evaluated``) are left out, exactly as stuff labels
are, and counted per image in ``RawSample.left_out`` so the packer can report them: in COCO
evaluation an ignore (crowd) region only absorbs detections of its own category, so one of a
category that is not evaluated would ignore nothing, and training drops crowd regions anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mapdet.fileio import read_json

VERSIONS = ("v2.0", "v1.2")  # preference order when both are present
PANOPTIC_JSON = {"v2.0": "panoptic_2020.json", "v1.2": "panoptic_2018.json"}
CLASS_SETS = ("evaluated", "all-instances")  # default first


@dataclass
class VistasClass:
    id: int  # 1..K, config order among labels with "instances": true
    name: str  # e.g. "object--vehicle--car"
    config_index: int  # position in the config's label list (the value in the label PNGs)
    color: tuple


def config_path(root, version: str) -> Path:
    return Path(root) / f"config_{version}.json"


def labels_dir(root, split: str, version: str, kind: str) -> Path:
    """``kind``: labels | instances | panoptic | polygons."""
    return Path(root) / split / version / kind


def panoptic_json_path(root, split: str, version: str) -> Path:
    return labels_dir(root, split, version, "panoptic") / PANOPTIC_JSON[version]


def detect_version(root) -> str:
    """ "v2.0" or "v1.2" from the config files or label folders present; v2.0 wins when both are."""
    root = Path(root)
    for version in VERSIONS:
        if config_path(root, version).exists() or any(root.glob(f"*/{version}")):
            return version
    raise FileNotFoundError(
        f"{root} holds no Mapillary Vistas release: expected config_v2.0.json or config_v1.2.json "
        "(or training/v2.0, training/v1.2 folders) at its top level"
    )


def load_classes(config_file: Path, class_set: str = "evaluated") -> tuple[list[VistasClass], list[str]]:
    """The object classes of a config file in ``class_set``, and the names of all its labels.

    ``class_set``: ``"evaluated"`` (labels with ``"instances"`` and ``"evaluate"``, the benchmark's
    classes; a missing ``"evaluate"`` counts as true) or ``"all-instances"`` (every ``"instances"``
    label). Ids are 1..K in config order among the chosen labels.
    """
    if class_set not in CLASS_SETS:
        raise ValueError(f"class_set must be one of {CLASS_SETS}, got {class_set!r}")
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file} not found: the reader needs the release's config file")
    labels = _labels(config_file)
    things = [(i, lab) for i, lab in enumerate(labels) if lab.get("instances")]
    if not things:
        raise ValueError(f'{config_file}: no label has "instances": true, so there are no object classes')
    if class_set == "evaluated":
        things = [(i, lab) for i, lab in things if lab.get("evaluate", True)]
        if not things:
            raise ValueError(
                f'{config_file}: no instance label has "evaluate": true; pack with '
                "--all-instance-classes to keep every instance class"
            )
    classes = [
        VistasClass(id=k, name=lab["name"], config_index=i, color=tuple(lab.get("color", (0, 0, 0))))
        for k, (i, lab) in enumerate(things, start=1)
    ]
    return classes, [lab["name"] for lab in labels]


def _labels(config_file: Path) -> list[dict]:
    """The ``labels`` of a release's config file; ValueError (one line, naming it) when it is no such file."""
    config = read_json(config_file, "Vistas config")
    if not isinstance(config, dict) or not isinstance(config.get("labels"), list):
        raise ValueError(f"{config_file}: no list 'labels' (not a Mapillary Vistas config file)")
    return config["labels"]


def not_evaluated_classes(config_file: Path) -> list[tuple[int, str]]:
    """(config index, name) of the labels with ``"instances": true`` and ``"evaluate": false``."""
    labels = _labels(Path(config_file))
    return [(i, lab["name"]) for i, lab in enumerate(labels) if lab.get("instances") and not lab.get("evaluate", True)]
