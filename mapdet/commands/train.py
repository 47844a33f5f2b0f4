"""mapdet train --config FILE [--set section.key=value ...] [--resume auto|PATH]

Trains torchvision Faster R-CNN on packed shards. One process: ``python -m mapdet train ...``.
DDP: ``accelerate launch --config_file launch/accelerate/<topology>.yaml -m mapdet train ...``.

The run folder (train.out) gets config.yaml, checkpoints/step_N/, tensorboard/, export/ (plain
weights) and metrics_step_N.json from each validation. SIGTERM/SIGUSR1 -> checkpoint, exit 75.

Faults: corrupt training samples are skipped and counted for the whole job, per shard
(TensorBoard ``train/bad_samples/<shard>``, and the log); past train.max_bad_samples of the samples
read, training stops with a checkpoint and exit 1. Boxes the decoder had to clip or drop are
counted as ``train/sanitized_boxes``. A rank that dies or stops answering makes the others fail
their next collective (at once, or after train.timeout_s) with a one-line message and exit 1.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import timedelta
from pathlib import Path

import torch
from accelerate.utils import InitProcessGroupKwargs, set_seed
from tqdm import tqdm

from mapdet import comm, tracking
from mapdet.engine import checkpoint, preemption
from mapdet.modeling import trained
from mapdet.data.augment import BatchAugment
from mapdet.config import load_config, per_rank_batch, to_dict, to_yaml
from mapdet.data.loaders import TrainStream
from mapdet.engine.step import cuda_speedups, train_step
from mapdet.shards.manifest import class_instance_counts, class_names, classes_mismatch, coco_path, load_manifest
from mapdet.modeling.detector import build_model
from mapdet.engine.optim import make_optimizer, make_scheduler
from mapdet.evaluation.validation import metrics_dict, validate


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="experiment YAML (launch/configs/*.yaml); default: built-in defaults")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides, e.g. optim.lr=0.01 train.max_steps=500")
    p.add_argument("--resume", default="none", help="auto (latest checkpoint of train.out, if any) | none | PATH")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    run_dir = Path(cfg.train.out)
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.timeout_s))  # a dead rank ends the rest
    accelerator = comm.make_accelerator(mixed_precision=cfg.train.mixed_precision, log_with="tensorboard",
                                        project_dir=str(run_dir), kwargs_handlers=[timeout])
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    set_seed(cfg.train.seed + rank)  # per-rank: augmentation and sampling differ across ranks
    # A config that sets data.global_batch learns the same on any topology: the per-rank batch follows
    # the world size. Without it, fewer processes silently mean fewer images per step (and less learned).
    cfg.data.batch_size = per_rank_batch(cfg.data, world, cfg.optim.grad_accum)
    global_batch = world * cfg.data.batch_size * cfg.optim.grad_accum
    accelerator.print(f"global batch {global_batch} images per step = {world} process(es) x data.batch_size "
                      f"{cfg.data.batch_size} x optim.grad_accum {cfg.optim.grad_accum}; {comm.get_num_nodes()} node(s)")

    train_manifest = load_manifest(cfg.data.shards, cfg.data.train_split)
    names = class_names(train_manifest)
    model = build_model(cfg.model, len(names) + 1, class_instance_counts(train_manifest))
    cuda_speedups(model, device)  # channels-last weights and cudnn.benchmark on CUDA; nothing on the CPU
    optimizer = make_optimizer(model, cfg.optim)
    scheduler = make_scheduler(optimizer, cfg.optim, cfg.train.max_steps)  # stepped once per step, never prepared
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    step, batches_done, counters = 0, 0, {"skipped_steps": 0, "bad_samples": 0, "samples": 0, "bad_by_shard": {},
                                       "sanitized_boxes": 0}
    resume_from = checkpoint.resolve(run_dir, args.resume)
    if resume_from is not None:
        meta = checkpoint.load(resume_from, raw_model, optimizer, scheduler, accelerator.scaler)
        step, batches_done, counters = meta["step"], meta["batches"], {**counters, **meta["counters"]}
        accelerator.print(f"resumed from {resume_from} at step {step}")
    if step >= cfg.train.max_steps:
        accelerator.print(f"{run_dir} already finished {step} steps (train.max_steps={cfg.train.max_steps})")
        if accelerator.is_main_process and not (run_dir / "export" / "model.safetensors").exists():
            _export(raw_model, run_dir, cfg, names)  # killed after its last checkpoint, before the export
        tracking.finish(accelerator)
        return 0
    batches = _SanitizedTally(iter(TrainStream(cfg.data.shards, train_manifest, cfg.data, rank, world, cfg.train.seed, batches_done)))
    augment = BatchAugment(cfg.augment).to(device)
    val = _validation_inputs(cfg, accelerator, train_manifest)

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        preemption.clear_marker(run_dir)
    tracking.start(accelerator, to_yaml(cfg), to_dict(cfg))
    preemption.install()
    bar = tqdm(total=cfg.train.max_steps, initial=step, desc="train", unit="step", disable=not accelerator.is_main_process)
    nonfinite_in_row, exit_code = 0, 0
    try:
        while step < cfg.train.max_steps:
            # The step's one all-reduce also carries the sanitised-box tally and the preemption flag
            # (a signal on ANY rank makes every rank checkpoint this step and exit).
            res = train_step(accelerator, model, optimizer, scheduler, batches, augment, cfg.optim.grad_accum,
                             cfg.optim.clip_norm, shared=lambda: (batches.take(), preemption.requested()))
            sanitized, preempt_flags = res.shared
            step += 1
            batches_done += cfg.optim.grad_accum
            bar.update()
            nonfinite_in_row = nonfinite_in_row + 1 if res.skipped else 0
            counters["skipped_steps"] += res.skipped
            _report_bad(accelerator, res.bad, _count_samples(res, sanitized, counters), counters, step)
            if step % cfg.train.log_every == 0 or step == 1:
                _log_step(accelerator, res, scheduler, counters, world, step)
                bar.set_postfix(loss=f"{res.losses['loss']:.3f}")
            if cfg.train.image_log_every and step % cfg.train.image_log_every == 0 and res.last_images is not None:
                tracking.images_with_boxes(accelerator, "train/augmented", res.last_images[:2],
                                           [t["boxes"] for t in res.last_targets[:2]], [t["labels"] for t in res.last_targets[:2]], names, step)
            # Ranks must stop together or DDP hangs: every input of the decision is the same on all
            # ranks (the skip flag and the counts are summed over ranks, the bad entries gathered,
            # the counters restored from rank 0's checkpoint), so no rank can decide otherwise.
            stop = _stop_reason(cfg, counters, nonfinite_in_row)
            preempted = preempt_flags > 0
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps or preempted or stop:
                checkpoint.save(run_dir, step, raw_model, optimizer, scheduler, accelerator.scaler,
                                {"batches": batches_done, "counters": counters, "global_batch": global_batch,
                                 "processes": world}, cfg.train.keep_last)
            if preempted:
                accelerator.print(f"preempted ({preemption.reason() or 'signal on another rank'}): checkpoint at step {step} written; exiting {preemption.EXIT_PREEMPTED}")
                if accelerator.is_main_process:
                    preemption.write_marker(run_dir, step)
                exit_code = preemption.EXIT_PREEMPTED
                break
            if stop:
                accelerator.print(f"stopping at step {step}: {stop}")
                exit_code = 1
                break
            if val and (step == cfg.train.max_steps or (cfg.train.eval_every and step % cfg.train.eval_every == 0)):
                _validate(accelerator, raw_model, cfg, val, train_manifest, run_dir, step)
    except RuntimeError as e:
        if not _rank_failure(e):
            raise
        print(f"[rank {rank}] stopping at step {step}: a collective failed ({str(e).splitlines()[0][:300]}). Another "
              f"rank died or did not answer within train.timeout_s={cfg.train.timeout_s}. Checkpoints up to the last "
              f"complete one are kept: rerun with --resume auto", file=sys.stderr)
        return 1
    bar.close()
    _check_replicas(accelerator, raw_model)
    if exit_code == 0 and accelerator.is_main_process:
        _export(raw_model, run_dir, cfg, names)
    tracking.finish(accelerator)
    return exit_code


def _validation_inputs(cfg, accelerator, train_manifest: dict):
    """(manifest, COCO ground truth) of the validation split, or None when it is not packed or empty.
    Raises ValueError (exit 2, before any step) when its classes differ from training's: label ids are
    positions in the class list, so validation would score every class as another one."""
    try:
        manifest = load_manifest(cfg.data.shards, cfg.data.val_split)
    except ValueError:
        accelerator.print(f"no {cfg.data.val_split} split in {cfg.data.shards}: training without validation")
        return None
    if not manifest["num_samples"]:
        accelerator.print(f"the {cfg.data.val_split} split in {cfg.data.shards} has no images: training without validation")
        return None
    if why := classes_mismatch(train_manifest, manifest):
        raise ValueError(why)
    return manifest, json.loads(coco_path(cfg.data.shards, cfg.data.val_split).read_text())


def _validate(accelerator, raw_model, cfg, val, train_manifest, run_dir: Path, step: int) -> None:
    manifest, gt = val
    comm.broadcast_buffers(raw_model)  # every rank scores the model the checkpoint holds (rank 0's)
    v = validate(raw_model, accelerator.device, cfg.eval, cfg.data.shards, manifest, gt)
    metrics = metrics_dict(v, manifest, train_manifest)
    summary = metrics["bbox"]
    values = {f"val/{k}": summary[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")}
    values.update({f"val/AP_at_maxdets_{m}": ap for m, ap in summary["AP_at_maxdets"].items()})
    values.update({f"val/{k}": x for k, x in v.loss.items()})
    values.update({f"val_class_AP/{r['name']}": r["AP"] for r in summary["per_class"]})
    tracking.scalars(accelerator, values, step)
    if accelerator.is_main_process:
        (run_dir / f"metrics_step_{step:07d}.json").write_text(json.dumps(metrics, indent=1))
    accelerator.print(f"step {step}: val AP {summary['AP']:.4f} AP50 {summary['AP50']:.4f} loss {v.loss.get('loss', float('nan')):.4f}")


def _log_step(accelerator, res, scheduler, counters, world: int, step: int) -> None:
    values = {f"train/{k}": v for k, v in res.losses.items()}
    values.update({
        "train/lr": scheduler.get_last_lr()[0],
        "train/grad_norm": res.grad_norm,
        "train/images_per_s": res.images * world / max(res.step_time_s, 1e-9),
        "train/step_time_s": res.step_time_s,
        "train/data_wait": res.data_wait_s / max(res.step_time_s, 1e-9),
        "train/skipped_steps": counters["skipped_steps"],
        "train/bad_samples": counters["bad_samples"],
        "train/sanitized_boxes": counters["sanitized_boxes"],
    })
    values.update({f"train/bad_samples/{shard}": n for shard, n in counters["bad_by_shard"].items()})
    if torch.cuda.is_available():
        values["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    tracking.scalars(accelerator, {k: v for k, v in values.items() if math.isfinite(v)}, step)


class _SanitizedTally:
    """Passes training batches through, counting the boxes the decoder clipped or dropped (outside
    the image, without area, label outside 1..K) until ``take()``."""

    def __init__(self, batches):
        self.batches, self.count = batches, 0

    def __next__(self):
        batch = next(self.batches)
        self.count += sum(t["sanitized"] for t in batch.targets)
        return batch

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


def _count_samples(res, sanitized: float, counters: dict) -> list[dict]:
    """Add the images, sanitised boxes and corrupt samples of this step on ALL ranks to ``counters``
    (so every rank takes the same stop decision and TensorBoard shows the whole job); returns every
    rank's bad entries. The counts were summed over ranks in the step's all-reduce (``res.all_*``,
    ``sanitized``); the entries themselves are gathered only in a step where some rank met one."""
    bad = [b for part in comm.all_gather_object(res.bad) for b in part] if res.all_bad > 0 else []
    counters["samples"] += res.all_images
    counters["sanitized_boxes"] += round(sanitized)
    for b in bad:
        n = b.get("samples", 1)
        counters["bad_samples"] += n
        counters["bad_by_shard"][b["shard"]] = counters["bad_by_shard"].get(b["shard"], 0) + n
    return bad


def _report_bad(accelerator, mine: list[dict], everyone: list[dict], counters: dict, step: int) -> None:
    for b in mine:
        print(f"[rank {accelerator.process_index}] skipped bad sample in {b['shard']} ({b['key']}): {b['reason']}", file=sys.stderr)
    if everyone:
        accelerator.print(f"step {step}: {sum(b.get('samples', 1) for b in everyone)} corrupt sample(s) skipped; "
                          f"so far per shard: {_per_shard(counters)}")


def _per_shard(counters: dict) -> str:
    return ", ".join(f"{s} {n}" for s, n in sorted(counters["bad_by_shard"].items(), key=lambda x: -x[1]))


def _stop_reason(cfg, counters: dict, nonfinite_in_row: int) -> str:
    if nonfinite_in_row >= cfg.train.max_nonfinite:
        return (f"{nonfinite_in_row} steps in a row had a non-finite loss (train.max_nonfinite={cfg.train.max_nonfinite}); "
                "lower optim.lr, raise optim.warmup_steps or set optim.clip_norm")
    seen = counters["samples"] + counters["bad_samples"]
    if seen >= 50 and counters["bad_samples"] > cfg.train.max_bad_samples * seen:
        return (f"{counters['bad_samples']} of {seen} training samples were corrupt, above train.max_bad_samples="
                f"{cfg.train.max_bad_samples} (per shard: {_per_shard(counters)}); run `mapdet verify {cfg.data.shards}` "
                "and repack the shards it names")
    return ""


def _rank_failure(e: RuntimeError) -> bool:
    """A collective that failed because a peer died or timed out (gloo raises a plain RuntimeError)."""
    return isinstance(e, torch.distributed.DistError) or "gloo" in str(e)


def _check_replicas(accelerator, raw_model) -> None:
    """DDP keeps every rank's weights identical; say so, or fail loudly if they drifted.

    Parameters only: BatchNorm running statistics are updated locally by the last forward pass
    (DDP re-broadcasts rank 0's buffers at the start of each forward), and rank 0's are exported.
    """
    with torch.no_grad():
        total = float(sum(p.double().sum() for p in raw_model.parameters()))
    sums = comm.all_gather_object(total)
    if len(set(sums)) > 1:
        raise RuntimeError(f"model weights differ across ranks (checksums {sums}): DDP replicas diverged")
    accelerator.print(f"weights identical on all {len(sums)} rank(s) (checksum {sums[0]:.6f})")


def _export(raw_model, run_dir: Path, cfg, names: dict[int, str]) -> None:
    """Plain weights + classes.json with the model settings: enough for `mapdet predict --weights`."""
    trained.write_export(run_dir / "export", raw_model, cfg.model, names)
