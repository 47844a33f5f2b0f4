"""A trained detector ready for inference, from a training checkpoint or an export; the export format.

Export (``mapdet train`` writes it when training ends: ``write_export``)::

    RUN/export/model.safetensors   plain state dict: loads strictly into
                                   ``model.build_inference_model(<"model" below>, K + 1)``
    RUN/export/classes.json        {"arch": "small", "num_classes": K + 1,
                                    "classes": [{"id": 1, "name": "object--vehicle--car"}, ...],
                                                # + "category_id" for a COCO pack's classes
                                    "model": {ModelConfig keys, resolved: min_size, max_size,
                                              anchor_sizes, aspect_ratios, detections_per_img,
                                              score_thresh, nms_thresh, rpn_post_nms_top_n_test, ...}}

The "model" record makes the two files enough to rebuild the network: no training config needed.
It keeps only what shapes inference (start weights, class weights and frozen stages are training
settings and are left at their defaults). Exports written before it existed carry arch and classes
only: ``config`` (the training YAML) supplies the model settings then, and without it loading stops
with a message saying so.

Labels: the model predicts labels 1..K and class ids are 1..K in order (as in the shard manifest), so
a predicted label is a position in the class list; any other numbering is refused when the classes
are read. A class packed from COCO JSON also carries its file's own ``category_id`` (kept here, so
``mapdet predict`` writes the file's ids: ``mapdet.shards.manifest.category_ids``); for a Vistas
pack the category id is the class id.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mapdet.config import ModelConfig, load_config
from mapdet.fileio import read_json, write_json_atomic
from mapdet.modeling import run_weights
from mapdet.shards.manifest import ManifestError, class_names, load_manifest
from mapdet.shards.source import shard_source

# Training-only settings: they change how training starts or weighs its loss, never the network that
# a state dict loads into or what it predicts (a frozen stage is a FrozenBatchNorm2d with the same
# tensors, and eval-mode BatchNorm computes the same).
_TRAINING_ONLY = dict(
    weights=None, backbone_weights=None, trainable_backbone_layers=None, class_weights="none", class_weights_list=None
)


@dataclass
class Trained:
    model: object  # modeling.detector.Detector (torchvision Faster R-CNN) on the CPU, eval mode, weights loaded
    classes: list[dict]  # [{"id": 1..K, "name"}, + "category_id" (COCO packs)]
    model_cfg: ModelConfig
    step: int  # training step of the checkpoint (0 for an export)
    source: str  # the file or folder loaded, for messages

    @property
    def names(self) -> dict[int, str]:
        return class_names({"classes": self.classes})


def export_record(model_cfg: ModelConfig, classes: list[dict]) -> dict:
    """classes.json content for a model trained with ``model_cfg`` on ``classes`` (the training
    manifest's: ``{"id", "name"}``, + ``"category_id"`` for a COCO pack)."""
    from mapdet.modeling.build import resolve_config  # torchvision: only when a model is really involved

    settings = dataclasses.replace(resolve_config(model_cfg), **_TRAINING_ONLY)
    return {
        "arch": settings.arch,
        "num_classes": len(classes) + 1,
        "classes": _checked(classes, "the training classes"),
        "model": dataclasses.asdict(settings),
    }


def write_export(out: Path, raw_model, model_cfg: ModelConfig, classes: list[dict]) -> None:
    """``out/model.safetensors`` (plain weights) + ``out/classes.json`` (classes and model settings)."""
    from safetensors.torch import save_file

    from mapdet.modeling.weights_io import export_weights

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in export_weights(raw_model).items()}, str(out / "model.safetensors"))
    write_json_atomic(out / "classes.json", export_record(model_cfg, classes))


def from_export(weights: str | Path, classes: str | Path | None = None, config: str | None = None) -> Trained:
    """Exported weights (``.safetensors`` or ``.pth``) and their classes.json (default: beside them)."""
    from mapdet.modeling.weights_io import load_weights_file

    weights = Path(weights)
    state = load_weights_file(weights, "--weights")
    path = Path(classes) if classes else weights.with_name("classes.json")
    if not path.is_file():
        raise FileNotFoundError(
            f"no classes file {path}: pass --classes with the classes.json that `mapdet train` "
            f"wrote beside the export (RUN/export/classes.json)"
        )
    record = read_json(path, "classes")
    found = _classes_of(record, path)
    model_cfg = _settings(record, path, config)
    return Trained(_build(model_cfg, found, state, str(weights)), found, model_cfg, 0, str(weights))


