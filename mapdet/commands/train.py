"""mapdet train --config FILE [--set section.key=value ...] [--resume auto|PATH]

Trains torchvision Faster R-CNN on packed shards. One process: ``python -m mapdet train ...``.
DDP: ``accelerate launch --config_file launch/accelerate/<topology>.yaml -m mapdet train ...``.

The run folder (train.out) gets config.yaml, checkpoints/step_N/, tensorboard/, export/ (plain
weights) and metrics_step_N.json from each validation. SIGTERM/SIGUSR1 -> checkpoint, exit 75.

Faults: corrupt training samples are skipped and counted for the whole job, per shard
(TensorBoard ``train/bad_samples/<shard>``, and the log); past train.max_bad_samples of the samples
read, training stops with a checkpoint and exit 1. Boxes the decoder had to clip or drop are
counted as ``train/sanitized_boxes``. A rank that dies or stops answering makes the others fail
their next collective (at once, or after train.timeout_s) with a one-line message and exit 1. A rank
that runs out of CUDA memory prints one line naming the settings to lower, leaves the process group
and exits 1 (no checkpoint: the last one stays as it was); the others fail their collective at once.
Settings out of range stop before anything runs (exit 2; README, Configuration reference).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

from accelerate.utils import InitProcessGroupKwargs, set_seed

from mapdet import comm, tracking
from mapdet.cli import add_config_arguments
from mapdet.config import load_config, per_rank_batch, to_dict, to_yaml
from mapdet.data.augment import BatchAugment
from mapdet.data.loaders import TrainStream
from mapdet.engine import checkpoint, preemption
from mapdet.engine.loop import LoopState, OutOfMemory, RankFailure, SanitizedTally, check_replicas, train_loop
from mapdet.engine.optim import make_optimizer, make_scheduler
from mapdet.engine.step import TrainParts, cuda_speedups
from mapdet.evaluation.validation import metrics_dict, validate
from mapdet.modeling import run_weights, trained
from mapdet.modeling.build import build_model
from mapdet.shards.manifest import (
    ManifestError,
    class_instance_counts,
    class_names,
    classes_mismatch,
    load_coco,
    load_manifest,
)
from mapdet.shards.source import shard_source


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p)
    p.add_argument("--resume", default="none", help="auto (latest checkpoint of train.out, if any) | none | PATH")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set, processes=comm.launched_processes())
    run_dir = Path(cfg.train.out)
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.timeout_s))  # a dead rank ends the rest
    accelerator = comm.make_accelerator(
        mixed_precision=cfg.train.mixed_precision,
        log_with="tensorboard",
        project_dir=str(run_dir),
        kwargs_handlers=[timeout],
    )
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    set_seed(cfg.train.seed + rank)  # per-rank: augmentation and sampling differ across ranks
    # A config that sets data.global_batch learns the same on any topology: the per-rank batch follows
    # the world size. Without it, fewer processes silently mean fewer images per step (and less learned).
    cfg.data.batch_size = per_rank_batch(cfg.data, world, cfg.optim.grad_accum)
    accelerator.print(
        f"global batch {world * cfg.data.batch_size * cfg.optim.grad_accum} images per step = "
        f"{world} process(es) x data.batch_size {cfg.data.batch_size} x optim.grad_accum "
        f"{cfg.optim.grad_accum}; {comm.get_num_nodes()} node(s)"
    )

    shards = shard_source(cfg.data.shards, cfg.data)  # a folder, a URL or a pipe: command
    train_manifest = load_manifest(shards, cfg.data.train_split)
    names = class_names(train_manifest)
    model = build_model(cfg.model, len(names) + 1, class_instance_counts(train_manifest))
    cuda_speedups(model, device)  # channels-last weights and cudnn.benchmark on CUDA; nothing on the CPU
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)  # stepped once per step, never prepared
    model, optimizer = accelerator.prepare(model, optimizer)
    parts = TrainParts(
        accelerator, model, accelerator.unwrap_model(model), optimizer, scheduler, BatchAugment(cfg.augment).to(device)
    )

    state = LoopState()
    resume_from = run_weights.resolve(run_dir, args.resume)
    if resume_from is not None:
        state = LoopState.from_meta(
            checkpoint.load(resume_from, parts.raw_model, optimizer, scheduler, accelerator.scaler)
        )
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    if state.step >= cfg.train.max_steps:
        accelerator.print(f"{run_dir} already finished {state.step} steps (train.max_steps={cfg.train.max_steps})")
        if accelerator.is_main_process and not (run_dir / "export" / "model.safetensors").exists():
            # killed after its last checkpoint, before the export
            _export(parts.raw_model, run_dir, cfg, train_manifest["classes"])
        tracking.finish(accelerator)
        return 0
    stream = TrainStream(shards, train_manifest, cfg.data, rank, world, cfg.train.seed, state.batches)
    val = _validation_inputs(cfg, accelerator, shards, train_manifest)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        preemption.clear_marker(run_dir)
    tracking.start(accelerator, to_yaml(cfg), to_dict(cfg))
    preemption.install()
    validate_at = (
        partial(_validate, accelerator, parts.raw_model, cfg, shards, val, train_manifest, run_dir) if val else None
    )
    try:
        exit_code = train_loop(parts, SanitizedTally(iter(stream)), cfg, state, run_dir, names, validate_at)
    except (RankFailure, OutOfMemory) as e:  # one line; no checkpoint can be written together any more
        print(e, file=sys.stderr, flush=True)
        if isinstance(e, OutOfMemory):
            comm.leave()  # the other ranks wait for this one in a collective: let it fail now
        preemption.uninstall()  # the launcher's SIGTERM, once a rank has exited, ends this one at once
        return 1
    check_replicas(accelerator, parts.raw_model)
    if exit_code == 0 and accelerator.is_main_process:
        _export(parts.raw_model, run_dir, cfg, train_manifest["classes"])
    tracking.finish(accelerator)
    return exit_code


def _validation_inputs(cfg, accelerator, shards, train_manifest: dict):
    """(manifest, COCO ground truth) of the validation split, or None when it is not packed or empty.
    Raises ValueError (exit 2, before any step) when its classes differ from training's: label ids are
    positions in the class list, so validation would score every class as another one."""
    try:
        manifest = load_manifest(shards, cfg.data.val_split)
    except ManifestError as e:
        accelerator.print(f"no {cfg.data.val_split} split ({e}): training without validation")
        return None
    if not manifest["num_samples"]:
        accelerator.print(
            f"the {cfg.data.val_split} split in {cfg.data.shards} has no images: training without validation"
        )
        return None
    if why := classes_mismatch(train_manifest, manifest):
        raise ValueError(why)
    return manifest, load_coco(shards, cfg.data.val_split)


def _validate(accelerator, raw_model, cfg, shards, val, train_manifest, run_dir: Path, step: int) -> None:
    """Validation at ``step``: metrics to TensorBoard, metrics_step_N.json and the log."""
    manifest, gt = val
    comm.broadcast_buffers(raw_model)  # every rank scores the model the checkpoint holds (rank 0's)
    v = validate(raw_model, accelerator.device, cfg.eval, shards, manifest, gt)
    metrics = metrics_dict(v, manifest, train_manifest)
    summary = metrics["bbox"]
    values = {f"val/{k}": summary[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")}
    values.update({f"val/AP_at_maxdets_{m}": ap for m, ap in summary["AP_at_maxdets"].items()})
    values.update({f"val/{k}": x for k, x in v.loss.items()})
    values.update({f"val_class_AP/{r['name']}": r["AP"] for r in summary["per_class"]})
    tracking.scalars(accelerator, values, step)
    if accelerator.is_main_process:
        (run_dir / f"metrics_step_{step:07d}.json").write_text(json.dumps(metrics, indent=1))
    accelerator.print(
        f"step {step}: val AP {summary['AP']:.4f} AP50 {summary['AP50']:.4f} "
        f"loss {v.loss.get('loss', float('nan')):.4f}"
    )


def _export(raw_model, run_dir: Path, cfg, classes: list[dict]) -> None:
    """Plain weights + classes.json with the model settings: enough for `mapdet predict --weights`."""
    trained.write_export(run_dir / "export", raw_model, cfg.model, classes)
