"""mapdet evaluate --config FILE --checkpoint PATH|latest [--set ...] [--out DIR]

Distributed COCO evaluation of a trained model on packed validation shards, with the validation
loss in the same pass. Run on every GPU you have:
``accelerate launch --config_file launch/accelerate/<topology>.yaml -m mapdet evaluate ...``.

Writes DIR/metrics.json (COCO summary on pycocotools' 0-1 scale, AP at each maxDets, per-class
AP with GT and training counts, val loss, images left out) and DIR/detections.json (COCO results
format, in the numbering and pixels of {split}.coco.json: a COCO pack's own category and image
ids, boxes in stored-image pixels), prints the per-class table, and logs scalars and a few images
with predictions (red) and ground truth (green) to the run's TensorBoard. Default DIR: RUN/eval/step_N.

Memory: scoring never puts all detections on one rank (``validation``). detections.json is
written by the main process from every rank's detections streamed one rank at a time, in the
order they were scored; the other ranks wait for it (writing is the only part that is serial).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mapdet import comm, tracking
from mapdet.cli import add_config_arguments
from mapdet.config import load_config, to_dict, to_yaml
from mapdet.data.loaders import eval_loader
from mapdet.evaluation.coco import format_summary, format_table
from mapdet.evaluation.validation import metrics_dict, stream_detections, validate
from mapdet.modeling import run_weights
from mapdet.modeling.build import build_inference_model
from mapdet.shards.manifest import by_category_id, class_names, classes_mismatch, load_coco, load_manifest
from mapdet.shards.source import shard_source
from mapdet.structures import Detections


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, example="eval.max_dets=[100,300,1000]")
    p.add_argument(
        "--checkpoint",
        default="latest",
        help="latest (of train.out) | a checkpoint folder | a weights file (.safetensors/.pth, "
        "e.g. RUN/export/model.safetensors)",
    )
    p.add_argument("--split", default=None, help="split to evaluate (default: data.val_split)")
    p.add_argument("--out", default=None, help="output folder (default: RUN/eval/step_N)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    split = args.split or cfg.data.val_split
    run_dir = Path(cfg.train.out)
    accelerator = comm.make_accelerator(log_with="tensorboard", project_dir=str(run_dir))
    shards = shard_source(cfg.data.shards, cfg.data)  # a folder, a URL or a pipe: command
    manifest = load_manifest(shards, split)
    train_manifest = _optional_manifest(shards, cfg.data.train_split)
    if train_manifest is not None and (why := classes_mismatch(train_manifest, manifest)):
        raise ValueError(f"{cfg.data.shards}: {why}; the model's classes are the training split's")
    names = class_names(by_category_id(manifest))  # detections carry COCO category ids (validation)
    gt = load_coco(shards, split)

    model = build_inference_model(cfg.model, len(names) + 1).to(accelerator.device)
    state, step = run_weights.load_weights(run_dir, args.checkpoint)
    model.load_state_dict(state)
    out = Path(args.out) if args.out else run_dir / "eval" / f"step_{step:07d}"

    v = validate(model, accelerator.device, cfg.eval, shards, manifest, gt)
    metrics = metrics_dict(v, manifest, train_manifest)
    tracking.start(accelerator, to_yaml(cfg), to_dict(cfg))
    summary = metrics["bbox"]
    values = {f"eval/{k}": summary[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")}
    values.update({f"eval/AP_at_maxdets_{m}": ap for m, ap in summary["AP_at_maxdets"].items()})
    values.update({f"eval/{k}": x for k, x in v.loss.items()})
    tracking.scalars(accelerator, values, step)
    main = accelerator.is_main_process
    batch = _logged_batch(cfg, shards, manifest) if main else None
    writer = _ResultsWriter(out / "detections.json", batch) if main else None
    stream_detections(v, writer.add if main else None)
    if main:
        writer.close()
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        print(format_table(summary["per_class"]))
        print(format_summary(summary))
        if v.loss:
            print(
                f"val loss {v.loss['loss']:.4f} over {v.images} images"
                + (f" ({len(v.left_out)} left out: corrupt)" if v.left_out else "")
            )
        print(f"wrote {out / 'metrics.json'} and {out / 'detections.json'}")
        if batch is not None:
            _log_images(accelerator, batch, names, Detections.concat(writer.kept), step)
    tracking.finish(accelerator)
    return 0


class _ResultsWriter:
    """detections.json from one rank's Detections at a time: the bytes ``json.dumps`` gives for
    the whole list; keeps the detections of the logged images' ``batch``."""

    def __init__(self, path: Path, batch):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.file, self.empty = path, open(path, "w"), True  # noqa: SIM115 - closed in close()
        self.file.write("[")
        self.shown = np.array([t["image_id"] for t in batch.targets] if batch else [], np.int64)
        self.kept: list[Detections] = []

    def add(self, dets: Detections) -> None:
        items = json.dumps(dets.to_coco_results())[1:-1]
        if items:
            self.file.write(items if self.empty else ", " + items)
            self.empty = False
        self.kept.append(dets.take(np.isin(dets.image_id, self.shown)))

    def close(self) -> None:
        self.file.write("]")
        self.file.close()


def _optional_manifest(shards, split):
    try:
        return load_manifest(shards, split)
    except ValueError:
        return None


def _logged_batch(cfg, shards, manifest):
    """The first ``eval.num_images_logged`` validation images (pictures only), or None."""
    n = cfg.eval.num_images_logged
    if n <= 0:
        return None
    return next(iter(eval_loader(shards, manifest, n, 0, rank=0, world=1, skip_corrupt=True)))


def _log_images(accelerator, batch, names, dets: Detections, step: int) -> None:
    """The batch's images with predictions (red, score >= 0.3) and ground truth (green)."""
    boxes, labels, scores = [], [], []
    for t in batch.targets:
        sel = (dets.image_id == t["image_id"]) & (dets.scores >= 0.3)
        boxes.append(dets.boxes[sel])
        labels.append(dets.labels[sel])
        scores.append(dets.scores[sel])
    tracking.images_with_boxes(
        accelerator,
        "val/predictions",
        batch.images,
        boxes,
        labels,
        names,
        step,
        scores_list=scores,
        extra_boxes=[t["boxes"] for t in batch.targets],
    )