def from_checkpoint(path: str | Path, classes: str | Path | None = None, config: str | None = None) -> Trained:
    """A checkpoint folder (``RUN/checkpoints/step_N``) or a run folder (its latest checkpoint).

    Model settings: ``config`` or the run's ``config.yaml``. Classes: ``classes`` (a classes.json or
    a shard manifest), else the training split's manifest that config names, else the run's export.
    """
    path = Path(path)
    if (path / "meta.json").is_file():
        run = path.parent.parent
    elif (path / "checkpoints").is_dir() or (path / "config.yaml").is_file():
        run, path = path, run_weights.latest(path)
        if path is None:
            raise FileNotFoundError(
                f"--checkpoint {run}: no complete checkpoint under {run_weights.checkpoints_dir(run)}"
            )
    else:
        raise FileNotFoundError(
            f"--checkpoint {path}: neither a checkpoint folder (RUN/checkpoints/step_N with "
            f"meta.json) nor a run folder (with checkpoints/)"
        )
    config = config or run / "config.yaml"
    if not Path(config).is_file():
        raise FileNotFoundError(f"no {config}: pass --config with the training config of {run}")
    cfg = load_config(config)
    found = _checkpoint_classes(run, cfg, classes)
    state, step = run_weights.load_weights(run, str(path))
    return Trained(_build(cfg.model, found, state, str(path)), found, cfg.model, step, str(path))


def _checkpoint_classes(run: Path, cfg, classes) -> list[dict]:
    if classes:
        return read_classes(classes)
    try:
        shards = shard_source(cfg.data.shards, cfg.data)
        return _checked(load_manifest(shards, cfg.data.train_split)["classes"], "the training manifest")
    except ManifestError:
        if (run / "export" / "classes.json").is_file():
            return read_classes(run / "export" / "classes.json")
        raise FileNotFoundError(
            f"the classes of {run} are in neither the training manifest its config names "
            f"({cfg.data.shards}, split {cfg.data.train_split}) nor {run / 'export/classes.json'}: "
            "pass --classes (a classes.json or the training split's manifest)"
        ) from None


def read_classes(path: str | Path) -> list[dict]:
    """The ``classes`` list of a classes.json or a shard manifest, checked to be ids 1..K in order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no classes file {path}")
    return _classes_of(read_json(path, "classes"), path)


def _classes_of(record, path: Path) -> list[dict]:
    if not isinstance(record, dict) or not isinstance(record.get("classes"), list):
        raise ValueError(
            f"{path}: no 'classes' list (expected a classes.json written by `mapdet train` or a shard manifest)"
        )
    return _checked(record["classes"], str(path))


def _checked(classes: list, where: str) -> list[dict]:
    """``{"id", "name"}`` (+ ``"category_id"`` where given) of each class; ids 1..K in order and
    category ids distinct integers, else ValueError."""
    keys = ("id", "name", "category_id")
    out = [{k: c[k] for k in keys if k in c} for c in classes if isinstance(c, dict)]
    if not out or len(out) != len(classes) or [c.get("id") for c in out] != list(range(1, len(out) + 1)):
        raise ValueError(
            f"{where}: class ids must be 1..K in order (a label is a position in the list), "
            f"got {[c.get('id') for c in out][:10]}"
        )
    cats = [c.get("category_id", c["id"]) for c in out]
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in cats) or len(set(cats)) != len(cats):
        raise ValueError(f"{where}: category ids must be distinct integers, got {cats[:10]}")
    return out


def _settings(record: dict, path: Path, config: str | None) -> ModelConfig:
    """Model settings from ``config`` when given, else from the export's "model" record."""
    if config:
        cfg = load_config(config).model
    elif isinstance(record.get("model"), dict):
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(record["model"]) - known)
        if unknown:
            raise ValueError(f"{path}: unknown model settings {unknown} (written by a newer mapdet?)")
        cfg = ModelConfig(**record["model"])
    else:
        raise ValueError(
            f"{path} does not record the model settings (an export written before they were, or "
            "not a classes.json): pass --config with the training config"
        )
    if record.get("arch") not in (None, cfg.arch):
        raise ValueError(f"{path} says arch {record['arch']} but the model settings say {cfg.arch}")
    return cfg


def _build(model_cfg: ModelConfig, classes: list[dict], state: dict, source: str):
    """The inference network for ``classes``, ``state`` loaded strictly; a misfit is one clear line."""
    from mapdet.modeling.build import build_inference_model

    model = build_inference_model(model_cfg, len(classes) + 1)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} in the file, {tuple(v.shape)} here"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or shapes:
        problems = [
            f"{len(v)} {what} (first: {v[0]})"
            for what, v in (("tensors missing", missing), ("unexpected tensors", extra), ("of another shape", shapes))
            if v
        ]
        raise ValueError(
            f"{source} does not fit model.arch={model_cfg.arch} with {len(classes)} classes: "
            f"{'; '.join(problems)}. Are the weights, classes and model settings of one run?"
        )
    model.load_state_dict(state)
    return model.eval()
